"""Inference-only entry point of rwkv_ops.tensorflow: forward results, nothing on a tape.

One function for a server: a padded batch (optional ``mask``), packed sequences (``cu_seqlens``
with known values), or a single step (T = 1, no mask: the direct decode update). The inputs pass
through ``tf.stop_gradient`` first: no op downstream of them has a watched input, so a surrounding
``tf.GradientTape`` records nothing and keeps no intermediate alive.
"""

from __future__ import annotations

import tensorflow as tf

from rwkv_ops.common.serving import check_inference_options
from rwkv_ops.tensorflow.api import generalized_delta_rule
from rwkv_ops.tensorflow.decode import rwkv7_op_rnn
from rwkv_ops.tensorflow.varlen import generalized_delta_rule_varlen


@tf.autograph.experimental.do_not_convert
def generalized_delta_rule_inference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None, cu_seqlens=None):
    """Forward-only generalized delta rule: the results of ``generalized_delta_rule``.

    Args:
        r, w, k, v, a, b: [B, T, H, K] (head_first: [B, H, T, K]); with ``cu_seqlens``, packed
            [1, total_T, H, K].
        initial_state: optional [B, H, K, K] or [1, H, K, K]; with ``cu_seqlens``, [N, H, K, K].
        output_final_state: when False the second result is None.
        head_first: layout of the inputs and of o (not with ``cu_seqlens``).
        mask: optional [B, T] (0 = padding); not with ``cu_seqlens``.
        cu_seqlens: optional [N + 1] sequence boundaries of packed inputs (see
            ``rwkv_ops.tensorflow.varlen.generalized_delta_rule_varlen``).

    Returns:
        (o, final_state) as ``generalized_delta_rule`` (final_state [N, H, K, K] with
        cu_seqlens), with no gradient to any input.

    Example::

        >>> import tensorflow as tf
        >>> from rwkv_ops.tensorflow.inference import generalized_delta_rule_inference
        >>> r, w, k, v, a, b = tf.unstack(tf.random.normal([6, 2, 32, 4, 64]))
        >>> o, s = generalized_delta_rule_inference(r, w, k, v, a, b)
        >>> o.shape, s.shape
        (TensorShape([2, 32, 4, 64]), TensorShape([2, 4, 64, 64]))
    """
    check_inference_options(head_first, mask is not None, cu_seqlens is not None)
    r, w, k, v, a, b = (tf.stop_gradient(tf.convert_to_tensor(x)) for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = tf.stop_gradient(tf.convert_to_tensor(initial_state))
    if cu_seqlens is not None:
        return generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state,
                                             output_final_state)
    shape = r.shape
    if shape.rank == 4 and shape[2 if head_first else 1] == 1 and mask is None:
        if initial_state is None:
            H, K = shape[1 if head_first else 2], shape[3]
            wide = any(x.dtype == tf.float64 for x in (r, w, k, v, a, b))
            initial_state = tf.zeros(tf.stack([tf.shape(r)[0], H, K, K]),
                                     tf.float64 if wide else tf.float32)
        o, state = rwkv7_op_rnn(r, w, k, v, a, b, initial_state, head_first)
        return o, (state if output_final_state else None)
    return generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state, head_first,
                                  mask=mask)
