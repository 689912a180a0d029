"""Inference-only entry point of rwkv_ops.tensorflow: forward results, nothing on a tape.

One function for a server: a padded batch (optional ``mask``), packed sequences (``cu_seqlens``
with known values), or a single step (T = 1, no mask: the direct decode update). The inputs pass
through ``tf.stop_gradient`` first: no op downstream of them has a watched input, so a surrounding
``tf.GradientTape`` records nothing and keeps no intermediate alive.
"""

from __future__ import annotations

import tensorflow as tf

from rwkv_ops.common import docs
from rwkv_ops.common.serving import check_inference_options, single_step_sizes
from rwkv_ops.tensorflow.api import generalized_delta_rule
from rwkv_ops.tensorflow.decode import rwkv7_op_rnn
from rwkv_ops.tensorflow.varlen import generalized_delta_rule_varlen


@tf.autograph.experimental.do_not_convert
def generalized_delta_rule_inference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None, cu_seqlens=None):
    check_inference_options(head_first, mask is not None, cu_seqlens is not None)
    r, w, k, v, a, b = (tf.stop_gradient(tf.convert_to_tensor(x)) for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = tf.stop_gradient(tf.convert_to_tensor(initial_state))
    if cu_seqlens is not None:
        return generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state,
                                             output_final_state)
    shape = tuple(r.shape) if r.shape.rank is not None else ()
    step = single_step_sizes(shape, head_first, mask is not None)
    if step is not None:
        if initial_state is None:
            _, H, K = step  # the batch may be symbolic: taken from tf.shape below
            wide = any(x.dtype == tf.float64 for x in (r, w, k, v, a, b))
            initial_state = tf.zeros(tf.stack([tf.shape(r)[0], H, K, K]),
                                     tf.float64 if wide else tf.float32)
        o, state = rwkv7_op_rnn(r, w, k, v, a, b, initial_state, head_first)
        return o, (state if output_final_state else None)
    return generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state, head_first,
                                  mask=mask)


generalized_delta_rule_inference.__doc__ = docs.GENERALIZED_DELTA_RULE_INFERENCE.format(
    framework="TensorFlow", no_grad="no gradient to any input",
    example="""    >>> import tensorflow as tf
    >>> from rwkv_ops.tensorflow.inference import generalized_delta_rule_inference
    >>> r, w, k, v, a, b = tf.unstack(tf.random.normal([6, 2, 32, 4, 64]))
    >>> o, s = generalized_delta_rule_inference(r, w, k, v, a, b)
    >>> o.shape, s.shape
    (TensorShape([2, 32, 4, 64]), TensorShape([2, 4, 64, 64]))""",
)
