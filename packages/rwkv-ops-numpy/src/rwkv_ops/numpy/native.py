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
chunks run in parallel except for a scan of S over chunks: a few small matrix products per chunk.
Everything that does not depend on S_0 is computed for all chunks at once before the scan:
U = u0 + wa S_0^T and Y = y0 + q_eff S_0^T.

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


def inverse_unit_lower(A):
    """(I - A)^-1 for A strictly lower triangular [..., L, L], L <= 16.

    A is nilpotent (A^16 = 0), so (I - A)^-1 = (I + A)(I + A^2)(I + A^4)(I + A^8): six batched
    products instead of a serial substitution (np.linalg.solve is ~10x slower on many small systems).
    """
    assert A.shape[-1] <= 16
    eye = np.eye(A.shape[-1], dtype=A.dtype)
    A2 = A @ A
    A4 = A2 @ A2
    A8 = A4 @ A4
    return ((eye + A) @ (eye + A2)) @ ((eye + A4) @ (eye + A8))


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
    if Tp != T:
        # Tail padding as identity steps: w = -inf (decay 1), k = a = 0; their outputs are cut off.
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        r, k, v, a, b = (np.pad(x, pad) for x in (r, k, v, a, b))
        w = np.pad(w, pad, constant_values=-np.inf)
    if mask is not None:
        keep = np.pad(mask.astype(bool), ((0, 0), (0, Tp - T)))[:, :, None, None]
        w = np.where(keep, w, -np.inf)         # padded steps: decay 1, k = a = 0
        k = np.where(keep, k, 0).astype(cd)
        a = np.where(keep, a, 0).astype(cd)

    def chunks(x):  # [B, Tp, H, K] -> [NC, B, H, L, K], a view: chunk c is x[c]
        return x.reshape(B, NC, L, H, K).transpose(1, 0, 3, 2, 4)

    # r, k, a, b stay views: the products that consume them write contiguous chunk-major buffers
    # (one pass instead of a transposing copy and then a product). v feeds matrix products: copy.
    r, w, k, a, b = (chunks(x) for x in (r, w, k, a, b))
    v = np.ascontiguousarray(chunks(v))
    lam = np.empty(v.shape, dtype=cd)
    with np.errstate(over="ignore"):
        np.exp(w, out=lam)                     # in place: temporaries cost page faults
    np.negative(lam, out=lam)
    np.maximum(lam, -LAMBDA_FLOOR[cd], out=lam)
    lam_in = np.tril(np.ones((L, L), dtype=cd)) @ lam   # Lam_i, inclusive (cumsum as a product)
    lam_mid = lam_in[..., CHUNK // 2 - 1: CHUNK // 2, :].copy()
    lam_end = lam_in[..., -1:, :].copy()
    # Two exponentials per element; every other factor is one of these times a per-chunk vector
    # (exp(Lam_m) >= e^-80 and exp(Lam_L - Lam_m) >= e^-80 stay normal numbers: no underflow).
    # Computed in place: on CPU the page faults of fresh temporaries cost as much as the arithmetic.
    rel = np.subtract(lam_in, lam_mid, out=lam_in)              # Lam_i - Lam_m
    e_ex = np.exp(np.subtract(rel, lam, out=lam), out=lam)      # exp(Lam_{i-1} - Lam_m)
    e_in = np.exp(rel, out=rel)                                 # exp(Lam_i - Lam_m)
    e_mid = np.exp(lam_mid)
    e_end = np.exp(lam_end - lam_mid)
    # Stacked operands [q~; a~] and [k^; b^]: one product gives all four L x L blocks.
    qa = np.empty(r.shape[:-2] + (2 * L, K), dtype=cd)
    kb = np.empty_like(qa)
    q_t = np.multiply(r, e_in, out=qa[..., :L, :])
    a_t = np.multiply(a, e_ex, out=qa[..., L:, :])
    k_h = np.divide(k, e_in, out=kb[..., :L, :])       # k_j exp(Lam_m - Lam_j)
    b_h = np.divide(b, e_in, out=kb[..., L:, :])
    with np.errstate(over="ignore", invalid="ignore"):
        incl = np.tril(np.ones((L, L), dtype=bool))
        strict = np.tril(np.ones((L, L), dtype=bool), -1)
        # Entries above the diagonal may overflow; they are dropped by selection.
        full = qa @ np.swapaxes(kb, -1, -2)
        A_qk = np.where(incl, full[..., :L, :L], 0)
        A_qb = np.where(incl, full[..., :L, L:], 0)
        A_ak = np.where(strict, full[..., L:, :L], 0)
        A_ab = np.where(strict, full[..., L:, L:], 0)
    # The stacked operands are rescaled in place (fewer fresh temporaries: on CPU their page faults
    # cost as much as the arithmetic): qa becomes [r_S; a_S], kb becomes [k_bar; b_bar].
    np.multiply(qa, e_mid, out=qa)
    r_s, a_s = qa[..., :L, :], qa[..., L:, :]  # r exp(Lam_i), a exp(Lam_{i-1})
    decay_end_t = np.swapaxes(e_end * e_mid, -1, -2)        # exp(Lam_L), [NC, B, H, K, 1]
    np.multiply(kb, e_end, out=kb)             # k exp(Lam_L - Lam_j), b exp(Lam_L - Lam_j)
    kb_bar_t = np.swapaxes(kb, -1, -2)         # [NC, B, H, K, 2L], a transposed view

    # With St = S^T (K x V): U = u0 + wa St, and Y = A_qk V + A_qb U + r_S St = y0 + q_eff St.
    sol = inverse_unit_lower(A_ab) @ np.concatenate([A_ak @ v, a_s], axis=-1)
    u0, wa = sol[..., :K], np.ascontiguousarray(sol[..., K:])
    via_u = A_qb @ sol
    y0 = A_qk @ v + via_u[..., :K]
    q_eff = np.ascontiguousarray(r_s + via_u[..., K:])

    # The only sequential part: the state scan over chunks, three small products per chunk.
    # St_next = St diag(d_L) + [k_bar; b_bar]^T [V; U], with [V; U] assembled in one buffer.
    y = np.empty((NC, B, H, L, K), dtype=cd)
    vu = np.empty((B, H, 2 * L, K), dtype=cd)
    St = np.ascontiguousarray(np.swapaxes(s0.astype(cd), -1, -2))
    for c in range(NC):
        np.add(y0[c], q_eff[c] @ St, out=y[c])
        vu[:, :, :L] = v[c]
        np.add(u0[c], wa[c] @ St, out=vu[:, :, L:])
        St = St * decay_end_t[c] + kb_bar_t[c] @ vu
    y = y.transpose(1, 0, 3, 2, 4).reshape(B, Tp, H, K)[:, :T]
    if mask is not None:
        y = np.where(mask.astype(bool)[:, :, None, None], y, 0)
    return y, np.swapaxes(St, -1, -2)
