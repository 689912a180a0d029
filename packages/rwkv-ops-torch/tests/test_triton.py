"""The PyTorch Triton path against the float64 reference.

Every test body runs on the GPU when one is visible, and otherwise on CPU tensors in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), at smaller shapes. Inputs are fresh per run; the
seed is in every assertion message (RWKV_OPS_TEST_SEED=<seed> replays it).

Tolerances (relative Frobenius error per tensor, vs float64 on the dtype-rounded inputs):
fp32 1e-5 with the model's decays, 2e-4 with decays down to 0; fp16 2e-3 and bf16 4e-3 (the
outputs and gradients themselves are rounded to 10 / 7 mantissa bits; products run in tf32).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_same_storage_results, make_cotangents,
                                    make_inputs, override_config, rel_error, seed_from_env)
from rwkv_ops.torch import triton_launcher as launcher

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "ds0")
# The interpreter reports the overflowing products above each chunk's diagonal, which the kernels
# compute and then select away (never multiply by 0).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton")
TOL = {
    (torch.float32, "model"): FLOAT32_TOL["model"],
    (torch.float32, "full"): FLOAT32_TOL["full"],
    (torch.float16, "model"): 2e-3,
    (torch.float16, "full"): 3e-3,
    (torch.bfloat16, "model"): 4e-3,
    (torch.bfloat16, "full"): 6e-3,
    (torch.float64, "model"): 1e-5,
}

if HAS_CUDA:
    GRID = [(T, K) for T in (1, 15, 16, 17, 1000, 4096) for K in (32, 64, 128)]
    DTYPES = (torch.float32, torch.bfloat16, torch.float16)
else:
    GRID = [(T, K) for T in (1, 15, 16, 17, 40) for K in (32, 64)]
    DTYPES = (torch.float32, torch.bfloat16)


def _seed(request) -> int:
    return seed_from_env() + zlib.crc32(request.node.name.encode()) % 1000


def run_case(seed, B, T, H, K, dtype=torch.float32, decays="model", mask=None, head_first=False,
             initial_state=True, state_batch=None, output_final_state=True, dfinal=True,
             scales=None):
    """Kernel forward + backward vs the float64 reference; returns {name: relative error}.
    scales: {input name: factor} applied to the drawn inputs ("do" and "dfinal_state": to the
    cotangents)."""
    x = make_inputs(B, T, H, K, seed=seed, decays=decays, initial_state=initial_state,
                    state_batch=state_batch, head_first=head_first, mask=mask)
    scales = dict(scales or {})
    do_scale, dfinal_scale = scales.pop("do", 1.0), scales.pop("dfinal_state", 1.0)
    for name, factor in scales.items():
        x[name] = x[name] * factor
    ts = [torch.tensor(x[n], dtype=dtype, device=DEVICE, requires_grad=True) for n in NAMES]
    s0 = None
    if x["initial_state"] is not None:
        s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE,
                          requires_grad=True)
    m = None if x["mask"] is None else torch.tensor(x["mask"], device=DEVICE)
    o, final = launcher.generalized_delta_rule(*ts, s0, output_final_state, head_first, mask=m)
    rounded = [t.detach().double().cpu().numpy() for t in ts]
    y_ref, s_ref = generalized_delta_rule_reference(*rounded, x["initial_state"], True, head_first,
                                                    mask=x["mask"])
    do, dsT = make_cotangents(o.shape, (B, H, K, K), seed=seed)
    do, dsT = do * do_scale, dsT * dfinal_scale
    errors = {"y": rel_error(o.detach().double().cpu().numpy(), y_ref)}
    assert o.dtype == dtype and o.shape == ts[0].shape
    if output_final_state:
        assert final.dtype == torch.float32 and final.shape == (B, H, K, K)
        errors["state"] = rel_error(final.detach().cpu().numpy(), s_ref)
    else:
        assert final is None
        dfinal = False
    outs = [o] + ([final] if dfinal else [])
    cots = [torch.tensor(do, dtype=dtype, device=DEVICE)]
    if dfinal:
        cots.append(torch.tensor(dsT, dtype=torch.float32, device=DEVICE))
    inputs = ts + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(outs, inputs, cots)
    refs = generalized_delta_rule_backward(
        *rounded, x["initial_state"], do=cots[0].double().cpu().numpy(),
        dfinal_state=dsT if dfinal else None, head_first=head_first, mask=x["mask"])
    for name, g, ref in zip(GRAD_NAMES, grads, refs):
        assert g.dtype == (torch.float32 if name == "ds0" else dtype)
        errors[name] = rel_error(g.double().cpu().numpy(), ref)
    return errors


def check(errors, tol, seed):
    worst = max(errors, key=errors.get)
    listing = " ".join(f"{n}={e:.2e}" for n, e in errors.items())
    assert errors[worst] <= tol, f"seed={seed}: {worst} error {errors[worst]:.3e} > {tol:.0e} ({listing})"


@pytest.mark.parametrize("T,K", GRID)
def test_matches_reference_fp32(T, K, poison_empty, request):
    seed = _seed(request)
    check(run_case(seed, 2, T, 2, K), TOL[torch.float32, "model"], seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decays", ["model", "full"])
def test_dtypes_and_decays(dtype, decays, poison_empty, request):
    seed = _seed(request)
    T = 300 if HAS_CUDA else 33
    check(run_case(seed, 2, T, 2, 64 if HAS_CUDA else 32, dtype, decays), TOL[dtype, decays], seed)


@pytest.mark.parametrize("factor", [2.0 ** 16, 2.0 ** -20])
def test_input_magnitudes(factor, poison_empty, request):
    """r, k, a, v, the initial state and the cotangents scaled by the factor and b by its
    inverse: the prep tiles, the state checkpoints and the scans' product operands (the state,
    v, dy: fp16 with tf32 products, scaled by a power of two per chunk or row) then lie far
    outside fp16's range without their scales (above 65504, or in its subnormals)."""
    seed = _seed(request)
    T = 300 if HAS_CUDA else 33
    scales = dict(r=factor, k=factor, a=factor, v=factor, b=1.0 / factor, initial_state=factor,
                  do=factor, dfinal_state=factor)
    check(run_case(seed, 2, T, 2, 32, torch.bfloat16, scales=scales),
          TOL[torch.bfloat16, "model"], seed)


@pytest.mark.parametrize("mask", ["left", "right", "random"])
def test_mask(mask, poison_empty, request):
    seed = _seed(request)
    T = 257 if HAS_CUDA else 40
    check(run_case(seed, 3, T, 2, 32, mask=mask), TOL[torch.float32, "model"], seed)


def test_head_first_broadcast_state(poison_empty, request):
    seed = _seed(request)
    errors = run_case(seed, 3, 17, 2, 32, head_first=True, state_batch=1, mask="random")
    check(errors, TOL[torch.float32, "model"], seed)


@pytest.mark.parametrize("initial_state,output_final_state", [(False, True), (False, False),
                                                              (True, False)])
def test_optional_state(initial_state, output_final_state, poison_empty, request):
    seed = _seed(request)
    errors = run_case(seed, 2, 20, 2, 32, initial_state=initial_state,
                      output_final_state=output_final_state)
    check(errors, TOL[torch.float32, "model"], seed)


@pytest.mark.parametrize("cps", [1, 2])
def test_segments(cps, monkeypatch, poison_empty, request):
    """The segment algebra (per-segment local state + transition, combined), forced on."""
    override_config(monkeypatch, launcher, chunks_per_segment=cps)
    seed = _seed(request)
    errors = run_case(seed, 2, 80 if not HAS_CUDA else 1000, 2, 32, mask="random", state_batch=1,
                      decays="full")
    check(errors, TOL[torch.float32, "full"], seed)


@pytest.mark.parametrize("T,mask", [(48, None), (40, "random")])
def test_whole_and_tail_chunks(T, mask, poison_empty, request):
    """K = 64: whole chunks without a mask (the kernels' FULL mode: unmasked loads and stores)
    and a tail chunk with a mask."""
    seed = _seed(request)
    check(run_case(seed, 2, T, 2, 64, mask=mask), TOL[torch.float32, "model"], seed)


def test_float64_inputs(request):
    seed = _seed(request)
    x = make_inputs(1, 20, 2, 32, seed=seed)
    ts = [torch.tensor(x[n], device=DEVICE) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], device=DEVICE)
    o, final = launcher.generalized_delta_rule(*ts, s0)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert o.dtype == torch.float64 and final.dtype == torch.float64
    check({"y": rel_error(o.cpu().numpy(), y_ref), "state": rel_error(final.cpu().numpy(), s_ref)},
          TOL[torch.float64, "model"], seed)


def test_deterministic(request):
    seed = _seed(request)
    x = make_inputs(2, 40, 2, 32, seed=seed)
    results = []
    for _ in range(2):
        ts = [torch.tensor(x[n], dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
              for n in NAMES]
        s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE,
                          requires_grad=True)
        o, final = launcher.generalized_delta_rule(*ts, s0)
        grads = torch.autograd.grad((o.float().square().sum() + final.sum()), ts + [s0])
        results.append([o, final, *grads])
    for first, second in zip(*results):
        assert torch.equal(first, second), f"seed={seed}: two runs differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp16_storage_matches_fp32(dtype, monkeypatch, request):
    """With tf32 products the prep tiles and the state checkpoints are stored as fp16 scaled by
    powers of two (configs.tile_dtype); stored as fp32 instead, every output and gradient comes
    out the same up to the order of the products' sums (``assert_same_storage_results`` says how
    close)."""
    seed = _seed(request)
    x = make_inputs(2, 300 if HAS_CUDA else 40, 2, 32, seed=seed)
    do, dsT = make_cotangents((2, x["r"].shape[1], 2, 32), (2, 2, 32, 32), seed=seed)
    configs = launcher._kernels()[2]
    results = []
    for storage in ("float16", "float32"):
        monkeypatch.setattr(configs, "tile_dtype", lambda precision, _s=storage: _s)
        ts = [torch.tensor(x[n], dtype=dtype, device=DEVICE, requires_grad=True) for n in NAMES]
        s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE,
                          requires_grad=True)
        o, final = launcher.generalized_delta_rule(*ts, s0)
        grads = torch.autograd.grad((o, final), ts + [s0],
                                    (torch.tensor(do, dtype=dtype, device=DEVICE),
                                     torch.tensor(dsT, dtype=torch.float32, device=DEVICE)))
        results.append([o, final, *grads])
    for name, first, second in zip(("y", "state") + GRAD_NAMES, *results):
        assert_same_storage_results(name, first.detach().double().cpu().numpy(),
                                    second.detach().double().cpu().numpy(),
                                    fp32=name in ("state", "ds0"), seed=seed)


def test_empty_sequence():
    s0 = torch.randn(1, 2, 32, 32, device=DEVICE)
    xs = [torch.randn(2, 0, 2, 32, device=DEVICE) for _ in NAMES]
    o, final = launcher.generalized_delta_rule(*xs, s0)
    assert o.shape == (2, 0, 2, 32)
    assert torch.equal(final, s0.expand(2, 2, 32, 32))
    o, final = launcher.generalized_delta_rule(*xs)
    assert torch.equal(final, torch.zeros(2, 2, 32, 32, device=DEVICE))


def test_errors():
    xs = [torch.randn(1, 4, 2, 32, device=DEVICE) for _ in NAMES]
    with pytest.raises(ValueError, match="`k` has shape"):
        launcher.generalized_delta_rule(xs[0], xs[1], xs[2][..., :16], *xs[3:])
    with pytest.raises(ValueError, match="initial_state"):
        launcher.generalized_delta_rule(*xs, torch.zeros(1, 3, 32, 32, device=DEVICE))
    with pytest.raises(TypeError):
        launcher.generalized_delta_rule(*xs[:5], xs[5].to(torch.int32))
    odd = [torch.randn(1, 4, 2, 48, device=DEVICE) for _ in NAMES]
    with pytest.raises(KernelUnavailableError, match="32, 64, 128"):
        launcher.generalized_delta_rule(*odd)


def test_unavailable_reason():
    reason, _ = launcher.unavailable_reason(64)
    assert reason is None
    reason, quiet = launcher.unavailable_reason(48)
    assert "32, 64, 128" in reason and not quiet


def test_torch_compile_fullgraph(request):
    seed = _seed(request)
    x = make_inputs(2, 20, 2, 32, seed=seed, mask="random")
    mask = torch.tensor(x["mask"], device=DEVICE)

    def loss(*args):
        o, final = launcher.generalized_delta_rule(*args, mask=mask)
        return o.float().square().sum() + (final * final.flip(-1)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE, requires_grad=True) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE, requires_grad=True)
    eager = torch.autograd.grad(loss(*ts, s0), ts + [s0])
    traced = torch.autograd.grad(compiled(*ts, s0), ts + [s0])
    for a, b in zip(eager, traced):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"seed={seed}"


def test_no_grad_forward_skips_the_op(poison_empty, monkeypatch, request):
    """Without a gradient, an eager forward launches its kernels directly (``_plain_eager``: less
    host time per call) and gives the custom op's results bit for bit (outputs NaN-poisoned);
    under torch.compile(fullgraph=True) the same call still goes through the op (a graph break
    would raise) and agrees with the reference."""
    seed = _seed(request)
    x = make_inputs(2, 20, 2, 32, seed=seed)
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE)
    op = launcher.triton_gdr_fwd
    cps = launcher.select_config(32, torch.float32, 20, 4).chunks_per_segment
    with torch.no_grad():
        calls = []
        monkeypatch.setattr(launcher, "triton_gdr_fwd", lambda *a: calls.append(a) or op(*a))
        direct = launcher.generalized_delta_rule(*ts, s0)
        assert not calls, "an eager no_grad forward went through the custom op"
        via_op = op(*ts, s0, None, False, cps, False, None, 0)[:2]
        monkeypatch.setattr(launcher, "triton_gdr_fwd", op)
        compiled = torch.compile(launcher.generalized_delta_rule, fullgraph=True,
                                 backend="inductor" if HAS_CUDA else "aot_eager")(*ts, s0)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    for got, want, ref in zip(direct, via_op, (y_ref, s_ref)):
        assert torch.equal(got, want), f"seed={seed}"
        assert rel_error(got.double().cpu().numpy(), ref) < FLOAT32_TOL["model"], f"seed={seed}"
    for got, ref in zip(compiled, (y_ref, s_ref)):
        assert rel_error(got.double().cpu().numpy(), ref) < FLOAT32_TOL["model"], f"seed={seed}"


def test_no_grad_vmap_goes_through_the_op(request):
    """Under torch.func.vmap (a functorch transform) a no_grad forward must not take the direct
    launch, whose kernels would read the batched tensors' storage: the custom op's vmap
    fallback runs it per element, equal to a loop."""
    seed = _seed(request)
    xs = [torch.tensor(np.stack([make_inputs(2, 20, 2, 32, seed=seed + i)[n] for i in range(3)]),
                       dtype=torch.float32, device=DEVICE) for n in NAMES]
    with torch.no_grad():
        batched = torch.func.vmap(lambda *a: launcher.generalized_delta_rule(*a))(*xs)
        for i in range(3):
            o, s = launcher.generalized_delta_rule(*(x[i] for x in xs))
            assert torch.equal(batched[0][i], o) and torch.equal(batched[1][i], s), f"seed={seed}"


def test_opcheck(request):
    seed = _seed(request)
    x = make_inputs(1, 17, 1, 32, seed=seed)
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE, requires_grad=True) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE, requires_grad=True)
    args = (*ts, s0, None, False, 1, True, None, 0)
    torch.library.opcheck(torch.ops.rwkv_ops.triton_gdr_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.gpu
def test_protocol_error_shape(request):
    """The benchmark protocol's error shape: B=2, T=256, H=4, K=64 (ANCHORS.md)."""
    seed = _seed(request)
    check(run_case(seed, 2, 256, 4, 64, torch.bfloat16), 3e-3, seed)
    check(run_case(seed, 2, 256, 4, 64, torch.float32), 1e-5, seed)


@pytest.mark.gpu
def test_cuda_graph(request):
    seed = _seed(request)
    x = make_inputs(2, 100, 2, 64, seed=seed)
    ts = [torch.tensor(x[n], dtype=torch.bfloat16, device="cuda") for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device="cuda")
    o_ref, s_ref = launcher.generalized_delta_rule(*ts, s0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launcher.generalized_delta_rule(*ts, s0)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, s = launcher.generalized_delta_rule(*ts, s0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, o_ref) and torch.equal(s, s_ref), f"seed={seed}"


@pytest.mark.gpu
def test_offsets_past_2_31(poison_empty, request):
    """T * H * K > 2^31 elements per tensor: the kernels' offsets are 64-bit (forward, ~75 GB).

    Two steps that forget the state (decay at the floor, a = b = 0) sit before a short tail, so
    the tail's outputs and the final state equal a fresh run on the tail alone; wrapped 32-bit
    offsets would read and write elsewhere (o is NaN-poisoned first).
    """
    if torch.cuda.mem_get_info()[0] < 90 * 2**30:
        pytest.skip("needs 90 GiB of free GPU memory")
    seed = _seed(request)
    H, K, tail = 1, 32, 1000
    T = 2**31 // (H * K) + 40
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = torch.bfloat16

    def randn():
        return torch.randn((1, T, H, K), device="cuda", dtype=bf16, generator=g)

    r, k, v, a = randn(), randn(), randn(), randn()
    a.mul_(K ** -0.5)                                  # about unit norm
    b = a * -0.5
    w = torch.empty((1, T, H, K), device="cuda", dtype=bf16).uniform_(-3.0, -0.5, generator=g)
    s = T - tail
    w[:, s - 2:s] = 30.0                               # decay below the floor: e^-10 per step
    a[:, s - 2:s] = 0.0
    b[:, s - 2:s] = 0.0
    o, final = launcher.generalized_delta_rule(r, w, k, v, a, b)
    o_tail, final_tail = launcher.generalized_delta_rule(
        *(x[:, s - 2:].contiguous() for x in (r, w, k, v, a, b)))
    err_o = rel_error(o[:, s - 2:].float().cpu().numpy(), o_tail.float().cpu().numpy())
    err_s = rel_error(final.cpu().numpy(), final_tail.cpu().numpy())
    assert torch.isfinite(o[:, :64]).all() and torch.isfinite(o[:, -64:]).all(), f"seed={seed}"
    assert err_o <= 3e-3 and err_s <= 1e-3, f"o {err_o:.2e}, state {err_s:.2e} (seed={seed})"


def test_gradient_through_final_state_only(request):
    """o unused: its gradient is None inside autograd (the backward must not need it)."""
    seed = _seed(request)
    x = make_inputs(1, 20, 2, 32, seed=seed)
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE, requires_grad=True) for n in NAMES]
    s0 = torch.tensor(x["initial_state"], dtype=torch.float32, device=DEVICE, requires_grad=True)
    _, final = launcher.generalized_delta_rule(*ts, s0)
    _, dsT = make_cotangents((1, 20, 2, 32), (1, 2, 32, 32), seed=seed)
    grads = torch.autograd.grad(final, ts + [s0], torch.tensor(dsT, dtype=torch.float32,
                                                               device=DEVICE))
    refs = generalized_delta_rule_backward(*(x[n] for n in NAMES), x["initial_state"],
                                           do=np.zeros((1, 20, 2, 32)), dfinal_state=dsT)
    check({n: rel_error(g.cpu().numpy(), ref) for n, g, ref in zip(GRAD_NAMES, grads, refs)},
          TOL[torch.float32, "model"], seed)


def _packed_case(seed, lengths, H=2, K=32):
    x = make_inputs(1, sum(lengths), H, K, seed=seed)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device=DEVICE)
    ts = [torch.tensor(x[n], dtype=torch.float32, device=DEVICE, requires_grad=True) for n in NAMES]
    s0 = torch.randn(len(lengths), H, K, K, device=DEVICE, requires_grad=True)
    return ts, s0, cu


def test_opcheck_varlen(request):
    ts, s0, cu = _packed_case(_seed(request), (5, 0, 19))
    args = (*ts, s0, None, False, 1, True, cu, 19)
    torch.library.opcheck(torch.ops.rwkv_ops.triton_gdr_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_torch_compile_fullgraph_varlen(request):
    seed = _seed(request)
    ts, s0, cu = _packed_case(seed, (7, 20, 3))

    def loss(*args):
        o, final = launcher.generalized_delta_rule_packed(*args[:6], cu, 20, args[6])
        return o.float().square().sum() + (final * final.flip(-1)).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if HAS_CUDA else "aot_eager")
    eager = torch.autograd.grad(loss(*ts, s0), ts + [s0])
    traced = torch.autograd.grad(compiled(*ts, s0), ts + [s0])
    for a, b in zip(eager, traced):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_equals_each_sequence_alone(dtype, poison_empty, request):
    """Without segments the packed launch runs, for each sequence, the very operations of a dense
    launch on that sequence alone: outputs, final states and all gradients are bitwise equal."""
    seed = _seed(request)
    lengths = (5, 0, 40, 17)
    ts, s0, cu = _packed_case(seed, lengths)
    ts = [t.detach().to(dtype).requires_grad_() for t in ts]
    o, final = launcher.generalized_delta_rule_packed(*ts, cu, max(lengths), s0)
    do, dsT = make_cotangents(o.shape, final.shape, seed=seed)
    do = torch.tensor(do, dtype=dtype, device=DEVICE)
    dsT = torch.tensor(dsT, dtype=torch.float32, device=DEVICE)
    grads = torch.autograd.grad([o, final], ts + [s0], [do, dsT])
    for n, (lo, hi) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if hi == lo:
            assert torch.equal(final[n], s0[n]) and torch.equal(grads[6][n], dsT[n])
            continue
        xs = [t.detach()[:, lo:hi].clone().requires_grad_() for t in ts]
        s = s0.detach()[n:n + 1].clone().requires_grad_()
        o_n, f_n = launcher.generalized_delta_rule(*xs, s)
        g_n = torch.autograd.grad([o_n, f_n], xs + [s], [do[:, lo:hi], dsT[n:n + 1]])
        assert torch.equal(o[:, lo:hi], o_n), f"seed={seed} n={n}: o differs"
        assert torch.equal(final[n:n + 1], f_n), f"seed={seed} n={n}: final state differs"
        for name, g, ref in zip(GRAD_NAMES, grads, g_n):
            got = g[n:n + 1] if name == "ds0" else g[:, lo:hi]
            assert torch.equal(got, ref), f"seed={seed} n={n}: {name} differs"
