"""Serving entry points of rwkv_ops.jax against the float64 reference: the decode step (native,
and the Triton decode kernel through jax-triton on a GPU), variable-length batches and the
inference-only op.

Inputs are fresh per run; the seed is in every assertion message (RWKV_OPS_TEST_SEED replays it).
Tolerances (relative Frobenius error vs float64 on the dtype-rounded inputs): fp32 1e-5 with the
model's decays and 2e-4 with decays down to 0 (the lambda floor's bound, FLOAT32_TOL); bf16
outputs 4e-3 (o itself is rounded to 8 significant bits), the fp32 state of a bf16 decode 1e-5.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_ops.jax import decode, inference, varlen
from rwkv_ops.jax.api import generalized_delta_rule
from rwkv_ops.numpy.reference import (generalized_delta_rule_backward,
                                      generalized_delta_rule_reference)
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_errors, make_cotangents, make_inputs,
                                    override_config, rel_error, seed_for)

HAS_GPU = jax.default_backend() == "gpu"
NAMES = ("r", "w", "k", "v", "a", "b")
GRAD_NAMES = ("dr", "dw", "dk", "dv", "da", "db", "ds0")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a JAX GPU backend")]


def _rounded(x, dtype):
    return {n: np.asarray(jnp.asarray(x[n], dtype).astype(jnp.float32), np.float64) for n in NAMES}


def run_decode_chain(step, x, T, head_first, dtype=jnp.float32):
    axis = 2 if head_first else 1
    state = jnp.asarray(x["initial_state"], jnp.float32)
    outs = []
    for t in range(T):
        ins = [jnp.asarray(np.take(x[n], [t], axis=axis), dtype) for n in NAMES]
        o, state = step(*ins, state, head_first)
        outs.append(o)
    return jnp.concatenate(outs, axis=axis), state


# ---------------------------------------------------------------------------------------------
# decode


@pytest.mark.parametrize("decays", ["model", "full"])
@pytest.mark.parametrize("head_first", [False, True])
def test_decode_chain(decays, head_first, request):
    seed = seed_for(request)
    T = 20
    x = make_inputs(2, T, 3, 24, seed=seed, decays=decays, head_first=head_first)
    step = jax.jit(decode.rwkv7_op_rnn, static_argnums=7)
    o, state = run_decode_chain(step, x, T, head_first)
    assert o.dtype == jnp.float32 and state.dtype == jnp.float32
    ref = _rounded(x, jnp.float32)
    y_ref, s_ref = generalized_delta_rule_reference(*(ref[n] for n in NAMES), x["initial_state"],
                                                    True, head_first)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)},
                  FLOAT32_TOL[decays], seed)


@pytest.mark.parametrize("decays", ["model", "full"])
def test_decode_gradients(decays, request):
    """Three chained steps under jax.vjp vs the reference backward of the T = 3 sequence."""
    seed = seed_for(request)
    B, T, H, K = 2, 3, 2, 16
    x = make_inputs(B, T, H, K, seed=seed, decays=decays)
    ins = [jnp.asarray(x[n], jnp.float32) for n in NAMES]
    s0 = jnp.asarray(x["initial_state"], jnp.float32)

    def chain(*args):
        *xs, state = args
        outs = []
        for t in range(T):
            o, state = decode.rwkv7_op_rnn(*(v[:, t:t + 1] for v in xs), state)
            outs.append(o)
        return jnp.concatenate(outs, 1), state

    (o, state), pullback = jax.vjp(chain, *ins, s0)
    do, dsT = make_cotangents(o.shape, state.shape, seed=seed)
    grads = pullback((jnp.asarray(do, jnp.float32), jnp.asarray(dsT, jnp.float32)))
    refs = generalized_delta_rule_backward(*(np.asarray(v, np.float64) for v in ins),
                                           x["initial_state"], do=do, dfinal_state=dsT)
    errors = {n: rel_error(g, ref) for n, g, ref in zip(GRAD_NAMES, grads, refs)}
    assert_errors(errors, FLOAT32_TOL[decays], seed)


def test_decode_broadcast_state(request):
    seed = seed_for(request)
    x = make_inputs(3, 1, 2, 16, seed=seed, state_batch=1)
    o, state = decode.generalized_delta_rule_single_step(
        *(jnp.asarray(x[n], jnp.float32) for n in NAMES), jnp.asarray(x["initial_state"], jnp.float32))
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"])
    assert state.shape == (3, 2, 16, 16)
    assert_errors({"y": rel_error(o, y_ref), "state": rel_error(state, s_ref)},
                  FLOAT32_TOL["model"], seed)


def test_decode_errors():
    xs = [jnp.ones((2, 1, 2, 16)) for _ in NAMES]
    state = jnp.zeros((2, 2, 16, 16))
    with pytest.raises(ValueError, match="single step takes inputs of layout"):
        decode.rwkv7_op_rnn(*(jnp.ones((2, 3, 2, 16)) for _ in NAMES), state)
    with pytest.raises(ValueError, match="`initial_state` has shape"):
        decode.rwkv7_op_rnn(*xs, jnp.zeros((2, 2, 8, 8)))
    with pytest.raises(TypeError, match="floating dtype"):
        decode.rwkv7_op_rnn(*xs[:5], jnp.ones((2, 1, 2, 16), jnp.int32), state)
    with pytest.raises(ValueError, match="inplace=True is supported by the torch backend only"):
        decode.rwkv7_op_rnn(*xs, state, inplace=True)
    if not HAS_GPU:
        from rwkv_ops.common import KernelUnavailableError
        with pytest.raises(KernelUnavailableError, match="no GPU backend"):
            decode.decode_triton(*xs, state)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a JAX GPU backend")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("head_first", [False, True])
def test_decode_triton_chain(dtype, head_first, request):
    seed = seed_for(request)
    T = 20
    x = make_inputs(4, T, 3, 64, seed=seed, decays="full", head_first=head_first)
    step = jax.jit(decode.decode_triton, static_argnums=7, donate_argnums=6)
    o, state = run_decode_chain(step, x, T, head_first, dtype)
    assert o.dtype == dtype and state.dtype == jnp.float32
    ref = _rounded(x, dtype)
    y_ref, s_ref = generalized_delta_rule_reference(*(ref[n] for n in NAMES), x["initial_state"],
                                                    True, head_first)
    errors = {"y": rel_error(np.asarray(o, np.float32), y_ref), "state": rel_error(state, s_ref)}
    assert_errors(errors, FLOAT32_TOL["full"] if dtype == jnp.float32 else 4e-3, seed)
    assert_errors({"state": errors["state"]}, FLOAT32_TOL["full"], seed)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a JAX GPU backend")
def test_decode_triton_gradient_is_native(request):
    seed = seed_for(request)
    x = make_inputs(2, 1, 2, 32, seed=seed)
    ins = [jnp.asarray(x[n], jnp.float32) for n in NAMES] + [jnp.asarray(x["initial_state"], jnp.float32)]

    def loss(fn):
        return lambda *a: sum(jnp.sum(jnp.sin(t)) for t in fn(*a))

    g_kernel = jax.grad(loss(decode.decode_triton), argnums=tuple(range(7)))(*ins)
    g_native = jax.grad(loss(decode.decode_native), argnums=tuple(range(7)))(*ins)
    for a, b in zip(g_kernel, g_native):
        assert rel_error(a, b) < 1e-5, f"seed={seed}"


# ---------------------------------------------------------------------------------------------
# variable-length batches


def _varlen_case(seed, lengths, H=2, K=32):
    per_seq = [make_inputs(1, n, H, K, seed=seed + i) for i, n in enumerate(lengths)]
    packed = {n: np.concatenate([s[n] for s in per_seq], axis=1) for n in NAMES}
    packed["initial_state"] = np.concatenate([s["initial_state"] for s in per_seq], axis=0)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return packed, per_seq, cu


# The Triton path on the packed layout: jax-triton on a GPU, else Triton's CPU interpreter (needs
# triton and torch; TRITON_INTERPRET=1 is set for those tests only). Its outputs are NaN-filled
# before the kernels run (the launcher's interpreter path), so unwritten elements show.
TRITON_GPU = HAS_GPU and importlib.util.find_spec("jax_triton") is not None
TRITON_INTERPRETER = (not HAS_GPU and importlib.util.find_spec("triton") is not None
                      and importlib.util.find_spec("torch") is not None)
triton_path = pytest.mark.skipif(not (TRITON_GPU or TRITON_INTERPRETER),
                                 reason="needs jax-triton on a GPU, or triton + torch")
VARLEN_KERNELS = ["native", pytest.param("triton", marks=triton_path)]


@pytest.fixture
def triton_interpreter(monkeypatch):
    if TRITON_INTERPRETER:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def check_varlen(seed, lengths, kernel_type=None, H=2, K=32):
    """jit(vjp) of the packed call vs each sequence's float64 reference: outputs, final states and
    the gradients of r, w, k, v, a, b and the initial states."""
    packed, per_seq, cu = _varlen_case(seed, lengths, H, K)
    ins = [jnp.asarray(packed[n], jnp.float32) for n in NAMES]
    s0 = jnp.asarray(packed["initial_state"], jnp.float32)
    run = jax.jit(lambda *a: varlen.generalized_delta_rule_varlen(*a[:6], cu, a[6],
                                                                  kernel_type=kernel_type))
    (o, final), pullback = jax.vjp(run, *ins, s0)
    assert o.shape == ins[0].shape and final.shape == s0.shape
    do, dsT = make_cotangents(o.shape, final.shape, seed=seed)
    grads = pullback((jnp.asarray(do, jnp.float32), jnp.asarray(dsT, jnp.float32)))
    errors = {}
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        xs = [x[n] for n in NAMES]
        y_ref, s_ref = generalized_delta_rule_reference(*xs, x["initial_state"])
        refs = generalized_delta_rule_backward(*xs, x["initial_state"], do=do[:, lo:hi],
                                               dfinal_state=dsT[i:i + 1])
        errors[f"state{i}"] = rel_error(final[i:i + 1], s_ref)
        errors[f"ds0_{i}"] = rel_error(grads[6][i:i + 1], refs[6])
        if hi > lo:
            errors[f"y{i}"] = rel_error(o[:, lo:hi], y_ref)
            for name, g, ref in zip(GRAD_NAMES[:6], grads, refs):
                errors[f"{name}{i}"] = rel_error(g[:, lo:hi], ref)
    assert_errors(errors, FLOAT32_TOL["model"], seed)


@pytest.mark.parametrize("kernel_type", VARLEN_KERNELS)
@pytest.mark.parametrize("lengths", [(5, 16, 33, 1), (3, 0, 17)])
def test_varlen_matches_each_sequence(lengths, kernel_type, triton_interpreter, request):
    check_varlen(seed_for(request), lengths, kernel_type)


@triton_path
@pytest.mark.parametrize("cps", [1, 2])
def test_varlen_triton_segments(cps, monkeypatch, triton_interpreter, request):
    """The segment split forced on: segments past a short sequence's end are identity segments."""
    from rwkv_ops.jax import triton_launcher

    override_config(monkeypatch, triton_launcher, chunks_per_segment=cps)
    check_varlen(seed_for(request), (20, 0, 53, 7), "triton")


@triton_path
def test_varlen_triton_all_empty_and_no_state(triton_interpreter, request):
    seed = seed_for(request)
    xs = [jnp.zeros((1, 0, 2, 32)) for _ in NAMES]
    s0 = jnp.ones((2, 2, 32, 32))
    o, final = varlen.generalized_delta_rule_varlen(*xs, [0, 0, 0], s0, kernel_type="triton")
    assert o.shape == (1, 0, 2, 32) and np.array_equal(final, s0)
    packed, per_seq, cu = _varlen_case(seed, (7, 20))
    ins = [jnp.asarray(packed[n], jnp.float32) for n in NAMES]
    o, final = varlen.generalized_delta_rule_varlen(*ins, cu, kernel_type="triton")
    o2, none = varlen.generalized_delta_rule_varlen(*ins, cu, output_final_state=False,
                                                    kernel_type="triton")
    assert none is None and np.array_equal(o, o2)
    for i, (x, lo, hi) in enumerate(zip(per_seq, cu[:-1], cu[1:])):
        y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), None)
        assert_errors({"y": rel_error(o[:, lo:hi], y_ref),
                       "state": rel_error(final[i:i + 1], s_ref)}, FLOAT32_TOL["model"], seed)


def test_varlen_kernel_choice(monkeypatch):
    from rwkv_ops.common import KernelUnavailableError

    xs = [jnp.ones((1, 10, 2, 32)) for _ in NAMES]
    run = varlen.generalized_delta_rule_varlen
    with pytest.raises(ValueError, match="not valid"):
        run(*xs, [0, 4, 10], kernel_type="fast")
    if not HAS_GPU:
        # an explicit request never falls back (outside the interpreter there is no GPU here)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert varlen.choose_kernel(None, 32) == "native"
        with pytest.raises(KernelUnavailableError, match="KERNEL_TYPE='triton'"):
            run(*xs, [0, 4, 10], kernel_type="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not TRITON_GPU, reason="needs jax-triton on a GPU")
@pytest.mark.parametrize("kernel_type", [None, "triton"])
def test_varlen_gpu_sizes(kernel_type, request):
    """Longer sequences on the GPU (segments on through the automatic config: few heads)."""
    check_varlen(seed_for(request), (1000, 0, 17, 4100, 300), kernel_type, H=2, K=64)


def test_varlen_errors():
    xs = [jnp.ones((1, 10, 2, 16)) for _ in NAMES]
    run = varlen.generalized_delta_rule_varlen
    with pytest.raises(ValueError, match=r"packed as \[1, total_T, H, K\]"):
        run(*(jnp.ones((2, 10, 2, 16)) for _ in NAMES), [0, 4, 10])
    with pytest.raises(ValueError, match="non-decreasing"):
        run(*xs, [0, 6, 4, 10])
    with pytest.raises(ValueError, match="start at 0 and end at total_T = 10"):
        run(*xs, np.array([0, 4, 12]))
    with pytest.raises(TypeError, match="integers"):
        run(*xs, np.array([0.0, 10.0]))
    with pytest.raises(ValueError, match=r"expected \[2, 2, 16, 16\]"):
        run(*xs, (0, 4, 10), jnp.zeros((1, 2, 16, 16)))
    with pytest.raises(ValueError, match="concrete `cu_seqlens`"):
        jax.jit(run)(*xs, jnp.array([0, 4, 10]))


# ---------------------------------------------------------------------------------------------
# inference-only op


@pytest.mark.parametrize("case", ["dense", "mask", "single_step", "varlen"])
def test_inference_equals_training_forward(case, request):
    seed = seed_for(request)
    T = 1 if case == "single_step" else 21
    x = make_inputs(2, T, 2, 32, seed=seed, mask="random" if case == "mask" else None)
    ins = [jnp.asarray(x[n], jnp.float32) for n in NAMES]
    s0 = jnp.asarray(x["initial_state"], jnp.float32)
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    if case == "varlen":
        packed = [v.reshape(1, 2 * T, 2, 32) for v in ins]
        cu = (0, T, 2 * T)
        run = jax.jit(lambda *a: inference.generalized_delta_rule_inference(*a, cu_seqlens=cu))
        o, s = run(*packed, s0)
        o_train, s_train = varlen.generalized_delta_rule_varlen(*packed, cu, s0)
    else:
        run = jax.jit(inference.generalized_delta_rule_inference)
        o, s = run(*ins, s0, mask=mask)
        o_train, s_train = generalized_delta_rule(*ins, s0, mask=mask)
    if case == "dense":
        grads = jax.grad(lambda *a: jnp.sum(run(*a)[0]), argnums=(0, 6))(*ins, s0)
        for g in grads:
            assert not np.any(np.asarray(g)), "the inference op must pass no gradient"
    assert_errors({"y": rel_error(o, o_train), "state": rel_error(s, s_train)}, 1e-6, seed)
    y_ref, s_ref = generalized_delta_rule_reference(*(x[n] for n in NAMES), x["initial_state"],
                                                    mask=x["mask"])
    assert_errors({"y": rel_error(np.asarray(o).reshape(y_ref.shape), y_ref),
           "state": rel_error(s, s_ref)}, FLOAT32_TOL["model"], seed)


def test_inference_options():
    xs = [jnp.ones((1, 10, 2, 16)) for _ in NAMES]
    run = inference.generalized_delta_rule_inference
    with pytest.raises(ValueError, match="head_first=True is not supported"):
        run(*xs, head_first=True, cu_seqlens=[0, 10])
    with pytest.raises(ValueError, match="either `mask`"):
        run(*xs, mask=jnp.ones((1, 10), bool), cu_seqlens=[0, 10])
    o, s = run(*(x[:, :1] for x in xs), output_final_state=False)
    assert s is None and o.shape == (1, 1, 2, 16)
