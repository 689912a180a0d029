"""The JAX Triton path (shared kernels through jax-triton) against the float64 reference.

On a machine whose JAX has a GPU backend and jax-triton, every test runs the real kernels and is
marked ``gpu`` (``scripts/gpu_check.sh`` runs ``pytest -m gpu``). Elsewhere the same test bodies run
the same kernels in Triton's CPU interpreter at small sizes, when triton and torch (the interpreter
works on torch tensors) are importable: a fixture sets TRITON_INTERPRET=1 for these tests only.

Inputs are fresh per run (seed printed in every assertion message; RWKV_OPS_TEST_SEED replays one).
Tolerances (relative error ||x - ref|| / ||ref||, for o, the final state and all seven gradients):
fp32 1e-5 in the model's decay range and 2e-4 with decays down to 0; bf16 / fp16 1e-2 (inputs are
rounded to the dtype first; o and the input gradients are stored in it, and the kernels' products
run in TF32).
"""

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

GPU = jax.default_backend() == "gpu" and importlib.util.find_spec("jax_triton") is not None
INTERPRET = (not GPU and importlib.util.find_spec("triton") is not None
             and importlib.util.find_spec("torch") is not None)

from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rwkv_ops.jax import triton_launcher  # noqa: E402
from rwkv_ops.jax.triton_launcher import generalized_delta_rule  # noqa: E402
from rwkv_ops.numpy import reference  # noqa: E402
from rwkv_ops.numpy.testing import (FLOAT32_TOL, assert_same_storage_results,  # noqa: E402
                                    make_cotangents, make_inputs, rel_error, seed_from_env)

if GPU:
    pytestmark = pytest.mark.gpu
else:
    pytestmark = pytest.mark.skipif(
        not INTERPRET, reason="needs a GPU JAX backend with jax-triton, or triton + torch for the "
                              "CPU interpreter")

SEED = seed_from_env()
NAMES = ("r", "w", "k", "v", "a", "b")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}


def sizes(gpu, interpreter):
    """The GPU grid, or the interpreter's small subset."""
    return gpu if GPU else interpreter


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Without a GPU: Triton's interpreter, for these tests only (the kernels are decorated on
    first use, inside the first test; other test modules keep seeing no Triton path)."""
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(autouse=True)
def dirty_device_memory():
    """Leave NaN in freed device memory, which XLA's allocator hands out next: jax-triton outputs
    are not initialised, so an element a kernel forgets to write shows as NaN. (The interpreter
    path fills its outputs with NaN itself.)"""
    if GPU:
        junk = jnp.full((256 * 2**20,), jnp.nan, jnp.float32)
        junk.block_until_ready()
        del junk
    yield


def rounded(x, dtype):
    """The inputs as the kernels see them (rounded to dtype), in float64; the state via fp32."""
    out = {n: np.asarray(jnp.asarray(x[n]).astype(DTYPES[dtype]).astype(jnp.float32), np.float64)
           for n in NAMES}
    s0 = x["initial_state"]
    out["initial_state"] = None if s0 is None else s0.astype(np.float32).astype(np.float64)
    out["mask"] = x["mask"]
    return out


def run(x, dtype, *, head_first=False, do=None, ds=None, grads=True):
    """(o, final_state, grads or None) of the Triton path, jit-compiled."""
    args = [jnp.asarray(x[n]).astype(DTYPES[dtype]) for n in NAMES]
    s0 = None if x["initial_state"] is None else jnp.asarray(x["initial_state"], jnp.float32)
    mask = None if x["mask"] is None else jnp.asarray(x["mask"])
    leaves = args + ([s0] if s0 is not None else [])

    def f(*a):
        return generalized_delta_rule(*a[:6], a[6] if len(a) == 7 else None, head_first=head_first,
                                      mask=mask)

    if not grads:
        o, s = jax.jit(f)(*leaves)
        return o, s, None
    (o, s), vjp = jax.vjp(jax.jit(f), *leaves)
    g = vjp((jnp.asarray(do).astype(o.dtype), jnp.asarray(ds, jnp.float32)))
    return o, s, g


def check(x, dtype, *, head_first=False, tol=None, label=""):
    """Forward (plain call) and forward + backward against the reference; returns the errors."""
    tol = TOLERANCE[dtype] if tol is None else tol
    xr = rounded(x, dtype)
    args = [xr[n] for n in NAMES]
    ref_o, ref_s = reference.generalized_delta_rule_reference(
        *args, xr["initial_state"], head_first=head_first, mask=xr["mask"])
    do, ds = make_cotangents(ref_o.shape, ref_s.shape, seed=SEED)
    # the reference takes the output's cotangent as the kernels get it: in the output's dtype
    # (for bf16 at T = 1 its rounding alone moved dr by 1e-2 against an unrounded reference)
    do_seen = np.asarray(jnp.asarray(do).astype(DTYPES[dtype]).astype(jnp.float32), np.float64)
    ref_g = reference.generalized_delta_rule_backward(
        *args, xr["initial_state"], do=do_seen, dfinal_state=ds, head_first=head_first,
        mask=xr["mask"])

    errors = {}
    o, s, _ = run(x, dtype, head_first=head_first, grads=False)
    errors["o (no grad)"] = rel_error(o, ref_o)
    errors["final_state (no grad)"] = rel_error(s, ref_s)
    o, s, g = run(x, dtype, head_first=head_first, do=do, ds=ds)
    assert o.dtype == DTYPES[dtype] and s.dtype == jnp.float32
    errors["o"] = rel_error(o, ref_o)
    errors["final_state"] = rel_error(s, ref_s)
    for name, gi, ri in zip(list(NAMES) + ["initial_state"], g, ref_g):
        if ri is None:
            assert x["initial_state"] is None
            continue
        errors["d" + name] = rel_error(gi, ri)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (
        f"{label} seed={SEED}: d{worst} relative error {errors[worst]:.2e} > {tol:.0e}; all: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors


@pytest.mark.parametrize("dtype", sizes(["bfloat16", "float32"], ["float32", "bfloat16"]))
@pytest.mark.parametrize("K", sizes([32, 64, 128], [32]))
@pytest.mark.parametrize("T", sizes([1, 15, 16, 17, 1000], [1, 17]))
def test_grid(T, K, dtype):
    x = make_inputs(2, T, 2, K, seed=SEED + T + K)
    check(x, dtype, label=f"T={T} K={K} {dtype}")


@pytest.mark.parametrize("state,mask,head_first", sizes(
    [(None, None, False), ("broadcast", None, False), ("full", "left", False),
     ("full", "right", True), ("broadcast", "random", True), (None, "random", False)],
    [("broadcast", "random", True), (None, "left", False)]))
def test_state_mask_layout(state, mask, head_first):
    B, T, H, K = sizes((3, 100, 2, 64), (2, 21, 2, 32))
    x = make_inputs(B, T, H, K, seed=SEED + 1, initial_state=state is not None,
                    state_batch=1 if state == "broadcast" else None, head_first=head_first, mask=mask)
    check(x, "float32", head_first=head_first, label=f"state={state} mask={mask} hf={head_first}")


# the interpreter computes (and then discards) the overflowing entries above the diagonal in numpy
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", sizes(["float32", "float16"], ["float32"]))
def test_full_decay_range(dtype):
    """Decays spread down to exactly 0 (w large) and exactly 1 (w = -inf): finite, accurate."""
    B, T, H, K = sizes((2, 200, 2, 64), (1, 33, 2, 32))
    x = make_inputs(B, T, H, K, seed=SEED + 2, decays="full")
    check(x, dtype, tol=FLOAT32_TOL["full"] if dtype == "float32" else None,
          label=f"full decays {dtype}")


@pytest.mark.parametrize("forced", sizes([False, True], [True]))
def test_segments(forced, monkeypatch):
    """Few (batch, head) pairs and many chunks: the sequence is cut into segments whose states are
    chained afterwards (forward and backward). ``forced`` lowers the segment length so that short
    sequences take that path too."""
    from rwkv_ops.jax._triton import configs

    if forced:
        monkeypatch.setattr(configs, "MIN_CHUNKS_PER_SEGMENT", 2)
        B, T, H, K = 1, sizes(200, 80), 2, 32
    else:
        B, T, H, K = 1, 2048, 2, 64
    cfg = triton_launcher.select_config(K, jnp.float32, T, B * H)
    n_chunks = -(-T // 16)
    assert cfg.chunks_per_segment < n_chunks, "the test must take the segment path"
    for state, mask in ((None, None), ("broadcast", "right")):
        x = make_inputs(B, T, H, K, seed=SEED + 3, initial_state=state is not None,
                        state_batch=1 if state == "broadcast" else None, mask=mask)
        check(x, "float32", label=f"segments T={T} state={state} mask={mask}")


@pytest.mark.parametrize("T,mask", [(48, None), (40, "random")])
def test_whole_and_tail_chunks(T, mask):
    """K = 64: whole chunks without a mask (the kernels' FULL mode: unmasked loads and stores)
    and a tail chunk with a mask."""
    x = make_inputs(2, T, 2, 64, seed=SEED + 4, mask=mask)
    check(x, "float32", label=f"whole/tail chunks T={T} mask={mask}")


def test_fp16_storage_matches_fp32(monkeypatch):
    """bf16 inputs (tf32 products): the prep tiles and the checkpoints stored as fp16 scaled by
    powers of two (configs.tile_dtype) give the outputs and gradients of fp32 storage up to the
    order of the products' sums (``assert_same_storage_results``)."""
    x = make_inputs(2, 300 if GPU else 40, 2, 32, seed=SEED)
    do, ds = make_cotangents((2, x["r"].shape[1], 2, 32), (2, 2, 32, 32), seed=SEED)
    configs = triton_launcher._configs()
    results = []
    for storage in ("float16", "float32"):
        monkeypatch.setattr(configs, "tile_dtype", lambda precision, _s=storage: _s)
        o, s, g = run(x, "bfloat16", do=do, ds=ds)
        results.append([o, s, *g])
    names = ["o", "final_state"] + ["d" + n for n in NAMES] + ["dinitial_state"]
    for name, first, second in zip(names, *results):
        assert_same_storage_results(name, first, second,
                                    fp32=name in ("final_state", "dinitial_state"), seed=SEED)


def test_transformations():
    """jit, grad, value_and_grad and checkpoint agree with each other and with the reference;
    output_final_state=False returns None; T = 0 returns the initial state."""
    B, T, H, K = sizes((2, 64, 2, 64), (1, 19, 2, 32))
    x = make_inputs(B, T, H, K, seed=SEED + 4)
    args = [jnp.asarray(x[n], jnp.float32) for n in NAMES]
    s0 = jnp.asarray(x["initial_state"], jnp.float32)
    do, ds = make_cotangents((B, T, H, K), (B, H, K, K), seed=SEED)
    do, ds = jnp.asarray(do, jnp.float32), jnp.asarray(ds, jnp.float32)

    def loss(*a):
        o, s = generalized_delta_rule(*a)
        return jnp.sum(o * do) + jnp.sum(s * ds)

    argnums = tuple(range(7))
    value, g1 = jax.jit(jax.value_and_grad(loss, argnums=argnums))(*args, s0)
    g2 = jax.grad(jax.checkpoint(loss), argnums=argnums)(*args, s0)
    g3 = jax.jit(jax.grad(jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable),
                          argnums=argnums))(*args, s0)
    ref = reference.generalized_delta_rule_backward(*[x[n] for n in NAMES], x["initial_state"],
                                                    do=np.asarray(do), dfinal_state=np.asarray(ds))
    for name, a, b, c, r in zip(list(NAMES) + ["initial_state"], g1, g2, g3, ref):
        for label, gi in (("jit(value_and_grad)", a), ("grad(checkpoint)", b), ("jit(grad(checkpoint))", c)):
            err = rel_error(gi, r)
            assert err <= 1e-5, f"seed={SEED} {label} d{name}: {err:.2e}"
    ref_o, ref_s = reference.generalized_delta_rule_reference(*[x[n] for n in NAMES], x["initial_state"])
    # the loss is an fp32 sum of a few thousand terms that may cancel: its error is bounded by the
    # terms' magnitudes, not by its own (relative errors up to 1.9e-5 of the value seen, 3e-7 of
    # the terms' magnitudes; XLA's CPU reductions may split differently from run to run)
    terms = (ref_o * np.asarray(do), ref_s * np.asarray(ds))
    ref_value = sum(np.sum(t) for t in terms)
    scale = sum(np.sum(np.abs(t)) for t in terms)
    assert abs(float(value) - ref_value) <= 1e-5 * scale, (
        f"seed={SEED} loss {float(value)} against {ref_value} (terms' magnitudes {scale:.3e})")

    o, s = jax.jit(lambda *a: generalized_delta_rule(*a, output_final_state=False))(*args)
    assert s is None and rel_error(o, reference.generalized_delta_rule_reference(
        *[x[n] for n in NAMES])[0]) <= 1e-5, f"seed={SEED}"

    empty = [a[:, :0] for a in args]
    o, s = generalized_delta_rule(*empty, s0[:1])
    assert o.shape == (B, 0, H, K) and s.shape == (B, H, K, K)
    np.testing.assert_array_equal(np.asarray(s), np.broadcast_to(np.asarray(s0[:1]), s.shape))


def test_one_device_mesh():
    """Batch- and head-sharded inputs under jit with a NamedSharding: on one device the partitioned
    call must still run, keep the shardings and match the reference."""
    B, T, H, K = sizes((2, 48, 4, 64), (2, 18, 2, 32))
    x = make_inputs(B, T, H, K, seed=SEED + 5)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    sx = NamedSharding(mesh, P("data", None, "model", None))
    ss = NamedSharding(mesh, P("data", "model", None, None))
    args = [jax.device_put(jnp.asarray(x[n], jnp.float32), sx) for n in NAMES]
    s0 = jax.device_put(jnp.asarray(x["initial_state"], jnp.float32), ss)
    do, ds = make_cotangents((B, T, H, K), (B, H, K, K), seed=SEED)

    def loss(*a):
        o, s = generalized_delta_rule(*a)
        return jnp.sum(o * do) + jnp.sum(s * ds), (o, s)

    f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))
    hlo = f.lower(*args, s0).compile().as_text()
    assert not re.search(r"all-gather|all-to-all", hlo)
    (_, (o, s)), g = f(*args, s0)
    assert o.sharding.is_equivalent_to(sx, 4) and g[0].sharding.is_equivalent_to(sx, 4)
    ref_o, ref_s = reference.generalized_delta_rule_reference(*[x[n] for n in NAMES], x["initial_state"])
    ref_g = reference.generalized_delta_rule_backward(*[x[n] for n in NAMES], x["initial_state"],
                                                      do=do, dfinal_state=ds)
    assert rel_error(o, ref_o) <= 1e-5 and rel_error(s, ref_s) <= 1e-5, f"seed={SEED}"
    for name, gi, r in zip(list(NAMES) + ["initial_state"], g, ref_g):
        assert rel_error(gi, r) <= 1e-5, f"seed={SEED} d{name}: {rel_error(gi, r):.2e}"
