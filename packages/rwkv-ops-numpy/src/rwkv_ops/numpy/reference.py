"""The float64 sequential reference of the RWKV-7 generalized delta rule: the project's oracle.

Readable first, vectorised over batch and heads only. Every other implementation is tested against
:func:`generalized_delta_rule_reference` and :func:`generalized_delta_rule_backward`.

Per batch element and head, with S a V x K matrix (rows are value channels):

    d_t = exp(-exp(w_t))
    S_t = S_{t-1} diag(d_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T
    y_t = S_t r_t

A padded step (mask 0) leaves S unchanged and outputs 0.
"""

from __future__ import annotations

import numpy as np


def _prepare(r, w, k, v, a, b, initial_state, head_first, mask):
    xs = [np.asarray(x, dtype=np.float64) for x in (r, w, k, v, a, b)]
    if head_first:
        xs = [np.swapaxes(x, 1, 2) for x in xs]
    B, T, H, K = xs[0].shape
    if initial_state is None:
        s0 = np.zeros((B, H, K, K))
    else:
        s0 = np.broadcast_to(np.asarray(initial_state, dtype=np.float64), (B, H, K, K)).copy()
    m = np.ones((B, T), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    return xs, s0, m


def decay(w):
    """d = exp(-exp(w)), exactly 1 for w = -inf and exactly 0 (not NaN) for very large w."""
    with np.errstate(over="ignore"):
        return np.exp(-np.exp(w))


def decay_derivative(w):
    """dd/dw = -exp(w - exp(w)), written so that it is finite (0) at w = -inf and for huge w."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = -np.exp(w - np.exp(w))
    return np.where(np.isfinite(w) | (w < 0), np.nan_to_num(out, nan=0.0), 0.0)


def _forward_states(xs, s0, m):
    """Run the recurrence, returning y [B, T, H, K] and every state S_0..S_T [T+1, B, H, K, K]."""
    r, w, k, v, a, b = xs
    B, T, H, K = r.shape
    d = decay(w)
    states = np.empty((T + 1, B, H, K, K))
    states[0] = s0
    y = np.zeros((B, T, H, K))
    S = s0.copy()
    for t in range(T):
        u = np.einsum("bhvk,bhk->bhv", S, a[:, t])
        S_new = (S * d[:, t, :, None, :]
                 + u[..., :, None] * b[:, t, :, None, :]
                 + v[:, t, :, :, None] * k[:, t, :, None, :])
        keep = m[:, t, None, None, None]
        S = np.where(keep, S_new, S)
        y[:, t] = np.where(m[:, t, None, None], np.einsum("bhvk,bhk->bhv", S, r[:, t]), 0.0)
        states[t + 1] = S
    return y, states


def generalized_delta_rule_reference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None):
    """Float64 sequential forward.

    Args:
        r, w, k, v, a, b: [B, T, H, K] (head_first: [B, H, T, K]) arrays of any float dtype.
        initial_state: optional [B, H, K, K] or [1, H, K, K].
        mask: optional [B, T]; 0/False marks padding.

    Returns:
        (o, final_state): o float64 in the inputs' layout, final_state [B, H, K, K] float64 or None.
    """
    xs, s0, m = _prepare(r, w, k, v, a, b, initial_state, head_first, mask)
    y, states = _forward_states(xs, s0, m)
    if head_first:
        y = np.swapaxes(y, 1, 2)
    return y, (states[-1] if output_final_state else None)


def generalized_delta_rule_backward(r, w, k, v, a, b, initial_state=None, *, do, dfinal_state=None,
                                    head_first=False, mask=None):
    """Float64 explicit backward of :func:`generalized_delta_rule_reference`.

    Args:
        r, w, k, v, a, b, initial_state, head_first, mask: as for the forward.
        do: gradient of the loss with respect to o (same layout as the inputs).
        dfinal_state: optional gradient with respect to the final state, [B, H, K, K].

    Returns:
        (dr, dw, dk, dv, da, db, dinitial_state), float64; dr..db in the inputs' layout,
        dinitial_state with the shape of initial_state (summed over B for a [1, H, K, K] state),
        or None when no initial state was given.
    """
    xs, s0, m = _prepare(r, w, k, v, a, b, initial_state, head_first, mask)
    r_, w_, k_, v_, a_, b_ = xs
    dy = np.asarray(do, dtype=np.float64)
    if head_first:
        dy = np.swapaxes(dy, 1, 2)
    _, states = _forward_states(xs, s0, m)
    B, T, H, K = r_.shape
    d = decay(w_)
    dd_dw = decay_derivative(w_)
    grads = {name: np.zeros((B, T, H, K)) for name in ("r", "w", "k", "v", "a", "b")}
    G = np.zeros((B, H, K, K)) if dfinal_state is None else np.array(dfinal_state, dtype=np.float64)
    G = np.broadcast_to(G, (B, H, K, K)).copy()
    for t in range(T - 1, -1, -1):
        keep = m[:, t]
        S_prev, S_t = states[t], states[t + 1]
        G_t = G + dy[:, t, :, :, None] * r_[:, t, :, None, :]  # y_t = S_t r_t
        u = np.einsum("bhvk,bhk->bhv", S_prev, a_[:, t])
        du = np.einsum("bhvk,bhk->bhv", G_t, b_[:, t])
        step = {
            "r": np.einsum("bhvk,bhv->bhk", S_t, dy[:, t]),
            "v": np.einsum("bhvk,bhk->bhv", G_t, k_[:, t]),
            "k": np.einsum("bhvk,bhv->bhk", G_t, v_[:, t]),
            "b": np.einsum("bhvk,bhv->bhk", G_t, u),
            "a": np.einsum("bhvk,bhv->bhk", S_prev, du),
            "w": (S_prev * G_t).sum(axis=2) * dd_dw[:, t],
        }
        for name, value in step.items():
            grads[name][:, t] = np.where(keep[:, None, None], value, 0.0)
        G_prev = G_t * d[:, t, :, None, :] + du[..., :, None] * a_[:, t, :, None, :]
        G = np.where(keep[:, None, None, None], G_prev, G)
    out = [grads[n] for n in ("r", "w", "k", "v", "a", "b")]
    if head_first:
        out = [np.swapaxes(x, 1, 2) for x in out]
    ds0 = None
    if initial_state is not None:
        ds0 = G.sum(axis=0, keepdims=True) if np.shape(initial_state)[0] == 1 and B != 1 else G
    return (*out, ds0)
