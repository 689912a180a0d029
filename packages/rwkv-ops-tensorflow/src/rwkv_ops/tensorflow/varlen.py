"""Variable-length batches for TensorFlow: N sequences packed along T, boundaries in ``cu_seqlens``.

The native approach of every backend: gather the packed [1, total_T, H, K] inputs into a
right-padded [N, max_len, H, K] batch with a mask, run the dense op (padded steps leave the state
unchanged and receive no gradient), and gather the real steps' outputs back into the packed
layout. Both directions are ``tf.gather`` with host-computed indices, so ``tf.GradientTape``
differentiates it as usual.

The boundaries fix the padded batch's shape, so they must be known when the graph is built: a
NumPy array, list or tuple, an eager tensor, or a constant inside ``tf.function``. A symbolic
``cu_seqlens`` is a clear ValueError.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rwkv_ops.common import TensorInfo
from rwkv_ops.common.serving import (VarlenProblem, check_varlen_inputs,
                                     cu_seqlens_not_concrete)
from rwkv_ops.tensorflow.api import _device_of, generalized_delta_rule, tensor_info


def host_cu_seqlens(cu_seqlens) -> np.ndarray:
    """cu_seqlens as a NumPy array; ValueError when its values are unknown (symbolic)."""
    if isinstance(cu_seqlens, (tf.Tensor, tf.Variable)):
        value = tf.get_static_value(cu_seqlens)
        if value is None:
            raise cu_seqlens_not_concrete("tensorflow")
        return np.asarray(value)
    return np.asarray(cu_seqlens)


def padding_indices(p: VarlenProblem):
    """Host index arrays of the gather in both directions.

    Returns (src [N, max_len]: packed step of each padded slot, 0 for padding; mask [N, max_len]
    bool; dst [total_T, 2]: the padded slot (n, t) of each packed step).
    """
    starts = np.asarray(p.starts, dtype=np.int64)
    lengths = np.asarray(p.lengths, dtype=np.int64)
    t = np.arange(p.max_len, dtype=np.int64)
    mask = t[None, :] < lengths[:, None]
    src = np.where(mask, starts[:, None] + t[None, :], 0)
    seq = np.repeat(np.arange(p.N, dtype=np.int64), lengths)
    pos = np.arange(p.total_T, dtype=np.int64) - np.repeat(starts, lengths)
    return src, mask, np.stack([seq, pos], axis=-1)


@tf.autograph.experimental.do_not_convert
def generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state=None,
                                  output_final_state=True):
    """The generalized delta rule on N sequences of any lengths, packed along T (TensorFlow).

    Differentiable with respect to r, w, k, v, a, b and initial_state (``tf.GradientTape``).

    Args:
        r, w, k, v, a, b: [1, total_T, H, K] packed inputs, floating dtypes.
        cu_seqlens: [N + 1] integers with known values (NumPy array, list, tuple, eager tensor),
            0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = total_T; sequence n is steps
            cu_seqlens[n] .. cu_seqlens[n + 1] - 1.
        initial_state: optional [N, H, K, K], one state per sequence (zeros when None).
        output_final_state: when False the second result is None.

    Returns:
        (o, final_state): o [1, total_T, H, K] in r's dtype; final_state [N, H, K, K] float32
        (float64 for float64 inputs) or None.

    Example::

        >>> import tensorflow as tf
        >>> from rwkv_ops.tensorflow.varlen import generalized_delta_rule_varlen
        >>> r, w, k, v, a, b = tf.unstack(tf.random.normal([6, 1, 54, 4, 64]))
        >>> o, s = generalized_delta_rule_varlen(r, w, k, v, a, b, [0, 5, 21, 54])
        >>> o.shape, s.shape
        (TensorShape([1, 54, 4, 64]), TensorShape([3, 4, 64, 64]))
    """
    cu = host_cu_seqlens(cu_seqlens)
    originals = (r, w, k, v, a, b, initial_state)
    tensors = [None if x is None else tf.convert_to_tensor(x) for x in originals]
    devices = [_device_of(x) for x in originals]
    default = next((d for d in devices if d), "cpu")
    infos = [None if t is None else tensor_info(t, d or default, 1)
             for t, d in zip(tensors, devices)]
    cu_info = TensorInfo(shape=cu.shape, is_floating=bool(np.issubdtype(cu.dtype, np.floating)),
                         dtype=str(cu.dtype),
                         is_bool_or_integer=bool(np.issubdtype(cu.dtype, np.integer)))
    p = check_varlen_inputs(*infos[:6], cu_info, cu.reshape(-1).tolist(), infos[6])
    src, mask, dst = padding_indices(p)
    keep = tf.constant(mask[..., None, None])
    # padding slots read step 0 and are then zeroed: nothing of them reaches the result or the
    # gradient of step 0
    padded = [tf.where(keep, tf.gather(x[0], src), tf.zeros((), x.dtype)) for x in tensors[:6]]
    o_pad, final = generalized_delta_rule(*padded, tensors[6], output_final_state,
                                          mask=tf.constant(mask))
    return tf.gather_nd(o_pad, dst)[None], final
