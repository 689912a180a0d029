"""Serving entry points of rwkv_ops.tensorflow against the float64 reference: the decode step,
variable-length batches and the inference-only op, with tf.GradientTape gradients.

Inputs are fresh per run; the seed is in every assertion message (RWKV_OPS_TEST_SEED replays it).
Tolerances (relative Frobenius error vs float64 on the same inputs): fp32 1e-5 with the model's
decays, 2e-4 with decays down to 0 (the lambda floor's bound, FLOAT32_TOL).
"""

from __future__ import annotations


import numpy as np
import pytest
import tensorflow as tf

from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_errors, make_cotangents, make_inputs,
                                    rel_error, seed_for)
from rwkv_ops.tensorflow.api import generalized_delta_rule
from rwkv_ops.tensorflow.decode import generalized_delta_rule_single_step, rwkv7_op_rnn
from rwkv_ops.tensorflow.inference import generalized_delta_rule_inference
from rwkv_ops.tensorflow.varlen import generalized_delta_rule_varlen

NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "ds0")


def f32(x):
    return tf.constant(np.asarray(x, np.float32))


# ---------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("decays", ["model", "full"])
@pytest.mark.parametrize("head_first", [False, True])
def test_decode_chain(decays, head_first, request):
    seed = seed_for(request)
    T = 20
    x = make_inputs(2, T, 3, 24, seed=seed, decays=decays, head_first=head_first)
    axis = 2 if head_first else 1
    # a None batch while tracing, as in a served model
    spec = [tf.TensorSpec([None, 3, 1, 24] if head_first else [None, 1, 3, 24])] * 6
    step = tf.function(lambda *a: rwkv7_op_rnn(*a, head_first=head_first),
                       input_signature=spec + [tf.TensorSpec([None, 3, 24, 24])])
    state = f32(x["initial_state"])
    outs = []
    for t in range(T):
        o, state = step(*(f32(np.take(x[n], [t], axis=axis)) for n in NAMES), state)
        outs.append(o)
    o = tf.concat(outs, axis=axis)
    assert o.dtype == tf.float32 and state.dtype == tf.float32
    xs = [x[n].astype(np.float32) for n in NAMES]
    y_ref, s_ref = generalized_delta_rule_reference(*xs, x["initial_state"].astype(np.float32),
                                                    True, head_first)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)},
                  FLOAT32_TOL[decays], seed)


@pytest.mark.parametrize("decays", ["model", "full"])
def test_decode_gradients(decays, request):
    """Three chained steps under tf.GradientTape vs the reference backward of the T = 3 sequence."""
    seed = seed_for(request)
    B, T, H, K = 2, 3, 2, 16
    x = make_inputs(B, T, H, K, seed=seed, decays=decays)
    ins = [f32(x[n]) for n in NAMES]
    s0 = f32(x["initial_state"])
    do, dsT = make_cotangents((B, T, H, K), (B, H, K, K), seed=seed)
    with tf.GradientTape() as tape:
        tape.watch(ins + [s0])
        state, outs = s0, []
        for t in range(T):
            o, state = rwkv7_op_rnn(*(v[:, t:t + 1] for v in ins), state)
            outs.append(o)
        o = tf.concat(outs, 1)
        loss = tf.reduce_sum(o * f32(do)) + tf.reduce_sum(state * f32(dsT))
    grads = tape.gradient(loss, ins + [s0])
    refs = generalized_delta_rule_backward(*(x[n].astype(np.float32) for n in NAMES),
                                           x["initial_state"].astype(np.float32), do=do,
                                           dfinal_state=dsT)
    errors = {n: rel_error(g, ref) for n, g, ref in zip(GRAD_NAMES, grads, refs)}
    assert_errors(errors, FLOAT32_TOL[decays], seed)


def test_decode_broadcast_state(request):
    seed = seed_for(request)
    x = make_inputs(3, 1, 2, 16, seed=seed, state_batch=1)
    o, state = generalized_delta_rule_single_step(*(x[n] for n in NAMES), x["initial_state"])
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert o.dtype == tf.float64 and state.shape == (3, 2, 16, 16)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)}, 1e-12, seed)


def test_decode_errors():
    xs = [tf.ones([2, 1, 2, 16]) for _ in NAMES]
    state = tf.zeros([2, 2, 16, 16])
    with pytest.raises(ValueError, match="single step takes inputs of layout"):
        rwkv7_op_rnn(*(tf.ones([2, 3, 2, 16]) for _ in NAMES), state)
    with pytest.raises(ValueError, match="`initial_state` has shape"):
        rwkv7_op_rnn(*xs, tf.zeros([2, 2, 8, 8]))
    with pytest.raises(TypeError, match="floating dtype"):
        rwkv7_op_rnn(*xs[:5], tf.ones([2, 1, 2, 16], tf.int32), state)
    with pytest.raises(ValueError, match="inplace=True is supported by the torch backend only"):
        rwkv7_op_rnn(*xs, state, inplace=True)


# ---------------------------------------------------------------------------------------------
# variable-length batches


@pytest.mark.parametrize("lengths", [(5, 16, 33, 1), (3, 0, 17)])
def test_varlen_matches_each_sequence(lengths, request):
    seed = seed_for(request)
    per_seq = [make_inputs(1, n, 2, 16, seed=seed + i) for i, n in enumerate(lengths)]
    ins = [f32(np.concatenate([s[n] for s in per_seq], axis=1)) for n in NAMES]
    s0 = f32(np.concatenate([s["initial_state"] for s in per_seq]))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    do, dsT = make_cotangents(ins[0].shape, s0.shape, seed=seed)
    with tf.GradientTape() as tape:
        tape.watch(ins + [s0])
        o, final = generalized_delta_rule_varlen(*ins, tf.constant(cu), s0)
        loss = tf.reduce_sum(o * f32(do)) + tf.reduce_sum(final * f32(dsT))
    grads = [g.numpy() for g in tape.gradient(loss, ins + [s0])]
    assert o.shape == ins[0].shape and final.shape == s0.shape
    errors = {}
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        xs = [x[n].astype(np.float32) for n in NAMES]
        s_i = x["initial_state"].astype(np.float32)
        y_ref, s_ref = generalized_delta_rule_reference(*xs, s_i)
        refs = generalized_delta_rule_backward(*xs, s_i, do=do[:, lo:hi], dfinal_state=dsT[i:i + 1])
        errors[f"state{i}"] = rel_error(final[i:i + 1], s_ref)
        errors[f"ds0_{i}"] = rel_error(grads[6][i:i + 1], refs[6])
        if hi > lo:
            errors[f"y{i}"] = rel_error(o[:, lo:hi], y_ref)
            for name, g, ref in zip(GRAD_NAMES[:6], grads, refs):
                errors[f"{name}{i}"] = rel_error(g[:, lo:hi], ref)
    assert_errors(errors, FLOAT32_TOL["model"], seed)


def test_varlen_errors():
    xs = [tf.ones([1, 10, 2, 16]) for _ in NAMES]
    run = generalized_delta_rule_varlen
    with pytest.raises(ValueError, match=r"packed as \[1, total_T, H, K\]"):
        run(*(tf.ones([2, 10, 2, 16]) for _ in NAMES), [0, 4, 10])
    with pytest.raises(ValueError, match="non-decreasing"):
        run(*xs, [0, 6, 4, 10])
    with pytest.raises(ValueError, match="start at 0 and end at total_T = 10"):
        run(*xs, tf.constant([0, 4, 12]))
    with pytest.raises(TypeError, match="integers"):
        run(*xs, np.array([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"expected \[2, 2, 16, 16\]"):
        run(*xs, (0, 4, 10), tf.zeros([1, 2, 16, 16]))
    traced = tf.function(lambda cu: run(*xs, cu)[0],
                         input_signature=[tf.TensorSpec([3], tf.int32)])
    with pytest.raises(ValueError, match="concrete `cu_seqlens`"):
        traced(tf.constant([0, 4, 10]))


# ---------------------------------------------------------------------------------------------
# inference-only op


@pytest.mark.parametrize("case", ["dense", "mask", "single_step", "varlen"])
def test_inference_equals_training_forward(case, request):
    seed = seed_for(request)
    T = 1 if case == "single_step" else 21
    x = make_inputs(2, T, 2, 16, seed=seed, mask="random" if case == "mask" else None)
    ins = [tf.Variable(x[n].astype(np.float32)) for n in NAMES]
    s0 = tf.Variable(x["initial_state"].astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        if case == "varlen":
            packed = [tf.reshape(v, [1, 2 * T, 2, 16]) for v in ins]
            o, s = generalized_delta_rule_inference(*packed, s0, cu_seqlens=[0, T, 2 * T])
            o_train, s_train = generalized_delta_rule_varlen(*packed, [0, T, 2 * T], s0)
        else:
            o, s = generalized_delta_rule_inference(*ins, s0, mask=x["mask"])
            o_train, s_train = generalized_delta_rule(*ins, s0, mask=x["mask"])
    assert all(g is None for g in tape.gradient([o, s], ins + [s0])), "inference ops were taped"
    assert all(g is not None for g in tape.gradient([o_train, s_train], ins + [s0]))
    assert_errors({"y": rel_error(o, o_train), "state": rel_error(s, s_train)}, 1e-6, seed)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                    mask=x["mask"])
    assert_errors({"y": rel_error(tf.reshape(o, y_ref.shape), y_ref), "state": rel_error(s, s_ref)},
          FLOAT32_TOL["model"], seed)


def test_inference_options():
    xs = [tf.ones([1, 10, 2, 16]) for _ in NAMES]
    with pytest.raises(ValueError, match="head_first=True is not supported"):
        generalized_delta_rule_inference(*xs, head_first=True, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="either `mask`"):
        generalized_delta_rule_inference(*xs, mask=tf.ones([1, 10], tf.bool), cu_seqlens=[0, 10])
    o, s = generalized_delta_rule_inference(*(x[:, :1] for x in xs), output_final_state=False)
    assert s is None and o.shape == (1, 1, 2, 16)
