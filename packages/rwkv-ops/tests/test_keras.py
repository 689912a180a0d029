"""The dispatched op inside a Keras 3 layer: one `fit` step on CPU per Keras backend, each in its
own process (TensorFlow and Triton cannot share one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("keras_fit_script.py")


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_fit_step_in_keras_layer(backend):
    env = {k: v for k, v in os.environ.items() if k not in ("KERNEL_BACKEND", "KERNEL_TYPE")}
    env.update(KERAS_BACKEND=backend, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["keras_backend"] == backend and out["operator_backend"] == backend
    assert out["finite"] and out["loss"] > 0
    assert out["all_weights_changed"], "gradients did not reach every weight through the operator"
