"""Validation messages, environment rules and kernel-type selection (framework-free)."""

import warnings

import pytest

from rwkv_ops.common import (
    KernelUnavailableError,
    TensorInfo,
    check_head_size,
    check_inputs,
    check_single_step_inputs,
    choose_kernel_type,
    read_environment,
)
from rwkv_ops.common import selection


def info(shape, floating=True, dtype="float32", device="cpu", integer=False):
    return TensorInfo(tuple(shape), floating, dtype, device, integer)


def six(shape=(2, 5, 3, 8), **kw):
    return [info(shape, **kw) for _ in range(6)]


def test_valid_call_returns_sizes():
    p = check_inputs(*six(), info((1, 3, 8, 8)), info((2, 5), floating=False, dtype="bool", integer=True))
    assert (p.B, p.T, p.H, p.K, p.state_batch, p.has_mask) == (2, 5, 3, 8, 1, True)
    p = check_inputs(*six((2, 3, 5, 8)), head_first=True)
    assert (p.B, p.T, p.H, p.K) == (2, 5, 3, 8)


def test_rank_error_names_argument_and_layout():
    with pytest.raises(ValueError, match=r"`r` must have rank 4 .*\[B, T, H, K\].*got shape \[2, 5, 8\]"):
        check_inputs(*six((2, 5, 8)))


def test_shape_mismatch_names_argument_received_and_expected():
    args = six()
    args[3] = info((2, 5, 3, 16))
    with pytest.raises(ValueError, match=r"`v` has shape \[2, 5, 3, 16\] but expected \[2, 5, 3, 8\].*V must equal"):
        check_inputs(*args)
    args = six()
    args[1] = info((2, 6, 3, 8))
    with pytest.raises(ValueError, match=r"`w` has shape \[2, 6, 3, 8\] but expected \[2, 5, 3, 8\]"):
        check_inputs(*args)


def test_state_and_mask_shapes():
    with pytest.raises(ValueError, match=r"`initial_state` has shape \[2, 3, 8, 4\] but expected \[2, 3, 8, 8\] or \[1, 3, 8, 8\]"):
        check_inputs(*six(), info((2, 3, 8, 4)))
    with pytest.raises(ValueError, match=r"`initial_state` has shape \[3, 3, 8, 8\]"):
        check_inputs(*six(), info((3, 3, 8, 8)))
    # with B = 1 the broadcast shape is the expected one: named once
    with pytest.raises(ValueError, match=r"has shape \[1, 3, 8, 4\] but expected \[1, 3, 8, 8\]\.$"):
        check_inputs(*six((1, 5, 3, 8)), info((1, 3, 8, 4)))
    with pytest.raises(ValueError, match=r"`mask` has shape \[2, 4\] but expected \[2, 5\]"):
        check_inputs(*six(), None, info((2, 4)))


def test_dtype_errors():
    args = six()
    args[2] = info((2, 5, 3, 8), floating=False, dtype="int32", integer=True)
    with pytest.raises(TypeError, match="`k` must have a floating dtype.*got int32"):
        check_inputs(*args)
    with pytest.raises(TypeError, match="`initial_state` must have a floating dtype"):
        check_inputs(*six(), info((2, 3, 8, 8), floating=False, dtype="int64", integer=True))
    with pytest.raises(TypeError, match="`mask` must be boolean, integer or floating"):
        check_inputs(*six(), None, info((2, 5), floating=False, dtype="complex64"))
    with pytest.raises(TypeError, match="`head_first` must be a bool"):
        check_inputs(*six(), head_first=1)


def test_device_mismatch():
    args = six()
    args[4] = info((2, 5, 3, 8), device="cuda:0")
    with pytest.raises(ValueError, match="one device.*a on cuda:0"):
        check_inputs(*args)


def test_single_step_requires_t1():
    check_single_step_inputs(*six((2, 1, 3, 8)), info((2, 3, 8, 8)))
    with pytest.raises(ValueError, match=r"single step takes inputs of layout \[B, 1, H, K\].*T = 5"):
        check_single_step_inputs(*six(), info((2, 3, 8, 8)))


def test_head_size_message():
    assert check_head_size(64, (32, 64, 128), "triton") is None
    assert "K in {32, 64, 128}, got K = 48" in check_head_size(48, (32, 64, 128), "triton")


@pytest.mark.parametrize(
    "env, backend, kernel_type, keras",
    [
        ({}, "torch", None, None),
        ({"KERAS_BACKEND": "jax"}, "jax", None, None),
        ({"KERNEL_BACKEND": "tensorflow"}, "tensorflow", None, "tensorflow"),
        ({"KERNEL_BACKEND": "numpy", "KERAS_BACKEND": "numpy", "KERNEL_TYPE": "native"}, "numpy", "native", None),
        ({"KERNEL_TYPE": " Triton "}, "torch", "triton", None),
    ],
)
def test_environment_priority(env, backend, kernel_type, keras):
    e = read_environment(env)
    assert (e.backend, e.kernel_type, e.keras_backend) == (backend, kernel_type, keras)
    assert e.warnings == ()


def test_environment_conflict_warns():
    e = read_environment({"KERNEL_BACKEND": "jax", "KERAS_BACKEND": "torch"})
    assert e.backend == "jax" and "follows KERNEL_BACKEND (jax)" in e.warnings[0]


@pytest.mark.parametrize("name", ["KERNEL_BACKEND", "KERAS_BACKEND", "KERNEL_TYPE"])
def test_environment_invalid_values_list_valid_ones(name):
    with pytest.raises(ValueError, match=f"{name}='bogus' is not valid; valid values are: "):
        read_environment({name: "bogus"})


def test_choose_kernel_type():
    cands = [("triton", "no CUDA GPU is visible", True), ("cuda", "nvcc not found", False), ("native", None)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet reasons: no warning
        assert choose_kernel_type("torch", None, [cands[0], cands[2]]) == "native"
    assert choose_kernel_type("torch", "native", cands) == "native"
    with pytest.raises(KernelUnavailableError, match="KERNEL_TYPE='triton' cannot run here with torch: no CUDA GPU"):
        choose_kernel_type("torch", "triton", cands)
    with pytest.raises(KernelUnavailableError, match="tensorflow backend has no 'cuda' implementation; it offers: native"):
        choose_kernel_type("tensorflow", "cuda", [("native", None)])
    with pytest.raises(ValueError, match="KERNEL_TYPE='fast' is not valid"):
        choose_kernel_type("torch", "fast", cands)
    selection._warned.clear()
    with pytest.warns(RuntimeWarning, match="falls back to the native implementation.*cuda: nvcc not found"):
        assert choose_kernel_type("torch", None, cands) == "native"
