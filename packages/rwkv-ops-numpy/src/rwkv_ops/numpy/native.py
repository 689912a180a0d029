"""Chunked NumPy forward of the generalized delta rule (the WY form of ALGORITHM.md section 2).

This file is also the readable template of the native implementations in the other frameworks:
they follow the same steps, names and constants.

Per (batch, head), the sequence is cut into chunks of L = 16 steps. Inside a chunk, with
``Lam_i = sum_{t <= i} lambda_t`` (lambda = log d = -exp(w)) the decay from step j to step i is
``exp(Lam_i - Lam_j)``. Every pairwise product is factorised around the chunk's middle step m:
``q~_i = r_i exp(Lam_i - Lam_m)`` and ``k^_j = k_j exp(Lam_m - Lam_j)``, so ``q~_i . k^_j`` carries
exactly the decay from j to i, and no factor exceeds ``exp(L/2 * LAMBDA_FLOOR)`` (finite in float32).
The four L x L matrices A_qk, A_qb (inclusive lower triangle) and A_ak, A_ab (strict) then give

    U = (I - A_ab)^-1 (A_ak V + a_S S_0^T)      rows u_i = S_{i-1} a_i
    Y = r_S S_0^T + A_qk V + A_qb U
    S_L = S_0 diag(exp(Lam_L)) + U^T b_bar + V^T k_bar

(a_S = a exp(Lam_{i-1}), r_S = r exp(Lam_i), k_bar = k exp(Lam_L - Lam_j): all factors <= 1). The
chunks run in parallel except for a scan of S over chunks: two small matrix products per chunk.

Numerical safety: lambda is clamped at ``-LAMBDA_FLOOR`` (float32: decays below e^-10 = 4.5e-5 act as
4.5e-5; float64: e^-80), so that the factorised products stay finite. Masked-out triangle entries
may overflow and are removed by selection, never by multiplication (inf * 0 would be NaN). Padded
steps (mask 0) become identity steps: lambda = 0, k = 0, a = 0; their outputs are zeroed.
"""

from __future__ import annotations

import numpy as np

CHUNK = 16
# |lambda| bound per compute dtype: CHUNK / 2 * floor must stay below log(max float) ~ 88 (709).
LAMBDA_FLOOR = {np.dtype(np.float32): 10.0, np.dtype(np.float64): 80.0}


def compute_dtype(*dtypes):
    """float64 when any input is float64, else float32 (bf16 / fp16 inputs compute in float32)."""
    return np.dtype(np.float64) if any(np.dtype(d) == np.float64 for d in dtypes) else np.dtype(np.float32)


def chunked_forward(r, w, k, v, a, b, s0, mask):
    """The chunked forward on [B, T, H, K] arrays of the compute dtype.

    Args:
        r, w, k, v, a, b: [B, T, H, K], already in the compute dtype.
        s0: [B, H, K, K] state (compute dtype).
        mask: [B, T] bool or None.

    Returns:
        y [B, T, H, K] and the final state [B, H, K, K], both in the compute dtype.
    """
    cd = r.dtype
    B, T, H, K = r.shape
    L = CHUNK
    NC = -(-T // L)
    Tp = NC * L
    m = np.ones((B, T), dtype=bool) if mask is None else mask.astype(bool)
    if Tp != T:
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        r, w, k, v, a, b = (np.pad(x, pad) for x in (r, w, k, v, a, b))
        m = np.pad(m, ((0, 0), (0, Tp - T)))
    keep = m[:, :, None, None]
    with np.errstate(over="ignore"):
        lam = np.maximum(-np.exp(w), -LAMBDA_FLOOR[cd])
    lam = np.where(keep, lam, 0).astype(cd)
    k = np.where(keep, k, 0).astype(cd)
    a = np.where(keep, a, 0).astype(cd)

    def chunks(x):  # [B, Tp, H, K] -> [B, H, NC, L, K]
        return x.reshape(B, NC, L, H, K).transpose(0, 3, 1, 2, 4)

    r, lam, k, v, a, b = (chunks(x) for x in (r, lam, k, v, a, b))
    lam_in = np.cumsum(lam, axis=-2)          # Lam_i, inclusive
    lam_ex = lam_in - lam                      # Lam_{i-1}
    lam_mid = lam_in[..., CHUNK // 2 - 1: CHUNK // 2, :]
    lam_end = lam_in[..., -1:, :]
    with np.errstate(over="ignore", invalid="ignore"):
        q_t = r * np.exp(lam_in - lam_mid)
        a_t = a * np.exp(lam_ex - lam_mid)
        k_h = k * np.exp(lam_mid - lam_in)
        b_h = b * np.exp(lam_mid - lam_in)
        incl = np.tril(np.ones((L, L), dtype=bool))
        strict = np.tril(np.ones((L, L), dtype=bool), -1)
        kt, bt = np.swapaxes(k_h, -1, -2), np.swapaxes(b_h, -1, -2)
        A_qk = np.where(incl, q_t @ kt, 0)
        A_qb = np.where(incl, q_t @ bt, 0)
        A_ak = np.where(strict, a_t @ kt, 0)
        A_ab = np.where(strict, a_t @ bt, 0)
    r_s = r * np.exp(lam_in)
    a_s = a * np.exp(lam_ex)
    decay_end = np.exp(lam_end)                # [B, H, NC, 1, K]
    k_bar = k * np.exp(lam_end - lam_in)
    b_bar = b * np.exp(lam_end - lam_in)

    # (I - A_ab) is unit lower triangular: one solve for both right-hand sides.
    eye = np.eye(L, dtype=cd)
    rhs = np.concatenate([A_ak @ v, a_s], axis=-1)
    sol = np.linalg.solve(eye - A_ab, rhs)
    u0, wa = sol[..., :K], sol[..., K:]       # U = u0 + wa S_0^T

    # Scan of the state over chunks; keeps the state entering each chunk.
    states = np.empty((B, H, NC, K, K), dtype=cd)
    S = s0.astype(cd, copy=True)
    x_state = np.swapaxes(v, -1, -2) @ k_bar   # V^T k_bar, [B, H, NC, V, K]
    for c in range(NC):
        states[:, :, c] = S
        ut = np.swapaxes(u0[:, :, c], -1, -2) + S @ np.swapaxes(wa[:, :, c], -1, -2)
        S = S * decay_end[:, :, c] + ut @ b_bar[:, :, c] + x_state[:, :, c]
    st = np.swapaxes(states, -1, -2)
    u = u0 + wa @ st
    y = r_s @ st + A_qk @ v + A_qb @ u         # [B, H, NC, L, V]
    y = y.transpose(0, 2, 3, 1, 4).reshape(B, Tp, H, K)[:, :T]
    y = np.where(m[:, :T, None, None], y, 0)
    return y, S
