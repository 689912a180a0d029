"""Public face of rwkv_ops.numpy: the same names as every backend package."""

from __future__ import annotations

import numpy as np

from rwkv_ops.common import TensorInfo, check_inputs, choose_kernel_type, docs
from rwkv_ops.numpy.native import chunked_forward, compute_dtype

BACKEND = "numpy"


def tensor_info(x) -> TensorInfo:
    x = np.asarray(x)
    return TensorInfo(shape=tuple(x.shape), is_floating=bool(np.issubdtype(x.dtype, np.floating)),
                      dtype=str(x.dtype), device="cpu",
                      is_bool_or_integer=bool(x.dtype == bool or np.issubdtype(x.dtype, np.integer)))


def _native(r, w, k, v, a, b, initial_state=None, output_final_state=True, head_first=False, *,
            mask=None):
    xs = [np.asarray(x) for x in (r, w, k, v, a, b)]
    p = check_inputs(*(tensor_info(x) for x in xs),
                     None if initial_state is None else tensor_info(initial_state),
                     None if mask is None else tensor_info(mask), head_first)
    out_dtype = xs[0].dtype
    cd = compute_dtype(*(x.dtype for x in xs))
    if head_first:
        xs = [np.swapaxes(x, 1, 2) for x in xs]
    xs = [x.astype(cd, copy=False) for x in xs]
    if initial_state is None:
        s0 = np.zeros((p.B, p.H, p.K, p.K), dtype=cd)
    else:
        s0 = np.broadcast_to(np.asarray(initial_state).astype(cd), (p.B, p.H, p.K, p.K))
    if p.T == 0:
        y, s = np.zeros((p.B, 0, p.H, p.K), dtype=cd), s0.copy()
    else:
        y, s = chunked_forward(*xs, s0, None if mask is None else np.asarray(mask).astype(bool))
    if head_first:
        y = np.swapaxes(y, 1, 2)
    return np.ascontiguousarray(y.astype(out_dtype, copy=False)), (s if output_final_state else None)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    return _native(r, w, k, v, a, b, initial_state, output_final_state, head_first, mask=mask)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="NumPy, forward only; the gradient is rwkv_ops.numpy.generalized_delta_rule_backward",
    tensor="numpy arrays",
    example="""    >>> import numpy as np
    >>> from rwkv_ops.numpy import generalized_delta_rule
    >>> r, w, k, v, a, b = np.random.randn(6, 2, 32, 4, 64).astype(np.float32)
    >>> o, state = generalized_delta_rule(r, -np.exp(w), k, v, a, b)
    >>> o.shape, state.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)

rwkv7_op = generalized_delta_rule


def available_kernel_types():
    """Kernel types that can run on this machine, fastest first. NumPy has only 'native'."""
    return ["native"]


def get_generalized_delta_rule(HEAD_SIZE=64, KERNEL_TYPE=None):
    choose_kernel_type(BACKEND, KERNEL_TYPE, [("native", None)])
    return generalized_delta_rule, False


get_generalized_delta_rule.__doc__ = docs.GET_GENERALIZED_DELTA_RULE.format(framework="NumPy")
