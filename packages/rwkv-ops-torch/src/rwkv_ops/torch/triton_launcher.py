"""PyTorch launcher of the shared Triton kernels (``KERNEL_TYPE="triton"``).

The forward and the backward are ``torch.library`` custom ops (``rwkv_ops::triton_gdr_fwd`` and
``rwkv_ops::triton_gdr_bwd``) with fake implementations and a registered autograd formula, so
``torch.compile(fullgraph=True)`` traces them without graph breaks; nothing synchronises with the
host and every buffer size follows from the shapes, so calls are CUDA-graph capturable. An eager
forward that needs no gradient (no_grad, inference) launches the same kernels without going
through the op (``_plain_eager``), which saves the op's host work per call.

Passes of one call (B*H sequences of T steps, NC = ceil(T / 16) chunks):

* forward: ``chunk_prep_kernel`` (chunk-parallel K-side tiles), [segments only]
  ``chunk_scan_fwd_kernel`` (LOCAL) + ``state_combine_kernel``, then ``chunk_scan_fwd_kernel``,
  which writes o, the final state and, when a gradient will be needed, the state entering every
  chunk (the prep tiles W, b_bar, Kc, R2, dec and the chunks' pair matrices are kept for the
  backward too; the checkpoints and the tiles are fp16 scaled by powers of two with tf32
  products, exactly, and fp32 otherwise: ``configs.tile_dtype``).
* backward: [segments only] ``chunk_scan_bwd_kernel`` (LOCAL) + ``state_combine_kernel``
  (reverse), then ``chunk_scan_bwd_kernel`` (state gradient at every chunk end, and the initial
  state's gradient), then ``chunk_bwd_kernel`` (all six input gradients, chunk-parallel).

Variable-length batches (``generalized_delta_rule_packed``, used by ``rwkv_ops.torch.varlen``):
both custom ops take an optional ``cu_seqlens`` (int32 [N + 1] on the inputs' device) and the
longest length ``max_len``. The kernels then read and write the packed [1, total_T, H, K] tensors
in place (their ``VARLEN`` constexpr): the launch plan is that of N sequences of max_len steps
(B = N, T = max_len, strides (0, H*K, K)), each program finds its sequence's start and length in
cu_seqlens, and steps past a sequence's end are identity steps (chunks wholly past it are skipped).
o and the input gradients are allocated like the packed inputs, the final state and its gradient as
[N, H, K, K]; no padded copy is made in either direction. The custom ops, their fake
implementations and the autograd formula are shared with the dense path, so the packed call traces
under torch.compile(fullgraph=True) like the dense one (max_len is a host int of the call).

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors in Triton's interpreter (tests).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rwkv_ops.common import KernelUnavailableError, check_head_size, docs
from rwkv_ops.common.validation import device_mismatch_reason
from rwkv_ops.torch.api import check_torch_inputs

KERNEL_TYPE = "triton"
SUPPORTED_HEAD_SIZES = (32, 64, 128)
CHUNK = 16
# rows per program of the segment combine (fp32 ieee products; larger tiles spill)
COMBINE_ROWS = 16

_FLOAT_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}
_TORCH_DTYPES = {name: dtype for dtype, name in _FLOAT_NAMES.items()}


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(head_size: Optional[int] = None) -> tuple:
    """(why the Triton kernels cannot run here, or None; quiet). Cheap: imports nothing new."""
    if not interpret_mode() and not torch.cuda.is_available():
        return "no CUDA GPU is visible to PyTorch", True
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)", False
    if head_size is not None:
        reason = check_head_size(int(head_size), SUPPORTED_HEAD_SIZES, KERNEL_TYPE)
        if reason is not None:
            return reason, False
    return None, False


def _kernels():
    # imported on first use: importing this module must not import Triton
    from rwkv_ops.torch._triton import chunk_bwd, chunk_fwd, configs
    return chunk_fwd, chunk_bwd, configs


def select_config(K: int, dtype: torch.dtype, T: int, BH: int, sm_count: Optional[int] = None):
    """The kernels' launch configuration (the shared ``configs.chunk_config``)."""
    return _kernels()[2].chunk_config(K, _FLOAT_NAMES.get(dtype, "float32"), T, BH, sm_count)


def _sm_count(device: torch.device) -> Optional[int]:
    """The multiprocessors of a CUDA device; None under Triton's interpreter."""
    if interpret_mode() or device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _layout(x: torch.Tensor, head_first: bool, cu_seqlens=None, max_len: int = 0) -> tuple:
    """(B, T, H, K) and the element strides (b, t, h) of a contiguous tensor in its layout.

    With ``cu_seqlens`` (packed [1, total_T, H, K]): B = N sequences, T = max_len, stride_b 0."""
    if cu_seqlens is not None:
        _, _, H, K = x.shape
        return (cu_seqlens.shape[0] - 1, max_len, H, K), (0, H * K, K)
    if head_first:
        B, H, T, K = x.shape
        return (B, T, H, K), (H * T * K, K, T * K)
    B, T, H, K = x.shape
    return (B, T, H, K), (T * H * K, H * K, K)


def _compute_precision(*xs) -> str:
    return "ieee" if any(x.dtype in (torch.float32, torch.float64) for x in xs) else "tf32"


def _kept_dtypes(prec: str) -> tuple:
    """dtypes of the forward op's outputs kept for the backward, in the op's order: checkpoints,
    their scales, segment transitions, W, b_bar, Kc, R2, dec, tile scales, pair matrices (the
    tiles and checkpoints in ``configs.tile_dtype``)."""
    tile, f32 = _TORCH_DTYPES[_kernels()[2].tile_dtype(prec)], torch.float32
    return (tile, f32, f32, tile, tile, tile, tile, f32, f32, f32)


# ---------------------------------------------------------------------------------------------
# forward


def _launch_plan(r, w, k, v, a, b, mask, head_first, chunks_per_segment, cu_seqlens=None,
                 max_len=0):
    """What forward and backward launch with: ((B, T, H, K), (stride_b, stride_t, stride_h), B*H,
    chunks, segments, config, dot precision, precision of the inverse series, the mask and
    cu_seqlens pointers (r stands in for an absent one: the kernels never read it then))."""
    (B, T, H, K), strides = _layout(r, head_first, cu_seqlens, max_len)
    BH, NC = B * H, max(1, -(-T // CHUNK))
    n_seg = -(-NC // chunks_per_segment)
    cfg = select_config(K, r.dtype, T, BH, _sm_count(r.device))
    prec = _compute_precision(r, w, k, v, a, b)
    prec_inv = "ieee" if prec == "ieee" else cfg.precision_inverse
    return ((B, T, H, K), strides, BH, NC, n_seg, cfg, prec, prec_inv,
            r if mask is None else mask, r if cu_seqlens is None else cu_seqlens)


def _forward_impl(r, w, k, v, a, b, initial_state, mask, head_first, chunks_per_segment, save,
                  cu_seqlens=None, max_len=0):
    chunk_fwd, _, configs = _kernels()
    (B, T, H, K), (sb, st, sh), BH, NC, n_seg, cfg, prec, prec_inv, m, cu = _launch_plan(
        r, w, k, v, a, b, mask, head_first, chunks_per_segment, cu_seqlens, max_len)
    has_mask, varlen = mask is not None, cu_seqlens is not None
    cps = chunks_per_segment
    dev = r.device
    f32 = torch.float32

    tile = _kept_dtypes(prec)[0]
    wt, bt, kct, r2t = (torch.empty((BH, NC, CHUNK, K), dtype=tile, device=dev) for _ in range(4))
    qct = torch.empty((BH, NC, CHUNK, CHUNK), dtype=f32, device=dev)
    dect = torch.empty((BH, NC, K), dtype=f32, device=dev)
    sct = torch.empty((BH, NC, configs.TILE_SCALES), dtype=f32, device=dev)
    pm = torch.empty((BH, NC, configs.PAIR_MATRICES, CHUNK, CHUNK), dtype=f32,
                     device=dev) if save else sct
    G = cfg.prep_chunks
    chunk_fwd.chunk_prep_kernel[(-(-NC // G) * BH,)](
        r, w, k, a, b, m, cu,
        wt, bt, kct, r2t, qct, dect, sct, pm,
        T, H, BH, NC, sb, st, sh,
        K=K, G=G, HAS_MASK=has_mask, PREC=prec,
        PREC_INV=prec_inv, VARLEN=varlen, FULL=configs.whole_chunks(T, G, has_mask, varlen),
        SAVE_PAIRS=save, num_warps=cfg.warps_prep)

    y = torch.empty(r.shape, dtype=r.dtype, device=dev)
    final = torch.empty((B, H, K, K), dtype=f32, device=dev)
    ckpt = torch.empty((BH, NC, K, K), dtype=tile, device=dev) if save else y
    cks = torch.empty((BH, NC, K), dtype=f32, device=dev) if save else y
    has_init = initial_state is not None
    if has_init:
        init_sb = 0 if initial_state.shape[0] == 1 else H * K * K
        init, init_sh, init_ss = initial_state, K * K, 0
    else:
        init, init_sb, init_sh, init_ss = r, 0, 0, 0
    seg_m = None  # the segments' transitions, kept for the backward
    bv = cfg.bv_fwd
    nv = K // bv
    scan = chunk_fwd.chunk_scan_fwd_kernel
    if n_seg > 1:
        loc = torch.empty((BH, n_seg, K, K), dtype=f32, device=dev)
        trans = torch.empty((BH, n_seg, K, K), dtype=f32, device=dev)
        seg_m = trans if save else None
        scan[(2 * nv * BH * n_seg,)](
            v, wt, bt, kct, r2t, qct, dect, sct, r, cu,
            y, y, y, loc, trans,
            T, H, BH, NC, cps, sb, st, sh, 0, 0, 0, n_seg * K * K, K * K,
            K=K, BV=bv, HAS_INIT=False, LOCAL=True, WRITE_Y=False, SAVE_CKPT=False,
            WRITE_END=True, PREC=prec, VARLEN=varlen, PREFETCH=cfg.prefetch_fwd,
            PREFETCH_L1=cfg.prefetch_fwd_l1, num_warps=cfg.warps_fwd, num_stages=cfg.stages_fwd)
        starts = torch.empty((BH, n_seg, K, K), dtype=f32, device=dev)
        chunk_fwd.state_combine_kernel[(K // COMBINE_ROWS * BH,)](
            loc, trans, init, starts, H, BH, n_seg, init_sb, init_sh,
            K=K, BV=COMBINE_ROWS, HAS_INIT=has_init, REVERSE=False, num_warps=4)
        init, init_sb, init_sh, init_ss = starts, H * n_seg * K * K, n_seg * K * K, K * K
        has_init = True
    scan[(nv * BH * n_seg,)](
        v, wt, bt, kct, r2t, qct, dect, sct, init, cu,
        y, ckpt, cks, final, final,
        T, H, BH, NC, cps, sb, st, sh, init_sb, init_sh, init_ss, K * K, 0,
        K=K, BV=bv, HAS_INIT=has_init, LOCAL=False, WRITE_Y=True, SAVE_CKPT=save,
        WRITE_END=True, PREC=prec, VARLEN=varlen, PREFETCH=cfg.prefetch_fwd,
        PREFETCH_L1=cfg.prefetch_fwd_l1, num_warps=cfg.warps_fwd, num_stages=cfg.stages_fwd)
    if not save:
        return y, final, None
    if seg_m is None:
        seg_m = torch.empty((0,), dtype=f32, device=dev)
    return y, final, (ckpt, cks, seg_m, wt, bt, kct, r2t, dect, sct, pm)


def _forward_fake(r, w, k, v, a, b, initial_state, mask, head_first, chunks_per_segment, save,
                  cu_seqlens=None, max_len=0):
    (B, T, H, K), _ = _layout(r, head_first, cu_seqlens, max_len)
    NC = max(1, -(-T // CHUNK))
    n_seg = -(-NC // chunks_per_segment)
    configs = _kernels()[2]
    BH = B * H
    shapes = ((BH, NC, K, K), (BH, NC, K), (BH, n_seg, K, K) if n_seg > 1 else (0,),
              (BH, NC, CHUNK, K), (BH, NC, CHUNK, K), (BH, NC, CHUNK, K), (BH, NC, CHUNK, K),
              (BH, NC, K),
              (BH, NC, configs.TILE_SCALES), (BH, NC, configs.PAIR_MATRICES, CHUNK, CHUNK))
    dtypes = _kept_dtypes(_compute_precision(r, w, k, v, a, b))
    return (r.new_empty(r.shape), r.new_empty((B, H, K, K), dtype=torch.float32),
            *(r.new_empty(shape if save else (0,), dtype=dtype)
              for shape, dtype in zip(shapes, dtypes)))


@torch.library.custom_op("rwkv_ops::triton_gdr_fwd", mutates_args=())
def triton_gdr_fwd(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor, initial_state: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], head_first: bool, chunks_per_segment: int,
                   save: bool, cu_seqlens: Optional[torch.Tensor],
                   max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward custom op on contiguous inputs (T >= 1); mask as uint8 [B, T] or None.

    With ``cu_seqlens`` (int32 [N + 1], never with a mask or head_first) the inputs are N
    sequences packed as [1, total_T, H, K], max_len >= 1 the longest; B reads N and NC
    ceil(max_len / 16) below, and the kept buffers of chunks wholly past a sequence's end are
    left unwritten (the backward never reads them).

    Returns (o, final_state fp32 [B, H, K, K], then what the backward needs, each empty unless
    ``save``: checkpoints [B*H, NC, K, K] (state entering every chunk; fp16 with tf32 products,
    scaled per row, else fp32) and their rows' inverse scales fp32 [B*H, NC, K], segment transitions
    fp32 [B*H, n_segments, K, K] (empty without segments), the prep tiles W, b_bar, Kc, R2
    [B*H, NC, 16, K] (fp16 with tf32 products, else fp32: ``configs.tile_dtype``), dec
    [B*H, NC, K] fp32, the tiles' inverse scales fp32 [B*H, NC, 4], and the chunks' pair
    matrices fp32 [B*H, NC, 4, 16, 16]).
    """
    y, final, kept = _forward_impl(r, w, k, v, a, b, initial_state, mask, head_first,
                                   chunks_per_segment, save, cu_seqlens, max_len)
    if kept is None:
        # nothing kept (no gradient): the op's fixed outputs, empty
        kept = tuple(y.new_empty((0,), dtype=dtype)
                     for dtype in _kept_dtypes(_compute_precision(r, w, k, v, a, b)))
    return (y, final, *kept)


triton_gdr_fwd.register_fake(_forward_fake)


# ---------------------------------------------------------------------------------------------
# backward


def _backward_impl(r, w, k, v, a, b, initial_state, mask, ckpt, cks, seg_m, wt, bt, kct, r2t,
                   dect, sct, pm, do, dfinal, head_first, chunks_per_segment, cu_seqlens=None,
                   max_len=0):
    chunk_fwd, chunk_bwd, configs = _kernels()
    (B, T, H, K), (sb, st, sh), BH, NC, n_seg, cfg, prec, _, m, cu = _launch_plan(
        r, w, k, v, a, b, mask, head_first, chunks_per_segment, cu_seqlens, max_len)
    has_mask, varlen = mask is not None, cu_seqlens is not None
    cps = chunks_per_segment
    dev = r.device
    f32 = torch.float32
    has_init = dfinal is not None
    if has_init:
        init, init_sb, init_sh, init_ss = dfinal, H * K * K, K * K, 0
    else:
        init, init_sb, init_sh, init_ss = r, 0, 0, 0
    bv = cfg.bv_state
    nv = K // bv
    scan = chunk_bwd.chunk_scan_bwd_kernel
    if n_seg > 1:
        gloc = torch.empty((BH, n_seg, K, K), dtype=f32, device=dev)
        scan[(nv * BH * n_seg,)](
            do, wt, bt, r2t, dect, sct, r, cu,
            gloc, gloc, gloc,
            T, H, BH, NC, cps, sb, st, sh, 0, 0, 0, n_seg * K * K, K * K,
            K=K, BV=bv, HAS_INIT=False, LOCAL=True, SAVE_CKPT=False, WRITE_END=True,
            PREC=prec, VARLEN=varlen, L1_PREFETCH=cfg.l1_prefetch_state,
            num_warps=cfg.warps_state, num_stages=cfg.stages_state)
        gend = torch.empty((BH, n_seg, K, K), dtype=f32, device=dev)
        chunk_fwd.state_combine_kernel[(K // COMBINE_ROWS * BH,)](
            gloc, seg_m, init, gend, H, BH, n_seg, init_sb, init_sh,
            K=K, BV=COMBINE_ROWS, HAS_INIT=has_init, REVERSE=True, num_warps=4)
        init, init_sb, init_sh, init_ss = gend, H * n_seg * K * K, n_seg * K * K, K * K
        has_init = True
    need_ds0 = initial_state is not None
    gck = torch.empty((BH, NC, K, K), dtype=ckpt.dtype, device=dev)
    gks = torch.empty((BH, NC, K), dtype=f32, device=dev)
    ds0 = torch.empty((B, H, K, K) if need_ds0 else (0,), dtype=f32, device=dev)
    scan[(nv * BH * n_seg,)](
        do, wt, bt, r2t, dect, sct, init, cu,
        gck, gks, ds0 if need_ds0 else gck,
        T, H, BH, NC, cps, sb, st, sh, init_sb, init_sh, init_ss, K * K, 0,
        K=K, BV=bv, HAS_INIT=has_init, LOCAL=False, SAVE_CKPT=True, WRITE_END=need_ds0,
        PREC=prec, VARLEN=varlen, L1_PREFETCH=cfg.l1_prefetch_state,
        num_warps=cfg.warps_state, num_stages=cfg.stages_state)
    grads = [torch.empty(x.shape, dtype=x.dtype, device=dev) for x in (r, w, k, v, a, b)]
    chunk_bwd.chunk_bwd_kernel[(NC * BH,)](
        r, w, k, v, a, b, do, m, ckpt, cks, gck, gks, pm, cu, wt, bt, kct, sct,
        *grads,
        T, H, BH, NC, sb, st, sh,
        K=K, KB=cfg.kb_bwd, HAS_MASK=has_mask, PREC=prec, VARLEN=varlen,
        FULL=configs.whole_chunks(T, 1, has_mask, varlen),
        PREFETCH=cfg.prefetch_bwd, L1_PREFETCH=cfg.l1_prefetch_bwd,
        num_warps=cfg.warps_bwd, num_stages=cfg.stages_bwd,
        **({} if cfg.maxnreg_bwd is None else dict(maxnreg=cfg.maxnreg_bwd)))
    return (*grads, ds0)


@torch.library.custom_op("rwkv_ops::triton_gdr_bwd", mutates_args=())
def triton_gdr_bwd(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   a: torch.Tensor, b: torch.Tensor, initial_state: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor], ckpt: torch.Tensor, cks: torch.Tensor,
                   seg_m: torch.Tensor, wt: torch.Tensor, bt: torch.Tensor, kct: torch.Tensor,
                   r2t: torch.Tensor, dect: torch.Tensor, sct: torch.Tensor, pm: torch.Tensor,
                   do: torch.Tensor,
                   dfinal: Optional[torch.Tensor], head_first: bool,
                   chunks_per_segment: int, cu_seqlens: Optional[torch.Tensor],
                   max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward custom op: (dr, dw, dk, dv, da, db, d_initial_state fp32 [B, H, K, K] or empty);
    cu_seqlens / max_len as in the forward (B = N sequences)."""
    return _backward_impl(r, w, k, v, a, b, initial_state, mask, ckpt, cks, seg_m, wt, bt, kct,
                          r2t, dect, sct, pm, do, dfinal, head_first, chunks_per_segment,
                          cu_seqlens, max_len)


@triton_gdr_bwd.register_fake
def _(r, w, k, v, a, b, initial_state, mask, ckpt, cks, seg_m, wt, bt, kct, r2t, dect, sct, pm,
      do, dfinal, head_first, chunks_per_segment, cu_seqlens, max_len):
    (B, T, H, K), _ = _layout(r, head_first, cu_seqlens, max_len)
    ds0 = r.new_empty((B, H, K, K) if initial_state is not None else (0,), dtype=torch.float32)
    return (*(x.new_empty(x.shape) for x in (r, w, k, v, a, b)), ds0)


def _setup_context(ctx, inputs, output):
    (r, w, k, v, a, b, initial_state, mask, head_first, chunks_per_segment, save, cu_seqlens,
     max_len) = inputs
    ctx.head_first = head_first
    ctx.chunks_per_segment = chunks_per_segment
    ctx.max_len = max_len
    # the outputs past (o, final_state) are saved tensors, not results: without this, autograd
    # would fill a zero gradient for each of them (gigabytes of memset at training sizes)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(r, w, k, v, a, b, initial_state, mask, cu_seqlens, *output[2:])


def _backward(ctx, do, dfinal, *_unused):
    (r, w, k, v, a, b, initial_state, mask, cu_seqlens, ckpt, cks, seg_m, wt, bt, kct, r2t, dect,
     sct, pm) = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(r)
    do = do.contiguous()
    if dfinal is not None:
        dfinal = dfinal.contiguous()
    dr, dw, dk, dv, da, db, ds0 = triton_gdr_bwd(
        r, w, k, v, a, b, initial_state, mask, ckpt, cks, seg_m, wt, bt, kct, r2t, dect, sct, pm,
        do, dfinal, ctx.head_first, ctx.chunks_per_segment, cu_seqlens, ctx.max_len)
    d_init = None
    if initial_state is not None:
        if initial_state.shape[0] == 1 and ds0.shape[0] != 1:
            ds0 = ds0.sum(0, keepdim=True)
        d_init = ds0.to(initial_state.dtype)
    return dr, dw, dk, dv, da, db, d_init, None, None, None, None, None, None


torch.library.register_autograd("rwkv_ops::triton_gdr_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public function


def _raise_if_unrunnable(K: int, device: torch.device) -> None:
    reason = check_head_size(K, SUPPORTED_HEAD_SIZES, KERNEL_TYPE)
    if reason is None and device.type != "cuda" and not interpret_mode():
        reason = device_mismatch_reason("Triton", device)
    if reason is not None:
        raise KernelUnavailableError(
            f"rwkv-ops: KERNEL_TYPE='{KERNEL_TYPE}' cannot run here with torch: {reason}.")


# torch's own check (private); where a torch build lacks it, every call takes the op
_functorch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _plain_eager(*tensors) -> bool:
    """Whether a forward that keeps nothing for a backward may launch its kernels directly rather
    than through the custom op: plain tensors (or None), and nothing that must see the op: no
    torch.compile tracing, no functorch transform (vmap, grad), no dispatch or torch-function
    mode (FakeTensorMode, export). The op's dispatch, its aliasing checks and its ten empty
    fixed outputs cost about 45 us of host time per call (``benchmarks/host_overhead.py --cpu``,
    [8, 512, 64, 64]: 122 against 167 us a dense call, 94 against 143 a packed one), where the
    GPU's work at that size takes 280 us on an H200, and the GPU machine's host is slower."""
    return (all(t is None or type(t) is torch.Tensor for t in tensors)
            and not torch.compiler.is_compiling()
            and not _functorch_transforms_active()
            and not torch._C._is_torch_function_mode_enabled()
            and _get_current_dispatch_mode() is None)


def _run(xs, initial_state, output_final_state, head_first, mask, B, T, H, K, cu_seqlens=None):
    """Shared body of the dense and the packed entry points, for validated inputs: B sequences of
    T steps (packed: B = N, T = max_len)."""
    r = xs[0]
    out_dtype = r.dtype
    wide = any(x.dtype == torch.float64 for x in xs) or (
        initial_state is not None and initial_state.dtype == torch.float64)
    state_dtype = torch.float64 if wide else torch.float32
    if T == 0:
        o = torch.empty(r.shape, dtype=out_dtype, device=r.device)
        if initial_state is None:
            final = torch.zeros((B, H, K, K), dtype=state_dtype, device=r.device)
        else:
            final = initial_state.to(state_dtype).expand(B, H, K, K).clone()
        return o, (final if output_final_state else None)
    if wide:
        # the kernels compute in float32 at most: float64 inputs run in true fp32 ("ieee")
        xs = tuple(x.to(torch.float32) for x in xs)
        if initial_state is not None:
            initial_state = initial_state.to(torch.float32)
    xs = tuple(x.contiguous() for x in xs)
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if mask is not None:
        mask = (mask != 0).to(torch.uint8).contiguous()
    tracked = [*xs] + ([initial_state] if initial_state is not None else [])
    save = torch.is_grad_enabled() and any(x.requires_grad for x in tracked)
    cfg = select_config(K, xs[0].dtype, T, B * H)
    args = (*xs, initial_state, mask, head_first, cfg.chunks_per_segment, save, cu_seqlens,
            T if cu_seqlens is not None else 0)
    if not save and _plain_eager(*tracked, mask, cu_seqlens):
        o, final, _ = _forward_impl(*args)
    else:
        o, final, *_ = triton_gdr_fwd(*args)
    if o.dtype != out_dtype:
        o = o.to(out_dtype)
    if not output_final_state:
        return o, None
    return o, final.to(state_dtype)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    xs = (r, w, k, v, a, b)
    p = check_torch_inputs(*xs, initial_state, mask, head_first)
    _raise_if_unrunnable(p.K, r.device)
    return _run(xs, initial_state, output_final_state, head_first, mask, p.B, p.T, p.H, p.K)


def generalized_delta_rule_packed(r, w, k, v, a, b, cu_seqlens, max_len, initial_state=None,
                                  output_final_state=True):
    """The kernels on N sequences packed along T, read and written in place (no padded copies).

    For validated inputs (``rwkv_ops.torch.varlen.generalized_delta_rule_varlen`` checks them):
    r, w, k, v, a, b [1, total_T, H, K]; cu_seqlens int32 [N + 1] on their device (the sequence
    boundaries); max_len the longest length (a host int: it sizes the launch); initial_state
    [N, H, K, K] or None. Returns (o [1, total_T, H, K], final state [N, H, K, K] or None), like
    :func:`generalized_delta_rule`, and is differentiable the same way. Raises
    KernelUnavailableError where the kernels cannot run (head size, CPU tensors without
    TRITON_INTERPRET=1).
    """
    xs = (r, w, k, v, a, b)
    _, _, H, K = r.shape
    _raise_if_unrunnable(K, r.device)
    cu = cu_seqlens.to(device=r.device, dtype=torch.int32).contiguous()
    return _run(xs, initial_state, output_final_state, False, None, cu.shape[0] - 1, int(max_len),
                H, K, cu)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="PyTorch, shared Triton kernels; CUDA tensors (CPU only under TRITON_INTERPRET=1)",
    tensor="torch tensors",
    example="""    >>> import torch
    >>> from rwkv_ops.torch.triton_launcher import generalized_delta_rule
    >>> r, w, k, v, a, b = torch.randn(6, 2, 32, 4, 64, device="cuda", dtype=torch.bfloat16).unbind(0)
    >>> o, state = generalized_delta_rule(r, w, k, v, a, b)
    >>> o.shape, state.shape
    (torch.Size([2, 32, 4, 64]), torch.Size([2, 4, 64, 64]))""",
)

rwkv7_op = generalized_delta_rule
