"""One decode step (T = 1) of the generalized delta rule in PyTorch.

Per batch element and head (ALGORITHM.md section 6)::

    u = S a,   S' = S diag(d) + u b^T + v k^T,   y = S' r,   d = exp(-exp(w))

Two implementations behind :func:`rwkv7_op_rnn`:

* ``decode_triton``: the shared ``decode_kernel`` (shared-kernels/triton/decode.py), one pass over
  the fp32 state, for CUDA tensors when no gradient is needed. Nothing in it synchronises with the
  host and with ``inplace=True`` it allocates only ``o``, so a decode loop can be captured in a CUDA
  graph.
* ``decode_native``: the same update in torch ops (any device, any K, float64), differentiable.

The decay is exact in both (no LAMBDA_FLOOR clamp: nothing is factorised here).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch

from rwkv_ops.common import KernelUnavailableError, check_head_size, check_single_step_inputs
from rwkv_ops.torch.api import tensor_info
from rwkv_ops.torch.triton_launcher import interpret_mode

KERNEL_HEAD_SIZES = (32, 64, 128)
# Past this w, d = exp(-exp(w)) is 0 in every float type; capping keeps exp(w) finite, so the
# gradient d * -exp(w) is 0, never 0 * inf = NaN.
_W_CAP = 30.0


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _check(r, w, k, v, a, b, state, head_first):
    return check_single_step_inputs(*(tensor_info(x) for x in (r, w, k, v, a, b)),
                                    tensor_info(state), head_first)


def _check_inplace(state, p):
    if state.shape[0] != p.B:
        raise ValueError(
            f"rwkv-ops: inplace=True needs a state of shape [B, H, K, K] = "
            f"[{p.B}, {p.H}, {p.K}, {p.K}] to update, got {list(state.shape)} (a broadcast "
            "[1, H, K, K] state cannot hold B new states).")


def _native(p, r, w, k, v, a, b, state, head_first, inplace):
    xs = (r, w, k, v, a, b)
    cd = torch.float64 if any(x.dtype == torch.float64 for x in (*xs, state)) else torch.float32
    axis = 2 if head_first else 1
    r_, w_, k_, v_, a_, b_ = (x.select(axis, 0).to(cd) for x in xs)   # [B, H, K]
    S = state.to(cd)
    d = torch.exp(-torch.exp(w_.clamp(max=_W_CAP)))
    u = S @ a_.unsqueeze(-1)                                      # [B', H, V, 1]
    S_new = S * d.unsqueeze(-2) + u * b_.unsqueeze(-2) + v_.unsqueeze(-1) * k_.unsqueeze(-2)
    y = (S_new @ r_.unsqueeze(-1)).squeeze(-1)                    # [B, H, V]
    o = y.unsqueeze(axis).to(r.dtype)
    if inplace:
        # recorded by autograd when it tracks the state (which then errors clearly if the old
        # state is still needed for a backward)
        return o, state.copy_(S_new)
    return o, S_new


def decode_native(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """:func:`rwkv7_op_rnn` in torch ops: any device and head size, differentiable.

    With ``inplace=True`` the new state is copied into ``state`` (which must be [B, H, K, K]) and
    ``state`` is returned.
    """
    p = _check(r, w, k, v, a, b, state, head_first)
    if inplace:
        _check_inplace(state, p)
    return _native(p, r, w, k, v, a, b, state, head_first, inplace)


def triton_unavailable_reason(r, state, K) -> Optional[str]:
    """Why ``decode_triton`` cannot take these (validated) tensors; None when it can."""
    if not _has_triton():
        return "Triton is not installed (pip install triton)"
    if K not in KERNEL_HEAD_SIZES:
        return check_head_size(int(K), KERNEL_HEAD_SIZES, "triton")
    if r.device.type != "cuda" and not interpret_mode():
        return f"the Triton kernels need CUDA tensors, got tensors on {r.device}"
    if state.dtype != torch.float32:
        return f"the Triton decode kernel keeps the state in float32, got {state.dtype}"
    return None


def _kernel():
    # imported on first use: importing this module must not import Triton
    from rwkv_ops.torch._triton import decode
    return decode


def _triton(p, r, w, k, v, a, b, state, inplace):
    kernel = _kernel()
    # contiguous() is free on contiguous tensors; at T = 1 both layouts put (b, h) at (b*H + h)*K
    xs = [x.contiguous() for x in (r, w, k, v, a, b)]
    s_in = state
    if s_in.shape[0] != p.B:
        s_in = s_in.expand(p.B, p.H, p.K, p.K)
    s_in = s_in.contiguous()
    o = torch.empty(r.shape, dtype=r.dtype, device=r.device)
    if inplace and s_in.data_ptr() == state.data_ptr():
        s_out = state            # the kernel reads each element before it writes it
    else:
        s_out = torch.empty((p.B, p.H, p.K, p.K), dtype=torch.float32, device=r.device)
    bv, warps = kernel.decode_config(p.K)
    grid = (p.B * p.H * (p.K // bv),)
    kernel.decode_kernel[grid](*xs, s_in, o, s_out, K=p.K, BV=bv, num_warps=warps)
    if inplace and s_out is not state:
        state.copy_(s_out)       # a non-contiguous state: updated through a temporary
        s_out = state
    return o, s_out


def decode_triton(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """:func:`rwkv7_op_rnn` with the Triton decode kernel; no gradient (see the module doc).

    Raises KernelUnavailableError when the kernel cannot take these tensors (CPU tensors outside
    TRITON_INTERPRET=1, head size not in {32, 64, 128}, a state that is not float32).
    """
    p = _check(r, w, k, v, a, b, state, head_first)
    reason = triton_unavailable_reason(r, state, p.K)
    if reason is not None:
        raise KernelUnavailableError(f"rwkv-ops: the Triton decode step cannot run here: {reason}.")
    if inplace:
        _check_inplace(state, p)
    return _triton(p, r, w, k, v, a, b, state, inplace)


def rwkv7_op_rnn(r, w, k, v, a, b, state, head_first=False, *, inplace=False):
    """One recurrent step (decode) of the RWKV-7 generalized delta rule (PyTorch).

    Uses the Triton decode kernel for CUDA tensors when no gradient is needed (K in {32, 64, 128},
    float32 state, no float64 input), else the native torch update (differentiable, any device
    and K).

    Args:
        r, w, k, v, a, b: [B, 1, H, K] (head_first: [B, H, 1, K]), floating dtypes.
        state: [B, H, K, K] float32 (a [1, H, K, K] state broadcasts over B unless ``inplace``).
        head_first: layout of the six inputs and of ``o``.
        inplace: write the new state into ``state`` and return ``state`` itself (CUDA-graph
            friendly: no allocation besides ``o``).

    Returns:
        (o, new_state): o with the inputs' layout and r's dtype; new_state [B, H, K, K] float32
        (float64 for float64 inputs or state).

    Example::

        >>> import torch
        >>> from rwkv_ops.torch.decode import rwkv7_op_rnn
        >>> r, w, k, v, a, b = torch.randn(6, 2, 1, 4, 64).unbind(0)
        >>> state = torch.zeros(2, 4, 64, 64)
        >>> o, state = rwkv7_op_rnn(r, w, k, v, a, b, state, inplace=True)
        >>> o.shape, state.shape
        (torch.Size([2, 1, 4, 64]), torch.Size([2, 4, 64, 64]))
    """
    p = _check(r, w, k, v, a, b, state, head_first)
    if inplace:
        _check_inplace(state, p)
    xs = (r, w, k, v, a, b)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*xs, state))
    if (r.device.type == "cuda" and not needs_grad
            and not any(x.dtype == torch.float64 for x in xs)
            and triton_unavailable_reason(r, state, p.K) is None):
        return _triton(p, r, w, k, v, a, b, state, inplace)
    return _native(p, r, w, k, v, a, b, state, head_first, inplace)


generalized_delta_rule_single_step = rwkv7_op_rnn
