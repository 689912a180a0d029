"""The float64 reference (against finite differences) and the chunked NumPy forward (against it)."""

import numpy as np
import pytest

from rwkv_ops.common import KernelUnavailableError
from rwkv_ops.numpy import (
    available_kernel_types,
    generalized_delta_rule,
    generalized_delta_rule_backward,
    generalized_delta_rule_reference,
    get_generalized_delta_rule,
    rwkv7_op,
)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_close, make_cotangents, make_inputs,
                                    seed_from_env)

SEED = seed_from_env()
NAMES = ("r", "w", "k", "v", "a", "b")


def args_of(x, dtype=np.float64):
    return [x[n].astype(dtype) for n in NAMES]


@pytest.mark.parametrize("mask", [None, "left", "random"])
@pytest.mark.parametrize("decays", ["model", "full"])
def test_reference_backward_matches_finite_differences(decays, mask):
    """Central differences of <do, o> + <ds, final_state> in float64, every input and the state."""
    B, T, H, K = 2, 5, 2, 3
    x = make_inputs(B, T, H, K, seed=SEED, decays=decays, mask=mask, state_batch=1)
    if decays == "full":  # keep finite differences away from w = -inf / 800, where d is flat
        x["w"] = np.clip(x["w"], -4.0, 2.5)
    do, ds = make_cotangents((B, T, H, K), (B, H, K, K), seed=SEED)
    inputs = {n: x[n] for n in NAMES}
    inputs["initial_state"] = x["initial_state"]

    def loss(inp):
        o, s = generalized_delta_rule_reference(*(inp[n] for n in NAMES), inp["initial_state"], mask=x["mask"])
        return float(np.sum(o * do) + np.sum(s * ds))

    grads = generalized_delta_rule_backward(*(inputs[n] for n in NAMES), inputs["initial_state"], do=do,
                                            dfinal_state=ds, mask=x["mask"])
    eps = 1e-6
    for name, g in zip(list(NAMES) + ["initial_state"], grads):
        num = np.zeros_like(inputs[name])
        for idx in np.ndindex(num.shape):
            plus = {n: v.copy() for n, v in inputs.items()}
            minus = {n: v.copy() for n, v in inputs.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            num[idx] = (loss(plus) - loss(minus)) / (2 * eps)
        assert g.shape == num.shape
        assert_close(f"d{name} (seed {SEED})", g, num, 1e-6)
        if mask is not None and name in NAMES:
            assert np.all(g[~x["mask"]] == 0), f"d{name} leaks into padded steps"


def test_reference_decay_edges_are_finite():
    x = make_inputs(1, 4, 1, 4, seed=SEED)
    x["w"][0, 0] = -np.inf   # decay exactly 1
    x["w"][0, 1] = 1e4       # decay exactly 0
    do, ds = make_cotangents((1, 4, 1, 4), (1, 1, 4, 4), seed=SEED)
    with np.errstate(over="ignore"):
        o, s = generalized_delta_rule_reference(*args_of(x), x["initial_state"])
        grads = generalized_delta_rule_backward(*args_of(x), x["initial_state"], do=do, dfinal_state=ds)
    for t in (o, s, *grads):
        assert np.all(np.isfinite(t))
    assert np.all(grads[1][0, :2] == 0)  # dd/dw is exactly 0 at both ends


@pytest.mark.parametrize("T", [1, 15, 16, 17, 100])
@pytest.mark.parametrize("K", [16, 64])
@pytest.mark.parametrize("decays", ["model", "full"])
def test_chunked_forward_matches_reference(T, K, decays):
    """float32 chunked forward against the float64 reference (inputs rounded to float32 first)."""
    mask = {1: None, 15: "left", 16: None, 17: "right", 100: "random"}[T]
    x = make_inputs(2, T, 2, K, seed=SEED + T, decays=decays, mask=mask, state_batch=1 if T == 17 else None)
    a32 = args_of(x, np.float32)
    s0 = x["initial_state"].astype(np.float32)
    o, s = generalized_delta_rule(*a32, s0, mask=x["mask"])
    ro, rs = generalized_delta_rule_reference(*a32, s0, mask=x["mask"])
    assert o.dtype == np.float32 and s.dtype == np.float32 and s.shape == (2, 2, K, K)
    assert_close(f"o (T={T} K={K} seed {SEED})", o, ro, FLOAT32_TOL[decays])
    assert_close(f"final_state (T={T} K={K} seed {SEED})", s, rs, FLOAT32_TOL[decays])


def test_head_first_no_state_and_float64():
    x = make_inputs(2, 37, 3, 8, seed=SEED, head_first=True, initial_state=False)
    o, s = generalized_delta_rule(*args_of(x), head_first=True)
    ro, rs = generalized_delta_rule_reference(*args_of(x), head_first=True)
    assert o.dtype == np.float64 and s.dtype == np.float64 and o.shape == (2, 3, 37, 8)
    assert_close("o fp64", o, ro, 1e-12)
    assert_close("state fp64", s, rs, 1e-12)
    o2, s2 = generalized_delta_rule(*args_of(x), head_first=True, output_final_state=False)
    assert s2 is None and np.array_equal(o2, o)


def test_float16_inputs_compute_in_float32():
    x = make_inputs(1, 20, 2, 16, seed=SEED)
    a16 = args_of(x, np.float16)
    o, s = generalized_delta_rule(*a16, x["initial_state"].astype(np.float32))
    ro, rs = generalized_delta_rule_reference(*a16, x["initial_state"].astype(np.float32))
    assert o.dtype == np.float16 and s.dtype == np.float32
    assert_close("o fp16 output rounding", o, ro, 2e-3)
    assert_close("state", s, rs, 1e-5)


def test_t_zero_returns_initial_state():
    x = make_inputs(2, 1, 2, 8, seed=SEED, state_batch=1)
    empty = [v[:, :0] for v in args_of(x, np.float32)]
    o, s = generalized_delta_rule(*empty, x["initial_state"].astype(np.float32))
    assert o.shape == (2, 0, 2, 8)
    np.testing.assert_array_equal(s, np.broadcast_to(x["initial_state"].astype(np.float32), (2, 2, 8, 8)))
    o, s = generalized_delta_rule(*empty)
    assert not np.any(s) and s.shape == (2, 2, 8, 8)


def test_bad_inputs_raise_project_messages():
    x = make_inputs(2, 4, 2, 8, seed=SEED)
    a = args_of(x, np.float32)
    with pytest.raises(ValueError, match=r"`a` has shape \[2, 4, 2, 7\] but expected \[2, 4, 2, 8\]"):
        generalized_delta_rule(*a[:4], a[4][..., :7], a[5])
    with pytest.raises(TypeError, match="`r` must have a floating dtype"):
        generalized_delta_rule(a[0].astype(np.int32), *a[1:])
    with pytest.raises(ValueError, match="`mask` has shape"):
        generalized_delta_rule(*a, mask=np.ones((2, 5), bool))


def test_api_face():
    assert rwkv7_op is generalized_delta_rule
    assert available_kernel_types() == ["native"]
    op, use_kernel = get_generalized_delta_rule(64)
    assert op is generalized_delta_rule and use_kernel is False
    with pytest.raises(KernelUnavailableError, match="numpy backend has no 'triton' implementation"):
        get_generalized_delta_rule(64, "triton")
    with pytest.raises(ValueError, match="valid values are: triton, cuda, native"):
        get_generalized_delta_rule(64, "xla")
