"""rwkv_ops.torch.native against the float64 sequential reference (forward and all seven gradients).

Every test draws fresh inputs; the seed is in each assertion message. Replay one with
RWKV_OPS_TEST_SEED=<seed>.

Tolerances (relative error ||x - ref|| / ||ref|| per tensor):
- float32, decays in the model's range: 1e-5 (measured ~5e-7).
- float32, decays down to exactly 0: 2e-4 (FLOAT32_TOL; median ~5e-5, 1.3e-4 at worst for the
  small dinitial_state of T=33 K=5; the LAMBDA_FLOOR clamp treats decays below e^-10 as e^-10).
- float64: 1e-11 (measured ~6e-14).
- bfloat16 / float16 inputs: 5e-3 / 1e-3 (measured ~1.7e-3 / ~2e-4). The computation is float32;
  the error is the rounding of o and of the six input gradients to the input dtype (2^-9 / 2^-12
  relative at most per element). The reference runs on the rounded inputs and the same rounded
  ``do``; the final state and its gradient stay float32 and get the float32 tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rwkv_ops.numpy.reference import (
    generalized_delta_rule_backward,
    generalized_delta_rule_reference,
)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, make_cotangents, make_inputs, rel_error,
                                    seed_from_env)
from rwkv_ops.torch import native
from rwkv_ops.torch.native import generalized_delta_rule

NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "dinitial_state")
SEED = seed_from_env()

TOL = {
    (torch.float32, "model"): FLOAT32_TOL["model"],
    (torch.float32, "full"): FLOAT32_TOL["full"],
    (torch.float64, "model"): 1e-11,
    (torch.float64, "full"): 1e-11,
    (torch.bfloat16, "model"): 5e-3,
    (torch.float16, "model"): 1e-3,
}


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_numpy(t):
    return t.detach().to(torch.float64).cpu().numpy()


def make_case(B, T, H, K, *, seed, dtype=torch.float32, decays="model", initial_state=True,
              state_batch=None, head_first=False, mask=None):
    """Torch leaf tensors (requires_grad) and the float64 arrays the reference gets (rounded)."""
    x = make_inputs(B, T, H, K, seed=seed, decays=decays, initial_state=initial_state,
                    state_batch=state_batch, head_first=head_first, mask=mask)
    ts = {n: torch.tensor(x[n], dtype=dtype).requires_grad_() for n in NAMES}
    s0 = None
    if x["initial_state"] is not None:
        s0 = torch.tensor(x["initial_state"], dtype=state_dtype(dtype)).requires_grad_()
    m = None if x["mask"] is None else torch.tensor(x["mask"])
    ref = {n: to_numpy(t) for n, t in ts.items()}
    ref["initial_state"] = None if s0 is None else to_numpy(s0)
    ref["mask"] = x["mask"]
    return ts, s0, m, ref


def check_case(B, T, H, K, *, dtype=torch.float32, decays="model", initial_state=True,
               state_batch=None, head_first=False, mask=None, output_final_state=True,
               mask_as=None, seed=SEED):
    ts, s0, m, ref = make_case(B, T, H, K, seed=seed, dtype=dtype, decays=decays,
                               initial_state=initial_state, state_batch=state_batch,
                               head_first=head_first, mask=mask)
    if m is not None and mask_as is not None:
        m = m.to(mask_as)
    tol = TOL[(dtype, decays)]
    where = (f"seed={seed} B={B} T={T} H={H} K={K} dtype={dtype} decays={decays} "
             f"initial_state={initial_state} state_batch={state_batch} head_first={head_first} "
             f"mask={mask} output_final_state={output_final_state}")

    o, state = generalized_delta_rule(*(ts[n] for n in NAMES), s0, output_final_state, head_first,
                                      mask=m)
    y_ref, s_ref = generalized_delta_rule_reference(*(ref[n] for n in NAMES), ref["initial_state"],
                                                    head_first=head_first, mask=ref["mask"])
    assert o.dtype == dtype and o.shape == ts["r"].shape, where
    err = rel_error(to_numpy(o), y_ref)
    assert err <= tol, f"o: relative error {err:.3e} > {tol:.1e} ({where})"
    if m is not None:
        padded = ~m.bool()
        o_btk = o.transpose(1, 2) if head_first else o
        assert torch.all(o_btk[padded] == 0), f"o is not exactly 0 at masked steps ({where})"
    # The state and its gradient stay float32 for half-precision inputs: no output rounding there.
    state_tol = TOL[(state_dtype(dtype), decays)] if dtype in (torch.float32, torch.float64) \
        else TOL[(torch.float32, decays)]
    if output_final_state:
        assert state.dtype == state_dtype(dtype) and state.shape == (B, H, K, K), where
        err = rel_error(to_numpy(state), s_ref)
        assert err <= state_tol, \
            f"final_state: relative error {err:.3e} > {state_tol:.1e} ({where})"
    else:
        assert state is None, where

    do, dstate = make_cotangents(tuple(o.shape), (B, H, K, K), seed=seed)
    do_t = torch.tensor(do, dtype=dtype)
    outputs, cotangents = [o], [do_t]
    dfinal = None
    if output_final_state:
        dstate_t = torch.tensor(dstate, dtype=state.dtype)
        outputs.append(state)
        cotangents.append(dstate_t)
        dfinal = to_numpy(dstate_t)
    leaves = [ts[n] for n in NAMES] + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(outputs, leaves, cotangents)
    refs = generalized_delta_rule_backward(*(ref[n] for n in NAMES), ref["initial_state"],
                                           do=to_numpy(do_t), dfinal_state=dfinal,
                                           head_first=head_first, mask=ref["mask"])
    for name, g, g_ref in zip(GRAD_NAMES, grads, refs):
        assert g.dtype == leaves[GRAD_NAMES.index(name)].dtype, f"{name} dtype ({where})"
        err = rel_error(to_numpy(g), g_ref)
        limit = state_tol if name == "dinitial_state" else tol
        assert err <= limit, f"{name}: relative error {err:.3e} > {limit:.1e} ({where})"
        if m is not None and name != "dinitial_state":
            g_btk = g.transpose(1, 2) if head_first else g
            assert torch.all(g_btk[~m.bool()] == 0), f"{name} is not 0 at masked steps ({where})"


# T x K x options, subsampled: every option appears with both decay ranges and both head sizes.
GRID = [
    dict(T=1, K=16),
    dict(T=1, K=64, initial_state=False, decays="full"),
    dict(T=15, K=16, head_first=True, mask="left", decays="full"),
    dict(T=15, K=64, state_batch=1),
    dict(T=16, K=64, mask="right"),
    dict(T=16, K=16, state_batch=1, head_first=True, decays="full"),
    dict(T=17, K=16, initial_state=False, mask="right", decays="full"),
    dict(T=17, K=64, head_first=True),
    dict(T=17, K=16, output_final_state=False, decays="full"),
    dict(T=100, K=16, mask="left", state_batch=1),
    dict(T=100, K=64, decays="full"),
    dict(T=100, K=16, mask="random", head_first=True, decays="full"),
    dict(T=40, K=24, initial_state=False, output_final_state=False),
    dict(T=33, K=5, mask="random", decays="full"),
]


@pytest.mark.parametrize("case", GRID, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_float32_matches_reference(case):
    case = dict(case)
    check_case(2, case.pop("T"), 2, case.pop("K"), **case)


@pytest.mark.parametrize("case", [
    dict(T=37, K=16, decays="full", mask="left", state_batch=1),
    dict(T=20, K=64, head_first=True),
], ids=["full-left-broadcast", "model-head_first"])
def test_float64_matches_reference_tightly(case):
    case = dict(case)
    check_case(2, case.pop("T"), 2, case.pop("K"), dtype=torch.float64, **case)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_inputs(dtype):
    check_case(2, 40, 2, 32, dtype=dtype, mask="right")


@pytest.mark.parametrize("mask_as", [torch.float32, torch.int64], ids=["float-mask", "int-mask"])
def test_mask_given_as_numbers(mask_as):
    check_case(2, 21, 2, 16, mask="random", mask_as=mask_as)


@pytest.mark.parametrize("mask, initial_state, zeroed", [
    ("left", False, ("k", "v")),            # S_0 = 0: the SPEC recipe, v k^T = 0 suffices
    ("random", True, ("k", "v", "a")),      # otherwise (S a) b^T must vanish too
], ids=["left-no-state", "random-with-state"])
def test_mask_matches_padding_recipe(mask, initial_state, zeroed):
    # w += (1 - mask) * -1e9 gives d = 1 at padded steps; with the zeroed inputs they are identity
    # steps, as with mask (which also zeroes their outputs).
    ts, s0, m, _ = make_case(2, 30, 2, 16, seed=SEED, mask=mask, initial_state=initial_state)
    keep = m[:, :, None, None].to(torch.float32)
    with torch.no_grad():
        x = {n: ts[n] * keep if n in zeroed else ts[n] for n in NAMES}
        x["w"] = ts["w"] + (1 - keep) * -1e9
        o_recipe, s_recipe = generalized_delta_rule(*(x[n] for n in NAMES), s0)
        o_mask, s_mask = generalized_delta_rule(*(ts[n] for n in NAMES), s0, mask=m)
    assert rel_error(to_numpy(o_recipe * keep), to_numpy(o_mask)) <= 1e-5, f"seed={SEED}"
    assert rel_error(to_numpy(s_recipe), to_numpy(s_mask)) <= 1e-5, f"seed={SEED}"


@pytest.mark.parametrize("w_value", [800.0, math.inf, -math.inf, 3.0],
                         ids=["w=800", "w=inf", "w=-inf", "w=3"])
def test_extreme_decays_finite(w_value):
    """Every decay 0 (or 1), and a large upstream gradient (as with fp16 loss scaling)."""
    ts, s0, _, ref = make_case(2, 48, 2, 16, seed=SEED)
    with torch.no_grad():
        ts["w"].fill_(w_value)
    ref["w"] = np.full_like(ref["w"], w_value)
    o, state = generalized_delta_rule(*(ts[n] for n in NAMES), s0)
    do, dstate = make_cotangents(tuple(o.shape), tuple(state.shape), seed=SEED)
    scale = 1e6
    grads = torch.autograd.grad([o, state], [ts[n] for n in NAMES] + [s0],
                                [torch.tensor(do * scale, dtype=torch.float32),
                                 torch.tensor(dstate * scale, dtype=torch.float32)])
    for name, g in zip(GRAD_NAMES, grads):
        assert torch.isfinite(g).all(), f"{name} not finite for w={w_value} (seed={SEED})"
    with np.errstate(over="ignore"):
        y_ref, s_ref = generalized_delta_rule_reference(*(ref[n] for n in NAMES),
                                                        ref["initial_state"])
        refs = generalized_delta_rule_backward(*(ref[n] for n in NAMES), ref["initial_state"],
                                               do=do * scale, dfinal_state=dstate * scale)
    # With every decay below the floor the whole sequence sits at the clamp: 1e-3 (measured 3e-4).
    # d initial_state carries the clamp most directly (the floor's decay e^-10 instead of 0 at the
    # first step): 3e-3 for it (measured up to 1.05e-3 over 41 seeds, others below 1e-4).
    tol = 1e-3
    tol_ds0 = 3e-3
    assert rel_error(to_numpy(o), y_ref) <= tol, f"seed={SEED}"
    assert rel_error(to_numpy(state), s_ref) <= tol, f"seed={SEED}"
    for name, g, g_ref in zip(GRAD_NAMES, grads, refs):
        if name == "dw" and w_value != -math.inf:
            # The true dw is ~exp(w - e^w) (1e-8 at w = 3, 0 beyond): compare in absolute terms,
            # against the scale of the other gradients.
            scale_ref = np.linalg.norm(refs[0])
            assert np.linalg.norm(to_numpy(g) - g_ref) <= 1e-6 * scale_ref, f"dw (seed={SEED})"
            continue
        limit = tol_ds0 if name == "dinitial_state" else tol
        assert rel_error(to_numpy(g), g_ref) <= limit, f"{name} (seed={SEED})"


def test_T_zero():
    B, H, K = 2, 3, 8
    r = torch.randn(B, 0, H, K, dtype=torch.bfloat16)
    s0 = torch.randn(1, H, K, K, requires_grad=True)
    o, state = generalized_delta_rule(r, r, r, r, r, r, s0)
    assert o.shape == (B, 0, H, K) and o.dtype == torch.bfloat16
    assert state.shape == (B, H, K, K) and state.dtype == torch.float32
    assert torch.equal(state, s0.detach().expand(B, H, K, K))
    g = torch.randn(B, H, K, K)
    (ds0,) = torch.autograd.grad(state, s0, g)
    torch.testing.assert_close(ds0, g.sum(0, keepdim=True))

    o, state = generalized_delta_rule(r, r, r, r, r, r)
    assert torch.equal(state, torch.zeros(B, H, K, K)) and state.dtype == torch.float32
    rf = torch.randn(B, H, 0, K, dtype=torch.float64)
    o, state = generalized_delta_rule(rf, rf, rf, rf, rf, rf, output_final_state=False,
                                      head_first=True)
    assert o.shape == (B, H, 0, K) and o.dtype == torch.float64 and state is None


def test_backward_saves_one_state_per_chunk():
    """Autograd must keep O(T K + T/16 K^2) per head, not a K x K state per token."""
    B, T, H, K = 1, 128, 1, 256
    ts, s0, _, _ = make_case(B, T, H, K, seed=SEED)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, state = generalized_delta_rule(*(ts[n] for n in NAMES), s0)
    saved_bytes = sum(saved.values())
    per_token_states = T * K * K * 4
    # Measured 0.16 of per_token_states here (8 chunk states, 1/16, plus the L x K intermediates).
    assert saved_bytes < 0.3 * per_token_states, (saved_bytes, per_token_states)
    assert torch.isfinite(torch.autograd.grad(o.sum() + state.sum(), ts["r"])[0]).all()


def test_graph_grows_per_chunk_not_per_token():
    def nodes(T):
        ts, s0, _, _ = make_case(1, T, 1, 8, seed=SEED)
        o, state = generalized_delta_rule(*(ts[n] for n in NAMES), s0)
        seen, stack = set(), [o.grad_fn, state.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
        return len(seen)

    # A loop per token adds several nodes per token; the chunk scan adds ~7 per chunk (measured 70).
    grow = nodes(16 * 20) - nodes(16 * 10)  # 160 more tokens, 10 more chunks
    assert grow < 160, f"autograd graph grew by {grow} nodes for 160 tokens"


def test_torch_compile_cpu():
    ts, s0, m, ref = make_case(1, 20, 2, 16, seed=SEED, mask="right")
    compiled = torch.compile(generalized_delta_rule, fullgraph=True)
    o, state = compiled(*(ts[n] for n in NAMES), s0, mask=m)
    y_ref, s_ref = generalized_delta_rule_reference(*(ref[n] for n in NAMES), ref["initial_state"],
                                                    mask=ref["mask"])
    assert rel_error(to_numpy(o), y_ref) <= 1e-5, f"seed={SEED}"
    assert rel_error(to_numpy(state), s_ref) <= 1e-5, f"seed={SEED}"
    do, dstate = make_cotangents(tuple(o.shape), tuple(state.shape), seed=SEED)
    grads = torch.autograd.grad([o, state], [ts[n] for n in NAMES] + [s0],
                                [torch.tensor(do, dtype=torch.float32),
                                 torch.tensor(dstate, dtype=torch.float32)])
    refs = generalized_delta_rule_backward(*(ref[n] for n in NAMES), ref["initial_state"], do=do,
                                           dfinal_state=dstate, mask=ref["mask"])
    for name, g, g_ref in zip(GRAD_NAMES, grads, refs):
        assert rel_error(to_numpy(g), g_ref) <= 1e-5, f"{name} (seed={SEED})"


def test_module_contract():
    assert native.KERNEL_TYPE == "native"
    assert native.SUPPORTED_HEAD_SIZES is None
    assert native.unavailable_reason() == (None, False)
    assert native.unavailable_reason(7) == (None, False)
    assert native.CHUNK == 16


# ---------------------------------------------------------------------------------------------
# Bad inputs: every SPEC error, with the library's message.


def good(B=2, T=5, H=3, K=8, dtype=torch.float32):
    return {n: torch.randn(B, T, H, K, dtype=dtype) for n in NAMES}


def call(x, **kwargs):
    return generalized_delta_rule(*(x[n] for n in NAMES), **kwargs)


def rand(*shape, **kwargs):
    return lambda: torch.randn(*shape, **kwargs)


BAD_INPUTS = [
    pytest.param("k", rand(2, 6, 3, 8), ValueError,
                 "`k` has shape [2, 6, 3, 8] but expected [2, 5, 3, 8]", id="shape"),
    pytest.param("v", rand(2, 5, 3, 4), ValueError,
                 "the value size V must equal the head size K", id="V!=K"),
    pytest.param("r", rand(2, 5, 24), ValueError, "`r` must have rank 4", id="rank"),
    pytest.param("w", lambda: torch.ones(2, 5, 3, 8, dtype=torch.int32), TypeError,
                 "`w` must have a floating dtype", id="int-input"),
    pytest.param("a", lambda: torch.zeros(2, 5, 3, 8, dtype=torch.bool), TypeError,
                 "`a` must have a floating dtype", id="bool-input"),
    pytest.param("initial_state", rand(2, 3, 8, 4), ValueError,
                 "`initial_state` has shape [2, 3, 8, 4] but expected [2, 3, 8, 8]",
                 id="state-shape"),
    pytest.param("initial_state", rand(3, 3, 8, 8), ValueError,
                 "`initial_state` has shape [3, 3, 8, 8]", id="state-batch"),
    pytest.param("initial_state", rand(3, 8, 8), ValueError,
                 "`initial_state` has shape [3, 8, 8]", id="state-rank"),
    pytest.param("initial_state", lambda: torch.ones(2, 3, 8, 8, dtype=torch.int64), TypeError,
                 "`initial_state` must have a floating dtype", id="state-int"),
    pytest.param("mask", lambda: torch.ones(2, 4, dtype=torch.bool), ValueError,
                 "`mask` has shape [2, 4] but expected [2, 5]", id="mask-shape"),
    pytest.param("mask", lambda: torch.ones(2, 5, dtype=torch.complex64), TypeError,
                 "`mask` must be boolean, integer or floating", id="mask-dtype"),
    pytest.param("b", rand(2, 5, 3, 8, device="meta"), ValueError,
                 "all inputs must be on one device", id="device"),
    pytest.param("mask", lambda: torch.ones(2, 5, device="meta"), ValueError, "mask on meta",
                 id="mask-device"),
    pytest.param("head_first", lambda: 1, TypeError, "`head_first` must be a bool",
                 id="head_first-type"),
    pytest.param(NAMES, rand(2, 5, 0, 8), ValueError, "head count H must be >= 1", id="H=0"),
]


@pytest.mark.parametrize("names, make, error, fragment", BAD_INPUTS)
def test_bad_inputs(names, make, error, fragment):
    x = good()
    for name in (names,) if isinstance(names, str) else names:
        x[name] = make()
    kwargs = {key: x.pop(key) for key in ("initial_state", "mask", "head_first") if key in x}
    with pytest.raises(error) as info:
        call(x, **kwargs)
    assert fragment in str(info.value)
    assert str(info.value).startswith("rwkv-ops:")


def test_head_first_shape_errors_name_the_layout():
    x = good()
    x["k"] = torch.randn(2, 3, 6, 8)
    with pytest.raises(ValueError, match=r"\[B, H, T, K\]"):
        call(x, head_first=True)
