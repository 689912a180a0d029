"""Variable-length batches for NumPy: N sequences packed along T, boundaries in ``cu_seqlens``.

The native approach of every backend: gather the packed [1, total_T, H, K] inputs into a
right-padded [N, max_len, H, K] batch with a mask, run the dense op (padded steps leave the state
unchanged), and gather the real steps' outputs back into the packed layout. Both directions are
gathers with indices computed on the host, so in the differentiable backends the gradient is the
framework's own scatter-add.
"""

from __future__ import annotations

import numpy as np

from rwkv_ops.common.serving import VarlenProblem, check_varlen_inputs
from rwkv_ops.numpy.api import generalized_delta_rule, tensor_info


def padding_indices(p: VarlenProblem):
    """Host index arrays of the gather in both directions.

    Returns (src [N, max_len] int64: packed step of each padded slot, 0 for padding;
    mask [N, max_len] bool; seq [total_T], pos [total_T]: the padded slot of each packed step).
    """
    starts = np.asarray(p.starts, dtype=np.int64)
    lengths = np.asarray(p.lengths, dtype=np.int64)
    t = np.arange(p.max_len, dtype=np.int64)
    mask = t[None, :] < lengths[:, None]
    src = np.where(mask, starts[:, None] + t[None, :], 0)
    seq = np.repeat(np.arange(p.N, dtype=np.int64), lengths)
    pos = np.arange(p.total_T, dtype=np.int64) - np.repeat(starts, lengths)
    return src, mask, seq, pos


def host_cu_seqlens(cu_seqlens):
    """cu_seqlens as a NumPy array (its values, its dtype)."""
    return np.asarray(cu_seqlens)


def generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state=None,
                                  output_final_state=True):
    """The generalized delta rule on N sequences of any lengths, packed along T (NumPy, forward).

    Args:
        r, w, k, v, a, b: [1, total_T, H, K] packed inputs, floating dtypes.
        cu_seqlens: [N + 1] integers, 0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = total_T;
            sequence n is steps cu_seqlens[n] .. cu_seqlens[n + 1] - 1.
        initial_state: optional [N, H, K, K], one state per sequence (zeros when None).
        output_final_state: when False the second result is None.

    Returns:
        (o, final_state): o [1, total_T, H, K] in r's dtype; final_state [N, H, K, K] float32
        (float64 for float64 inputs) or None.

    Example::

        >>> import numpy as np
        >>> from rwkv_ops.numpy.varlen import generalized_delta_rule_varlen
        >>> r, w, k, v, a, b = np.random.randn(6, 1, 54, 4, 64).astype(np.float32)
        >>> o, s = generalized_delta_rule_varlen(r, -np.exp(w), k, v, a, b, [0, 5, 21, 54])
        >>> o.shape, s.shape
        ((1, 54, 4, 64), (3, 4, 64, 64))
    """
    xs = [np.asarray(x) for x in (r, w, k, v, a, b)]
    cu = host_cu_seqlens(cu_seqlens)
    p = check_varlen_inputs(*(tensor_info(x) for x in xs), tensor_info(cu), cu.reshape(-1).tolist(),
                            None if initial_state is None else tensor_info(initial_state))
    src, mask, seq, pos = padding_indices(p)
    padded = [np.where(mask[..., None, None], x[0][src], 0) for x in xs]
    o_pad, final = generalized_delta_rule(*padded, initial_state, output_final_state, mask=mask)
    return o_pad[seq, pos][None], final
