"""The public face of rwkv_ops.tensorflow: names, kernel-type selection and its errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import tensorflow as tf

import rwkv_ops.tensorflow as rt
from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.numpy.reference import generalized_delta_rule_reference
from rwkv_ops.numpy.testing import NAMES, make_inputs, rel_error, seed_from_env

SEED = seed_from_env()


def test_exports_and_version():
    assert rt.__version__ == "0.1.0"
    for name in ("generalized_delta_rule", "rwkv7_op", "get_generalized_delta_rule",
                 "available_kernel_types"):
        assert name in rt.__all__ and callable(getattr(rt, name))
    assert rt.rwkv7_op is rt.generalized_delta_rule
    assert "TensorFlow" in rt.generalized_delta_rule.__doc__
    assert "KERNEL_TYPE" in rt.get_generalized_delta_rule.__doc__


def test_no_torch_or_triton_imported():
    # TensorFlow and Triton abort when they share a process: this package must never pull either in.
    assert "triton" not in sys.modules and "torch" not in sys.modules


def test_available_kernel_types():
    assert rt.available_kernel_types() == ["native"]


@pytest.mark.parametrize("kernel_type", [None, "native"])
@pytest.mark.parametrize("head_size", [16, 64, 7])
def test_native_is_selected_and_runs(kernel_type, head_size):
    op, use_kernel = rt.get_generalized_delta_rule(head_size, kernel_type)
    assert op is rt.generalized_delta_rule and use_kernel is False
    B, T, H, K = 1, 18, 1, head_size
    x = make_inputs(B, T, H, K, seed=SEED)
    o, s = op(*(tf.constant(x[n], tf.float32) for n in NAMES), x["initial_state"].astype(np.float32))
    ref_o, ref_s = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    for name, got, ref in (("o", o, ref_o), ("final_state", s, ref_s)):
        err = rel_error(got, ref)
        assert err <= 1e-5, f"{name}: relative error {err:.3e} (RWKV_OPS_TEST_SEED={SEED})"


@pytest.mark.parametrize("kernel_type", ["triton", "cuda"])
def test_gpu_kernel_types_are_unavailable(kernel_type):
    with pytest.raises(KernelUnavailableError,
                       match=f"the tensorflow backend has no '{kernel_type}' implementation; "
                             "it offers: native"):
        rt.get_generalized_delta_rule(64, kernel_type)


@pytest.mark.parametrize("kernel_type", ["pallas", "Native", ""])
def test_unknown_kernel_type(kernel_type):
    with pytest.raises(ValueError, match="is not valid; valid values are: triton, cuda, native"):
        rt.get_generalized_delta_rule(64, kernel_type)
