"""Chunked JAX implementation of the generalized delta rule ("native": CPU, TPU and GPU).

A port of ``rwkv_ops.numpy.native`` (the readable template: same steps, names and constants) in
which the intra-chunk work is batched over every chunk at once and the scan of the state over chunks
is a ``jax.lax.scan``, so compile time does not grow with T.

The gradient is written by hand (``chunked_core``'s VJP, the backward of ALGORITHM.md section 2 in
this file's mid-chunk anchoring): the forward keeps only its inputs and the state entering each
chunk, the backward recomputes the chunk terms and runs a reverse scan of dL/dS. Automatic
differentiation of the forward gives the same numbers but keeps every intermediate: on CPU it needed
1.5x the temporary memory and 1.3x the time. The function works under jit, grad and vmap;
forward-mode (jvp, jacfwd) is not available, as for any ``jax.custom_vjp``.

Numerical safety, outputs and gradients finite for every decay in [0, 1]:

* lambda = -exp(w) is clamped at ``-LAMBDA_FLOOR`` by clamping w *before* the exponential (exp(w) =
  inf on a discarded branch would still poison its gradient with 0 * inf = NaN); its derivative is
  the true decay's (see ``log_decay``).
* Masked-out triangle entries of the L x L matrices may overflow; they are removed by ``jnp.where``,
  never by a multiplication. The factors q~, k^, a~, b^ themselves stay finite thanks to the
  mid-chunk anchoring.
* Padded steps (mask 0) become identity steps: w = -inf (lambda = 0) and r, k, v, a, b zeroed by
  selection, so no gradient reaches them and garbage there (even NaN) cannot leak in.

Every product runs at ``Precision.HIGHEST``: float32 inputs are computed in full float32, never
TF32.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from rwkv_ops.common import docs
from rwkv_ops.jax.api import as_arrays, validate

KERNEL_TYPE = "native"
SUPPORTED_HEAD_SIZES = None  # any K

CHUNK = 16
# |lambda| bound per compute dtype: CHUNK / 2 * floor must stay below log(max float) ~ 88 (709).
LAMBDA_FLOOR = {jnp.dtype(jnp.float32): 10.0, jnp.dtype(jnp.float64): 80.0}

_HIGHEST = jax.lax.Precision.HIGHEST


def unavailable_reason(head_size=None):
    """The native path runs everywhere and for every head size: ``(None, True)``."""
    return None, True


def compute_dtype(*dtypes):
    """float64 when any input is float64 (only possible with x64 enabled), else float32."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _mm(x, y):
    return jnp.matmul(x, y, precision=_HIGHEST)


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def log_decay(w, floor):
    """lambda = log d = -exp(w), clamped at -floor (decays below e^-floor act as e^-floor).

    The clamp keeps the factorised chunk products finite; it is not part of the operator. So the
    derivative is that of the true decay: dL/dw = dL/dd * dd/dw with dd/dw = lambda * d taken at
    the true w, and dL/dd = dL/dlambda / d_clamped read off the clamped forward. For unclamped
    entries this is the ordinary chain rule; for clamped ones it keeps the small but non-zero true
    gradient (|lambda d| <= floor e^-floor) that a plain clamp would zero.
    """
    log_floor = math.log(floor)
    # Clamp w before the exponential: exp(w) = inf on a discarded branch would still poison the
    # gradient (0 * inf = NaN).
    return -jnp.exp(jnp.where(w < log_floor, w, log_floor))


@log_decay.defjvp
def _log_decay_jvp(floor, primals, tangents):
    (w,), (w_dot,) = primals, tangents
    log_floor = math.log(floor)
    clamped = w >= log_floor
    w_free = jnp.where(clamped, log_floor, w)
    # Beyond w = 20, exp(w - exp(w)) is 0 in every dtype; capping there keeps inf - inf (w = +inf)
    # out of the slope.
    w_big = jnp.where(clamped, jnp.minimum(w, 20.0), log_floor)
    # lambda exp(lambda - lambda_clamped) = -exp(w - exp(w) + floor) when clamped.
    slope = jnp.where(clamped, -jnp.exp(w_big - jnp.exp(w_big) + floor), -jnp.exp(w_free))
    return log_decay(w, floor), slope * w_dot


def _unit_lower_inverse(A):
    # A is strictly lower triangular and L x L with L = 16, so A^16 = 0 and
    # (I - A)^-1 = I + A + ... + A^15 = (I + A)(I + A^2)(I + A^4)(I + A^8): six small products.
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    inverse = eye + A
    power = A
    for _ in range(int(math.log2(A.shape[-1])) - 1):
        power = _mm(power, power)
        inverse = _mm(inverse, eye + power)
    return inverse


def _solve_by_inverse(A, rhs, transpose=False):
    inverse = _unit_lower_inverse(A)
    return _mm(_mT(inverse) if transpose else inverse, rhs)


def _solve_by_triangular(A, rhs, transpose=False):
    eye = jnp.eye(A.shape[-1], dtype=A.dtype)
    return solve_triangular(eye - A, rhs, trans=1 if transpose else 0, lower=True,
                            unit_diagonal=True)


def solve_unit_lower(A, rhs, transpose=False):
    """Solve (I - A) X = rhs, or (I - A)^T X = rhs, for strictly lower triangular A.

    A: [..., L, L]; rhs: [..., L, N]. On accelerators this is ``solve_triangular``. On CPU,
    jaxlib's batched LAPACK triangular solve (a custom call that fans its batch out over XLA's
    intra-op thread pool) deadlocks when two of them run at once on a small pool, as in a forward +
    backward on 2 cores (seen with jax 0.10.2); there the inverse is built from matrix products.
    """
    return jax.lax.platform_dependent(A, rhs, cpu=partial(_solve_by_inverse, transpose=transpose),
                                      default=partial(_solve_by_triangular, transpose=transpose))


def _chunk_terms(r, lam, k, v, a, b):
    """Everything of the chunks that does not depend on the carried state (no scan involved).

    Inputs are [NC, B, H, L, K] (chunk axis first). Lam_i = sum_{t <= i} lambda_t within the chunk;
    every pairwise factor is anchored at the middle step m (see the module docstring).
    """
    L = CHUNK
    incl = jnp.tril(jnp.ones((L, L), dtype=bool))
    strict = jnp.tril(jnp.ones((L, L), dtype=bool), -1)
    lam_in = jnp.cumsum(lam, axis=-2)          # Lam_i, inclusive
    lam_ex = lam_in - lam                      # Lam_{i-1}
    lam_mid = lam_in[..., CHUNK // 2 - 1: CHUNK // 2, :]
    lam_end = lam_in[..., -1:, :]
    e_q = jnp.exp(lam_in - lam_mid)            # <= e^(L/2 * floor): finite
    e_a = jnp.exp(lam_ex - lam_mid)
    e_k = jnp.exp(lam_mid - lam_in)
    mid = jnp.exp(lam_mid)                     # [NC, B, H, 1, K]
    decay_end = jnp.exp(lam_end)
    tail = jnp.exp(lam_end - lam_mid)
    t = dict(incl=incl, strict=strict, e_q=e_q, e_a=e_a, e_k=e_k, decay_end=decay_end)
    t["e_in"] = e_q * mid                      # exp(Lam_i)
    t["e_ex"] = e_a * mid                      # exp(Lam_{i-1})
    t["e_tail"] = e_k * tail                   # exp(Lam_L - Lam_i)
    q_t, a_t, k_h, b_h = r * e_q, a * e_a, k * e_k, b * e_k
    kt, bt = _mT(k_h), _mT(b_h)
    A_qk = jnp.where(incl, _mm(q_t, kt), 0)
    A_qb = jnp.where(incl, _mm(q_t, bt), 0)
    A_ak = jnp.where(strict, _mm(a_t, kt), 0)
    A_ab = jnp.where(strict, _mm(a_t, bt), 0)
    r_s = q_t * mid
    a_s = a_t * mid
    k_bar = k_h * tail
    b_bar = b_h * tail
    # (I - A_ab) is unit lower triangular: one solve for both right-hand sides.
    rhs = jnp.concatenate([_mm(A_ak, v), a_s], axis=-1)
    sol = solve_unit_lower(A_ab, rhs)
    K = r.shape[-1]
    u0, wa = sol[..., :K], sol[..., K:]       # U = u0 + wa S_0^T
    t.update(q_t=q_t, a_t=a_t, k_h=k_h, b_h=b_h, A_qk=A_qk, A_qb=A_qb, A_ak=A_ak, A_ab=A_ab,
             r_s=r_s, a_s=a_s, k_bar=k_bar, b_bar=b_bar, sol=sol, u0=u0, wa=wa)
    return t


def _scan_forward(t, v, s0, keep_states):
    """Carry the state over the chunks; returns (Y's state part [NC, B, H, L, V], S_T, states)."""
    # Y = r_s S_0^T + A_qk V + A_qb (u0 + wa S_0^T): both S_0^T terms share one product.
    q_eff = t["r_s"] + _mm(t["A_qb"], t["wa"])

    def step(S, xs):
        u0_c, wa_c, q_c, decay_c, b_bar_c, v_c, k_bar_c = xs
        ut = _mT(u0_c) + _mm(S, _mT(wa_c))    # U^T = S_{i-1} a_i as columns
        y_c = _mm(q_c, _mT(S))
        S_next = S * decay_c + _mm(ut, b_bar_c) + _mm(_mT(v_c), k_bar_c)
        return S_next, ((y_c, S) if keep_states else y_c)

    xs = (t["u0"], t["wa"], q_eff, t["decay_end"], t["b_bar"], v, t["k_bar"])
    S, out = jax.lax.scan(step, s0, xs)
    y_s, states = out if keep_states else (out, None)
    return y_s, S, states


def _output(t, v, y_s):
    return y_s + _mm(t["A_qk"], v) + _mm(t["A_qb"], t["u0"])


@jax.custom_vjp
def chunked_core(r, lam, k, v, a, b, s0):
    """The recurrence on chunked inputs: r, lam, k, v, a, b [NC, B, H, L, K], s0 [B, H, K, K].

    Returns Y [NC, B, H, L, V] and the final state [B, H, V, K]. Its gradient is written by hand
    (ALGORITHM.md section 2): only the inputs and the state entering each chunk are kept for the
    backward, which recomputes the chunk terms.
    """
    t = _chunk_terms(r, lam, k, v, a, b)
    y_s, S, _ = _scan_forward(t, v, s0, keep_states=False)
    return _output(t, v, y_s), S


def _core_fwd(r, lam, k, v, a, b, s0):
    t = _chunk_terms(r, lam, k, v, a, b)
    y_s, S, states = _scan_forward(t, v, s0, keep_states=True)
    return (_output(t, v, y_s), S), (r, lam, k, v, a, b, states)


def _core_bwd(res, cotangents):
    r, lam, k, v, a, b, states = res
    dY, dS_T = cotangents
    t = _chunk_terms(r, lam, k, v, a, b)
    incl, strict = t["incl"], t["strict"]
    dU_y = _mm(_mT(t["A_qb"]), dY)

    # Reverse scan of G = dL/dS at each chunk end. Per chunk, with S_0 the state entering it:
    #   S_L = S_0 diag(P_L) + U^T b_bar + V^T k_bar,  U = u0 + wa S_0^T,
    #   Y = r_s S_0^T + A_qk V + A_qb U.
    # Only what the recursion needs runs inside the scan (three small products per chunk); every
    # other product with S_0 or G is batched over all chunks afterwards, from the saved states and
    # the G of each chunk end.
    U = t["u0"] + _mm(t["wa"], _mT(states))

    def step(G, xs):
        dU_y_c, b_bar_c, dY_c, r_s_c, wa_c, decay_c = xs
        dU = dU_y_c + _mm(b_bar_c, _mT(G))
        G_prev = G * decay_c + _mm(_mT(dY_c), r_s_c) + _mm(_mT(dU), wa_c)
        return G_prev, (G, dU)

    xs = (dU_y, t["b_bar"], dY, t["r_s"], t["wa"], t["decay_end"])
    ds0, (G_end, dU) = jax.lax.scan(step, dS_T, xs, reverse=True)
    d_r_s = _mm(dY, states)
    d_wa = _mm(dU, states)
    d_k_bar = _mm(v, G_end)
    d_b_bar = _mm(U, G_end)
    d_decay = jnp.sum(states * G_end, axis=-2, keepdims=True)
    dv_state = _mm(t["k_bar"], _mT(G_end))

    # Through the solve: sol = (I - A_ab)^-1 [A_ak V, a_s].
    d_sol = jnp.concatenate([dU, d_wa], axis=-1)
    d_rhs = solve_unit_lower(t["A_ab"], d_sol, transpose=True)
    K = r.shape[-1]
    d_akv, d_a_s = d_rhs[..., :K], d_rhs[..., K:]
    dA_ab = jnp.where(strict, _mm(d_rhs, _mT(t["sol"])), 0)
    dA_ak = jnp.where(strict, _mm(d_akv, _mT(v)), 0)
    dA_qk = jnp.where(incl, _mm(dY, _mT(v)), 0)
    dA_qb = jnp.where(incl, _mm(dY, _mT(U)), 0)
    dv = _mm(_mT(t["A_qk"]), dY) + _mm(_mT(t["A_ak"]), d_akv) + dv_state

    # Through the four L x L matrices to the anchored factors.
    q_t, a_t, k_h, b_h = t["q_t"], t["a_t"], t["k_h"], t["b_h"]
    dq_t = _mm(dA_qk, k_h) + _mm(dA_qb, b_h)
    da_t = _mm(dA_ak, k_h) + _mm(dA_ab, b_h)
    dk_h = _mm(_mT(dA_qk), q_t) + _mm(_mT(dA_ak), a_t)
    db_h = _mm(_mT(dA_qb), q_t) + _mm(_mT(dA_ab), a_t)

    # Elementwise factors: each x * exp(...) sends x * d/dx back to its exponent.
    dr = dq_t * t["e_q"] + d_r_s * t["e_in"]
    da = da_t * t["e_a"] + d_a_s * t["e_ex"]
    dk = dk_h * t["e_k"] + d_k_bar * t["e_tail"]
    db = db_h * t["e_k"] + d_b_bar * t["e_tail"]
    g_q, g_a = dq_t * q_t, da_t * a_t
    g_k = dk_h * k_h + db_h * b_h
    g_bar = d_k_bar * t["k_bar"] + d_b_bar * t["b_bar"]
    g_in = g_q - g_k + d_r_s * t["r_s"] - g_bar            # d/dLam_i
    g_ex = g_a + d_a_s * t["a_s"]                           # d/dLam_{i-1}
    g_mid = jnp.sum(g_k - g_q - g_a, axis=-2, keepdims=True)  # d/dLam_m
    g_end = jnp.sum(g_bar, axis=-2, keepdims=True) + d_decay * t["decay_end"]
    # Lam_i = sum_{j <= i} lambda_j: lambda_j collects Lam_i for i >= j, Lam_{i-1} for i > j, Lam_m
    # for j <= m and Lam_L always.
    before_mid = (jnp.arange(CHUNK) < CHUNK // 2)[:, None]
    dlam = (jnp.cumsum(g_in[..., ::-1, :], axis=-2)[..., ::-1, :]
            + jnp.cumsum(g_ex[..., ::-1, :], axis=-2)[..., ::-1, :] - g_ex
            + jnp.where(before_mid, g_mid, 0) + g_end)
    return dr, dlam, dk, dv, da, db, ds0


chunked_core.defvjp(_core_fwd, _core_bwd)


def chunked_forward(r, w, k, v, a, b, s0, mask):
    """The chunked recurrence on [B, T, H, K] arrays of the compute dtype (T >= 1).

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
    if mask is not None:
        # Padded steps become identity steps (w = -inf: lambda = 0; nothing written). Selecting
        # every input there also keeps garbage (even NaN) out of the outputs and the gradients.
        keep = mask[:, :, None, None]
        w = jnp.where(keep, w, -jnp.inf)
        r, k, v, a, b = (jnp.where(keep, x, 0) for x in (r, k, v, a, b))
    lam = log_decay(w, LAMBDA_FLOOR[jnp.dtype(cd)])
    if Tp != T:
        # Zero padding is an identity step too (lambda = 0, k = a = 0).
        pad = ((0, 0), (0, Tp - T), (0, 0), (0, 0))
        r, lam, k, v, a, b = (jnp.pad(x, pad) for x in (r, lam, k, v, a, b))

    def chunks(x):  # [B, Tp, H, K] -> [NC, B, H, L, K]: chunk axis first, ready for the scan
        return x.reshape(B, NC, L, H, K).transpose(1, 0, 3, 2, 4)

    y, S = chunked_core(*(chunks(x) for x in (r, lam, k, v, a, b)), s0)
    y = y.transpose(1, 0, 3, 2, 4).reshape(B, Tp, H, K)[:, :T]
    if mask is not None:
        y = jnp.where(mask[:, :, None, None], y, 0)
    return y, S


@partial(jax.jit, static_argnames=("head_first", "output_final_state", "out_dtype"))
def _native_call(r, w, k, v, a, b, s0, mask, *, head_first, output_final_state, out_dtype):
    cd = compute_dtype(*(x.dtype for x in (r, w, k, v, a, b)))
    xs = [x.astype(cd) for x in (r, w, k, v, a, b)]
    if head_first:
        xs = [jnp.swapaxes(x, 1, 2) for x in xs]
    B, T, H, K = xs[0].shape
    if s0 is None:
        s0 = jnp.zeros((B, H, K, K), dtype=cd)
    else:
        s0 = jnp.broadcast_to(s0.astype(cd), (B, H, K, K))
    if mask is not None:
        mask = mask != 0
    if T == 0:
        y, S = jnp.zeros((B, 0, H, K), dtype=cd), s0
    else:
        y, S = chunked_forward(*xs, s0, mask)
    if head_first:
        y = jnp.swapaxes(y, 1, 2)
    return y.astype(out_dtype), (S if output_final_state else None)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    r, w, k, v, a, b, initial_state, mask = as_arrays(r, w, k, v, a, b, initial_state, mask)
    validate(r, w, k, v, a, b, initial_state, mask, head_first)
    return _native_call(r, w, k, v, a, b, initial_state, mask, head_first=head_first,
                        output_final_state=bool(output_final_state), out_dtype=jnp.dtype(r.dtype))


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="JAX, native chunked implementation; jit, grad and vmap friendly",
    tensor="jax arrays",
    example="""    >>> import jax, jax.numpy as jnp
    >>> from rwkv_ops.jax.native import generalized_delta_rule
    >>> r, w, k, v, a, b = jax.random.normal(jax.random.key(0), (6, 2, 32, 4, 64))
    >>> o, state = generalized_delta_rule(r, -jnp.exp(w), k, v, a, b)
    >>> o.shape, state.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)
