"""Serving entry points of rwkv_ops.numpy against the float64 reference: the decode step,
variable-length batches and the inference-only op (NumPy is forward only).

Inputs are fresh per run; the seed is in every assertion message (RWKV_OPS_TEST_SEED replays it).
Tolerances (relative Frobenius error vs float64 on the same inputs): fp32 1e-5 with the model's
decays, 2e-4 with decays down to 0 (the lambda floor's bound, FLOAT32_TOL).
"""

from __future__ import annotations


import numpy as np
import pytest

from rwkv_ops.numpy.api import generalized_delta_rule
from rwkv_ops.numpy.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.numpy.inference import generalized_delta_rule_inference
from rwkv_ops.numpy.reference import generalized_delta_rule_reference
from rwkv_ops.numpy.testing import FLOAT32_TOL, assert_errors, make_inputs, rel_error, seed_for
from rwkv_ops.numpy.varlen import generalized_delta_rule_varlen

NAMES = ("r", "w", "k", "v", "a", "b")


@pytest.mark.parametrize("decays", ["model", "full"])
@pytest.mark.parametrize("head_first", [False, True])
def test_decode_chain(decays, head_first, request):
    seed = seed_for(request)
    T = 20
    x = make_inputs(2, T, 3, 24, seed=seed, decays=decays, head_first=head_first)
    axis = 2 if head_first else 1
    state = x["initial_state"].astype(np.float32)
    outs = []
    for t in range(T):
        step = [np.take(x[n], [t], axis=axis).astype(np.float32) for n in NAMES]
        o, state = rwkv7_op_rnn(*step, state, head_first)
        outs.append(o)
    o = np.concatenate(outs, axis=axis)
    assert o.dtype == np.float32 and state.dtype == np.float32
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n].astype(np.float32) for n in NAMES),
                                                    x["initial_state"].astype(np.float32), True,
                                                    head_first)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)},
                  FLOAT32_TOL[decays], seed)


def test_decode_broadcast_state_and_float64(request):
    seed = seed_for(request)
    x = make_inputs(3, 1, 2, 16, seed=seed, state_batch=1)
    o, state = generalized_delta_rule_single_step(*(x[n] for n in NAMES), x["initial_state"])
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert o.dtype == np.float64 and state.shape == (3, 2, 16, 16)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)}, 1e-12, seed)


def test_decode_errors():
    xs = [np.random.randn(2, 1, 2, 16).astype(np.float32) for _ in NAMES]
    state = np.zeros((2, 2, 16, 16), np.float32)
    with pytest.raises(ValueError, match="single step takes inputs of layout"):
        rwkv7_op_rnn(*(np.zeros((2, 3, 2, 16)) for _ in NAMES), state)
    with pytest.raises(ValueError, match="`initial_state` has shape"):
        rwkv7_op_rnn(*xs, np.zeros((2, 2, 8, 8)))
    with pytest.raises(TypeError, match="floating dtype"):
        rwkv7_op_rnn(*xs[:5], xs[5].astype(np.int32), state)
    with pytest.raises(ValueError, match="inplace=True is supported by the torch backend only"):
        rwkv7_op_rnn(*xs, state, inplace=True)


@pytest.mark.parametrize("lengths", [(5, 16, 33, 1), (3, 0, 17)])
def test_varlen_matches_each_sequence(lengths, request):
    seed = seed_for(request)
    per_seq = [make_inputs(1, n, 2, 16, seed=seed + i) for i, n in enumerate(lengths)]
    packed = [np.concatenate([s[n] for s in per_seq], axis=1).astype(np.float32) for n in NAMES]
    s0 = np.concatenate([s["initial_state"] for s in per_seq]).astype(np.float32)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    o, final = generalized_delta_rule_varlen(*packed, cu, s0)
    assert o.shape == packed[0].shape and o.dtype == np.float32 and final.shape == s0.shape
    errors = {}
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
        errors[f"state{i}"] = rel_error(final[i:i + 1], s_ref)
        if hi > lo:
            errors[f"y{i}"] = rel_error(o[:, lo:hi], y_ref)
    assert_errors(errors, FLOAT32_TOL["model"], seed)


def test_varlen_errors():
    xs = [np.zeros((1, 10, 2, 16), np.float32) + 0.5 for _ in NAMES]
    with pytest.raises(ValueError, match=r"packed as \[1, total_T, H, K\]"):
        generalized_delta_rule_varlen(*(np.ones((2, 10, 2, 16)) for _ in NAMES), [0, 4, 10])
    with pytest.raises(ValueError, match="non-decreasing"):
        generalized_delta_rule_varlen(*xs, [0, 6, 4, 10])
    with pytest.raises(ValueError, match="start at 0 and end at total_T = 10"):
        generalized_delta_rule_varlen(*xs, [0, 4, 11])
    with pytest.raises(TypeError, match="integers"):
        generalized_delta_rule_varlen(*xs, np.array([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"expected \[2, 2, 16, 16\]"):
        generalized_delta_rule_varlen(*xs, [0, 4, 10], np.zeros((3, 2, 16, 16)))


@pytest.mark.parametrize("case", ["dense", "mask", "single_step", "varlen"])
def test_inference_equals_training_forward(case, request):
    seed = seed_for(request)
    T = 1 if case == "single_step" else 21
    x = make_inputs(2, T, 2, 16, seed=seed, mask="random" if case == "mask" else None)
    xs = [x[n].astype(np.float32) for n in NAMES]
    s0 = x["initial_state"].astype(np.float32)
    if case == "varlen":
        packed = [v.reshape(1, 2 * T, 2, 16) for v in xs]
        o, s = generalized_delta_rule_inference(*packed, s0, cu_seqlens=[0, T, 2 * T])
        o_train, s_train = generalized_delta_rule_varlen(*packed, [0, T, 2 * T], s0)
    else:
        o, s = generalized_delta_rule_inference(*xs, s0, mask=x["mask"])
        o_train, s_train = generalized_delta_rule(*xs, s0, mask=x["mask"])
    assert_errors({"y": rel_error(o, o_train), "state": rel_error(s, s_train)}, 1e-6, seed)
    y_ref, s_ref = generalized_delta_rule_reference(*xs, s0, mask=x["mask"])
    assert_errors({"y": rel_error(o.reshape(y_ref.shape), y_ref), "state": rel_error(s, s_ref)},
          FLOAT32_TOL["model"], seed)


def test_inference_options():
    xs = [np.ones((1, 10, 2, 16), np.float32) for _ in NAMES]
    with pytest.raises(ValueError, match="head_first=True is not supported"):
        generalized_delta_rule_inference(*xs, head_first=True, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="either `mask`"):
        generalized_delta_rule_inference(*xs, mask=np.ones((1, 10), bool), cu_seqlens=[0, 10])
