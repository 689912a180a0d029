"""The public face of rwkv_ops.torch: names, kernel selection and its errors.

On a machine without a CUDA GPU (CI) every GPU kernel type must be reported unavailable with a
reason; selection for CUDA tensors is exercised by replacing ``kernel_reason`` with fakes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import warnings

import pytest
import torch

import rwkv_ops.torch as rt
from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.numpy.testing import make_inputs, seed_from_env
from rwkv_ops.torch import api, native

SEED = seed_from_env()
NAMES = ("r", "w", "k", "v", "a", "b")
NO_GPU = not torch.cuda.is_available()


@pytest.fixture
def no_interpreter(monkeypatch):
    """The machine as users see it: the test session may run Triton in its CPU interpreter."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def inputs(T=21, K=16, dtype=torch.float32):
    x = make_inputs(2, T, 2, K, seed=SEED)
    return [torch.tensor(x[n], dtype=dtype) for n in NAMES], torch.tensor(x["initial_state"],
                                                                          dtype=torch.float32)


def test_exports():
    assert rt.__version__ == "0.1.0"
    assert rt.rwkv7_op is rt.generalized_delta_rule
    for name in ("generalized_delta_rule", "rwkv7_op", "get_generalized_delta_rule",
                 "available_kernel_types"):
        assert name in rt.__all__ and callable(getattr(rt, name))
    assert "generalized delta rule (PyTorch" in rt.generalized_delta_rule.__doc__
    assert "KERNEL_TYPE" in rt.get_generalized_delta_rule.__doc__


def test_import_does_not_import_triton():
    code = "import sys, rwkv_ops.torch; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_unknown_kernel_type_lists_valid_values():
    with pytest.raises(ValueError) as info:
        rt.get_generalized_delta_rule(64, "tritonn")
    assert "KERNEL_TYPE='tritonn' is not valid" in str(info.value)
    assert "triton, cuda, native" in str(info.value)


@pytest.mark.skipif(not NO_GPU, reason="checks the GPU-less error; this machine has a CUDA GPU")
@pytest.mark.parametrize("kernel_type", ["triton", "cuda"])
def test_explicit_gpu_kernel_without_gpu_says_why(kernel_type, no_interpreter):
    with pytest.raises(KernelUnavailableError) as info:
        rt.get_generalized_delta_rule(64, kernel_type)
    message = str(info.value)
    prefix = f"KERNEL_TYPE='{kernel_type}' cannot run here with torch: "
    assert prefix in message
    assert len(message.split(prefix, 1)[1].strip(" .")) > 5, message  # a reason, not nothing


@pytest.mark.skipif(not NO_GPU, reason="only native runs on a GPU-less machine")
def test_available_kernel_types_here(no_interpreter):
    assert rt.available_kernel_types() == ["native"]
    assert rt.available_kernel_types(64) == ["native"]


def test_available_kernel_types_end_with_native():
    assert rt.available_kernel_types()[-1] == "native"
    assert rt.available_kernel_types(7)[-1] == "native"


def test_explicit_native_any_head_size():
    op, use_kernel = rt.get_generalized_delta_rule(7, "native")
    assert op is native.generalized_delta_rule and use_kernel is False
    xs, s0 = inputs(K=16)
    o, state = op(*xs, s0)
    assert torch.isfinite(o).all() and state.shape == (2, 2, 16, 16)


@pytest.mark.skipif(not NO_GPU, reason="on a GPU machine a kernel may back the automatic op")
def test_automatic_op_here_is_native():
    op, use_kernel = rt.get_generalized_delta_rule(64)
    assert op is rt.generalized_delta_rule and use_kernel is False


def test_automatic_op_on_cpu_tensors_equals_native():
    xs, s0 = inputs()
    mask = torch.rand(2, 21) < 0.8
    o, state = rt.generalized_delta_rule(*xs, s0, mask=mask)
    o_n, state_n = native.generalized_delta_rule(*xs, s0, mask=mask)
    assert torch.equal(o, o_n) and torch.equal(state, state_n), f"seed={SEED}"
    o, state = rt.rwkv7_op(*xs, output_final_state=False)
    assert state is None and o.shape == xs[0].shape


def test_automatic_op_validates_with_library_messages():
    xs, _ = inputs()
    with pytest.raises(ValueError, match="`initial_state` has shape"):
        rt.generalized_delta_rule(*xs, torch.zeros(2, 2, 16, 8))


def test_non_tensor_inputs_raise_type_error():
    """NumPy arrays (what a user of the default backend may pass) are refused with a TypeError
    that says what to do, by every torch entry point, instead of failing inside them."""
    xs, s0 = inputs()
    arrays = [x.numpy() for x in xs]
    calls = {
        "generalized_delta_rule": lambda: rt.generalized_delta_rule(*arrays),
        "native": lambda: native.generalized_delta_rule(*arrays),
        "initial_state": lambda: rt.generalized_delta_rule(*xs, s0.numpy()),
        "single step": lambda: rt.rwkv7_op_rnn(*(x[:, :1] for x in arrays), s0.numpy()),
        "varlen": lambda: rt.generalized_delta_rule_varlen(
            *(x[:1] for x in arrays), cu_seqlens=torch.tensor([0, 21], dtype=torch.int32)),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="takes torch.Tensor inputs, got numpy.ndarray"):
            call()


def test_missing_module_is_unavailable(monkeypatch):
    monkeypatch.setitem(api.KERNEL_MODULES, "triton", "rwkv_ops.torch.no_such_launcher")
    expected = ("not included in this build of rwkv-ops-torch", False)
    assert api.kernel_reason("triton", 64) == expected
    assert "triton" not in rt.available_kernel_types(64)


# Selection for CUDA tensors, with the availability of each kernel type faked.


def fake_reasons(monkeypatch, table):
    monkeypatch.setattr(api, "kernel_reason", lambda kernel_type, head_size: table[kernel_type])


def test_cuda_inputs_take_the_first_runnable_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake_reasons(monkeypatch, {"triton": (None, False), "cuda": (None, False),
                               "native": (None, False)})
    assert api._select("cuda", 64) == "triton"
    assert api._select("cpu", 64) == "native"
    assert api.get_generalized_delta_rule(64) == (api.generalized_delta_rule, True)
    fake_reasons(monkeypatch, {"triton": ("triton is not installed", False), "cuda": (None, False),
                               "native": (None, False)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # another GPU kernel is no fallback: nothing to say
        assert api._select("cuda", 64) == "cuda"
    assert api.get_generalized_delta_rule(64, "cuda")[1] is True


def test_unsupported_head_size_falls_back_with_one_warning(monkeypatch):
    reason = ("the triton kernels support head sizes K in {32, 64, 128}, got K = 48 "
              f"({uuid.uuid4()})")
    fake_reasons(monkeypatch, {"triton": (reason, False), "cuda": ("no CUDA GPU is visible", True),
                               "native": (None, False)})
    with pytest.warns(RuntimeWarning, match="falls back to the native implementation") as record:
        assert api._select("cuda", 48) == "native"
    assert reason in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api._select("cuda", 48) == "native"  # said once only
    with pytest.raises(KernelUnavailableError, match="got K = 48"):
        api.get_generalized_delta_rule(48, "triton")


def test_quiet_reasons_fall_back_silently(monkeypatch):
    fake_reasons(monkeypatch, {"triton": (f"no CUDA GPU {uuid.uuid4()}", True),
                               "cuda": (f"no CUDA GPU {uuid.uuid4()}", True),
                               "native": (None, False)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert api._select("cuda", 64) == "native"
        assert api.get_generalized_delta_rule(64) == (api.generalized_delta_rule, False)
