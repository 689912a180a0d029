"""The environment-variable dispatcher. Each case runs in a fresh interpreter: the variables are
read once, when rwkv_ops is imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CLEAN = {k: v for k, v in os.environ.items() if k not in ("KERNEL_BACKEND", "KERAS_BACKEND", "KERNEL_TYPE")}


def run(code, **env):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(CLEAN, **env), timeout=300)
    return proc


def run_json(code, **env):
    proc = run(code, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernel_backend_numpy_dispatches_and_imports_nothing_else():
    out = run_json("""
        import json, os, sys
        import numpy as np
        from rwkv_ops import generalized_delta_rule, rwkv7_op, RWKV7_USE_KERNEL, BACKEND, get_generalized_delta_rule
        import rwkv_ops.numpy as backend
        from rwkv_ops.numpy.testing import make_inputs, rel_error
        inp = make_inputs(1, 20, 2, 8, seed=0)
        x = [inp[n].astype(np.float32) for n in "rwkvab"]
        o, s = generalized_delta_rule(*x)
        ref, _ = backend.generalized_delta_rule_reference(*x)
        print(json.dumps({
            "same_op": generalized_delta_rule is backend.generalized_delta_rule and rwkv7_op is generalized_delta_rule,
            "use_kernel": RWKV7_USE_KERNEL, "backend": BACKEND,
            "err": rel_error(o, ref),
            "keras_backend": os.environ.get("KERAS_BACKEND"),
            "getter": get_generalized_delta_rule(64)[0] is backend.generalized_delta_rule,
            "loaded": sorted(m for m in ("torch", "jax", "tensorflow", "keras", "triton") if m in sys.modules),
        }))
    """, KERNEL_BACKEND="numpy")
    assert out["same_op"] and out["getter"] and out["use_kernel"] is False and out["backend"] == "numpy"
    assert out["err"] < 1e-5
    assert out["keras_backend"] == "numpy"  # KERAS_BACKEND follows KERNEL_BACKEND before Keras loads
    assert out["loaded"] == []


def test_keras_backend_selects_when_kernel_backend_unset():
    out = run_json("""
        import json, rwkv_ops
        print(json.dumps(rwkv_ops.BACKEND))
    """, KERAS_BACKEND="numpy")
    assert out == "numpy"


def test_default_backend_is_torch():
    out = run_json("""
        import json, sys, rwkv_ops
        op = rwkv_ops.generalized_delta_rule
        print(json.dumps([rwkv_ops.BACKEND, op.__module__, "jax" in sys.modules, "tensorflow" in sys.modules]))
    """)
    assert out[0] == "torch" and out[1].startswith("rwkv_ops.torch")
    assert out[2] is False and out[3] is False


@pytest.mark.parametrize("name", ["KERNEL_BACKEND", "KERAS_BACKEND", "KERNEL_TYPE"])
def test_invalid_values_raise_value_error_listing_valid_values(name):
    proc = run("from rwkv_ops import generalized_delta_rule", **{name: "mxnet"})
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr
    assert f"{name}='mxnet' is not valid; valid values are:" in proc.stderr
    assert ("triton, cuda, native" if name == "KERNEL_TYPE" else "torch, jax, tensorflow, numpy") in proc.stderr


def test_backend_packages_import_without_dispatcher_errors():
    """A bad variable must not break direct use of a backend package."""
    proc = run("import rwkv_ops.numpy as n; print(n.available_kernel_types())", KERNEL_TYPE="mxnet")
    assert proc.returncode == 0, proc.stderr


def test_explicit_unavailable_kernel_type_says_why():
    proc = run("from rwkv_ops import generalized_delta_rule", KERNEL_BACKEND="numpy", KERNEL_TYPE="triton")
    assert proc.returncode != 0
    assert "KernelUnavailableError" in proc.stderr
    assert "numpy backend has no 'triton' implementation; it offers: native" in proc.stderr


def test_conflicting_backends_warn_and_follow_kernel_backend():
    proc = run("""
        import warnings
        warnings.simplefilter("always")
        import rwkv_ops
        print(rwkv_ops.BACKEND)
    """, KERNEL_BACKEND="numpy", KERAS_BACKEND="jax")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "numpy"
    assert "KERNEL_BACKEND=numpy and KERAS_BACKEND=jax differ" in proc.stderr


def test_missing_backend_names_install_command(tmp_path):
    """Hide the jax portion of the namespace, as if rwkv-ops-jax were not installed."""
    proc = run("""
        import rwkv_ops
        rwkv_ops.__path__[:] = [p for p in rwkv_ops.__path__ if "rwkv-ops-jax" not in p and "jax" not in __import__("os").listdir(p)]
        from rwkv_ops import generalized_delta_rule
    """, KERNEL_BACKEND="jax")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and "pip install rwkv-ops-jax" in proc.stderr


def test_serving_entry_points_are_dispatched():
    out = run_json("""
        import json
        import rwkv_ops, rwkv_ops.numpy as backend
        names = ["generalized_delta_rule_inference", "generalized_delta_rule_varlen", "rwkv7_op_rnn",
                 "generalized_delta_rule_single_step", "available_kernel_types"]
        print(json.dumps([getattr(rwkv_ops, n) is getattr(backend, n) for n in names]))
    """, KERNEL_BACKEND="numpy")
    assert all(out)
