"""Inference-only entry point of rwkv_ops.jax: forward results, no gradient through it.

One function for a server: a padded batch (optional ``mask``), packed sequences (``cu_seqlens``,
concrete), or a single step (T = 1, no mask: the decode update of ``rwkv_ops.jax.decode``, its
Triton kernel on a GPU). The inputs pass through ``jax.lax.stop_gradient``: under ``grad`` their
tangents are symbolic zeros, so the Triton launcher's ``custom_vjp`` runs its plain forward, which
keeps no state checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rwkv_ops.common import docs
from rwkv_ops.common.serving import check_inference_options, single_step_sizes
from rwkv_ops.jax.api import as_arrays, generalized_delta_rule
from rwkv_ops.jax.decode import rwkv7_op_rnn
from rwkv_ops.jax.varlen import generalized_delta_rule_varlen


def generalized_delta_rule_inference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None, cu_seqlens=None):
    check_inference_options(head_first, mask is not None, cu_seqlens is not None)
    r, w, k, v, a, b, initial_state, mask = as_arrays(r, w, k, v, a, b, initial_state, mask)
    r, w, k, v, a, b = (jax.lax.stop_gradient(x) for x in (r, w, k, v, a, b))
    if initial_state is not None:
        initial_state = jax.lax.stop_gradient(initial_state)
    if cu_seqlens is not None:
        return generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state,
                                             output_final_state)
    step = single_step_sizes(tuple(np.shape(r)), head_first, mask is not None)
    if step is not None:
        if initial_state is None:
            B, H, K = step
            wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in (r, w, k, v, a, b))
            initial_state = jnp.zeros((B, H, K, K), jnp.float64 if wide else jnp.float32)
        o, state = rwkv7_op_rnn(r, w, k, v, a, b, initial_state, head_first)
        return o, (state if output_final_state else None)
    return generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state, head_first,
                                  mask=mask)


generalized_delta_rule_inference.__doc__ = docs.GENERALIZED_DELTA_RULE_INFERENCE.format(
    framework="JAX", no_grad="the gradient with respect to every input is zero",
    example="""    >>> import jax
    >>> from rwkv_ops.jax.inference import generalized_delta_rule_inference
    >>> r, w, k, v, a, b = jax.random.normal(jax.random.key(0), (6, 2, 32, 4, 64))
    >>> o, s = jax.jit(generalized_delta_rule_inference)(r, w, k, v, a, b)
    >>> o.shape, s.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)
