"""Pieces every chunk kernel shares: the sequence a program works on, tile loads, step validity,
the chunk's decay factors, the unit-lower-triangular inverse.

The algebra is that of ``rwkv_ops.numpy.native`` (chunks of CHUNK = 16 steps, every pairwise
decay factorised around the chunk's middle step, lambda clamped at -LAMBDA_FLOOR), written for
one (batch, head, chunk) tile. Framework-free: only ``triton`` and ``triton.language``.
"""

import triton
import triton.language as tl

from .configs import PAIR_MATRICES, TILE_SCALES

CHUNK = 16
# |lambda| bound (float32): CHUNK / 2 * LAMBDA_FLOOR = 80 < log(FLT_MAX) = 88.7, so every
# mid-anchored factor exp(+-(Lam_i - Lam_mid)) is finite. Same constant as the native paths.
LAMBDA_FLOOR = 10.0

L_ = tl.constexpr(CHUNK)
MID_ = tl.constexpr(CHUNK // 2 - 1)
FLOOR_ = tl.constexpr(LAMBDA_FLOOR)
LOG2E_ = tl.constexpr(1.4426950408889634)
# the prep kernel's cumulative decays are in log2 units (``chunk_log2_decays``): lambda log2(e)
# >= -FLOOR2_, and -exp(w) log2(e) = -2^(w log2(e) + log2(log2(e)))
FLOOR2_ = tl.constexpr(LAMBDA_FLOOR * 1.4426950408889634)
LOG2_LOG2E_ = tl.constexpr(0.5287663729448977)


@triton.jit
def exp_(x):
    """exp(x) as one MUFU.EX2 (ex2.approx.ftz): ``tl.exp`` lowers to the non-flushing ex2.approx,
    which wraps every exponential in a range test and two predicated multiplies. The kernels'
    factors lie in [e^-80, e^80] (normal numbers). A result below 2^-126 flushes to 0; that
    happens only for exp(w) of a very negative w (a lambda of -0 instead of about -1e-38) and
    for the gradient kernel's term exp(lambda + floor) at lambda < -97 (0 instead of < 1e-38)."""
    return tl.math.exp2(x * LOG2E_)


@triton.jit
def exp2_(x):
    """2^x as one MUFU.EX2: the prep kernel's factors, whose cumulative decays are in log2 units
    (``chunk_log2_decays``), so no multiply by log2(e) precedes it as in ``exp_``."""
    return tl.math.exp2(x)


@triton.jit
def prefetch(ptrs, TO_L1: tl.constexpr = False):
    """Ask for the 128-byte lines at ptrs (a tensor of global pointers) to be brought into L2
    (``prefetch.global.L2``), or with TO_L1 into this SM's L1 as well (``prefetch.global.L1``: for
    lines that this program itself reads later): one instruction per element, a hint that nothing
    waits for. Inline PTX, so GPU only: Triton's interpreter cannot run it
    (``configs.chunk_config`` turns prefetching off there)."""
    LEVEL: tl.constexpr = "L1" if TO_L1 else "L2"
    tl.inline_asm_elementwise("prefetch.global." + LEVEL + " [$1];\n\tmov.u32 $0, 0;", "=r,l",
                              [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_span(ptr, n: tl.constexpr, TO_L1: tl.constexpr = False):
    """``prefetch`` of n contiguous elements at ptr (a 128-byte aligned start; n elements a power
    of two number of 128-byte lines)."""
    LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth
    prefetch(ptr + tl.arange(0, n // LINE) * LINE, TO_L1)


@triton.jit
def prefetch_rows(ptr, row_off, K: tl.constexpr, TO_L1: tl.constexpr = False):
    """``prefetch`` of the rows of K elements at ptr + row_off (row_off: [R] element offsets, each
    row 128-byte aligned)."""
    LINE: tl.constexpr = 1024 // ptr.dtype.element_ty.primitive_bitwidth
    NL: tl.constexpr = (K + LINE - 1) // LINE
    prefetch(ptr + row_off[:, None] + (tl.arange(0, NL) * LINE)[None, :], TO_L1)


@triton.jit
def prefetch_tile(ptr, bh, NC, c, N: tl.constexpr, TO_L1: tl.constexpr = False):
    """``prefetch_span`` of chunk c's [CHUNK, N] tile of sequence bh in a contiguous [B*H, NC,
    CHUNK, N] buffer of the prep kernel (fp16: 32 N bytes)."""
    prefetch_span(ptr + (bh.to(tl.int64) * NC + c) * L_ * N, L_ * N, TO_L1)


@triton.jit
def sequence_span(cu_ptr, b, T, stride_b, stride_t, VARLEN: tl.constexpr):
    """(64-bit element offset of sequence b's first step, its length) for the chunk kernels.

    Dense (VARLEN=False): b is the batch index, the offset b * stride_b, the length the launch's T
    (cu_ptr is not read). Packed (VARLEN=True): b is the sequence index n of N sequences packed
    along T as [1, total_T, H, K]; cu (int32 [N + 1]) holds the boundaries, so the sequence starts
    at cu[n] * stride_t and has cu[n + 1] - cu[n] steps (stride_b unused). The launch's T is then
    the longest length: steps from the sequence's own length on are identity steps in every kernel.
    """
    if VARLEN:
        bos = tl.load(cu_ptr + b)
        T_n = tl.load(cu_ptr + b + 1) - bos
        off = bos.to(tl.int64) * stride_t
    else:
        off = b.to(tl.int64) * stride_b
        T_n = T
    return off, T_n


@triton.jit
def scan_program(cu_ptr, T, H, BH, stride_b, stride_t, stride_h, NB: tl.constexpr,
                 NV: tl.constexpr, K: tl.constexpr, BV: tl.constexpr, VARLEN: tl.constexpr):
    """The share of a serial scan (forward or state-gradient) that this program owns.

    Grid order: NB blocks, then B*H sequences, then segments (program id = (seg * BH + bh) * NB
    + blk); block blk holds value rows (blk % NV) * BV .. + BV - 1 (NB = 2 NV when the blocks
    past NV compute a segment transition). Returns blk, bh, seg, b, h, the rows vrow ([BV]),
    state_tile ([BV, K] offsets of those rows in a row-major [K, K] state), the sequence's length
    T_n and vt_off ([BV, CHUNK] 64-bit offsets of the transposed step-0 tile of a [B, T, H, K]
    tensor: v, y, dy).
    """
    pid = tl.program_id(0)
    blk = pid % NB
    bh = (pid // NB) % BH
    seg = pid // (NB * BH)
    b = bh // H
    h = bh % H
    rows = tl.arange(0, L_)
    cols = tl.arange(0, K)
    vrow = (blk % NV) * BV + tl.arange(0, BV)
    state_tile = vrow[:, None] * K + cols[None, :]
    seq, T_n = sequence_span(cu_ptr, b, T, stride_b, stride_t, VARLEN)
    base = seq + h.to(tl.int64) * stride_h
    vt_off = base + vrow[:, None] + rows[None, :] * stride_t
    return blk, bh, seg, b, h, vrow, state_tile, T_n, vt_off


@triton.jit
def segment_start_state(init_ptr, b, h, seg, init_sb, init_sh, init_ss, state_tile,
                        HAS_INIT: tl.constexpr, BV: tl.constexpr, K: tl.constexpr):
    """[BV, K] fp32 rows of the state a scan's segment starts from: read at init_ptr + b * init_sb
    + h * init_sh + seg * init_ss (any float dtype) with HAS_INIT, zero without."""
    if HAS_INIT:
        ip = (init_ptr + b.to(tl.int64) * init_sb + h.to(tl.int64) * init_sh
              + seg.to(tl.int64) * init_ss)
        X = tl.load(ip + state_tile).to(tl.float32)
    else:
        X = tl.zeros([BV, K], dtype=tl.float32)
    return X


@triton.jit
def load_f32(ptr, mask, FULL: tl.constexpr):
    """fp32 values at ptr, 0 where mask is False. FULL (``configs.whole_chunks``: whole chunks,
    no mask, no packed sequences): every element exists and mask is not read, so the load has no
    predicates and no selects."""
    if FULL:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def load_operand(ptr, mask, PREC: tl.constexpr, FULL: tl.constexpr):
    """``load_f32`` of a product operand, tf32-rounded (``tf32``) when ptr holds fp32. A bf16 or
    fp16 value is a tf32 value already (at most 11 significant bits), so its rounding is skipped:
    it changed no bit and cost two instructions per element."""
    x = load_f32(ptr, mask, FULL)
    if ptr.dtype.element_ty == tl.float32:
        x = tf32(x, PREC)
    return x


@triton.jit
def store_cast(ptr, x, mask, FULL: tl.constexpr):
    """Store x in ptr's dtype where mask is True (FULL: everywhere; mask is not read)."""
    if FULL:
        tl.store(ptr, x.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


# inverse scales stored per chunk by the prep kernel (``store_scaled``), in this order
SCALE_W_ = tl.constexpr(0)
SCALE_B_ = tl.constexpr(1)
SCALE_KC_ = tl.constexpr(2)
SCALE_R2_ = tl.constexpr(3)
SCALES_ = tl.constexpr(TILE_SCALES)


@triton.jit
def _pow2_scales(biggest):
    """(up, inv) for the magnitudes ``biggest``: the powers of two that put biggest * up in
    [2^14, 2^15), and inv = 1 / up. The exponent is taken at least 15 (so that both are normal
    numbers); an inf or NaN magnitude (exponent 255) keeps its values inf or NaN."""
    e = tl.maximum((biggest.to(tl.uint32, bitcast=True) >> 23) & 0xFF, 15)
    up = ((268 - e) << 23).to(tl.float32, bitcast=True)     # 2^(141 - e)
    inv = ((e - 14) << 23).to(tl.float32, bitcast=True)     # 2^(e - 141)
    return up, inv


@triton.jit
def row_operand(x, PREC: tl.constexpr):
    """(x_op, inv): x ([R, N] fp32) as a product operand, and the inverse scale of each of its rows
    ([R] fp32), so that a product x_op @ B equals (x @ B) * inv[:, None].

    tf32 mode: fp16, each row multiplied by the power of two that puts its largest magnitude in
    [2^14, 2^15) (``_pow2_scales``). The conversion rounds to 10 mantissa bits as the tf32
    rounding does (ties to even), so the products are those of tf32 operands; an fp16 product
    runs at twice the rate, packs two values per register, and takes a product's result as the
    next one's operand without a trip through shared memory. Entries more than 2^28 below their
    row's largest keep fewer bits (``store_scaled``). ieee mode: x itself, inverse scale 1.
    """
    if PREC == "tf32":
        up, inv = _pow2_scales(tl.max(tl.abs(x), axis=1))
        xo = (x * up[:, None]).to(tl.float16)
    else:
        xo = x
        inv = tl.full([x.shape[0]], 1.0, tl.float32)
    return xo, inv


@triton.jit
def joint_row_operands(x, y, fy, PREC: tl.constexpr):
    """(x_op, y_op, inv): ``row_operand`` of x and of y * fy ([R, N] fp32 each; fy an fp32 scalar)
    with one scale per row for both, so that x_op @ Bx + y_op @ By, accumulated in one product,
    equals (x @ Bx + y @ By * fy) * inv[:, None]."""
    ys = y * fy
    if PREC == "tf32":
        biggest = tl.maximum(tl.max(tl.abs(x), axis=1), tl.max(tl.abs(ys), axis=1))
        up, inv = _pow2_scales(biggest)
        xo = (x * up[:, None]).to(tl.float16)
        yo = (ys * up[:, None]).to(tl.float16)
    else:
        xo = x
        yo = ys
        inv = tl.full([x.shape[0]], 1.0, tl.float32)
    return xo, yo, inv


@triton.jit
def store_scaled(ptr, x, scale_ptr, mask, chunk_ok, FULL: tl.constexpr):
    """Store a prep tile x ([G, CHUNK, N] fp32, tf32-rounded in tf32 mode) of G chunks in ptr's
    dtype, and each chunk's inverse scale at scale_ptr ([G] pointers; chunk_ok [G] masks them).

    fp16 buffer (the tf32 mode's): every chunk's x is multiplied by the power of two that puts
    its largest magnitude in [2^14, 2^15). A tf32-rounded value keeps 10 mantissa bits, as fp16
    does, so it converts exactly: half the bytes of fp32, the same products. Only entries more
    than 2^28 below the chunk's largest become fp16 subnormals and keep fewer bits (below 2^-38
    of it, 0). The inverse scale restores x: the scans multiply a product by it (exact, a power
    of two). fp32 buffer (true fp32 mode): x as is, inverse scale 1.
    """
    if ptr.dtype.element_ty == tl.float16:
        up, inv = _pow2_scales(tl.max(tl.max(tl.abs(x), axis=2), axis=1))
        store_cast(ptr, x * up[:, None, None], mask, FULL)
    else:
        inv = tl.full(chunk_ok.shape, 1.0, tl.float32)
        store_cast(ptr, x, mask, FULL)
    store_cast(scale_ptr, inv, chunk_ok, FULL)


@triton.jit
def store_rounded(ptr, x, scale_ptr, mask, chunk_ok, PREC: tl.constexpr, FULL: tl.constexpr):
    """``store_scaled`` of a tile that is only stored, not used here as a product operand: in
    tf32 mode rounded to tf32 by the store itself. The fp16 conversion rounds the scaled x to 10
    mantissa bits, to nearest with ties to even, as ``tf32_even`` does for an fp32 buffer (so the
    two storages hold the same values), which saves the rounding's two instructions per element
    of ``tf32`` (whose ties go away from zero)."""
    if ptr.dtype.element_ty == tl.float32:
        x = tf32_even(x, PREC)
    store_scaled(ptr, x, scale_ptr, mask, chunk_ok, FULL)


# the pair matrices of a chunk kept for the gradient kernel (``store_pair_matrices``), in this
# order: A_qk, A_qb (masked to i >= j), A_ak (i > j) and N = (I - A_ab)^-1, tf32-rounded
PAIRS_ = tl.constexpr(PAIR_MATRICES)


@triton.jit
def store_pair_matrices(ptrs, A_qk, A_qb, A_ak, N, mask, FULL: tl.constexpr):
    """Store a chunk's pair matrices (each [CHUNK, CHUNK] fp32, or [G, CHUNK, CHUNK]) at ptrs, the
    first one's element pointers in a [.., PAIRS, CHUNK, CHUNK] buffer (mask as ptrs)."""
    store_cast(ptrs, A_qk, mask, FULL)
    store_cast(ptrs + L_ * L_, A_qb, mask, FULL)
    store_cast(ptrs + 2 * L_ * L_, A_ak, mask, FULL)
    store_cast(ptrs + 3 * L_ * L_, N, mask, FULL)


@triton.jit
def load_pair_matrices(ptrs):
    """(A_qk, A_qb, A_ak, N) of one chunk, as ``store_pair_matrices`` stored them at ptrs
    ([CHUNK, CHUNK] pointers to the first)."""
    return (tl.load(ptrs), tl.load(ptrs + L_ * L_), tl.load(ptrs + 2 * L_ * L_),
            tl.load(ptrs + 3 * L_ * L_))


@triton.jit
def store_operand_rows(ptr, scale_ptr, bh, NC, c, X_o, inv, state_tile, vrow, K: tl.constexpr):
    """Store a state's rows as ``row_operand`` made them (X_o [BV, K] and their inverse scales inv
    [BV]) as chunk c's checkpoint of sequence bh: X_o in ptr's dtype at ptr ([B*H, NC, K, K];
    state_tile: the rows' offsets in a [K, K] matrix), inv at scale_ptr ([B*H, NC, K] fp32). The
    gradient kernel's products take the checkpoint as stored and multiply by inv, so they see the
    values the scan's products saw (an fp32 buffer holds them as well, scaled)."""
    chunk = bh.to(tl.int64) * NC + c
    tl.store(ptr + chunk * K * K + state_tile, X_o.to(ptr.dtype.element_ty))
    tl.store(scale_ptr + chunk * K + vrow, inv)


@triton.jit
def load_scales(scale_ptr, live):
    """A chunk's four inverse tile scales at scale_ptr ([SCALES] fp32), for ``tile_scales``. All 1
    where live is False (a [SCALES] bool, all entries equal: a tensor, so that the forward scan's
    masked look-ahead load runs in the interpreter too)."""
    return tl.load(scale_ptr + tl.arange(0, SCALES_), mask=live, other=1.0)


@triton.jit
def tile_scale(sc, index: tl.constexpr):
    """One of a chunk's inverse tile scales (``load_scales``; index SCALE_W_, SCALE_B_, ...)."""
    return tl.sum(tl.where(tl.arange(0, SCALES_) == index, sc, 0.0), axis=0)


@triton.jit
def tile_scales(sc):
    """The inverse scales a scan applies for one chunk, from its four (``load_scales``): (W's
    times b_bar's, Kc's, R2's). The reduction waits for their load (where the forward scan does
    it, see chunk_scan_fwd_kernel)."""
    return (tile_scale(sc, SCALE_W_) * tile_scale(sc, SCALE_B_), tile_scale(sc, SCALE_KC_),
            tile_scale(sc, SCALE_R2_))


@triton.jit
def load_tile(ptr, t, T, cols, stride_t, FULL: tl.constexpr):
    """[CHUNK, N] fp32 tile of rows t (rows at or past T read as 0; FULL: all rows exist)."""
    # 64-bit row offsets: T * H * K may pass 2^31
    return load_f32(ptr + t.to(tl.int64)[:, None] * stride_t + cols[None, :], (t < T)[:, None],
                    FULL)


@triton.jit
def zero_invalid(x, valid, FULL: tl.constexpr):
    """x with the entries where valid is False set to 0 (FULL: every step is valid; x as is)."""
    if not FULL:
        x = tl.where(valid, x, 0.0)
    return x


@triton.jit
def step_validity(mask_ptr, t, T, HAS_MASK: tl.constexpr):
    """[CHUNK] bool: the step exists (t < T) and is not padding."""
    valid = t < T
    if HAS_MASK:
        m = tl.load(mask_ptr + t, mask=valid, other=0)
        valid = valid & (m != 0)
    return valid


@triton.jit
def step_sums(tri, x, PREC: tl.constexpr):
    """tri @ x: sums over the CHUNK steps (rows) of x ([CHUNK, N] fp32, or [G, CHUNK, N] with tri
    [G, CHUNK, CHUNK]) picked by the 0/1 matrix tri, as tensor-core products. In tf32 mode x is
    split into its tf32 rounding and the remainder (exact in fp32), so each term loses at most the
    remainder's truncation, 2^-21 of x: about fp32 accuracy. A cumsum over the steps (tl.cumsum:
    shuffles and shared memory across the warps) took several hundred instructions per warp."""
    if PREC == "tf32":
        hi = tf32(x, PREC)
        acc = tl.dot(tri, hi, input_precision=PREC)
        acc = tl.dot(tri, x - hi, acc, input_precision=PREC)
    else:
        acc = tl.dot(tri, x, input_precision=PREC)
    return acc


@triton.jit
def chunk_log_decays(w, valid, PREC: tl.constexpr, FULL: tl.constexpr):
    """Cumulative log decays of one chunk from w [CHUNK, K].

    Returns lam_in (Lam_i, inclusive), lam_ex (Lam_{i-1}), lam_mid (Lam at the anchor row, [K]),
    lam_end (Lam at the chunk's last row, [K]). Invalid steps are identity steps (lambda = 0);
    FULL: every step is valid (valid is not read).
    """
    lam = zero_invalid(tl.maximum(-exp_(w), -FLOOR_), valid[:, None], FULL)
    rows = tl.arange(0, L_)
    lam_in = step_sums(tl.where(rows[:, None] >= rows[None, :], 1.0, 0.0), lam, PREC)
    lam_ex = lam_in - lam
    lam_mid = tl.sum(tl.where(rows[:, None] == MID_, lam_in, 0.0), axis=0)
    lam_end = tl.sum(tl.where(rows[:, None] == L_ - 1, lam_in, 0.0), axis=0)
    return lam_in, lam_ex, lam_mid, lam_end


@triton.jit
def chunk_log2_decays(w, valid, FULL: tl.constexpr):
    """chunk_log_decays for G chunks at once, in log2 units: w [G, CHUNK, K], valid [G, CHUNK];
    returns Lam * log2(e) (lam_in, lam_ex [G, CHUNK, K], lam_mid, lam_end [G, K]), so a factor
    exp(Lam_i - Lam_j) is one ``exp2_`` of their difference, with no multiply by log2(e)
    before it; the conversion is folded into the exponential that makes lambda. FULL: every
    step is valid (valid is not read).

    The prep kernel's form (H200, shape S: 1.294 against 1.348 ms training, 1.218 against 1.239
    under no_grad). The gradient kernel keeps natural units (``chunk_log_decays``): there the
    same change gave fewer instructions (3480 against 3552 per warp) but 6.78 against 6.69 ms.
    Its rebuilt factors may then differ from the prep's in the last bit of an exponential, a
    difference far below their tf32 rounding. The sums over the steps stay a tl.cumsum here: on
    the prep kernel's one warp per chunk it is shuffles within the warp, and ``step_sums`` took
    more instructions (sm_90, K = 64: 4280 against 4208 per warp, 40 B spilled)."""
    lam = tl.maximum(-exp2_(w * LOG2E_ + LOG2_LOG2E_), -FLOOR2_)
    lam = zero_invalid(lam, valid[:, :, None], FULL)
    lam_in = tl.cumsum(lam, axis=1)
    lam_ex = lam_in - lam
    rows = tl.arange(0, L_)[None, :, None]
    lam_mid = tl.sum(tl.where(rows == MID_, lam_in, 0.0), axis=1)
    lam_end = tl.sum(tl.where(rows == L_ - 1, lam_in, 0.0), axis=1)
    return lam_in, lam_ex, lam_mid, lam_end


@triton.jit
def tf32(x, PREC: tl.constexpr):
    """Round an fp32 tile to the nearest tf32 value when PREC is "tf32".

    The tensor cores read tf32 operands by dropping the low 13 mantissa bits (truncation, a biased
    error twice as large as rounding); rounding first makes those bits zero, so they drop exactly.
    """
    if PREC == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def tf32_even(x, PREC: tl.constexpr):
    """``tf32`` with ties to even, the rounding of an fp32 -> fp16 conversion."""
    if PREC == "tf32":
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return x


@triton.jit
def unit_lower_inverse(A, PREC: tl.constexpr):
    """(I - A)^-1 for a strictly lower triangular [CHUNK, CHUNK] A (fp32 tile, products in PREC);
    for G chunks at once, A may be [G, CHUNK, CHUNK] (the identity broadcasts, products batch).

    A^16 = 0, so the Neumann series ends and factors: (I+A)(I+A^2)(I+A^4)(I+A^8). Six small
    products that run in parallel instead of a 15-step dependent substitution.
    """
    rows = tl.arange(0, L_)
    eye = tl.where(rows[:, None] == rows[None, :], 1.0, 0.0)
    A = tf32(A, PREC)
    A2 = tf32(tl.dot(A, A, input_precision=PREC), PREC)
    A4 = tf32(tl.dot(A2, A2, input_precision=PREC), PREC)
    A8 = tf32(tl.dot(A4, A4, input_precision=PREC), PREC)
    P1 = tf32(tl.dot(eye + A, eye + A2, input_precision=PREC), PREC)
    P2 = tf32(tl.dot(eye + A4, eye + A8, input_precision=PREC), PREC)
    return tl.dot(P1, P2, input_precision=PREC)
