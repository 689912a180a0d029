"""Launch configuration of the chunk kernels: one plain function of (K, dtype, T, B*H) and the
GPU's SM count (which sets the L2 prefetch distances, and whether a GPU launch, with its
register cap, or Triton's interpreter runs the kernels).

Both launchers (PyTorch and JAX) call :func:`chunk_config`, so they run the same kernels with the
same tiles and the same segment split, and give bitwise-equal results. No ``triton.autotune``:
the choice is made from shapes alone (CUDA-graph and jit friendly, no benchmarking at first call).
"""

from dataclasses import dataclass, replace
from typing import Optional

CHUNK = 16
# The serial passes (forward, state gradient) want at least this many programs in flight; with
# fewer (batch, head) pairs than that, the sequence is cut into segments (ALGORITHM.md s.7).
SERIAL_PROGRAMS = 512
# A segment holds at least this many chunks: shorter ones spend more on the extra passes than they
# win in parallelism.
MIN_CHUNKS_PER_SEGMENT = 32
# The gradient kernel prefetches into L2 the inputs of the program this many programs per SM
# ahead (times the GPU's SMs), where it pays: K = 32, and fp32 inputs up to K = 64 (not under
# the register cap at K = 64, see BWD_MAXNREG). Measured on the earlier one-pass kernel: 2
# programs of 4 warps were resident per SM at K <= 64 (255 registers), so 1 per SM is half a
# resident set: the lines arrive well before their program
# starts and stay in L2 until it does (H200, 132 SMs, shape S: gradient kernel 5.84-5.86 ms
# anywhere from 33 to 198 programs ahead, 5.94 at 264 (a whole resident set), 6.81 at 330, 7.01
# at 396, 6.60 without; at K = 128, 264 ahead was slower, 14.19 against 13.58, so none there).
BWD_PROGRAMS_PER_SM = 1
# Chunks ahead whose tiles the forward scan with checkpoints prefetches into L2 (H200, shape S:
# 1.237 against 1.264 ms; under no_grad it was slower, so it is not done there). The
# state-gradient scan's would take 167 registers instead of 128 on sm_90: 3 programs per SM
# instead of 4, and 512 no longer in one wave.
FWD_PREFETCH_CHUNKS = 4
# The gradient kernel's register cap with tf32 products up to K = 64 (Triton's ``maxnreg``): 3
# programs of 4 warps per SM. At K = 64 it binds (152 B of spill stack against 226 registers
# uncapped, 2 programs per SM), and the L2 prefetch then no longer pays (H200, shape S: 5.42 ms
# without it, 5.90 at 132 programs ahead, 5.93-6.12 at 198-396; uncapped 5.82 with it; capped
# at 128 registers, 4 per SM, 456 B of spill: 6.34). K = 32 fits in 168 registers anyway and
# keeps the prefetch (B=8 T=4096 H=128 K=32: 7.18 ms with it, 8.38 without). With pass 1 from
# the kept tiles (104 B of spill under the cap, 214 registers uncapped) the cap still wins: shape
# S 4.89 ms, uncapped 6.34 (5.76 with the prefetch), capped at 200 6.30, at 128 (4 per SM, 400 B
# of spill) 5.26, 8 warps capped at 128 (2 per SM, no spill) 7.92.
BWD_MAXNREG = 168


@dataclass(frozen=True)
class ChunkConfig:
    """Tiles and launch options of one call.

    precision: ``input_precision`` of the tensor-core products ("tf32" for bf16/fp16 inputs, "ieee"
    for fp32: true fp32). bv_fwd / bv_state: value rows per program of the forward scan and of
    the state-gradient scan; kb_bwd: key channels per block of the chunk-parallel gradient
    kernel's two passes. chunks_per_segment: chunks per segment of the serial passes (all of
    them: no segments).
    prep_chunks: chunks per program of the prep kernel (one per warp with warps_prep of them).
    precision_inverse: products of the (I - A_ab)^-1 series for bf16/fp16 inputs (fp32: ieee).
    prefetch_bwd: programs ahead whose inputs each gradient-kernel program prefetches into L2;
    prefetch_fwd: chunks ahead whose tiles the forward scan with checkpoints prefetches (0: none).
    maxnreg_bwd: the gradient kernel's register cap (Triton's ``maxnreg``; None: none).
    l1_prefetch_bwd: each gradient-kernel program prefetches its own seven input tiles into L1
    at its start. l1_prefetch_state: the state-gradient scan prefetches the next chunk's decays
    into L1 (not timed yet: off). prefetch_fwd_l1: the forward scan's prefetch
    (prefetch_fwd) goes into L1 as well (not timed yet: off).
    """

    precision: str
    bv_fwd: int
    bv_state: int
    kb_bwd: int
    chunks_per_segment: int
    prep_chunks: int = 1
    precision_inverse: str = "tf32"
    warps_prep: int = 1
    warps_fwd: int = 4
    warps_state: int = 4
    warps_bwd: int = 4
    stages_fwd: int = 2
    stages_state: int = 1
    stages_bwd: int = 1
    prefetch_bwd: int = 0
    prefetch_fwd: int = 0
    maxnreg_bwd: Optional[int] = None
    l1_prefetch_bwd: bool = False
    l1_prefetch_state: bool = False
    prefetch_fwd_l1: bool = False

    def with_(self, **changes) -> "ChunkConfig":
        return replace(self, **changes)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_config(K: int, dtype: str, T: int, BH: int,
                 sm_count: Optional[int] = None) -> ChunkConfig:
    """The configuration for head size K, input dtype name ("bfloat16", "float16", "float32"),
    sequence length T and B*H sequences on a GPU of sm_count multiprocessors. Only the L2
    prefetches and the gradient kernel's register cap depend on sm_count; None (Triton's
    interpreter, which cannot run the prefetches' inline PTX and allocates no registers) turns
    them off."""
    precision = "ieee" if dtype in ("float32", "float64") else "tf32"
    bv = min(K, 64)
    n_chunks = max(1, cdiv(T, CHUNK))
    programs = BH * (K // bv)
    n_seg = 1
    if programs < SERIAL_PROGRAMS and n_chunks >= 2 * MIN_CHUNKS_PER_SEGMENT:
        n_seg = min(cdiv(SERIAL_PROGRAMS, programs), n_chunks // MIN_CHUNKS_PER_SEGMENT)
    # register budgets (no spills on sm_90): one warp holds a whole [16, K] chunk tile in the prep
    # kernel up to K = 64.
    # The gradient kernel's key-channel blocks (chunk_bwd.chunk_bwd_kernel's two passes): all
    # channels in one block up to K = 64, two blocks of 64 at K = 128 (H200, B=8 T=4096 H=32
    # K=128: 11.0 ms against 12.8 for blocks of 32 and 13.6 for the one-pass kernel's loop over
    # 32 value rows; B=8 T=4096 H=128 K=32: 7.2 against 9.4 ms; shape S: 5.82 against 5.85, and
    # 8.1 / 15.0 ms for blocks of 32 / 16: each block recomputes the chunk's decays). fp32
    # inputs: blocks of 32 (shape S: 27.8 ms against 30.7 for the one-pass kernel, 45.0 for one
    # block of 64, 35.5 for 16), 16 at K = 128 (spills least: 1448 B against 1672 for 32).
    # forward scan with tf32 products: 64 value rows on 4 warps per program at K = 64 (its
    # operands fp16 scaled per row, chunk_common.row_operand; H200, shape S: no_grad scan 0.70
    # against 0.94 ms for 32 rows on 2 warps, 0.98 against 1.09 with checkpoints; L fwd 2.73
    # against 3.55 ms). With the earlier tf32 operands 32 rows on 2 warps were faster (H200, S:
    # 1.77 vs 1.86 ms with checkpoints; H100, B=8 T=4096 H=32 K=128: 2.57 vs 3.40 ms), which
    # K = 128 and K = 32 keep (not re-measured). State-gradient scan: 64 rows on 4 warps up to
    # K = 64, 32 rows on 2 warps at K = 128 (227 registers on 4 warps there; H100, same shape:
    # 2.82 vs 3.10 ms).
    small = K <= 64
    # True fp32 products ("ieee", fp32 inputs) run on the FMA units and hold more per thread than
    # tf32 ones: with the tf32 tiles, ptxas (sm_90) gives the fp32 forward scan and gradient
    # kernel 32 registers and 4-9 KB of spill per thread. Their own tiles below (H200, fp32
    # inputs, triton_dev.py --dtype float32 --sweep), fwd+bwd: shape S 49.5 ms against 290.8
    # with the tf32 tiles (gradient kernel 30.7 against 208.4 with 32 rows per step; forward
    # scan with checkpoints 9.6 against 68.0 with one stage); B=8 T=4096 H=32 K=128 104.1
    # against 263.9 (the scan 28.6 against 176.5 with 16 rows and one stage, the gradient
    # kernel 58.1 against 69.3 with 16 rows); K = 32 36.8 against 37.6 with one stage.
    ieee = precision == "ieee"
    if ieee:
        kb_bwd = 32 if small else 16
    else:
        kb_bwd = 64
    if ieee:
        bv_fwd = min(K, 32) if small else 16
    else:
        bv_fwd = 64 if K == 64 else min(K, 32)
    return ChunkConfig(
        precision=precision,
        bv_fwd=bv_fwd,
        warps_fwd=4 if bv_fwd == 64 else 2,
        # three stages of the forward scan's tile prefetch up to K = 64 (H100, shape S: scan 1.83
        # vs 2.00 ms, L fwd 4.28 vs 4.62 ms)
        stages_fwd=1 if ieee else 3 if small else 2,
        bv_state=bv if small else 32,
        warps_state=4 if small else 2,
        # the state-gradient scan's tiles (b_bar, R2, W, dy) and scales loaded two chunks ahead
        # through shared memory (H200, shape S: 0.99 ms against 1.21 with plain loads, 1.01 with
        # one chunk ahead)
        stages_state=3 if small else 1,
        kb_bwd=min(K, kb_bwd),
        chunks_per_segment=cdiv(n_chunks, n_seg),
        warps_prep=1 if K <= 64 else 4,
        warps_bwd=4,
        # the L2 prefetches: measured at K = 64 (they pay, except the gradient kernel's under
        # its register cap) and at 128 (the gradient kernel's costs); K = 32 has K = 64's
        prefetch_bwd=(BWD_PROGRAMS_PER_SM * sm_count
                      if small and (ieee or K < 64) and sm_count else 0),
        prefetch_fwd=FWD_PREFETCH_CHUNKS if small and sm_count else 0,
        maxnreg_bwd=BWD_MAXNREG if small and not ieee and sm_count else None,
        # where the gradient kernel has no L2 prefetch (tf32, K >= 64): H200, fp32 state, its own
        # seven tiles into L1 first, B=8 T=4096 H=32 K=64: 2.328 against 2.440 ms (shape S 4.666
        # against 4.910); K = 128 7.118 against 7.156; K = 32 (with the L2 prefetch) 7.62 against
        # 7.27, slower. Adding the kept tiles (7.17 / 2.372) or also the checkpoints and pair
        # matrices (2.395) was slower than the seven inputs alone.
        l1_prefetch_bwd=bool(K >= 64 and not ieee and sm_count),
    )


def whole_chunks(T: int, G: int, has_mask: bool, varlen: bool) -> bool:
    """FULL of the prep kernel (G chunks per program) and of the gradient kernel (G = 1): every
    chunk has 16 steps, all valid, and every program's G chunks exist (T a multiple of 16 G, no
    mask, no packed sequences). Their loads, stores and step selects then go unmasked (sm_90 SASS
    at K = 64: prep 3912 against 4184 instructions, gradient kernel 4920 against 5088)."""
    return not has_mask and not varlen and T % (CHUNK * G) == 0


# inverse tile scales per chunk in the prep kernel's scale buffer [B*H, NC, TILE_SCALES]
TILE_SCALES = 4
# pair matrices per chunk that a forward for training keeps for the gradient kernel
# ([B*H, NC, PAIR_MATRICES, 16, 16] fp32; chunk_common.store_pair_matrices)
PAIR_MATRICES = 4


def tile_dtype(precision: str) -> str:
    """dtype name of the prep kernel's W, b_bar, Kc and R2 buffers and of the state checkpoints
    (forward and gradient) for a product precision: float16 with tf32 products (a tf32-rounded
    value scaled by a power of two per chunk or row converts to it exactly, see
    ``chunk_common.store_scaled``: half the bytes of float32), float32 with true fp32 products
    ("ieee")."""
    return "float16" if precision == "tf32" else "float32"
