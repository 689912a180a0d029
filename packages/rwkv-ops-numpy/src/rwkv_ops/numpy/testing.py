"""Helpers every backend's tests and benchmarks share: protocol inputs and error measures.

Inputs follow the benchmark protocol (ANCHORS.md): r, w, k, v, a, b ~ N(0, 1), then
``w = -softplus(w) - 0.5`` (decay >= 0.545, the model's range), ``a = a / ||a||`` over K,
``b = -a * sigmoid(b)``, ``s0 = 0.1 * N(0, 1)``. ``decays="full"`` instead spreads the decays over
(0, 1], down to exactly 0, to probe numerical safety.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

NAMES = ("r", "w", "k", "v", "a", "b")

# Relative error bounds of the float32 chunked paths against the float64 reference, by decay range.
# With "full" decays the bound is the lambda floor's, not rounding: a float32 path uses the decay
# e^-10 = 4.5e-5 wherever the true one is smaller (LAMBDA_FLOOR), and that alone reaches 1.3e-4 in
# a small gradient such as dinitial_state at B=2 T=33 H=2 K=5 (the torch native path: 2-5% of
# seeds over 1e-4; against a reference with the same floor the error is 6e-7).
FLOAT32_TOL = {"model": 1e-5, "full": 2e-4}


def seed_from_env(default: Optional[int] = None) -> int:
    """A fresh seed per run (printed by the caller), or RWKV_OPS_TEST_SEED to replay one."""
    if "RWKV_OPS_TEST_SEED" in os.environ:
        return int(os.environ["RWKV_OPS_TEST_SEED"])
    if default is not None:
        return default
    return int(np.random.SeedSequence().entropy % (2**31))


def make_inputs(B, T, H, K, *, seed, decays="model", initial_state=True, state_batch=None,
                head_first=False, mask=None):
    """Random float64 inputs of the protocol.

    Returns a dict with r, w, k, v, a, b ([B, T, H, K], or [B, H, T, K] when head_first),
    initial_state ([state_batch or B, H, K, K] or None) and mask ([B, T] bool or None).
    ``mask``: None, "left" (left padding), "right" (right padding) or "random".
    """
    rng = np.random.default_rng(seed)
    x = {n: rng.standard_normal((B, T, H, K)) for n in NAMES}
    if decays == "model":
        x["w"] = -np.logaddexp(0.0, x["w"]) - 0.5
    elif decays == "full":
        # log-uniform exp(w) over [e^-6, e^6]: decays from ~1 down to e^-403 = 0; a few exact 0s
        # (w large) and exact 1s (w = -inf).
        x["w"] = rng.uniform(-6.0, 6.0, size=(B, T, H, K))
        flat = x["w"].reshape(-1)
        flat[rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)] = 800.0
        flat[rng.choice(flat.size, size=max(1, flat.size // 50), replace=False)] = -np.inf
    else:
        raise ValueError(f"decays must be 'model' or 'full', got {decays!r}")
    norm = np.linalg.norm(x["a"], axis=-1, keepdims=True)
    x["a"] = x["a"] / np.maximum(norm, 1e-12)
    x["b"] = -x["a"] / (1.0 + np.exp(-x["b"]))
    if head_first:
        x = {n: np.ascontiguousarray(np.swapaxes(v, 1, 2)) for n, v in x.items()}
    x["initial_state"] = None
    if initial_state:
        x["initial_state"] = 0.1 * rng.standard_normal((state_batch or B, H, K, K))
    x["mask"] = None
    if mask is not None:
        lengths = rng.integers(max(1, T // 2), T + 1, size=B)
        lengths[0] = max(1, T - 3) if T > 1 else 1
        pos = np.arange(T)[None, :]
        if mask == "right":
            m = pos < lengths[:, None]
        elif mask == "left":
            m = pos >= (T - lengths)[:, None]
        elif mask == "random":
            m = rng.random((B, T)) < 0.7
        else:
            raise ValueError(f"mask must be None, 'left', 'right' or 'random', got {mask!r}")
        x["mask"] = m
    return x


def make_cotangents(o_shape, state_shape, *, seed):
    """Random gradients for o and for a non-zero, non-symmetric final state."""
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal(o_shape), rng.standard_normal(state_shape)


def rel_error(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes a tolerance)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if x.shape != ref.shape:
        raise AssertionError(f"shape {x.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(x)):
        return float("inf")
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(x - ref)
    if denom == 0.0:
        return float(num)
    return float(num / denom)


def assert_close(name, x, ref, tol):
    err = rel_error(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > tolerance {tol:.1e}"
    return err


def assert_same_storage_results(name, first, second, *, fp32, seed):
    """Check that a result computed with fp16 storage of the prep tiles and checkpoints (first)
    equals the one of fp32 storage (second); fp32: the result is float32 (else bf16 / fp16).

    The scales are powers of two and the stored values tf32-exact, so the products take the same
    numbers; only the order of their sums may differ. Compiled for a GPU, the two storages'
    kernels may order the tensor cores' accumulations differently (H200: at most 5.6e-5 relative
    for bf16 outputs, where up to 0.07% of the elements differ by one unit in the last place;
    6.7e-8 for fp32 ones). Under Triton's interpreter numpy computes the products, and it sums
    an fp32 product with a transposed operand in another order than an fp16 one (whose operands
    it copies first): fp32 results then differ in the last bit (1.2e-8 relative). A scale that
    is not a power of two (15/16 of one, tried under the interpreter) perturbs every stored value
    instead: 2-10% of the bf16 elements then differ, bf16 results move by 4-9e-4 and fp32 ones
    by 2e-4. So: fp32 results within 1e-6; bf16 / fp16 ones within 2e-4, with fewer than 1% of
    their elements different.
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    diff = rel_error(first, second)
    share = float(np.mean(first != second))
    if fp32:
        assert diff <= 1e-6, f"seed={seed}: {name} moves by {diff:.2e} with fp32 storage"
    else:
        assert diff <= 2e-4 and share < 0.01, (
            f"seed={seed}: {name} moves by {diff:.2e} with fp32 storage ({share:.2%} of the "
            "elements differ)")


def seed_for(request) -> int:
    """A per-test seed: the run's seed (``seed_from_env``) offset by the test's name, so that
    parametrised cases draw different inputs and a failure names a seed to replay."""
    import zlib

    return seed_from_env() + zlib.crc32(request.node.name.encode()) % 1000


def assert_errors(errors, tol, seed):
    """Assert every relative error in ``errors`` ({name: error}) is within ``tol``; the message
    lists them all with the seed."""
    worst = max(errors, key=errors.get)
    listing = " ".join(f"{n}={e:.2e}" for n, e in errors.items())
    assert errors[worst] <= tol, f"seed={seed}: {worst} error {errors[worst]:.3e} > {tol:.0e} ({listing})"


def override_config(monkeypatch, launcher, **changes):
    """Make a Triton launcher (``rwkv_ops.torch.triton_launcher`` or ``rwkv_ops.jax.
    triton_launcher``) run with its ChunkConfig fields ``changes`` set, for the rest of the test
    (pytest's ``monkeypatch`` undoes it)."""
    real = launcher.select_config
    monkeypatch.setattr(launcher, "select_config", lambda *args: real(*args).with_(**changes))
