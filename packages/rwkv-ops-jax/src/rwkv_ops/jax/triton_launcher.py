"""JAX launcher of the shared Triton kernels (``KERNEL_TYPE="triton"``), through jax-triton.

The same kernels, grids and launch configuration (``configs.chunk_config``) as the PyTorch launcher
(``rwkv_ops.torch.triton_launcher``), so both give the same results:

* forward: ``chunk_prep_kernel`` (chunk-parallel K-side tiles), [segments only]
  ``chunk_scan_fwd_kernel`` (LOCAL) + ``state_combine_kernel``, then ``chunk_scan_fwd_kernel``,
  which writes o, the final state and, when a gradient will be needed, the state entering every
  chunk (those checkpoints, the prep tiles W, b_bar, Kc, R2, dec and the chunks' pair matrices
  are the backward's residuals; the checkpoints and the tiles are fp16 scaled by powers of two with
  tf32 products, exactly, and fp32 otherwise: ``configs.tile_dtype``).
* backward: [segments only] ``chunk_scan_bwd_kernel`` (LOCAL) + ``state_combine_kernel``
  (reverse), then ``chunk_scan_bwd_kernel`` (state gradient at every chunk end, and the initial
  state's), then ``chunk_bwd_kernel`` (the six input gradients, chunk-parallel).

Three layers:

1. ``jax.custom_vjp`` (``_gdr``): the plain call runs the forward without residuals; under
   ``grad`` / ``vjp`` the forward keeps them for the backward. Works under ``jit`` and
   ``checkpoint``.
2. ``custom_partitioning`` (``_fwd_cp``, ``_bwd_cp``): under ``jit`` with sharded inputs every
   device runs the kernels on its own block of batch elements and heads; T and K are never split
   (a T or K sharding is gathered first: the recurrence is sequential in T and mixes all of K).
3. Entry kernels (``_entries``): jax-triton passes arrays, then scalars, then output pointers, while
   the shared kernels take outputs before scalars. Thin ``@triton.jit`` entries with jax-triton's
   order call the shared kernels (inlined by Triton) and derive their strides from the layout.
   H and K are compile-time constants there, so the strides keep their divisibility (vectorised
   loads) while T stays a runtime argument (no recompilation per sequence length).

Variable-length batches (``generalized_delta_rule_packed``, used by ``rwkv_ops.jax.varlen``): the
kernels' ``VARLEN`` mode reads and writes the packed [1, total_T, H, K] arrays directly. The
concrete boundaries give the static launch (B = N sequences, T = the longest length) and travel as
an int32 [N + 1] operand (``cu``) that every entry passes on; each program finds its sequence's
start and length there, and steps past a sequence's end are identity steps. The same custom_vjp
differentiates it (``_Static.max_len`` > 0 marks it). It is not partitioned: the packed layout has
a batch of 1 and sequences of unequal lengths, so there is no batch axis to split; the kernels are
called without ``custom_partitioning`` and sharded operands are gathered to run whole.

Outputs of jax-triton are not zero-initialised; every kernel writes all elements of its outputs
(with VARLEN, of o, the gradients and the states; prep tiles and checkpoints of chunks wholly past
a sequence's end are left unwritten and never read).
Under ``TRITON_INTERPRET=1`` the same entries run in Triton's CPU interpreter through
``jax.pure_callback`` (tests on machines without a GPU; the interpreter works on torch tensors).

Importing this module imports neither triton nor jax_triton: both load on the first call.
"""

import importlib.util
import os
import threading
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rwkv_ops.common import KernelUnavailableError, check_head_size, docs
from rwkv_ops.jax.api import as_arrays, validate

KERNEL_TYPE = "triton"
SUPPORTED_HEAD_SIZES = (32, 64, 128)
CHUNK = 16
# rows per program of the segment combine (as the PyTorch launcher: larger tiles spill)
COMBINE_ROWS = 16

# Stand-in for an output a pass does not write (jax-triton gives every output its own buffer).
_UNUSED = jax.ShapeDtypeStruct((1,), jnp.float32)
_INTERPRETER_LOCK = threading.Lock()


def interpret_mode() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(head_size=None) -> tuple:
    """(why the Triton kernels cannot run here, or None; quiet). Cheap: imports nothing new.

    quiet is True only for "no GPU backend" (no surprise on a CPU or TPU machine).
    """
    if not interpret_mode():
        backend = jax.default_backend()
        if backend != "gpu":
            return f"no GPU backend in JAX (jax.default_backend() is '{backend}')", True
        if importlib.util.find_spec("jax_triton") is None:
            return "jax-triton is not installed: pip install rwkv-ops-jax[gpu]", False
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed: pip install rwkv-ops-jax[gpu]", False
    if interpret_mode() and importlib.util.find_spec("torch") is None:
        return ("Triton's interpreter (TRITON_INTERPRET=1) runs on torch tensors: "
                "pip install torch"), False
    if head_size is not None:
        reason = check_head_size(int(head_size), SUPPORTED_HEAD_SIZES, KERNEL_TYPE)
        if reason is not None:
            return reason, False
    return None, False


# ---------------------------------------------------------------------------------------------
# entry kernels (built on first use: importing this module must not import Triton)

_ENTRIES = {}


def _entries() -> dict:
    # The entries reach the shared kernels and triton.language through module globals, which every
    # Triton version resolves (not all resolve closures). The module is bound as `tl`: Triton's
    # interpreter recognises constexpr annotations by that exact spelling.
    global tl, _chunk_prep_kernel, _chunk_scan_fwd_kernel, _state_combine_kernel
    global _chunk_scan_bwd_kernel, _chunk_bwd_kernel, layout_strides, state_strides, end_strides
    if _ENTRIES:
        return _ENTRIES
    import triton
    import triton.language as tl

    from rwkv_ops.jax._triton import chunk_bwd, chunk_fwd

    _chunk_prep_kernel = chunk_fwd.chunk_prep_kernel
    _chunk_scan_fwd_kernel = chunk_fwd.chunk_scan_fwd_kernel
    _state_combine_kernel = chunk_fwd.state_combine_kernel
    _chunk_scan_bwd_kernel = chunk_bwd.chunk_scan_bwd_kernel
    _chunk_bwd_kernel = chunk_bwd.chunk_bwd_kernel

    # Shared conventions of the entries. Sizes (T, BH, NC, CPS, NSEG) arrive plus one: jax-triton
    # makes an int argument equal to 1 a compile-time constant, i.e. one more compiled variant per
    # size that happens to be 1; biased, they never are (as the kernels' do_not_specialize).
    # Layout strides: stride_b = T*H*K in both layouts, in int64
    # (T may come in as i32 or, when 1, as a constant); head_first: (t, h) = (K, T*K),
    # else (H*K, K).
    # INIT_MODE of the state entering a scan: 0 none, 1 [B, H, K, K], 2 [1, H, K, K] (broadcast),
    # 3 one per segment [B, H, NSEG, K, K]. Per-segment outputs are [B, H, NSEG, K, K].
    # VARLEN: B sequences packed as [1, total_T, H, K] (not head_first), boundaries in cu (int32
    # [B + 1]) and T the longest length: the kernels take the start of each sequence from cu and
    # ignore stride_b; (t, h) strides as for the [B, T, H, K] layout.

    @triton.jit
    def layout_strides(T, H: tl.constexpr, K: tl.constexpr, HEAD_FIRST: tl.constexpr):
        # (stride_b, stride_t, stride_h) of a contiguous input in its layout; stride_b in int64
        T64 = T + tl.zeros([], dtype=tl.int64)
        if HEAD_FIRST:
            stride_t = K
            stride_h = T64 * K
        else:
            stride_t = H * K
            stride_h = K
        return T64 * (H * K), stride_t, stride_h

    @triton.jit
    def state_strides(NSEG, H: tl.constexpr, K: tl.constexpr, INIT_MODE: tl.constexpr):
        # (batch, head, segment) strides of the state entering a pass, by INIT_MODE
        if INIT_MODE == 1:
            sb = H * K * K
            sh = K * K
            ss = 0
        elif INIT_MODE == 2:
            sb = 0
            sh = K * K
            ss = 0
        elif INIT_MODE == 3:
            sb = NSEG * (H * K * K)
            sh = NSEG * (K * K)
            ss = K * K
        else:
            sb = 0
            sh = 0
            ss = 0
        return sb, sh, ss

    @triton.jit
    def end_strides(NSEG, K: tl.constexpr, LOCAL: tl.constexpr):
        # (sequence, segment) strides of a scan's end states: one per segment when LOCAL
        if LOCAL:
            sbh = NSEG * (K * K)
            ss = K * K
        else:
            sbh = K * K
            ss = 0
        return sbh, ss

    @triton.jit
    def rwkv_gdr_prep(r, w, k, a, b, mask, cu,
                      T_p1, BH_p1, NC_p1,
                      wo, bo, kco, r2o, qco, deco, sco, pmo,
                      H: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                      HEAD_FIRST: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                      PREC_INV: tl.constexpr, VARLEN: tl.constexpr, FULL: tl.constexpr,
                      SAVE_PAIRS: tl.constexpr):
        T, BH, NC = T_p1 - 1, BH_p1 - 1, NC_p1 - 1
        stride_b, stride_t, stride_h = layout_strides(T, H, K, HEAD_FIRST)
        _chunk_prep_kernel(r, w, k, a, b, mask, cu, wo, bo, kco, r2o, qco, deco, sco, pmo,
                           T, H, BH, NC, stride_b, stride_t, stride_h,
                           K=K, G=G, HAS_MASK=HAS_MASK, PREC=PREC, PREC_INV=PREC_INV,
                           VARLEN=VARLEN, FULL=FULL, SAVE_PAIRS=SAVE_PAIRS)

    @triton.jit
    def rwkv_gdr_scan_fwd(v, wt, bt, kct, r2t, qct, dect, sct, init, cu,
                          T_p1, BH_p1, NC_p1, CPS_p1, NSEG_p1,
                          y, ckpt, cks, send, mend,
                          H: tl.constexpr, K: tl.constexpr, BV: tl.constexpr,
                          HEAD_FIRST: tl.constexpr, INIT_MODE: tl.constexpr, LOCAL: tl.constexpr,
                          WRITE_Y: tl.constexpr, SAVE_CKPT: tl.constexpr, WRITE_END: tl.constexpr,
                          PREC: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr,
                          PREFETCH_L1: tl.constexpr):
        T, BH, NC, CPS, NSEG = T_p1 - 1, BH_p1 - 1, NC_p1 - 1, CPS_p1 - 1, NSEG_p1 - 1
        stride_b, stride_t, stride_h = layout_strides(T, H, K, HEAD_FIRST)
        init_sb, init_sh, init_ss = state_strides(NSEG, H, K, INIT_MODE)
        send_sbh, send_ss = end_strides(NSEG, K, LOCAL)
        _chunk_scan_fwd_kernel(v, wt, bt, kct, r2t, qct, dect, sct, init, cu, y, ckpt, cks, send,
                               mend,
                               T, H, BH, NC, CPS, stride_b, stride_t, stride_h,
                               init_sb, init_sh, init_ss, send_sbh, send_ss,
                               K=K, BV=BV, HAS_INIT=INIT_MODE != 0, LOCAL=LOCAL, WRITE_Y=WRITE_Y,
                               SAVE_CKPT=SAVE_CKPT, WRITE_END=WRITE_END, PREC=PREC, VARLEN=VARLEN,
                               PREFETCH=PREFETCH, PREFETCH_L1=PREFETCH_L1)

    @triton.jit
    def rwkv_gdr_combine(loc, m, init,
                         BH_p1, NSEG_p1,
                         out,
                         H: tl.constexpr, K: tl.constexpr, BV: tl.constexpr,
                         INIT_MODE: tl.constexpr, REVERSE: tl.constexpr):
        BH, NSEG = BH_p1 - 1, NSEG_p1 - 1
        init_sb, init_sh, _ = state_strides(NSEG, H, K, INIT_MODE)
        _state_combine_kernel(loc, m, init, out, H, BH, NSEG, init_sb, init_sh,
                              K=K, BV=BV, HAS_INIT=INIT_MODE != 0, REVERSE=REVERSE)

    @triton.jit
    def rwkv_gdr_scan_bwd(dy, wt, bt, r2t, dect, sct, init, cu,
                          T_p1, BH_p1, NC_p1, CPS_p1, NSEG_p1,
                          gck, gks, gend,
                          H: tl.constexpr, K: tl.constexpr, BV: tl.constexpr,
                          HEAD_FIRST: tl.constexpr, INIT_MODE: tl.constexpr, LOCAL: tl.constexpr,
                          SAVE_CKPT: tl.constexpr, WRITE_END: tl.constexpr, PREC: tl.constexpr,
                          VARLEN: tl.constexpr, L1_PREFETCH: tl.constexpr):
        T, BH, NC, CPS, NSEG = T_p1 - 1, BH_p1 - 1, NC_p1 - 1, CPS_p1 - 1, NSEG_p1 - 1
        stride_b, stride_t, stride_h = layout_strides(T, H, K, HEAD_FIRST)
        init_sb, init_sh, init_ss = state_strides(NSEG, H, K, INIT_MODE)
        gend_sbh, gend_ss = end_strides(NSEG, K, LOCAL)
        _chunk_scan_bwd_kernel(dy, wt, bt, r2t, dect, sct, init, cu, gck, gks, gend,
                               T, H, BH, NC, CPS, stride_b, stride_t, stride_h,
                               init_sb, init_sh, init_ss, gend_sbh, gend_ss,
                               K=K, BV=BV, HAS_INIT=INIT_MODE != 0, LOCAL=LOCAL,
                               SAVE_CKPT=SAVE_CKPT, WRITE_END=WRITE_END, PREC=PREC, VARLEN=VARLEN,
                               L1_PREFETCH=L1_PREFETCH)

    @triton.jit
    def rwkv_gdr_bwd(r, w, k, v, a, b, dy, mask, ckpt, cks, gck, gks, pm, cu, wt, bt, kct, sct,
                     T_p1, BH_p1, NC_p1,
                     dr, dw, dk, dv, da, db,
                     H: tl.constexpr, K: tl.constexpr, KB: tl.constexpr,
                     HEAD_FIRST: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                     VARLEN: tl.constexpr, FULL: tl.constexpr, PREFETCH: tl.constexpr,
                     L1_PREFETCH: tl.constexpr, RWKV_OPS_MAXNREG: tl.constexpr):
        # RWKV_OPS_MAXNREG (CAP_PARAM): the launch's register cap, read by the lowering
        # (_register_cap_lowering), not by the kernel
        T, BH, NC = T_p1 - 1, BH_p1 - 1, NC_p1 - 1
        stride_b, stride_t, stride_h = layout_strides(T, H, K, HEAD_FIRST)
        _chunk_bwd_kernel(r, w, k, v, a, b, dy, mask, ckpt, cks, gck, gks, pm, cu, wt, bt, kct,
                          sct, dr, dw, dk, dv, da, db,
                          T, H, BH, NC, stride_b, stride_t, stride_h,
                          K=K, KB=KB, HAS_MASK=HAS_MASK, PREC=PREC, VARLEN=VARLEN, FULL=FULL,
                          PREFETCH=PREFETCH, L1_PREFETCH=L1_PREFETCH)

    _ENTRIES.update(prep=rwkv_gdr_prep, scan_fwd=rwkv_gdr_scan_fwd, combine=rwkv_gdr_combine,
                    scan_bwd=rwkv_gdr_scan_bwd, bwd=rwkv_gdr_bwd)

    return _ENTRIES


def _configs():
    from rwkv_ops.jax._triton import configs
    return configs


def select_config(K: int, dtype, T: int, BH: int, sm_count=None):
    """The kernels' launch configuration (the shared ``configs.chunk_config``)."""
    name = jnp.dtype(dtype).name
    return _configs().chunk_config(K, name if name in ("bfloat16", "float16") else "float32", T,
                                   BH, sm_count)


def _sm_count():
    """The multiprocessors of the default device when it is a GPU; None under Triton's
    interpreter (or when the device does not say)."""
    device = jax.devices()[0]
    if interpret_mode() or device.platform != "gpu":
        return None
    count = getattr(device, "core_count", None)
    return int(count) if count else None


# ---------------------------------------------------------------------------------------------
# launching one entry: jax-triton on a GPU, Triton's interpreter through a host callback otherwise


def _launch(entry, arrays, scalars, outs, grid, warps, stages, maxnreg=None, **constexprs):
    """Run entry kernel ``entry`` on ``arrays`` (then the int ``scalars``); returns its outputs.
    maxnreg: the kernel's register cap (Triton's option of that name; None: none)."""
    kernel = _entries()[entry]
    scalars = [int(s) + 1 for s in scalars]  # the entries take sizes plus one (see _entries)
    constexprs = _with_cap(kernel, entry, maxnreg, constexprs)
    if interpret_mode():
        return _launch_interpreted(kernel, arrays, scalars, outs, grid, constexprs)
    import jax_triton

    if maxnreg is not None:
        _register_cap_lowering()
    return jax_triton.triton_call(*arrays, *scalars, kernel=kernel, out_shape=list(outs), grid=grid,
                                  num_warps=warps, num_stages=stages, name=f"rwkv_ops_gdr_{entry}",
                                  **constexprs)


def _with_cap(kernel, entry, maxnreg, constexprs):
    """constexprs with the entry's CAP_PARAM set to maxnreg (an entry that takes a register cap
    always gets one, None included: one compile-cache key per cap)."""
    if CAP_PARAM in kernel.arg_names:
        return {**constexprs, CAP_PARAM: maxnreg}
    if maxnreg is not None:
        raise ValueError(f"entry {entry} takes no register cap")
    return constexprs


# the entry constexpr that carries a launch's register cap to the lowering; a name no other
# kernel lowered through jax-triton in the same process is likely to use
CAP_PARAM = "RWKV_OPS_MAXNREG"
_CAP_LOCK = threading.Lock()
_CAP_LOWERING = []


def _register_cap_lowering():
    """Give jax-triton's launches a register cap: its ``triton_call`` has no ``maxnreg`` option,
    so its CUDA lowering is wrapped once per process. A launch whose parameters hold
    ``CAP_PARAM`` (a constexpr of the entry that the kernel does not read; part of jax-triton's
    compile-cache key) compiles with Triton's ``maxnreg`` set to it, as the PyTorch launcher's
    launch option does; every other launch lowers exactly as before (jax-triton's own function
    and backend). Raises KernelUnavailableError naming the version when jax-triton's internals
    are not the ones this wraps (0.3.x), rather than launching without the cap."""
    with _CAP_LOCK:
        if _CAP_LOWERING:
            return
        from jax.interpreters import mlir

        try:
            from jax_triton import triton_lib
            lower = triton_lib.triton_kernel_call_lowering
            plain = triton_lib.get_cuda_backend
            primitive = triton_lib.triton_kernel_call_p
        except (ImportError, AttributeError) as error:
            import jax_triton
            raise KernelUnavailableError(
                f"the Triton path's register cap needs jax-triton 0.3's lowering "
                f"(jax_triton.triton_lib); jax-triton {jax_triton.__version__} differs: "
                f"{error}") from error

        def lowering(ctx, *args, **params):
            cap = params.get(CAP_PARAM)
            return lower(plain if cap is None else _capped_backend(cap), ctx, *args, **params)

        mlir.register_lowering(primitive, lowering, platform="cuda")
        _CAP_LOWERING.append(lowering)


def _capped_backend(maxnreg):
    """jax-triton's backend constructor ((device, compute capability) -> Triton's CUDA backend)
    for a launch capped at maxnreg registers: the backend's options carry ``maxnreg``, which
    Triton's compiler writes into the kernel (``.maxnreg`` for ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    class CappedBackend(CUDABackend):
        def parse_options(self, options):
            return super().parse_options({**options, "maxnreg": maxnreg})

    return lambda device, capability: CappedBackend(GPUTarget("cuda", capability, 32))


def _launch_interpreted(kernel, arrays, scalars, outs, grid, constexprs):
    import torch

    def to_torch(x):
        x = np.array(x)  # a writable copy
        if x.dtype == jnp.bfloat16:
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)

    def to_numpy(t, dtype):
        if dtype == jnp.bfloat16:
            return t.view(torch.int16).numpy().view(jnp.bfloat16)
        return t.numpy()

    torch_dtypes = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16,
                    jnp.dtype(jnp.float32): torch.float32}

    def run(*host_arrays):
        args = [to_torch(x) for x in host_arrays]
        # NaN-filled, like jax-triton's uninitialised outputs but loud: unwritten elements show
        results = [torch.full(o.shape, float("nan"), dtype=torch_dtypes[jnp.dtype(o.dtype)])
                   for o in outs]
        # the interpreter patches triton.language while it runs: one launch at a time (devices of
        # a sharded computation call back from several threads)
        with _INTERPRETER_LOCK:
            kernel[grid](*args, *scalars, *results, **constexprs)
        return tuple(to_numpy(t, jnp.dtype(o.dtype)) for t, o in zip(results, outs))

    return list(jax.pure_callback(run, tuple(outs), *arrays))


# ---------------------------------------------------------------------------------------------
# forward and backward on arrays whose batch and heads are all local (one device's shard)


class _Static(NamedTuple):
    """What a call fixes at trace time (hashable: a nondiff / static argument).

    init_mode: 0 no initial state, 1 [B, H, K, K], 2 [1, H, K, K]. cps / n_seg: chunks per segment
    and segments, chosen once from the global shapes so that every shard returns residuals of one
    shape. save: the forward keeps the checkpoints for a backward. max_len: 0 for a dense call;
    for packed sequences (an int32 cu_seqlens operand follows the mask) the longest length, which
    is the launch's T (B is then the number of sequences).
    """

    head_first: bool
    cps: int
    n_seg: int
    has_mask: bool
    init_mode: int
    save: bool = False
    max_len: int = 0


def _dims(x, head_first, cu=None, max_len=0):
    if cu is not None:
        _, _, H, K = x.shape
        return int(cu.shape[0]) - 1, int(max_len), int(H), int(K)
    if head_first:
        B, H, T, K = x.shape
    else:
        B, T, H, K = x.shape
    return int(B), int(T), int(H), int(K)


def _precision(xs) -> str:
    # float32 inputs get true fp32 products ("ieee"), never TF32: SPEC's dtype policy
    return "ieee" if any(jnp.dtype(x.dtype) == jnp.float32 for x in xs) else "tf32"


def _inverse_precision(prec: str, cfg) -> str:
    # the (I - A_ab)^-1 series products: the configuration's choice for half inputs (as torch)
    return "ieee" if prec == "ieee" else cfg.precision_inverse


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype)


def _forward_local(static, *arrays):
    """(o, final_state[, residuals]) of contiguous local arrays.

    arrays: r, w, k, v, a, b, then the initial state when ``init_mode``, then the uint8 mask when
    ``has_mask``, then cu_seqlens (int32 [N + 1]) when ``max_len`` (packed sequences: B reads N).
    With ``save`` the residuals of the backward follow: the state entering every chunk
    [B, H, NC, K, K] and its rows' inverse scales [B, H, NC, K], the segment transitions
    [B, H, n_seg, K, K] (only when ``n_seg > 1``), the prep kernel's tiles W, b_bar, Kc, R2
    [B, H, NC, 16, K], dec [B, H, NC, K], the tiles' inverse scales [B, H, NC, 4] and the chunks'
    pair matrices [B, H, NC, 4, 16, 16]. The checkpoints and the tiles are fp16 with tf32 products
    (scaled, exact: ``configs.tile_dtype``) and fp32 otherwise; the rest is fp32.
    """
    r, w, k, v, a, b = arrays[:6]
    rest = list(arrays[6:])
    s0 = rest.pop(0) if static.init_mode else None
    mask = rest.pop(0) if static.has_mask else None
    cu = rest.pop(0) if static.max_len else None
    B, T, H, K = _dims(r, static.head_first, cu, static.max_len)
    BH, NC = B * H, -(-T // CHUNK)
    cfg = select_config(K, r.dtype, T, BH, _sm_count())
    cps, n_seg = static.cps, static.n_seg
    prec = _precision(arrays[:6])
    m = r if mask is None else mask
    c = r if cu is None else cu  # stand-ins for absent pointers
    varlen = cu is not None

    configs = _configs()
    tile = _sds((B, H, NC, CHUNK, K), jnp.dtype(configs.tile_dtype(prec)))
    G = cfg.prep_chunks
    save = static.save
    pairs = _sds((B, H, NC, configs.PAIR_MATRICES, CHUNK, CHUNK)) if save else _UNUSED
    wt, bt, kct, r2t, qct, dect, sct, pm = _launch(
        "prep", (r, w, k, a, b, m, c), (T, BH, NC),
        (tile, tile, tile, tile, _sds((B, H, NC, CHUNK, CHUNK)), _sds((B, H, NC, K)),
         _sds((B, H, NC, configs.TILE_SCALES)), pairs),
        (-(-NC // G) * BH,), cfg.warps_prep, 3,
        H=H, K=K, G=G, HEAD_FIRST=static.head_first, HAS_MASK=mask is not None, PREC=prec,
        PREC_INV=_inverse_precision(prec, cfg), VARLEN=varlen,
        FULL=configs.whole_chunks(T, G, mask is not None, varlen), SAVE_PAIRS=save)

    bv = cfg.bv_fwd
    nv = K // bv
    common = dict(H=H, K=K, BV=bv, HEAD_FIRST=static.head_first, PREC=prec, VARLEN=varlen,
                  PREFETCH=cfg.prefetch_fwd, PREFETCH_L1=cfg.prefetch_fwd_l1)
    init, init_mode = (r, 0) if s0 is None else (s0, static.init_mode)
    tiles = (v, wt, bt, kct, r2t, qct, dect, sct)
    scalars = (T, BH, NC, cps, n_seg)
    seg_m = None
    if n_seg > 1:
        seg = _sds((B, H, n_seg, K, K))
        _, _, _, loc, seg_m = _launch(
            "scan_fwd", tiles + (r, c), scalars, (_UNUSED, _UNUSED, _UNUSED, seg, seg),
            (2 * nv * BH * n_seg,), cfg.warps_fwd, cfg.stages_fwd,
            INIT_MODE=0, LOCAL=True, WRITE_Y=False, SAVE_CKPT=False, WRITE_END=True, **common)
        (starts,) = _launch(
            "combine", (loc, seg_m, init), (BH, n_seg), (seg,), (K // COMBINE_ROWS * BH,), 4, 3,
            H=H, K=K, BV=COMBINE_ROWS, INIT_MODE=init_mode, REVERSE=False)
        init, init_mode = starts, 3
    outs = (_sds(r.shape, r.dtype), _sds((B, H, NC, K, K), tile.dtype) if save else _UNUSED,
            _sds((B, H, NC, K)) if save else _UNUSED, _sds((B, H, K, K)), _UNUSED)
    y, ckpt, cks, final, _ = _launch(
        "scan_fwd", tiles + (init, c), scalars, outs, (nv * BH * n_seg,),
        cfg.warps_fwd, cfg.stages_fwd,
        INIT_MODE=init_mode, LOCAL=False, WRITE_Y=True, SAVE_CKPT=save, WRITE_END=True, **common)
    if not save:
        return y, final
    return ((y, final, ckpt, cks) + ((seg_m,) if n_seg > 1 else ())
            + (wt, bt, kct, r2t, dect, sct, pm))


def _backward_local(static, *arrays):
    """(dr, dw, dk, dv, da, db[, d_initial_state [B, H, K, K] fp32]) of local arrays.

    arrays: r, w, k, v, a, b, [uint8 mask], [int32 cu_seqlens], then the forward's residuals
    (checkpoints, their scales, [segment transitions], W, b_bar, Kc, R2, dec, tile scales, pair
    matrices), then do and d_final_state.
    """
    r, w, k, v, a, b = arrays[:6]
    rest = list(arrays[6:])
    mask = rest.pop(0) if static.has_mask else None
    cu = rest.pop(0) if static.max_len else None
    ckpt = rest.pop(0)
    cks = rest.pop(0)
    seg_m = rest.pop(0) if static.n_seg > 1 else None
    wt, bt, kct, r2t, dect, sct, pm, dy, dfinal = rest
    B, T, H, K = _dims(r, static.head_first, cu, static.max_len)
    BH, NC = B * H, -(-T // CHUNK)
    cfg = select_config(K, r.dtype, T, BH, _sm_count())
    cps, n_seg = static.cps, static.n_seg
    bv = cfg.bv_state
    nv = K // bv
    prec = _precision(arrays[:6])
    varlen = cu is not None
    common = dict(H=H, K=K, BV=bv, HEAD_FIRST=static.head_first, PREC=prec, VARLEN=varlen,
                  L1_PREFETCH=cfg.l1_prefetch_state)
    m = r if mask is None else mask
    c = r if cu is None else cu  # stand-ins for absent pointers
    tiles = (dy, wt, bt, r2t, dect, sct)
    scalars = (T, BH, NC, cps, n_seg)
    init, init_mode = dfinal, 1
    if n_seg > 1:
        seg = _sds((B, H, n_seg, K, K))
        _, _, gloc = _launch(
            "scan_bwd", tiles + (r, c), scalars, (_UNUSED, _UNUSED, seg), (nv * BH * n_seg,),
            cfg.warps_state, cfg.stages_state,
            INIT_MODE=0, LOCAL=True, SAVE_CKPT=False, WRITE_END=True, **common)
        (gend,) = _launch(
            "combine", (gloc, seg_m, dfinal), (BH, n_seg), (seg,), (K // COMBINE_ROWS * BH,), 4, 3,
            H=H, K=K, BV=COMBINE_ROWS, INIT_MODE=1, REVERSE=True)
        init, init_mode = gend, 3
    need_ds0 = static.init_mode != 0
    gck, gks, ds0 = _launch(
        "scan_bwd", tiles + (init, c), scalars,
        (_sds((B, H, NC, K, K), ckpt.dtype), _sds((B, H, NC, K)),
         _sds((B, H, K, K)) if need_ds0 else _UNUSED),
        (nv * BH * n_seg,), cfg.warps_state, cfg.stages_state,
        INIT_MODE=init_mode, LOCAL=False, SAVE_CKPT=True, WRITE_END=need_ds0, **common)
    grad_args = ((r, w, k, v, a, b, dy, m, ckpt, cks, gck, gks, pm, c, wt, bt, kct, sct),
                 (T, BH, NC),
                 tuple(_sds(x.shape, x.dtype) for x in (r, w, k, v, a, b)), (NC * BH,),
                 cfg.warps_bwd, cfg.stages_bwd)
    flags = dict(H=H, K=K, HEAD_FIRST=static.head_first, HAS_MASK=mask is not None, PREC=prec,
                 VARLEN=varlen, FULL=_configs().whole_chunks(T, 1, mask is not None, varlen))
    grads = _launch("bwd", *grad_args, maxnreg=cfg.maxnreg_bwd, KB=cfg.kb_bwd,
                    PREFETCH=cfg.prefetch_bwd, L1_PREFETCH=cfg.l1_prefetch_bwd, **flags)
    return tuple(grads) + ((ds0,) if need_ds0 else ())


# ---------------------------------------------------------------------------------------------
# sharding: every kernel works per (batch element, head), so B and H shard freely; T and K never

# Dimensions of each kind of array: "x" an input / o / gradient (layout dependent), "m" the mask,
# "s" a [B, H, K, K] state, "s1" a [1, H, K, K] state, "c" checkpoints [B, H, NC, K, K],
# "g" per-segment states [B, H, NSEG, K, K], "p" prep tiles [B, H, NC, 16, K], "d" a [B, H, NC, K]
# array (chunk decays, the checkpoints' row scales), "e" the tiles' inverse scales [B, H, NC, 4],
# "q" the pair matrices [B, H, NC, 4, 16, 16]. Factor names of the Shardy rule; only b and h may
# shard.
# Tests set this to compile (never run) sharded programs under the interpreter.
_COMPILE_ONLY_UNDER_INTERPRETER = False
_FACTORS = {"x": "b t h k", "x_hf": "b h t k", "m": "b t", "s": "b h i k", "s1": "u h i k",
            "c": "b h c i k", "g": "b h g i k", "p": "b h c l k", "d": "b h c k", "e": "b h c j",
            "q": "b h c n l o"}
_REPLICATED_FACTORS = ("t", "k", "i", "c", "g", "l", "j", "n", "o")


def _fwd_roles(static):
    args = ["x"] * 6 + ([("s1" if static.init_mode == 2 else "s")] if static.init_mode else [])
    args += ["m"] if static.has_mask else []
    results = ["x", "s"]
    if static.save:
        results += ["c", "d"] + (["g"] if static.n_seg > 1 else [])
        results += ["p", "p", "p", "p", "d", "e", "q"]
    return args, results


def _bwd_roles(static):
    args = ["x"] * 6 + (["m"] if static.has_mask else []) + ["c", "d"]
    args += (["g"] if static.n_seg > 1 else []) + ["p", "p", "p", "p", "d", "e", "q", "x", "s"]
    results = ["x"] * 6 + (["s"] if static.init_mode else [])
    return args, results


def _spec(role, b_ax, h_ax, head_first):
    if role == "x":
        return P(b_ax, h_ax, None, None) if head_first else P(b_ax, None, h_ax, None)
    if role == "m":
        return P(b_ax, None)
    if role == "s":
        return P(b_ax, h_ax, None, None)
    if role == "s1":
        return P(None, h_ax, None, None)
    if role in ("d", "e"):
        return P(b_ax, h_ax, None, None)
    if role == "q":
        return P(b_ax, h_ax, None, None, None, None)
    return P(b_ax, h_ax, None, None, None)


def _batch_head_axes(sharding, head_first):
    """Mesh axes of r's batch and head dimensions (None: not sharded)."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            "rwkv-ops: the Triton kernels partition over batch and heads from a NamedSharding; "
            f"got {type(sharding).__name__}. Shard the inputs with jax.sharding.NamedSharding "
            "(a Mesh).")
    spec = tuple(sharding.spec) + (None,) * (4 - len(sharding.spec))
    return spec[0], spec[1] if head_first else spec[2]


def _shardings(roles_fn, static, mesh, arg_shapes):
    b_ax, h_ax = _batch_head_axes(arg_shapes[0].sharding, static.head_first)
    arg_roles, result_roles = roles_fn(static)

    def named(roles):
        return tuple(NamedSharding(mesh, _spec(r, b_ax, h_ax, static.head_first)) for r in roles)

    return named(arg_roles), named(result_roles)


def _def_partition(cp, roles_fn, local_fn):
    def partition(static, mesh, arg_shapes, result_shape):
        if interpret_mode() and not _COMPILE_ONLY_UNDER_INTERPRETER:
            # the interpreter runs through host callbacks, which XLA cannot call from a partitioned
            # custom call (the process would crash when the program runs)
            raise ValueError("rwkv-ops: sharded execution over several devices needs the GPU path; "
                             "under TRITON_INTERPRET=1 run on one device.")
        # r's batch and head axes for every operand and result: the partitioner reshards whatever
        # differs, and gathers any sharding of T or K (the kernels need whole sequences and heads)
        arg_shardings, result_shardings = _shardings(roles_fn, static, mesh, arg_shapes)
        return mesh, partial(local_fn, static), result_shardings, arg_shardings

    def infer_sharding_from_operands(static, mesh, arg_shapes, result_shape):
        return _shardings(roles_fn, static, mesh, arg_shapes)[1]

    def sharding_rule(static, mesh, operand_types, result_types):
        arg_roles, result_roles = roles_fn(static)

        def factors(role):
            return _FACTORS["x_hf" if role == "x" and static.head_first else role]

        rule = (", ".join(factors(r) for r in arg_roles) + " -> "
                + ", ".join(factors(r) for r in result_roles))
        # Shardy wants the special factors in the order the rule first names them
        order = dict.fromkeys(rule.replace(",", " ").replace("->", " ").split())
        return rule, {"need_replication_factors": tuple(f for f in order
                                                        if f in _REPLICATED_FACTORS)}

    cp.def_partition(partition=partition, infer_sharding_from_operands=infer_sharding_from_operands,
                     sharding_rule=sharding_rule)
    return cp


_fwd_cp = _def_partition(custom_partitioning(_forward_local, static_argnums=(0,)), _fwd_roles,
                         _forward_local)
_bwd_cp = _def_partition(custom_partitioning(_backward_local, static_argnums=(0,)), _bwd_roles,
                         _backward_local)


# ---------------------------------------------------------------------------------------------
# differentiation


def _operands(r, w, k, v, a, b, s0, mask, cu):
    return ((r, w, k, v, a, b) + ((s0,) if s0 is not None else ())
            + ((mask,) if mask is not None else ()) + ((cu,) if cu is not None else ()))


def _fwd_call(static):
    # packed sequences are one [1, total_T, H, K] block: nothing to partition over (see
    # generalized_delta_rule_packed), so the varlen path calls the kernels directly
    return partial(_forward_local, static) if static.max_len else partial(_fwd_cp, static)


def _bwd_call(static):
    return partial(_backward_local, static) if static.max_len else partial(_bwd_cp, static)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdr(static, r, w, k, v, a, b, s0, mask, cu):
    return _fwd_call(static._replace(save=False))(*_operands(r, w, k, v, a, b, s0, mask, cu))


def _gdr_fwd(static, r, w, k, v, a, b, s0, mask, cu):
    outs = _fwd_call(static._replace(save=True))(*_operands(r, w, k, v, a, b, s0, mask, cu))
    y, final = outs[:2]
    return (y, final), (r, w, k, v, a, b, s0, mask, cu, outs[2:])


def _gdr_bwd(static, residuals, cotangents):
    r, w, k, v, a, b, s0, mask, cu, kept = residuals
    dy, dfinal = cotangents
    arrays = ((r, w, k, v, a, b) + ((mask,) if mask is not None else ())
              + ((cu,) if cu is not None else ()) + tuple(kept))
    arrays += (dy, dfinal.astype(jnp.float32))
    grads = _bwd_call(static)(*arrays)
    ds0 = None
    if s0 is not None:
        ds0 = grads[6]
        if static.init_mode == 2:
            ds0 = ds0.sum(axis=0, keepdims=True)
        ds0 = ds0.astype(s0.dtype)
    return (*grads[:6], ds0, None, None)


_gdr.defvjp(_gdr_fwd, _gdr_bwd)


# ---------------------------------------------------------------------------------------------
# public function


def _raise_if_unrunnable(K):
    reason, _ = unavailable_reason(K)
    if reason is not None:
        raise KernelUnavailableError(
            f"rwkv-ops: KERNEL_TYPE='{KERNEL_TYPE}' cannot run here with jax: {reason}.")


def _run(xs, initial_state, output_final_state, head_first, mask, B, T, H, K, cu=None):
    """Shared body of the dense and the packed entry points, for validated inputs: B sequences of
    T steps (packed: B = N, T = max_len, cu the int32 boundaries)."""
    r = xs[0]
    out_dtype = r.dtype
    wide = any(jnp.dtype(x.dtype) == jnp.float64 for x in xs) or (
        initial_state is not None and jnp.dtype(initial_state.dtype) == jnp.float64)
    state_dtype = jnp.float64 if wide else jnp.float32
    if T == 0:
        o = jnp.zeros(r.shape, out_dtype)
        if initial_state is None:
            final = jnp.zeros((B, H, K, K), state_dtype)
        else:
            final = jnp.broadcast_to(initial_state.astype(state_dtype), (B, H, K, K))
        return o, (final if output_final_state else None)
    if wide:
        # the kernels compute in float32 at most: float64 inputs run in true fp32 ("ieee")
        xs = tuple(x.astype(jnp.float32) for x in xs)
        if initial_state is not None:
            initial_state = initial_state.astype(jnp.float32)
    if mask is not None:
        mask = (mask != 0).astype(jnp.uint8)
    cfg = select_config(K, xs[0].dtype, T, B * H)
    n_chunks = -(-T // CHUNK)
    init_mode = 0
    if initial_state is not None:
        init_mode = 2 if initial_state.shape[0] == 1 else 1
    static = _Static(head_first=head_first, cps=cfg.chunks_per_segment,
                     n_seg=-(-n_chunks // cfg.chunks_per_segment), has_mask=mask is not None,
                     init_mode=init_mode, max_len=T if cu is not None else 0)
    o, final = _gdr(static, *xs, initial_state, mask, cu)
    if o.dtype != out_dtype:
        o = o.astype(out_dtype)
    if not output_final_state:
        return o, None
    return o, final.astype(state_dtype)


def generalized_delta_rule(r, w, k, v, a, b, initial_state=None, output_final_state=True,
                           head_first=False, *, mask=None):
    r, w, k, v, a, b, initial_state, mask = as_arrays(r, w, k, v, a, b, initial_state, mask)
    p = validate(r, w, k, v, a, b, initial_state, mask, head_first)
    _raise_if_unrunnable(p.K)
    return _run((r, w, k, v, a, b), initial_state, output_final_state, head_first, mask,
                p.B, p.T, p.H, p.K)


def generalized_delta_rule_packed(r, w, k, v, a, b, cu_seqlens, initial_state=None,
                                  output_final_state=True):
    """The kernels on N sequences packed along T, read and written in place (no padded copies).

    For inputs validated by ``rwkv_ops.jax.varlen.generalized_delta_rule_varlen``: r, w, k, v, a, b
    [1, total_T, H, K]; cu_seqlens the concrete boundaries (NumPy, [N + 1]): the longest length is
    the launch's static T, and an int32 copy is the kernels' ``cu`` operand; initial_state
    [N, H, K, K] or None. Returns (o [1, total_T, H, K], final state [N, H, K, K] or None);
    differentiable (custom_vjp) and jit-compatible like :func:`generalized_delta_rule`.

    Not partitioned: the packed layout has a batch of 1 and sequences of unequal lengths, so there
    is no batch axis to split; the kernels are called without ``custom_partitioning``, and a
    sharded input is gathered to run whole (shard N sequences as separate calls, or use the dense
    op on a padded batch, to spread them over devices).
    """
    cu_host = np.asarray(cu_seqlens).reshape(-1)
    lengths = np.diff(cu_host)
    max_len = int(lengths.max()) if lengths.size else 0
    _, _, H, K = r.shape
    _raise_if_unrunnable(int(K))
    cu = jnp.asarray(cu_host.astype(np.int32))
    return _run((r, w, k, v, a, b), initial_state, output_final_state, False, None,
                int(cu_host.size) - 1, max_len, int(H), int(K), cu)


generalized_delta_rule.__doc__ = docs.GENERALIZED_DELTA_RULE.format(
    framework="JAX, the shared Triton kernels through jax-triton; a CUDA GPU (CPU only under "
              "TRITON_INTERPRET=1); jit / grad / checkpoint, batch- and head-sharded inputs",
    tensor="jax arrays",
    example="""    >>> import jax, jax.numpy as jnp
    >>> from rwkv_ops.jax.triton_launcher import generalized_delta_rule
    >>> x = jax.random.normal(jax.random.key(0), (6, 2, 32, 4, 64), jnp.bfloat16)
    >>> r, w, k, v, a, b = x
    >>> o, state = jax.jit(generalized_delta_rule)(r, -jax.nn.softplus(w) - 0.5, k, v, a, b)
    >>> o.shape, state.shape
    ((2, 32, 4, 64), (2, 4, 64, 64))""",
)

rwkv7_op = generalized_delta_rule
