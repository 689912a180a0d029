"""Serving entry points of rwkv_ops.torch against the float64 reference: the decode step (native
and the Triton decode kernel), variable-length batches and the inference-only op.

The Triton decode kernel runs on the GPU when one is visible, else on CPU tensors in Triton's
interpreter (conftest sets TRITON_INTERPRET=1). Inputs are fresh per run; the seed is in every
assertion message (RWKV_OPS_TEST_SEED=<seed> replays it).

Tolerances (relative Frobenius error per tensor, vs float64 on the dtype-rounded inputs): fp32
1e-5 with the model's decays and 2e-4 with decays down to 0 (the lambda floor's bound,
FLOAT32_TOL); bf16 outputs 4e-3 (o itself is rounded to 8 significant bits), the fp32 state of a
bf16 decode 1e-5 (only the inputs are bf16).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_errors, make_cotangents, make_inputs,
                                    override_config, rel_error, seed_for)
from rwkv_ops.torch import decode, inference, varlen
from rwkv_ops.torch.api import generalized_delta_rule

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "ds0")
# the interpreter reports exp overflowing to inf for huge w (d = 0 exactly, as intended)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _step_slices(x, t, head_first, dtype, device=DEVICE):
    axis = 2 if head_first else 1
    return [torch.tensor(np.take(x[n], [t], axis=axis), dtype=dtype, device=device) for n in NAMES]


def run_decode_chain(step, x, T, head_first, dtype=torch.float32, inplace=False, device=DEVICE):
    """Chain ``step`` over T steps; returns (o stacked along T in the inputs' layout, final state)."""
    state = torch.tensor(x["initial_state"], dtype=torch.float32, device=device)
    outs = []
    for t in range(T):
        o, new = step(*_step_slices(x, t, head_first, dtype, device), state, head_first,
                      inplace=inplace)
        if inplace:
            assert new is state
        outs.append(o)
        state = new
    return torch.cat(outs, dim=2 if head_first else 1), state


def _reference(x, dtype, head_first=False):
    rounded = [torch.tensor(x[n], dtype=dtype).double().numpy() for n in NAMES]
    return rounded, generalized_delta_rule_reference(*rounded, x["initial_state"], True, head_first)


# ---------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("decays", ["model", "full"])
@pytest.mark.parametrize("head_first", [False, True])
def test_decode_native_chain(decays, head_first, request):
    seed = seed_for(request)
    T = 20
    x = make_inputs(2, T, 3, 24, seed=seed, decays=decays, head_first=head_first)
    o, state = run_decode_chain(decode.decode_native, x, T, head_first, device="cpu")
    _, (y_ref, s_ref) = _reference(x, torch.float32, head_first)
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_errors({"y": rel_error(o.numpy(), y_ref), "state": rel_error(state.numpy(), s_ref)},
          FLOAT32_TOL[decays], seed)


@pytest.mark.parametrize("K", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_decode_triton_chain(K, dtype, inplace, poison_empty, request):
    seed = seed_for(request)
    T = 20 if HAS_CUDA else 6
    head_first = inplace          # both layouts, without doubling the interpreter's work
    x = make_inputs(3, T, 2, K, seed=seed, decays="full", head_first=head_first)
    o, state = run_decode_chain(decode.decode_triton, x, T, head_first, dtype, inplace)
    _, (y_ref, s_ref) = _reference(x, dtype, head_first)
    assert o.dtype == dtype and state.dtype == torch.float32
    tol_y = FLOAT32_TOL["full"] if dtype == torch.float32 else 4e-3
    errors = {"y": rel_error(o.float().cpu().numpy(), y_ref),
              "state": rel_error(state.cpu().numpy(), s_ref)}
    assert_errors(errors, tol_y, seed)
    assert_errors({"state": errors["state"]}, FLOAT32_TOL["full"], seed)


def test_decode_triton_broadcast_state(poison_empty, request):
    seed = seed_for(request)
    x = make_inputs(3, 1, 2, 32, seed=seed, state_batch=1)
    ts = _step_slices(x, 0, False, torch.float32)
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE)
    o, state = decode.decode_triton(*ts, s0)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert state.shape == (3, 2, 32, 32)
    assert_errors({"y": rel_error(o.cpu().numpy(), y_ref), "state": rel_error(state.cpu().numpy(), s_ref)},
          FLOAT32_TOL["model"], seed)
    with pytest.raises(ValueError, match="inplace=True needs a state of shape"):
        decode.decode_triton(*ts, s0, inplace=True)


def test_decode_triton_equals_native(request):
    """Kernel and native update agree to fp32 rounding on one step (both layouts in memory)."""
    seed = seed_for(request)
    x = make_inputs(2, 1, 3, 64, seed=seed, decays="full")
    ts = _step_slices(x, 0, False, torch.float32)
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE)
    o1, s1 = decode.decode_triton(*ts, s0)
    o2, s2 = decode.decode_native(*ts, s0)
    assert rel_error(o1.cpu().numpy(), o2.cpu().numpy()) < 1e-6, f"seed={seed}"
    assert rel_error(s1.cpu().numpy(), s2.cpu().numpy()) < 1e-6, f"seed={seed}"


@pytest.mark.parametrize("decays", ["model", "full"])
def test_decode_gradients(decays, request):
    """Three chained native steps under autograd vs the reference backward of the T = 3 sequence."""
    seed = seed_for(request)
    B, T, H, K = 2, 3, 2, 16
    x = make_inputs(B, T, H, K, seed=seed, decays=decays)
    ts = [torch.tensor(x[n], requires_grad=True) for n in NAMES]    # float64 leaves
    leaves = [t.float().detach().requires_grad_() for t in ts]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, requires_grad=True)
    state, outs = s0, []
    for t in range(T):
        o, state = decode.rwkv7_op_rnn(*(v[:, t:t + 1] for v in leaves), state)
        outs.append(o)
    o = torch.cat(outs, 1)
    do, dsT = make_cotangents(o.shape, state.shape, seed=seed)
    grads = torch.autograd.grad([o, state], leaves + [s0],
                                [torch.tensor(do, dtype=torch.float32),
                                 torch.tensor(dsT, dtype=torch.float32)])
    rounded = [v.detach().double().numpy() for v in leaves]
    refs = generalized_delta_rule_backward(*rounded, x["initial_state"], do=do, dfinal_state=dsT)
    errors = {n: rel_error(g.numpy(), ref) for n, g, ref in zip(GRAD_NAMES, grads, refs)}
    assert_errors(errors, FLOAT32_TOL[decays], seed)


def test_decode_dispatch_and_inplace(request):
    seed = seed_for(request)
    x = make_inputs(2, 1, 2, 32, seed=seed)
    ts = _step_slices(x, 0, False, torch.float32)
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE)
    o_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    state = s0.clone()
    o, new = decode.rwkv7_op_rnn(*ts, state, inplace=True)
    assert new is state
    assert_errors({"y": rel_error(o.cpu().numpy(), o_ref), "state": rel_error(state.cpu().numpy(), s_ref)},
          FLOAT32_TOL["model"], seed)
    assert decode.generalized_delta_rule_single_step is decode.rwkv7_op_rnn
    # a gradient request takes the native path on every device, and gets its gradient
    leaf = s0.clone().requires_grad_()
    _, new = decode.rwkv7_op_rnn(*ts, leaf)
    assert new.grad_fn is not None
    # float64 stays float64
    o64, s64 = decode.rwkv7_op_rnn(*(t.double() for t in ts), s0.double())
    assert o64.dtype == torch.float64 and s64.dtype == torch.float64


def test_decode_errors():
    xs = [torch.randn(2, 1, 2, 32) for _ in NAMES]
    state = torch.randn(2, 2, 32, 32)
    with pytest.raises(ValueError, match="single step takes inputs of layout"):
        decode.rwkv7_op_rnn(*(torch.randn(2, 3, 2, 32) for _ in NAMES), state)
    with pytest.raises(ValueError, match="`initial_state` has shape"):
        decode.rwkv7_op_rnn(*xs, torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="floating dtype"):
        decode.rwkv7_op_rnn(*xs[:5], xs[5].to(torch.int32), state)
    with pytest.raises(ValueError, match="inplace=True needs a state of shape"):
        decode.rwkv7_op_rnn(*xs, state[:1], inplace=True)
    with pytest.raises(KernelUnavailableError, match="32, 64, 128"):
        decode.decode_triton(*(torch.randn(2, 1, 2, 48) for _ in NAMES), torch.randn(2, 2, 48, 48))
    on_device = [x.to(DEVICE) for x in xs]
    with pytest.raises(KernelUnavailableError, match="float32"):
        decode.decode_triton(*on_device, state.to(DEVICE).double())


# ---------------------------------------------------------------------------------------------
# variable-length batches

LENGTHS = (5, 16, 33, 1)


def _varlen_case(seed, lengths, H=2, K=32, decays="model"):
    """Packed inputs of the given lengths and each sequence's own float64 data."""
    per_seq = [make_inputs(1, n, H, K, seed=seed + i, decays=decays) for i, n in enumerate(lengths)]
    packed = {n: np.concatenate([s[n] for s in per_seq], axis=1) for n in NAMES}
    packed["initial_state"] = np.concatenate([s["initial_state"] for s in per_seq], axis=0)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return packed, per_seq, cu


def check_varlen(seed, lengths, kernel_type=None, H=2, K=32, decays="model"):
    """Packed forward + backward vs each sequence's float64 reference (outputs, final states and
    the gradients of r, w, k, v, a, b and the initial states)."""
    packed, per_seq, cu = _varlen_case(seed, lengths, H, K, decays)
    ts = [torch.tensor(packed[n], dtype=torch.float32, device=DEVICE, requires_grad=True)
          for n in NAMES]
    s0 = torch.tensor(packed["initial_state"], dtype=torch.float32, device=DEVICE,
                      requires_grad=True)
    o, final = varlen.generalized_delta_rule_varlen(*ts, torch.tensor(cu), s0,
                                                    kernel_type=kernel_type)
    assert o.shape == ts[0].shape and final.shape == s0.shape
    do, dsT = make_cotangents(o.shape, final.shape, seed=seed)
    grads = torch.autograd.grad([o, final], ts + [s0],
                                [torch.tensor(do, dtype=torch.float32, device=DEVICE),
                                 torch.tensor(dsT, dtype=torch.float32, device=DEVICE)])
    grads = [g.cpu().numpy() for g in grads]
    errors = {}
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        xs = [x[n] for n in NAMES]
        y_ref, s_ref = generalized_delta_rule_reference(*xs, x["initial_state"])
        refs = generalized_delta_rule_backward(*xs, x["initial_state"], do=do[:, lo:hi],
                                               dfinal_state=dsT[i:i + 1])
        errors[f"state{i}"] = rel_error(final[i:i + 1].detach().cpu().numpy(), s_ref)
        errors[f"ds0_{i}"] = rel_error(grads[6][i:i + 1], refs[6])
        if hi > lo:
            errors[f"y{i}"] = rel_error(o[:, lo:hi].detach().cpu().numpy(), y_ref)
            for name, g, ref in zip(GRAD_NAMES[:6], grads, refs):
                errors[f"{name}{i}"] = rel_error(g[:, lo:hi], ref)
    assert_errors(errors, FLOAT32_TOL[decays], seed)


# "triton": the kernels on the packed layout (on CPU tensors in the interpreter); "native": the
# padded gather around the dense op
VARLEN_KERNELS = ("native", "triton")


@pytest.mark.parametrize("kernel_type", VARLEN_KERNELS)
@pytest.mark.parametrize("lengths", [LENGTHS, (3, 0, 17), (9, 9, 9)])
def test_varlen_matches_each_sequence(lengths, kernel_type, poison_empty, request):
    check_varlen(seed_for(request), lengths, kernel_type)


@pytest.mark.parametrize("cps", [1, 2])
def test_varlen_triton_segments(cps, monkeypatch, poison_empty, request):
    """The segment split forced on: segments past a short sequence's end are identity segments."""
    from rwkv_ops.torch import triton_launcher

    override_config(monkeypatch, triton_launcher, chunks_per_segment=cps)
    check_varlen(seed_for(request), (20, 0, 53, 7), "triton")


def test_varlen_triton_all_empty(request):
    xs = [torch.zeros(1, 0, 2, 32, device=DEVICE) for _ in NAMES]
    s0 = torch.randn(2, 2, 32, 32, device=DEVICE)
    o, final = varlen.generalized_delta_rule_varlen(*xs, [0, 0, 0], s0, kernel_type="triton")
    assert o.shape == (1, 0, 2, 32) and torch.equal(final, s0)


def test_varlen_kernel_choice(monkeypatch):
    xs = [torch.randn(1, 10, 2, 32) for _ in NAMES]
    run = varlen.generalized_delta_rule_varlen
    with pytest.raises(ValueError, match="not valid"):
        run(*xs, [0, 4, 10], kernel_type="fast")
    # CPU tensors: the automatic choice is the native implementation, never the interpreter
    assert varlen.choose_kernel(None, "cpu", 32) == "native"
    odd = [torch.randn(1, 10, 2, 48, device=DEVICE) for _ in NAMES]
    with pytest.raises(KernelUnavailableError, match="32, 64, 128"):
        run(*odd, [0, 4, 10], kernel_type="triton")
    # an explicit request never falls back: CPU tensors outside the interpreter raise
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="KERNEL_TYPE='triton'"):
        run(*xs, [0, 4, 10], kernel_type="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel_type", [None, "triton"])
def test_varlen_gpu_sizes(kernel_type, request):
    """Longer sequences on the GPU (segments on through the automatic config: few heads)."""
    check_varlen(seed_for(request), (1000, 0, 17, 4100, 300), kernel_type, H=2, K=64)


def test_varlen_without_state(request):
    seed = seed_for(request)
    packed, per_seq, cu = _varlen_case(seed, (7, 20))
    ts = [torch.tensor(packed[n], dtype=torch.float32, device=DEVICE) for n in NAMES]
    o, final = varlen.generalized_delta_rule_varlen(*ts, cu.tolist(), output_final_state=True)
    o2, none = varlen.generalized_delta_rule_varlen(*ts, tuple(cu), output_final_state=False)
    assert none is None and torch.equal(o, o2)
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), None)
        assert_errors({"y": rel_error(o[:, lo:hi].cpu().numpy(), y_ref),
               "state": rel_error(final[i:i + 1].cpu().numpy(), s_ref)}, FLOAT32_TOL["model"], seed)


def test_varlen_errors():
    xs = [torch.randn(1, 10, 2, 32) for _ in NAMES]
    run = varlen.generalized_delta_rule_varlen
    with pytest.raises(ValueError, match=r"packed as \[1, total_T, H, K\].*batch 2"):
        run(*(torch.randn(2, 10, 2, 32) for _ in NAMES), [0, 4, 10])
    with pytest.raises(ValueError, match="non-decreasing.*entry 2"):
        run(*xs, [0, 6, 4, 10])
    with pytest.raises(ValueError, match="start at 0 and end at total_T = 10"):
        run(*xs, [1, 4, 10])
    with pytest.raises(ValueError, match="start at 0 and end at total_T = 10"):
        run(*xs, [0, 4, 9])
    with pytest.raises(ValueError, match="1-D of length N"):
        run(*xs, [[0, 10]])
    with pytest.raises(TypeError, match="integers"):
        run(*xs, torch.tensor([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"expected \[2, 2, 32, 32\].*N = 2"):
        run(*xs, [0, 4, 10], torch.zeros(1, 2, 32, 32))


# ---------------------------------------------------------------------------------------------
# inference-only op


@pytest.mark.parametrize("case", ["dense", "mask", "single_step", "varlen"])
def test_inference_equals_training_forward(case, request):
    seed = seed_for(request)
    T = 1 if case == "single_step" else 21
    x = make_inputs(2, T, 2, 32, seed=seed, mask="random" if case == "mask" else None)
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE, requires_grad=True)
          for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE, requires_grad=True)
    mask = None if x["mask"] is None else torch.tensor(x["mask"], device=DEVICE)
    if case == "varlen":
        packed = [t.reshape(1, 2 * T, 2, 32) for t in ts]
        cu = [0, T, 2 * T]
        o, s = inference.generalized_delta_rule_inference(*packed, s0, cu_seqlens=cu)
        o_train, s_train = varlen.generalized_delta_rule_varlen(*packed, cu, s0)
    else:
        o, s = inference.generalized_delta_rule_inference(*ts, s0, mask=mask)
        o_train, s_train = generalized_delta_rule(*ts, s0, mask=mask)
    assert o.grad_fn is None and s.grad_fn is None and not o.requires_grad
    assert o.dtype == o_train.dtype and s.dtype == s_train.dtype
    errors = {"y": rel_error(o.cpu().numpy(), o_train.detach().cpu().numpy()),
              "state": rel_error(s.cpu().numpy(), s_train.detach().cpu().numpy())}
    assert_errors(errors, 1e-6, seed)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                    mask=x["mask"])
    assert_errors({"y": rel_error(o.reshape(y_ref.shape).cpu().numpy(), y_ref),
           "state": rel_error(s.cpu().numpy(), s_ref)}, FLOAT32_TOL["model"], seed)
    with torch.inference_mode():
        o2, _ = inference.generalized_delta_rule_inference(*(t.detach() for t in ts), s0.detach(),
                                                           mask=mask)
    assert o2.shape == ts[0].shape


def test_inference_options():
    xs = [torch.randn(1, 10, 2, 32) for _ in NAMES]
    run = inference.generalized_delta_rule_inference
    with pytest.raises(ValueError, match="head_first=True is not supported"):
        run(*xs, head_first=True, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="either `mask`"):
        run(*xs, mask=torch.ones(1, 10, dtype=torch.bool), cu_seqlens=[0, 10])
    o, s = run(*(x[:, :1] for x in xs), output_final_state=False)
    assert s is None and o.shape == (1, 1, 2, 32)


# ---------------------------------------------------------------------------------------------
# GPU only


def _capture(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_decode_cuda_graph(request):
    """One in-place decode step captured once and replayed per token: the serving loop."""
    seed = seed_for(request)
    B, T, H, K = 4, 12, 3, 64
    x = make_inputs(B, T, H, K, seed=seed)
    steps = [_step_slices(x, t, False, torch.bfloat16) for t in range(T)]
    inputs = [t.clone() for t in steps[0]]
    state = torch.tensor(x["initial_state"], dtype=torch.float32, device="cuda")
    start = state.clone()
    graph, (o, _) = _capture(lambda: decode.rwkv7_op_rnn(*inputs, state, inplace=True))
    state.copy_(start)            # the warm-up and the capture itself may have stepped it
    ys = []
    for t in range(T):
        for dst, src in zip(inputs, steps[t]):
            dst.copy_(src)
        graph.replay()
        ys.append(o.clone())
    torch.cuda.synchronize()
    _, (y_ref, s_ref) = _reference(x, torch.bfloat16)
    errors = {"y": rel_error(torch.cat(ys, 1).float().cpu().numpy(), y_ref),
              "state": rel_error(state.cpu().numpy(), s_ref)}
    assert_errors(errors, 4e-3, seed)
    assert_errors({"state": errors["state"]}, FLOAT32_TOL["model"], seed)


@pytest.mark.gpu
def test_inference_shape_protocol_cuda(request):
    """bf16 at the protocol's error shape through the Triton forward, no checkpoints kept."""
    seed = seed_for(request)
    x = make_inputs(2, 256, 4, 64, seed=seed)
    ts = [torch.tensor(x[n], dtype=torch.bfloat16, device="cuda", requires_grad=True) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    o, s = inference.generalized_delta_rule_inference(*ts, s0)
    held = torch.cuda.memory_allocated() - base
    expected = o.numel() * o.element_size() + s.numel() * 4
    assert held <= expected + (1 << 20), f"inference kept {held} bytes, outputs are {expected}"
    _, (y_ref, s_ref) = _reference(x, torch.bfloat16)
    assert_errors({"y": rel_error(o.float().cpu().numpy(), y_ref),
           "state": rel_error(s.cpu().numpy(), s_ref)}, 3e-3, seed)
