"""Chunked TensorFlow forward of the generalized delta rule, differentiable by ``tf.GradientTape``.

A port of ``rwkv_ops/numpy/native.py`` (the readable template; its docstring derives the algebra):
the same steps, names and constants. Per (batch, head) the sequence is cut into chunks of
L = CHUNK = 16 steps; inside a chunk every pairwise decay is factorised around the middle step, the
four L x L matrices A_qk, A_qb, A_ak, A_ab are formed for all chunks at once, and one triangular
solve gives U = (I - A_ab)^-1 (A_ak V + a_S S_0^T). Only the state is carried from chunk to chunk.

Differences from the NumPy template, all for TensorFlow's sake:

* The chunk-to-chunk carry ``S <- S diag(exp(Lam_L)) + (S wa^T) b_bar + X_c`` has its S-free part
  ``X_c = U0_c^T b_bar + V^T k_bar`` formed for all chunks before the scan. The scan has a
  hand-written gradient (``_state_scan``): it keeps exactly one state per chunk, the one entering it
  (which the outputs need anyway), runs the reverse scan ``G <- G diag(exp(Lam_L)) + (G b_bar^T) wa
  + dS_c`` and then forms the chunk-level gradients in parallel. Letting autodiff differentiate
  ``tf.scan`` would store a second copy of every state.
* Chunk tensors are laid out [NC, B, H, L, K] so that the scan walks the leading axis with no
  transposes, and the batch size may be unknown while tracing (``tf.function`` with a None batch).

Numerical safety, as in the template: lambda = -exp(w) is clamped at ``-LAMBDA_FLOOR`` (decays below
e^-10 act as e^-10 in float32), so that the factorised products stay finite. ``w`` is capped before
``exp`` so nothing overflows to inf (whose gradient would be ``0 * inf = NaN``). The clamp is
transparent to the gradient (``log_decay``): d(loss)/d(lambda) is rescaled by d_true / d_clamped, so
dw for a fast-decaying channel is the unclamped derivative ``d lambda colsum(S (.) G)`` instead of 0
(this cuts the dw error with decays down to 0 from ~2e-4 to the forward's clamp error, ~3e-5).
Triangle entries above the diagonal may overflow and are removed with ``tf.where``, never by
multiplication.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

CHUNK = 16
# |lambda| bound per compute dtype: CHUNK / 2 * floor must stay below log(max float) ~ 88 (709).
LAMBDA_FLOOR = {tf.float32: 10.0, tf.float64: 80.0}


def compute_dtype(*dtypes):
    """float64 when any input is float64, else float32 (bf16 / fp16 inputs compute in float32)."""
    return tf.float64 if any(tf.as_dtype(d) == tf.float64 for d in dtypes) else tf.float32


@tf.custom_gradient
def log_decay(w):
    """lambda = log d = -exp(w), clamped at -LAMBDA_FLOOR, finite with finite gradients for any w.

    ``w = -inf`` gives lambda = 0 (decay 1) with gradient 0; large ``w`` (up to +inf) gives
    -LAMBDA_FLOOR. The gradient is that of the unclamped decay (see the module docstring).
    """
    floor = LAMBDA_FLOOR[w.dtype]
    # Past this cap d = exp(-exp(w)) is below e^-1400, an exact 0 in float64 as in float32; capping
    # keeps exp(w) finite, so neither value nor gradient can meet inf - inf or 0 * inf.
    lam = -tf.exp(tf.minimum(w, tf.constant(math.log(floor) + 5.0, w.dtype)))
    lam_clamped = tf.maximum(lam, tf.constant(-floor, w.dtype))

    def grad(g):
        # g arrives as d(loss)/d(lambda) = d_clamped * colsum(S (.) G); scaling by
        # d_true / d_clamped = exp(lam - lam_clamped) <= 1 turns it into the unclamped derivative.
        return g * lam * tf.exp(lam - lam_clamped)

    return lam_clamped, grad


@tf.custom_gradient
def _state_scan(wa, b_bar, decay_end, X, s0):
    """Carry the state over chunks: S_{c+1} = S_c diag(decay_end_c) + (S_c wa_c^T) b_bar_c + X_c.

    Args:
        wa, b_bar: [NC, B, H, L, K]; decay_end: [NC, B, H, 1, K]; X: [NC, B, H, K, K].
        s0: [B, H, K, K] state entering chunk 0.

    Returns:
        states [NC, B, H, K, K] (the state entering each chunk) and the final state [B, H, K, K].
    """
    def step(S, c):
        wa_c, b_bar_c, decay_c, X_c = c
        return S * decay_c + tf.matmul(tf.matmul(S, wa_c, transpose_b=True), b_bar_c) + X_c

    after = tf.scan(step, (wa, b_bar, decay_end, X), initializer=s0)
    states = tf.concat([s0[None], after[:-1]], axis=0)
    final = after[-1]

    def grad(d_states, d_final):
        d_states = tf.zeros_like(states) if d_states is None else d_states
        d_final = tf.zeros_like(final) if d_final is None else d_final

        def step_back(G, c):
            # G_c = dL/dS_c: the carry's transpose applied to G_{c+1}, plus S_c's direct uses.
            wa_c, b_bar_c, decay_c, d_state_c = c
            return G * decay_c + tf.matmul(tf.matmul(G, b_bar_c, transpose_b=True), wa_c) + d_state_c

        g_in = tf.scan(step_back, (wa, b_bar, decay_end, d_states), initializer=d_final, reverse=True)
        g_out = tf.concat([g_in[1:], d_final[None]], axis=0)   # G_{c+1}, the gradient leaving chunk c
        # Everything but the reverse scan is parallel over chunks.
        d_decay_end = tf.reduce_sum(states * g_out, axis=-2, keepdims=True)
        d_b_bar = tf.matmul(tf.matmul(states, wa, transpose_b=True), g_out, transpose_a=True)
        d_wa = tf.matmul(tf.matmul(g_out, b_bar, transpose_b=True), states, transpose_a=True)
        return d_wa, d_b_bar, d_decay_end, g_out, g_in[0]

    return (states, final), grad


def chunked_forward(r, w, k, v, a, b, s0, mask):
    """The chunked forward on [B, T, H, K] tensors of the compute dtype.

    Args:
        r, w, k, v, a, b: [B, T, H, K], already in the compute dtype. Static sizes give a static
            graph (what XLA needs); unknown ones are read at run time (the eager wrapper's
            shape-generic trace).
        s0: [B, H, K, K] state (compute dtype).
        mask: [B, T] bool or None.

    Returns:
        y [B, T, H, K] and the final state [B, H, K, K], both in the compute dtype.
    """
    cd = r.dtype
    B, T, H, K = (r.shape[i] if r.shape[i] is not None else tf.shape(r)[i] for i in range(4))
    L = CHUNK
    NC = -(-T // L)
    Tp = NC * L
    m = tf.ones(tf.stack([B, T]), dtype=tf.bool) if mask is None else tf.cast(mask, tf.bool)
    if not isinstance(T, int) or Tp != T:
        pad = [[0, 0], [0, Tp - T], [0, 0], [0, 0]]
        r, w, k, v, a, b = (tf.pad(x, pad) for x in (r, w, k, v, a, b))
        m = tf.pad(m, [[0, 0], [0, Tp - T]])
    keep = m[:, :, None, None]
    zero = tf.zeros([], cd)
    # Padded steps become identity steps: decay 1 (lambda 0), no write (k 0), no read-back (a 0).
    lam = tf.where(keep, log_decay(w), zero)
    k = tf.where(keep, k, zero)
    a = tf.where(keep, a, zero)

    def chunks(x):  # [B, Tp, H, K] -> [NC, B, H, L, K]
        return tf.transpose(tf.reshape(x, tf.stack([B, NC, L, H, K])), [1, 0, 3, 2, 4])

    r, lam, k, v, a, b = (chunks(x) for x in (r, lam, k, v, a, b))
    lam_in = tf.cumsum(lam, axis=-2)          # Lam_i, inclusive
    lam_ex = lam_in - lam                      # Lam_{i-1}
    lam_mid = lam_in[..., CHUNK // 2 - 1: CHUNK // 2, :]
    lam_end = lam_in[..., -1:, :]
    grow = tf.exp(lam_mid - lam_in)            # <= exp(L/2 * floor): finite
    q_t = r * tf.exp(lam_in - lam_mid)
    a_t = a * tf.exp(lam_ex - lam_mid)
    k_h = k * grow
    b_h = b * grow
    incl = tf.constant(np.tril(np.ones((L, L), dtype=bool)))
    strict = tf.constant(np.tril(np.ones((L, L), dtype=bool), -1))
    A_qk = tf.where(incl, tf.matmul(q_t, k_h, transpose_b=True), zero)
    A_qb = tf.where(incl, tf.matmul(q_t, b_h, transpose_b=True), zero)
    A_ak = tf.where(strict, tf.matmul(a_t, k_h, transpose_b=True), zero)
    A_ab = tf.where(strict, tf.matmul(a_t, b_h, transpose_b=True), zero)
    r_s = r * tf.exp(lam_in)
    a_s = a * tf.exp(lam_ex)
    decay_end = tf.exp(lam_end)                # [NC, B, H, 1, K]
    to_end = tf.exp(lam_end - lam_in)
    k_bar = k * to_end
    b_bar = b * to_end

    # (I - A_ab) is unit lower triangular: one solve for both right-hand sides.
    eye = tf.eye(L, dtype=cd)
    rhs = tf.concat([tf.matmul(A_ak, v), a_s], axis=-1)
    sol = tf.linalg.triangular_solve(eye - A_ab, rhs, lower=True)
    u0, wa = sol[..., :K], sol[..., K:]       # U = u0 + wa S_0^T

    # S_L = S_0 diag(exp(Lam_L)) + U^T b_bar + V^T k_bar with U = u0 + wa S_0^T: the S_0-free part
    # X is formed for all chunks at once, the scan adds S_0 diag(exp(Lam_L)) + (S_0 wa^T) b_bar.
    X = tf.matmul(tf.concat([u0, v], axis=-2), tf.concat([b_bar, k_bar], axis=-2), transpose_a=True)
    states, S = _state_scan(wa, b_bar, decay_end, X, s0)
    u = u0 + tf.matmul(wa, states, transpose_b=True)
    y = (tf.matmul(r_s, states, transpose_b=True)
         + tf.matmul(tf.concat([A_qk, A_qb], axis=-1), tf.concat([v, u], axis=-2)))
    y = tf.reshape(tf.transpose(y, [1, 0, 3, 2, 4]), tf.stack([B, Tp, H, K]))[:, :T]
    y = tf.where(m[:, :T, None, None], y, zero)
    return y, S


# Eager callers get this traced copy: op-by-op dispatch of the ~60 ops above costs more than the
# arithmetic at small sizes. reduce_retracing lets it fall back to one shape-generic trace once
# shapes vary (decoding with a growing T would otherwise pay a fresh trace, ~0.5 s, per length).
chunked_forward_function = tf.function(chunked_forward, reduce_retracing=True)
