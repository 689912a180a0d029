"""The TensorFlow native path against the float64 sequential reference (forward and all gradients).

Tolerances (relative Frobenius error, ``rel_error``):
* float32 inputs: 1e-5 with the model's decays, 2e-4 with decays down to exactly 0 (the float32 path
  clamps decays below e^-10 to e^-10; that clamp is the error measured there, ~3e-5).
* bfloat16 / float16 inputs: compared with the reference run on the same rounded inputs, so the
  error is the final rounding of o and of the gradients to the input dtype: 1e-2 (bf16, 8-bit
  mantissa) and 2e-3 (fp16); the float32 final state and its gradient keep 1e-5.
* float64: 1e-10 (1e-6 for the gradient of a float32 initial state, rounded to float32).

TensorFlow tensors are immutable, so there is no output buffer to poison with NaN; instead every
result is checked finite (``rel_error`` is inf on NaN) and padded steps are checked to be exactly 0.
Replay a run with RWKV_OPS_TEST_SEED=<seed printed in the failure message>.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from rwkv_ops.numpy.reference import (
    generalized_delta_rule_backward,
    generalized_delta_rule_reference,
)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, NAMES, make_cotangents, make_inputs, rel_error,
                                    seed_from_env)
from rwkv_ops.tensorflow import generalized_delta_rule

SEED = seed_from_env()
GRAD_NAMES = tuple(f"d{n}" for n in NAMES) + ("dinitial_state",)


def check(name, x, ref, tol, seed=SEED):
    err = rel_error(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (RWKV_OPS_TEST_SEED={seed})"
    return err


def to_float64(x):
    return None if x is None else np.asarray(tf.cast(x, tf.float64))


def rounded(x, dtype):
    """x rounded to ``dtype`` and back to float64: what the op really receives."""
    return None if x is None else to_float64(tf.cast(tf.constant(x), dtype))


def run_tf(x, do, ds, *, dtype=tf.float32, state_dtype=tf.float32, head_first=False,
           output_final_state=True, wrap=None):
    """o, final_state and the gradients of sum(o * do) + sum(final_state * ds) (ds unused when
    output_final_state is False); the state gradient is absent without an initial state."""
    inputs = [tf.constant(x[n], dtype) for n in NAMES]
    s0 = None if x["initial_state"] is None else tf.constant(x["initial_state"], state_dtype)
    mask = x["mask"]

    def body(inputs, s0):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            if s0 is not None:
                tape.watch(s0)
            o, s = generalized_delta_rule(*inputs, s0, output_final_state, head_first, mask=mask)
            loss = tf.reduce_sum(tf.cast(o, tf.float64) * do)
            if s is not None:
                loss += tf.reduce_sum(tf.cast(s, tf.float64) * ds)
        grads = tape.gradient(loss, inputs + ([] if s0 is None else [s0]))
        return o, s, grads

    if wrap is not None:
        body = wrap(body)
    return body(inputs, s0)


def run_reference(x, do, ds, *, head_first=False, output_final_state=True):
    xs = [x[n] for n in NAMES]
    o, s = generalized_delta_rule_reference(*xs, x["initial_state"], head_first=head_first,
                                            mask=x["mask"])
    grads = generalized_delta_rule_backward(*xs, x["initial_state"], do=do,
                                            dfinal_state=ds if output_final_state else None,
                                            head_first=head_first, mask=x["mask"])
    return o, s, [g for g in grads if g is not None]


def compare(x, do, ds, got, *, tol, state_tol=None, head_first=False, output_final_state=True,
            seed=SEED):
    o, s, grads = got
    ref_o, ref_s, ref_grads = run_reference(x, do, ds, head_first=head_first,
                                            output_final_state=output_final_state)
    state_tol = tol if state_tol is None else state_tol
    check("o", to_float64(o), ref_o, tol, seed)
    if output_final_state:
        check("final_state", to_float64(s), ref_s, state_tol, seed)
    else:
        assert s is None
    assert len(grads) == len(ref_grads)
    for name, g, ref_g in zip(GRAD_NAMES, grads, ref_grads):
        check(name, to_float64(g), ref_g, state_tol if name == "dinitial_state" else tol, seed)


# (B, T, H, K, decays, initial_state, state_batch, head_first, mask, output_final_state):
# a subsample of T x K x the options, each option at least twice, both decay ranges at every T.
CASES = [
    (2, 1, 2, 16, "model", True, None, False, None, True),
    (2, 1, 2, 64, "full", True, 1, True, None, True),
    (2, 15, 2, 16, "full", False, None, False, None, True),
    (2, 15, 2, 64, "model", True, 1, False, "right", True),
    (2, 16, 2, 64, "model", True, None, True, None, True),
    (2, 16, 2, 16, "full", True, None, False, "left", True),
    (2, 17, 2, 16, "full", True, 1, False, "left", True),
    (2, 17, 2, 64, "model", False, None, False, None, False),
    (2, 100, 2, 64, "model", True, None, False, "right", True),
    (2, 100, 2, 16, "full", True, 1, True, "right", True),
    (3, 100, 1, 16, "model", True, None, True, "left", True),
    (2, 100, 2, 16, "full", True, None, False, "random", False),
]


def _case_id(case):
    B, T, H, K, decays, init, sb, hf, mask, ofs = case
    state = "nostate" if not init else ("bcast" if sb == 1 else "state")
    return f"T{T}-K{K}-{decays}-{state}" + ("-hf" if hf else "") + (f"-{mask}" if mask else "") \
        + ("" if ofs else "-nofinal")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_float32_matches_reference(case):
    B, T, H, K, decays, init, sb, hf, mask, ofs = case
    seed = SEED + T + K
    x = make_inputs(B, T, H, K, seed=seed, decays=decays, initial_state=init, state_batch=sb,
                    head_first=hf, mask=mask)
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=seed)
    got = run_tf(x, do, ds, head_first=hf, output_final_state=ofs)
    assert got[0].dtype == tf.float32 and got[0].shape == x["r"].shape
    if ofs:
        assert got[1].dtype == tf.float32 and got[1].shape == (B, H, K, K)
    compare(x, do, ds, got, tol=FLOAT32_TOL[decays], head_first=hf, output_final_state=ofs,
            seed=seed)
    if mask is not None:
        padded = ~x["mask"]
        o = np.asarray(got[0])
        o = np.swapaxes(o, 1, 2) if hf else o
        assert np.all(o[padded] == 0.0), f"padded steps must output exactly 0 (seed {seed})"


def test_bfloat16_inputs():
    B, T, H, K = 2, 40, 2, 32
    x = make_inputs(B, T, H, K, seed=SEED, mask="right")
    x = {n: (rounded(x[n], tf.bfloat16) if n in NAMES else x[n]) for n in x}
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    do = rounded(do, tf.bfloat16)  # o's gradient arrives in bf16; keep the cotangent exact
    got = run_tf(x, do, ds, dtype=tf.bfloat16)
    assert got[0].dtype == tf.bfloat16 and got[1].dtype == tf.float32
    assert all(g.dtype == tf.bfloat16 for g in got[2][:6]) and got[2][6].dtype == tf.float32
    compare(x, do, ds, got, tol=1e-2, state_tol=1e-5)


def test_float16_inputs():
    B, T, H, K = 2, 24, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED, initial_state=False)
    x = {n: (rounded(x[n], tf.float16) if n in NAMES else x[n]) for n in x}
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    do = rounded(do, tf.float16)
    got = run_tf(x, do, ds, dtype=tf.float16)
    assert got[0].dtype == tf.float16 and got[1].dtype == tf.float32
    compare(x, do, ds, got, tol=2e-3, state_tol=1e-5)


@pytest.mark.parametrize("decays", ["model", "full"])
def test_float64(decays):
    B, T, H, K = 2, 37, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED, decays=decays, mask="left")
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    # A float32 initial state joins float64 inputs: everything runs in float64.
    got = run_tf(x, do, ds, dtype=tf.float64, state_dtype=tf.float32)
    x["initial_state"] = rounded(x["initial_state"], tf.float32)
    assert got[0].dtype == tf.float64 and got[1].dtype == tf.float64
    # d(initial_state) is rounded to the state's float32 on its way out.
    compare(x, do, ds, got, tol=1e-10, state_tol=1e-6)


def test_extreme_decays_are_finite_and_exact():
    """w = -inf (decay exactly 1), w = +inf and w = 1e30 (decay exactly 0), 1/8 of the entries each.

    A decay of 0 runs as e^-10 in float32, so the error grows with the share of zero decays: at 1/4
    it is ~4e-5, at 1/2 ~9e-5 (measured over 8 seeds).
    """
    B, T, H, K = 2, 35, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED)
    rng = np.random.default_rng(SEED)
    choice = rng.integers(0, 8, size=x["w"].shape)
    x["w"] = np.select([choice == 0, choice == 1, choice == 2], [-np.inf, np.inf, 1e30], x["w"])
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    got = run_tf(x, do, ds)
    compare(x, do, ds, got, tol=FLOAT32_TOL["full"])


def test_tf_function():
    B, T, H, K = 2, 33, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED, decays="full", mask="left")
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    got = run_tf(x, do, ds, wrap=tf.function)
    compare(x, do, ds, got, tol=FLOAT32_TOL["full"])


def test_jit_compile():
    B, T, H, K = 2, 20, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED, state_batch=1, mask="right", head_first=True)
    do, ds = make_cotangents(x["r"].shape, (B, H, K, K), seed=SEED)
    got = run_tf(x, do, ds, head_first=True, wrap=lambda f: tf.function(f, jit_compile=True))
    compare(x, do, ds, got, tol=FLOAT32_TOL["model"], head_first=True)


def test_unknown_batch_under_tf_function():
    B, T, H, K = 3, 20, 2, 16
    x = make_inputs(B, T, H, K, seed=SEED, mask="random")
    spec = tf.TensorSpec([None, T, H, K], tf.float32)

    @tf.function(input_signature=[spec] * 6 + [tf.TensorSpec([None, H, K, K], tf.float32),
                                                tf.TensorSpec([None, T], tf.bool)])
    def op(r, w, k, v, a, b, s0, mask):
        assert r.shape[0] is None  # the batch really is unknown while tracing
        return generalized_delta_rule(r, w, k, v, a, b, s0, mask=mask)

    o, s = op(*(tf.constant(x[n], tf.float32) for n in NAMES),
              tf.constant(x["initial_state"], tf.float32), tf.constant(x["mask"]))
    ref_o, ref_s = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                    mask=x["mask"])
    check("o", o, ref_o, FLOAT32_TOL["model"])
    check("final_state", s, ref_s, FLOAT32_TOL["model"])


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("state", ["none", "full", "broadcast"])
def test_empty_sequence(head_first, state):
    B, H, K = 2, 2, 8
    shape = (B, H, 0, K) if head_first else (B, 0, H, K)
    rng = np.random.default_rng(SEED)
    inputs = [tf.constant(rng.standard_normal(shape), tf.float32) for _ in NAMES]
    s0_np = None if state == "none" else rng.standard_normal((1 if state == "broadcast" else B, H, K, K))
    s0 = None if s0_np is None else tf.constant(s0_np, tf.float32)
    ds = rng.standard_normal((B, H, K, K))
    with tf.GradientTape() as tape:
        if s0 is not None:
            tape.watch(s0)
        o, s = generalized_delta_rule(*inputs, s0, head_first=head_first, mask=np.ones((B, 0), bool))
        loss = tf.reduce_sum(tf.cast(s, tf.float64) * ds)
    assert o.shape == shape and o.dtype == tf.float32
    expected = np.zeros((B, H, K, K)) if s0_np is None else np.broadcast_to(s0_np, (B, H, K, K))
    check("final_state", s, expected, 1e-7)
    if s0 is not None:
        expected_grad = ds.sum(axis=0, keepdims=True) if state == "broadcast" else ds
        check("dinitial_state", tape.gradient(loss, s0), expected_grad, 1e-6)


def test_eager_calls_with_varying_shapes_share_one_trace():
    """The eager wrapper generalises its trace: after a few shapes, a new one runs without tracing."""
    from rwkv_ops.tensorflow.native import chunked_forward_function

    shapes = [(2, 5, 2, 8), (3, 21, 2, 8), (1, 40, 3, 16), (2, 9, 1, 4), (3, 50, 2, 12)]
    for i, (B, T, H, K) in enumerate(shapes):
        x = make_inputs(B, T, H, K, seed=SEED + i, mask="left")
        traces = chunked_forward_function.experimental_get_tracing_count()
        o, s = generalized_delta_rule(*(tf.constant(x[n], tf.float32) for n in NAMES),
                                      x["initial_state"].astype(np.float32), mask=x["mask"])
        ref_o, ref_s = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                        mask=x["mask"])
        check(f"o {B, T, H, K}", o, ref_o, FLOAT32_TOL["model"])
        check(f"final_state {B, T, H, K}", s, ref_s, FLOAT32_TOL["model"])
    assert chunked_forward_function.experimental_get_tracing_count() == traces


def test_mask_of_integers_and_floats_means_the_same():
    B, T, H, K = 2, 19, 1, 8
    x = make_inputs(B, T, H, K, seed=SEED, mask="random")
    inputs = [tf.constant(x[n], tf.float32) for n in NAMES]
    ref_o, ref_s = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                    mask=x["mask"])
    for mask in (x["mask"].astype(np.int32), x["mask"].astype(np.float32)):
        o, s = generalized_delta_rule(*inputs, x["initial_state"].astype(np.float32), mask=mask)
        check("o", o, ref_o, FLOAT32_TOL["model"])
        check("final_state", s, ref_s, FLOAT32_TOL["model"])


def _good(B=2, T=5, H=2, K=4):
    rng = np.random.default_rng(SEED)
    return [tf.constant(rng.standard_normal((B, T, H, K)), tf.float32) for _ in NAMES]


@pytest.mark.parametrize("mutate, error, message", [
    (lambda xs, kw: xs.__setitem__(0, xs[0][:, :, :, :, None]), ValueError,
     r"`r` must have rank 4 with layout \[B, T, H, K\] \(head_first=False\), got shape \[2, 5, 2, 4, 1\]"),
    (lambda xs, kw: xs.__setitem__(1, xs[1][:, :4]), ValueError,
     r"`w` has shape \[2, 4, 2, 4\] but expected \[2, 5, 2, 4\], the shape of `r`"),
    (lambda xs, kw: xs.__setitem__(3, tf.concat([xs[3], xs[3]], -1)), ValueError,
     r"`v` has shape \[2, 5, 2, 8\] .* \(the value size V must equal the head size K\)"),
    (lambda xs, kw: xs.__setitem__(4, tf.cast(xs[4], tf.int32)), TypeError,
     r"`a` must have a floating dtype \(float16, bfloat16, float32 or float64\), got int32"),
    (lambda xs, kw: kw.update(initial_state=tf.zeros([2, 2, 4, 5])), ValueError,
     r"`initial_state` has shape \[2, 2, 4, 5\] but expected \[2, 2, 4, 4\] or \[1, 2, 4, 4\]"),
    (lambda xs, kw: kw.update(initial_state=tf.zeros([3, 2, 4, 4])), ValueError,
     r"`initial_state` has shape \[3, 2, 4, 4\]"),
    (lambda xs, kw: kw.update(initial_state=tf.zeros([2, 2, 4, 4], tf.int64)), TypeError,
     r"`initial_state` must have a floating dtype"),
    (lambda xs, kw: kw.update(mask=np.ones((2, 4), bool)), ValueError,
     r"`mask` has shape \[2, 4\] but expected \[2, 5\] \(\[B, T\]"),
    (lambda xs, kw: kw.update(mask=tf.constant([["a"] * 5] * 2)), TypeError,
     r"`mask` must be boolean, integer or floating, got string"),
    (lambda xs, kw: kw.update(head_first=1), TypeError, r"`head_first` must be a bool, got int"),
], ids=["rank", "shape", "value-size", "int-input", "state-shape", "state-batch", "int-state",
        "mask-shape", "mask-dtype", "head-first-type"])
def test_bad_inputs(mutate, error, message):
    xs, kw = _good(), {}
    mutate(xs, kw)
    with pytest.raises(error, match=message):
        generalized_delta_rule(*xs, **kw)


def test_unknown_sequence_length_is_a_clear_error():
    @tf.function(input_signature=[tf.TensorSpec([2, None, 2, 4], tf.float32)] * 6)
    def op(*xs):
        return generalized_delta_rule(*xs)

    with pytest.raises(ValueError, match=r"static sizes T, H and K.*dimension 1 unknown"):
        op(*_good())
