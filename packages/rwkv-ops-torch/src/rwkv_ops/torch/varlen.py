"""Variable-length batches for PyTorch: N sequences packed along T, boundaries in ``cu_seqlens``.

The implementation is chosen like ``rwkv_ops.torch.api`` chooses one (``kernel_type``: None for
the automatic choice, which takes the fastest kernel that runs for CUDA tensors and the native
implementation for any other device; an explicit kernel type that cannot run raises):

* Triton: the kernels run on the packed [1, total_T, H, K] tensors themselves
  (``triton_launcher.generalized_delta_rule_packed``: each program reads its sequence's start and
  length from cu_seqlens, an int32 copy on the device; steps past a sequence's end are identity
  steps). No padded copy, no gather: o and the input gradients are written in the packed layout.
* native and CUDA: gather the packed inputs into a right-padded [N, max_len, H, K] batch with a
  mask, run that dense op (padded steps leave the state unchanged and receive no gradient), and
  gather the real steps' outputs back into the packed layout. Both directions are gathers, so
  autograd's backward is a scatter-add and gradients reach every input and the states. Sequences
  of equal length skip the gathers: the packed tensors are reshaped into the batch.

The boundaries are read on the host: they are validated there, and the launch (or the padded
batch) is sized by the longest sequence. Pass them as a list, tuple or CPU tensor; a CUDA tensor
costs a device-to-host copy that waits for all queued work.
"""

from __future__ import annotations

import torch

from rwkv_ops.common.serving import VarlenProblem, check_varlen_inputs
from rwkv_ops.torch.api import choose_kernel, load_kernel_module, tensor_info


def host_cu_seqlens(cu_seqlens) -> tuple:
    """(TensorInfo, values as Python ints) of cu_seqlens (a tensor, list, tuple or NumPy array)."""
    cu = cu_seqlens if isinstance(cu_seqlens, torch.Tensor) else torch.as_tensor(cu_seqlens)
    info = tensor_info(cu)
    # the device of the boundaries does not matter: they are only read on the host
    info = type(info)(shape=info.shape, is_floating=info.is_floating, dtype=info.dtype,
                      device="host", is_bool_or_integer=info.is_bool_or_integer)
    return info, cu.reshape(-1).tolist()


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    # a pageable host-to-device copy waits for the stream to drain; a pinned, non-blocking one is
    # queued behind the work already launched (the caching host allocator keeps the pinned block
    # alive until the copy has run)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def padding_indices(p: VarlenProblem, device):
    """Index tensors of the gather in both directions, on ``device``.

    Returns (src [N, max_len] int64: packed step of each padded slot, 0 for padding; mask
    [N, max_len] bool; dst [total_T] int64: the flat padded slot n * max_len + t of each packed
    step).
    """
    starts = torch.tensor(p.starts, dtype=torch.int64)
    lengths = torch.tensor(p.lengths, dtype=torch.int64)
    t = torch.arange(p.max_len, dtype=torch.int64)
    mask = t[None, :] < lengths[:, None]
    src = torch.where(mask, starts[:, None] + t[None, :], 0)
    seq = torch.repeat_interleave(torch.arange(p.N, dtype=torch.int64), lengths)
    pos = torch.arange(p.total_T, dtype=torch.int64) - torch.repeat_interleave(starts, lengths)
    dst = seq * p.max_len + pos
    return _to_device(src, device), _to_device(mask, device), _to_device(dst, device)


def _device_cu_seqlens(cu_seqlens, values, device) -> torch.Tensor:
    """cu_seqlens as int32 on ``device`` (the Triton kernels read it there)."""
    if (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device == torch.device(device)
            and cu_seqlens.dtype == torch.int32):
        return cu_seqlens.reshape(-1)
    return _to_device(torch.tensor(values, dtype=torch.int32), device)


def generalized_delta_rule_varlen(r, w, k, v, a, b, cu_seqlens, initial_state=None,
                                  output_final_state=True, *, kernel_type=None):
    """The generalized delta rule on N sequences of any lengths, packed along T (PyTorch).

    Differentiable with respect to r, w, k, v, a, b and initial_state.

    Args:
        r, w, k, v, a, b: [1, total_T, H, K] packed inputs, floating dtypes.
        cu_seqlens: [N + 1] integers (tensor on any device, list, tuple or NumPy array),
            0 = cu_seqlens[0] <= ... <= cu_seqlens[N] = total_T; sequence n is steps
            cu_seqlens[n] .. cu_seqlens[n + 1] - 1.
        initial_state: optional [N, H, K, K], one state per sequence (zeros when None).
        output_final_state: when False the second result is None.
        kernel_type: "triton", "cuda", "native" or None (automatic, as ``rwkv_ops.torch``'s
            ``generalized_delta_rule`` chooses); "triton" runs on the packed tensors directly (CUDA
            tensors, or CPU tensors under TRITON_INTERPRET=1), the others on a padded copy.
            Raises KernelUnavailableError when the requested kernel cannot run here.

    Returns:
        (o, final_state): o [1, total_T, H, K] in r's dtype; final_state [N, H, K, K] float32
        (float64 for float64 inputs) or None.

    Example::

        >>> import torch
        >>> from rwkv_ops.torch.varlen import generalized_delta_rule_varlen
        >>> r, w, k, v, a, b = torch.randn(6, 1, 54, 4, 64).unbind(0)
        >>> o, s = generalized_delta_rule_varlen(r, w, k, v, a, b, [0, 5, 21, 54])
        >>> o.shape, s.shape
        (torch.Size([1, 54, 4, 64]), torch.Size([3, 4, 64, 64]))
    """
    xs = (r, w, k, v, a, b)
    cu_info, cu_values = host_cu_seqlens(cu_seqlens)
    p = check_varlen_inputs(*(tensor_info(x) for x in xs), cu_info, cu_values,
                            None if initial_state is None else tensor_info(initial_state))
    chosen = choose_kernel(kernel_type, r.device.type, p.K)
    module = load_kernel_module(chosen)
    if chosen == "triton":
        cu = _device_cu_seqlens(cu_seqlens, cu_values, r.device)
        return module.generalized_delta_rule_packed(*xs, cu, p.max_len, initial_state,
                                                    output_final_state)
    if p.max_len > 0 and all(n == p.max_len for n in p.lengths):
        # equal lengths: the packed inputs already are the dense batch (views, no copies)
        dense = [x.reshape(p.N, p.max_len, p.H, p.K) for x in xs]
        o, final = module.generalized_delta_rule(*dense, initial_state, output_final_state)
        return o.reshape(1, p.total_T, p.H, p.K), final
    src, mask, dst = padding_indices(p, r.device)
    # padding slots read step 0; the dense op gives masked steps no output and no gradient, so
    # nothing of them reaches the result or step 0's gradient
    padded = [x[0][src] for x in xs]
    o_pad, final = module.generalized_delta_rule(*padded, initial_state, output_final_state,
                                                 mask=mask)
    o = o_pad.reshape(p.N * p.max_len, p.H, p.K)[dst]
    return o.unsqueeze(0), final
