"""Inference-only entry point of rwkv_ops.torch: forward results, nothing kept for a backward.

One function for a server: a padded batch (optional ``mask``), packed sequences (``cu_seqlens``),
or a single step (T = 1, no mask: the decode update of ``rwkv_ops.torch.decode``, its Triton kernel
on CUDA). Everything runs under ``torch.no_grad()``, so on CUDA the Triton forward writes no state
checkpoints (its ``SAVE_CKPT`` constexpr is off when no gradient is needed) and autograd records
nothing; it also runs inside ``torch.inference_mode()``.
"""

from __future__ import annotations

import torch

from rwkv_ops.common import docs
from rwkv_ops.common.serving import check_inference_options, single_step_sizes
from rwkv_ops.torch.api import generalized_delta_rule
from rwkv_ops.torch.decode import rwkv7_op_rnn
from rwkv_ops.torch.varlen import generalized_delta_rule_varlen


def generalized_delta_rule_inference(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                                     head_first=False, *, mask=None, cu_seqlens=None):
    check_inference_options(head_first, mask is not None, cu_seqlens is not None)
    with torch.no_grad():
        if cu_seqlens is not None:
            return generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state,
                                                 output_final_state)
        step = single_step_sizes(tuple(getattr(r, "shape", ())), head_first, mask is not None)
        if step is not None:
            if initial_state is None:
                B, H, K = step
                wide = any(getattr(x, "dtype", None) == torch.float64 for x in (r, w, k, v, a, b))
                initial_state = torch.zeros((B, H, K, K), device=r.device,
                                            dtype=torch.float64 if wide else torch.float32)
            o, state = rwkv7_op_rnn(r, w, k, v, a, b, initial_state, head_first)
            return o, (state if output_final_state else None)
        return generalized_delta_rule(r, w, k, v, a, b, initial_state, output_final_state,
                                      head_first, mask=mask)


generalized_delta_rule_inference.__doc__ = docs.GENERALIZED_DELTA_RULE_INFERENCE.format(
    framework="PyTorch", no_grad="no autograd history",
    example="""    >>> import torch
    >>> from rwkv_ops.torch.inference import generalized_delta_rule_inference
    >>> r, w, k, v, a, b = torch.randn(6, 2, 32, 4, 64).unbind(0)
    >>> o, s = generalized_delta_rule_inference(r, w, k, v, a, b)
    >>> o.shape, s.shape
    (torch.Size([2, 32, 4, 64]), torch.Size([2, 4, 64, 64]))""",
)
