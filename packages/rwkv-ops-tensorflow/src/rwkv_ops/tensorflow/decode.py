"""One decode step (T = 1) of the generalized delta rule in TensorFlow: a direct update, no chunks.

Per batch element and head (ALGORITHM.md section 6)::

    u = S a,   S' = S diag(d) + u b^T + v k^T,   y = S' r,   d = exp(-exp(w))

Eager, under ``tf.function`` (the batch size may be None) and differentiable with
``tf.GradientTape``. The row dot products are elementwise products and sums rather than
``matvec``: TensorFlow may run float32 products in TF32 on recent GPUs, and SPEC asks for full
float32. The decay is exact (no LAMBDA_FLOOR clamp: nothing is factorised here). TensorFlow tensors
are immutable: ``inplace=True`` is a ValueError (assign the result to a ``tf.Variable`` instead).
"""

from __future__ import annotations

import tensorflow as tf

from rwkv_ops.common import check_single_step_inputs
from rwkv_ops.common.serving import inplace_unsupported
from rwkv_ops.tensorflow.api import _device_of, _known_batch, tensor_info
from rwkv_ops.tensorflow.native import compute_dtype

# Past this w, d = exp(-exp(w)) is 0 in every float type; capping keeps exp(w) finite, so the
# gradient d * -exp(w) is 0, never 0 * inf = NaN.
_W_CAP = 30.0


def validate_step(r, w, k, v, a, b, state, head_first):
    """Check one decode step; returns (Problem, the seven arguments as tensors)."""
    originals = (r, w, k, v, a, b, state)
    tensors = [tf.convert_to_tensor(x) for x in originals]
    devices = [_device_of(x) for x in originals]
    default = next((d for d in devices if d), "cpu")
    batch = _known_batch(tensors[:6], tensors[6], None)
    infos = [tensor_info(t, d or default, batch) for t, d in zip(tensors, devices)]
    return check_single_step_inputs(*infos, head_first), tensors


@tf.autograph.experimental.do_not_convert
def rwkv7_op_rnn(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """One recurrent step (decode) of the RWKV-7 generalized delta rule (TensorFlow).

    Args:
        r, w, k, v, a, b: [B, 1, H, K] (head_first: [B, H, 1, K]), floating dtypes.
        state: [B, H, K, K] float32 (a [1, H, K, K] state broadcasts over B).
        head_first: layout of the six inputs and of ``o``.
        inplace: must be False (TensorFlow tensors are immutable).

    Returns:
        (o, new_state): o with the inputs' layout and r's dtype; new_state [B, H, K, K] float32
        (float64 for float64 inputs or state).

    Example::

        >>> import tensorflow as tf
        >>> from rwkv_ops.tensorflow.decode import rwkv7_op_rnn
        >>> r, w, k, v, a, b = tf.unstack(tf.random.normal([6, 2, 1, 4, 64]))
        >>> o, state = rwkv7_op_rnn(r, w, k, v, a, b, tf.zeros([2, 4, 64, 64]))
        >>> o.shape, state.shape
        (TensorShape([2, 1, 4, 64]), TensorShape([2, 4, 64, 64]))
    """
    p, tensors = validate_step(r, w, k, v, a, b, state, head_first)
    if inplace:
        raise inplace_unsupported("tensorflow")
    xs, state = tensors[:6], tensors[6]
    cd = compute_dtype(*(x.dtype for x in tensors))
    axis = 2 if head_first else 1
    r_, w_, k_, v_, a_, b_ = (tf.cast(tf.squeeze(x, axis), cd) for x in xs)   # [B, H, K]
    B = tf.shape(r_)[0]
    S = tf.broadcast_to(tf.cast(state, cd), tf.stack([B, p.H, p.K, p.K]))
    d = tf.exp(-tf.exp(tf.minimum(w_, tf.constant(_W_CAP, cd))))
    u = tf.reduce_sum(S * a_[..., None, :], axis=-1)
    S = S * d[..., None, :] + u[..., :, None] * b_[..., None, :] + v_[..., :, None] * k_[..., None, :]
    y = tf.reduce_sum(S * r_[..., None, :], axis=-1)
    return tf.cast(tf.expand_dims(y, axis), xs[0].dtype), S


generalized_delta_rule_single_step = rwkv7_op_rnn
