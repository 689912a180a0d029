"""Variable-length batches for JAX: N sequences packed along T, boundaries in ``cu_seqlens``.

The implementation is chosen like ``rwkv_ops.jax.api`` chooses one (``kernel_type``: None for the
automatic choice, the fastest that runs on this machine's default backend; an explicit kernel type
that cannot run raises):

* Triton: the kernels run on the packed [1, total_T, H, K] arrays themselves
  (``triton_launcher.generalized_delta_rule_packed``; cu_seqlens becomes an int32 device operand
  and the longest length the launch's static T; steps past a sequence's end are identity steps).
  No padded copy, no gather; ``jax.custom_vjp`` gives the gradients. This path is not partitioned
  over devices (the packed layout has no batch axis to split; a sharded input runs whole).
* native: gather the packed inputs into a right-padded [N, max_len, H, K] batch with a mask, run
  the dense op (padded steps leave the state unchanged and receive no gradient), and gather the
  real steps' outputs back into the packed layout. Both directions are gathers with host-computed
  indices, so ``jax.grad`` differentiates it as usual.

The boundaries fix the launch (or the padded batch's shape), so they must be concrete: a NumPy
array, list or tuple (or a concrete jax array outside jit). Under ``jax.jit`` close over them (or
pass a tuple as a static argument); a traced ``cu_seqlens`` is a clear ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_ops.common import TensorInfo
from rwkv_ops.common.serving import (VarlenProblem, check_varlen_inputs,
                                     cu_seqlens_not_concrete)
from rwkv_ops.jax.api import _device_of, _module, as_arrays, choose_kernel, tensor_info


def host_cu_seqlens(cu_seqlens) -> np.ndarray:
    """cu_seqlens as a NumPy array; ValueError when it is traced (its values unknown)."""
    if isinstance(cu_seqlens, jax.core.Tracer):
        raise cu_seqlens_not_concrete("jax")
    return np.asarray(cu_seqlens)


def padding_indices(p: VarlenProblem):
    """Host index arrays of the gather in both directions.

    Returns (src [N, max_len]: packed step of each padded slot, 0 for padding; mask [N, max_len]
    bool; seq [total_T], pos [total_T]: the padded slot of each packed step).
    """
    starts = np.asarray(p.starts, dtype=np.int32)
    lengths = np.asarray(p.lengths, dtype=np.int32)
    t = np.arange(p.max_len, dtype=np.int32)
    mask = t[None, :] < lengths[:, None]
    src = np.where(mask, starts[:, None] + t[None, :], 0).astype(np.int32)
    seq = np.repeat(np.arange(p.N, dtype=np.int32), lengths)
    pos = (np.arange(p.total_T, dtype=np.int32) - np.repeat(starts, lengths)).astype(np.int32)
    return src, mask, seq, pos


def generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state=None,
                                  output_final_state=True, *, kernel_type=None):
    """The generalized delta rule on N sequences of any lengths, packed along T (JAX).

    Differentiable with respect to r, w, k, v, a, b and initial_state; works under jit with
    concrete ``cu_seqlens``.

    Args:
        r, w, k, v, a, b: [1, total_T, H, K] packed inputs, floating dtypes.
        cu_seqlens: [N + 1] integers (NumPy array, list, tuple; concrete),
            0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = total_T; sequence n is steps
            cu_seqlens[n] .. cu_seqlens[n + 1] - 1.
        initial_state: optional [N, H, K, K], one state per sequence (zeros when None).
        output_final_state: when False the second result is None.
        kernel_type: "triton", "native" or None (automatic, as ``rwkv_ops.jax``'s
            ``generalized_delta_rule`` chooses); "triton" runs on the packed arrays directly (a
            GPU backend, or Triton's interpreter under TRITON_INTERPRET=1), "native" on a padded
            copy. Raises KernelUnavailableError when the requested kernel cannot run here.

    Returns:
        (o, final_state): o [1, total_T, H, K] in r's dtype; final_state [N, H, K, K] float32 or
        None.

    Example::

        >>> import jax
        >>> from rwkv_ops.jax.varlen import generalized_delta_rule_varlen
        >>> r, w, k, v, a, b = jax.random.normal(jax.random.key(0), (6, 1, 54, 4, 64))
        >>> o, s = generalized_delta_rule_varlen(r, w, k, v, a, b, (0, 5, 21, 54))
        >>> o.shape, s.shape
        ((1, 54, 4, 64), (3, 4, 64, 64))
    """
    cu = host_cu_seqlens(cu_seqlens)
    r, w, k, v, a, b, initial_state = as_arrays(r, w, k, v, a, b, initial_state)
    xs = (r, w, k, v, a, b)
    devices = [_device_of(x) for x in (*xs, initial_state)]
    default = next((d for d in devices if d is not None), "any")
    infos = [None if x is None else tensor_info(x, d or default)
             for x, d in zip((*xs, initial_state), devices)]
    cu_info = TensorInfo(shape=cu.shape, is_floating=bool(np.issubdtype(cu.dtype, np.floating)),
                         dtype=str(cu.dtype),
                         is_bool_or_integer=bool(np.issubdtype(cu.dtype, np.integer)))
    p = check_varlen_inputs(*infos[:6], cu_info, cu.reshape(-1).tolist(), infos[6])
    module = _module(choose_kernel(kernel_type, p.K))
    if module.KERNEL_TYPE == "triton":
        return module.generalized_delta_rule_packed(*xs, cu, initial_state, output_final_state)
    src, mask, seq, pos = padding_indices(p)
    keep = jnp.asarray(mask)[..., None, None]
    # padding slots read step 0 and are then zeroed: nothing of them reaches the result or the
    # gradient of step 0
    padded = [jnp.where(keep, x[0][src], jnp.zeros((), x.dtype)) for x in xs]
    o_pad, final = module.generalized_delta_rule(*padded, initial_state, output_final_state,
                                                 mask=jnp.asarray(mask))
    return o_pad[seq, pos][None], final
