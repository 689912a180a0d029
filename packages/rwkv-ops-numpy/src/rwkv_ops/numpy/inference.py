"""Inference-only entry point of rwkv_ops.numpy (NumPy keeps nothing for a backward anyway).

One function for a server: a padded batch (optional ``mask``), packed sequences (``cu_seqlens``),
or a single step (T = 1: the direct decode update, no chunking).
"""

from __future__ import annotations

import numpy as np

from rwkv_ops.common import docs
from rwkv_ops.common.serving import check_inference_options, single_step_sizes
from rwkv_ops.numpy.api import generalized_delta_rule
from rwkv_ops.numpy.decode import rwkv7_op_rnn
from rwkv_ops.numpy.varlen import generalized_delta_rule_varlen


def generalized_delta_rule_inference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None, cu_seqlens=None):
    check_inference_options(head_first, mask is not None, cu_seqlens is not None)
    if cu_seqlens is not None:
        return generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state,
                                             output_final_state)
    step = single_step_sizes(np.shape(r), head_first, mask is not None)
    if step is not None:
        if initial_state is None:
            B, H, K = step
            initial_state = np.zeros((B, H, K, K), np.float32)
        o, state = rwkv7_op_rnn(r, w, k, v, a, b, initial_state, head_first)
        return o, (state if output_final_state else None)
    return generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state, head_first,
                                  mask=mask)


generalized_delta_rule_inference.__doc__ = docs.GENERALIZED_DELTA_RULE_INFERENCE.format(
    framework="NumPy", no_grad="NumPy keeps nothing anyway",
    example="""    >>> import numpy as np
    >>> from rwkv_ops.numpy.inference import generalized_delta_rule_inference
    >>> r, w, k, v, a, b = np.random.randn(6, 2, 32, 4, 64).astype(np.float32)
    >>> o, s = generalized_delta_rule_inference(r, -np.exp(w), k, v, a, b)
    >>> o.shape, s.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)
