"""One decode step (T = 1) of the generalized delta rule in NumPy: a direct update, no chunking.

Per batch element and head (ALGORITHM.md section 6)::

    u = S a,   S' = S diag(d) + u b^T + v k^T,   y = S' r,   d = exp(-exp(w))

The decay is exact here (no LAMBDA_FLOOR clamp: nothing is factorised), so a chain of steps follows
the float64 reference to rounding.
"""

from __future__ import annotations

import numpy as np

from rwkv_ops.common import check_single_step_inputs
from rwkv_ops.common.serving import inplace_unsupported
from rwkv_ops.numpy.api import tensor_info
from rwkv_ops.numpy.native import compute_dtype
from rwkv_ops.numpy.reference import decay


def step(r, w, k, v, a, b, S):
    """The update on [B, H, K] vectors and a [B, H, K, K] state (one dtype); returns (y, S')."""
    d = decay(w)
    u = S @ a[..., None]                                   # [B, H, V, 1]
    S = S * d[..., None, :] + u * b[..., None, :] + v[..., :, None] * k[..., None, :]
    y = (S @ r[..., None])[..., 0]
    return y, S


def rwkv7_op_rnn(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """One recurrent step (decode) of the RWKV-7 generalized delta rule (NumPy).

    Args:
        r, w, k, v, a, b: [B, 1, H, K] (head_first: [B, H, 1, K]), floating dtypes.
        state: [B, H, K, K] (or [1, H, K, K], broadcast over B), float32 (float64 allowed).
        head_first: layout of the six inputs and of ``o``.
        inplace: not supported by NumPy (ValueError); PyTorch only.

    Returns:
        (o, new_state): o with the inputs' layout and r's dtype; new_state [B, H, K, K] float32
        (float64 when any input or the state is float64).

    Example::

        >>> import numpy as np
        >>> from rwkv_ops.numpy.decode import rwkv7_op_rnn
        >>> r, w, k, v, a, b = np.random.randn(6, 2, 1, 4, 64).astype(np.float32)
        >>> state = np.zeros((2, 4, 64, 64), np.float32)
        >>> o, state = rwkv7_op_rnn(r, -np.exp(w), k, v, a, b, state)
        >>> o.shape, state.shape
        ((2, 1, 4, 64), (2, 4, 64, 64))
    """
    xs = [np.asarray(x) for x in (r, w, k, v, a, b)]
    state = np.asarray(state)
    p = check_single_step_inputs(*(tensor_info(x) for x in xs), tensor_info(state), head_first)
    if inplace:
        raise inplace_unsupported("numpy")
    cd = compute_dtype(*(x.dtype for x in xs), state.dtype)
    axis = 2 if head_first else 1
    vecs = [np.take(x, 0, axis=axis).astype(cd, copy=False) for x in xs]   # [B, H, K]
    S = np.broadcast_to(state.astype(cd, copy=False), (p.B, p.H, p.K, p.K))
    with np.errstate(over="ignore"):
        y, S = step(*vecs, S)
    o = np.expand_dims(y, axis).astype(xs[0].dtype)
    return o, S


generalized_delta_rule_single_step = rwkv7_op_rnn
