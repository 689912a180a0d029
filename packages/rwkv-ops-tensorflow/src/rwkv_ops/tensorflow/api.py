"""Public face of rwkv_ops.tensorflow: the same names as every backend package."""

from __future__ import annotations

import tensorflow as tf

from rwkv_ops.common import TensorInfo, check_inputs, choose_kernel_type, docs
from rwkv_ops.common.validation import static_sizes_required
from rwkv_ops.tensorflow.native import chunked_forward, chunked_forward_function, compute_dtype

BACKEND = "tensorflow"


def _device_of(x):
    """The device a tensor lives on ("" when unknown: symbolic tensors, numpy arrays)."""
    if isinstance(x, (tf.Tensor, tf.Variable)) and tf.executing_eagerly():
        try:
            spec = tf.DeviceSpec.from_string(x.device)
        except (AttributeError, ValueError):
            return ""
        return f"{spec.device_type}:{spec.device_index}" if spec.device_type else ""
    return ""


def tensor_info(x, device="cpu", batch=None) -> TensorInfo:
    """Describe ``x`` (a tf.Tensor) for validation; an unknown leading size reads as ``batch``."""
    shape = list(x.shape.as_list()) if x.shape.rank is not None else []
    if shape and shape[0] is None and batch is not None:
        shape[0] = batch
    for i, s in enumerate(shape):
        if s is None:
            raise static_sizes_required("tensorflow", x.shape, i)
    dtype = tf.as_dtype(x.dtype)
    return TensorInfo(shape=tuple(shape), is_floating=bool(dtype.is_floating), dtype=dtype.name,
                      device=device, is_bool_or_integer=bool(dtype.is_bool or dtype.is_integer))


def _known_batch(xs, initial_state, mask):
    """A batch size read from whichever argument knows it while tracing (1 when none does)."""
    for x in xs:
        if x.shape.rank and x.shape[0] is not None:
            return int(x.shape[0])
    if initial_state is not None and initial_state.shape.rank and initial_state.shape[0] not in (None, 1):
        return int(initial_state.shape[0])
    if mask is not None and mask.shape.rank and mask.shape[0] is not None:
        return int(mask.shape[0])
    return 1


def _validate(xs, initial_state, mask, head_first):
    originals = [*xs, initial_state, mask]
    tensors = [None if x is None else tf.convert_to_tensor(x) for x in originals]
    devices = [_device_of(x) for x in originals]
    # Arguments without a device of their own (numpy arrays, graph tensors) follow the first that has one.
    default = next((d for d in devices if d), "cpu")
    batch = _known_batch(tensors[:6], tensors[6], tensors[7])
    infos = [None if t is None else tensor_info(t, d or default, batch)
             for t, d in zip(tensors, devices)]
    problem = check_inputs(*infos[:6], infos[6], infos[7], head_first)
    return problem, tensors[:6], tensors[6], tensors[7]


# Plain Python control flow on static sizes only: AutoGraph has nothing to convert here, and skipping
# it keeps validation errors raised inside tf.function readable.
@tf.autograph.experimental.do_not_convert
def _native(r, w, k, v, a, b, initial_state=None, output_final_state=True, head_first=False, *,
            mask=None):
    p, xs, s0, mask = _validate((r, w, k, v, a, b), initial_state, mask, head_first)
    out_dtype = xs[0].dtype
    cd = compute_dtype(*(x.dtype for x in xs))
    if head_first:
        xs = [tf.transpose(x, [0, 2, 1, 3]) for x in xs]
    xs = [tf.cast(x, cd) for x in xs]
    B = tf.shape(xs[0])[0]
    state_shape = tf.stack([B, p.H, p.K, p.K])
    if s0 is None:
        s0 = tf.zeros(state_shape, dtype=cd)
    else:
        # broadcast_to's gradient sums over the broadcast batch, as SPEC asks for a [1, H, K, K] state.
        s0 = tf.broadcast_to(tf.cast(s0, cd), state_shape)
    if p.T == 0:
        y, s = tf.zeros(tf.stack([B, 0, p.H, p.K]), dtype=cd), tf.identity(s0)
    else:
        mask = None if mask is None else tf.cast(mask, tf.bool)
        forward = chunked_forward_function if tf.executing_eagerly() else chunked_forward
        y, s = forward(*xs, s0, mask)
    if head_first:
        y = tf.transpose(y, [0, 2, 1, 3])
    return tf.cast(y, out_dtype), (s if output_final_state else None)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    return _native(r, w, k, v, a, b, initial_state, output_final_state, head_first, mask=mask)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="TensorFlow, chunked native path; eager, tf.function and jit_compile=True; "
              "differentiable with tf.GradientTape",
    tensor="tf.Tensor or anything tf.convert_to_tensor accepts",
    example="""    >>> import tensorflow as tf
    >>> from rwkv_ops.tensorflow import generalized_delta_rule
    >>> r, w, k, v, a, b = tf.unstack(tf.random.normal([6, 2, 32, 4, 64]))
    >>> o, state = generalized_delta_rule(r, -tf.exp(w), k, v, a, b)
    >>> o.shape, state.shape
    (TensorShape([2, 32, 4, 64]), TensorShape([2, 4, 64, 64]))""",
)

rwkv7_op = generalized_delta_rule


def available_kernel_types():
    """Kernel types that can run on this machine, fastest first. TensorFlow has only 'native'."""
    return ["native"]


def get_generalized_delta_rule(HEAD_SIZE=64, KERNEL_TYPE=None):
    choose_kernel_type(BACKEND, KERNEL_TYPE, [("native", None)])
    return generalized_delta_rule, False


get_generalized_delta_rule.__doc__ = docs.GET_GENERALIZED_DELTA_RULE.format(framework="TensorFlow")
