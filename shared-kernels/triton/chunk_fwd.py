"""Triton forward of the RWKV-7 generalized delta rule (chunked WY form; ALGORITHM.md s.2, s.7).

Per chunk of L = 16 steps (the algebra of ``rwkv_ops.numpy.native``), with S0 the state entering it
and N = (I - A_ab)^-1, the chunk acts on the state through five K-side tiles that do not depend on
S at all::

    W  = N a_s                    Ak = N A_ak
    Kc = k_bar + Ak^T b_bar       R2 = r_s + A_qb W          Qc = A_qk + A_qb Ak
    S_L = S0 diag(dec) + (S0 W^T) b_bar + V^T Kc             dec = exp(Lam_end)
    Y   = R2 S0^T + Qc V

So the forward is two kernels:

* ``chunk_prep_kernel``: every chunk in parallel (G chunks per program, one per warp, as batched
  [G, 16, .] products) computes W, b_bar, Kc, R2, Qc and dec into buffers (layouts below). This
  is all the exponential, triangular-solve and L x L work, done once per chunk; a forward for
  training also keeps the chunk's pair matrices (A_qk, A_qb, A_ak, N), which the gradient kernel
  reads instead of computing them again.
* ``chunk_scan_fwd_kernel``: the serial part, reduced to five small products per chunk. A program
  owns BV value rows of S for one segment of chunks (rows of S are independent). It writes o, the
  final state and, for the backward, the state entering every chunk as its products took it
  (``row_operand``: fp16 scaled per row with tf32 products, fp32 otherwise).

For few (batch, head) pairs the sequence is cut into segments (s.7): a LOCAL scan gives every
segment's state from zero (rows 0..K-1) and its transition M (from S = I with v = 0, rows K..2K-1),
``state_combine_kernel`` chains them, and the ordinary scan runs each segment from its true start.

Kernel signature order (shared with JAX): input pointers, output pointers, then scalars/constexprs.
With ``VARLEN`` the inputs are N sequences packed along T ([1, total_T, H, K]) with boundaries
``cu`` (int32 [N + 1]): the kernels' batch index is the sequence index, each program reads its
sequence's start and length (``chunk_common.sequence_span``) and the launch's T is the longest
length, so NC = ceil(max_len / 16) for every sequence (the tile and checkpoint buffers keep their
[N*H, NC, ...] indexing). Steps past a sequence's end are identity steps; chunks wholly past it are
skipped (no prep tiles, no scan steps, no checkpoints), and segments of the split that lie past it
are identity segments (local state 0, transition I).
Buffers of the K-side tiles, contiguous: [B*H, NC, 16, K] (W, b_bar, Kc, R2; fp16 with tf32
products, each chunk's tile scaled by a power of two, see ``chunk_common.store_scaled``; fp32 with
true fp32 products), [B*H, NC, 16, 16] (Qc, fp32), [B*H, NC, K] (dec, fp32) and [B*H, NC, 4] (the
inverse scales of W, b_bar, Kc and R2, fp32).
"""

import triton
import triton.language as tl

from .chunk_common import (L_, PAIRS_, SCALE_B_, SCALE_KC_, SCALE_R2_, SCALE_W_, SCALES_,
                           chunk_log2_decays, exp2_, joint_row_operands, load_f32, load_scales,
                           prefetch_tile, row_operand, scan_program, segment_start_state,
                           sequence_span, store_cast, store_pair_matrices, store_rounded,
                           store_operand_rows, store_scaled, tf32, tile_scales, unit_lower_inverse,
                           zero_invalid)


@triton.jit(do_not_specialize=["T", "H", "BH", "NC"])
def chunk_prep_kernel(
    r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, mask_ptr, cu_ptr,
    wo_ptr, bo_ptr, kco_ptr, r2o_ptr, qco_ptr, deco_ptr, sco_ptr, pm_ptr,
    T, H, BH, NC,
    stride_b, stride_t, stride_h,
    K: tl.constexpr, G: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
    PREC_INV: tl.constexpr, VARLEN: tl.constexpr, FULL: tl.constexpr, SAVE_PAIRS: tl.constexpr,
):
    """K-side tiles of G consecutive chunks of one (batch, head). Grid: (ceil(NC / G) * BH,).

    r, w, k, a, b: [B, T, H, K] by (stride_b, stride_t, stride_h), unit stride over K.
    mask: [B, T] (0 = padding) when HAS_MASK. VARLEN: B sequences packed along T, boundaries in
    cu (int32 [B + 1], see ``sequence_span``; never with HAS_MASK). Chunks past a sequence's end
    are identity chunks (dec 1, all other tiles 0); a program whose chunks all are returns at once
    and leaves them unwritten, since the scans never read past the sequence's last chunk.
    Outputs as in the module docstring; rows of R2 and Qc at padded or masked steps are 0 (so are
    their outputs, and their dy never reaches the state).
    In tf32 mode the tiles are rounded to tf32 (they are only ever product operands) and W, b_bar,
    Kc, R2 stored as scaled fp16, which holds them exactly (``store_scaled``; inverse scales in
    sco).
    FULL (``configs.whole_chunks``): every chunk whole, no mask, no packed sequences; the kernel
    then has no masked loads, stores or selects.
    SAVE_PAIRS (a forward for training): also the chunk's pair matrices for the gradient kernel,
    pm [B*H, NC, PAIR_MATRICES, 16, 16] fp32 (``store_pair_matrices``), so that it does not
    compute them again.
    Whole [G, 16, K] tiles are held in registers (250 registers on one warp at K = 64). Working in
    blocks of columns, with the factors of W, Kc and R2 passed through their output buffers
    between two passes, takes fewer registers (168 at K = 64) but was slower on an H200 (shape S:
    2.03 ms with blocks of 32 columns against 1.46; K = 128: 3.80 against 3.21 ms).
    """
    n_blk = tl.cdiv(NC, G)
    cb = tl.program_id(0) % n_blk
    bh = tl.program_id(0) // n_blk
    b = bh // H
    h = bh % H
    gi = tl.arange(0, G)
    rows = tl.arange(0, L_)
    c = cb * G + gi                                          # [G]
    t = c[:, None] * L_ + rows[None, :]                      # [G, L]
    seq, T_n = sequence_span(cu_ptr, b, T, stride_b, stride_t, VARLEN)
    if VARLEN:
        if cb * G * L_ >= T_n:
            return  # all G chunks past the sequence's end: the scans skip them, tiles unwritten
    inb = t < T_n
    valid = inb
    if HAS_MASK:
        m = tl.load(mask_ptr + b.to(tl.int64) * T + t, mask=inb, other=0)
        valid = inb & (m != 0)
    # 64-bit base of this block, 32-bit offsets inside it
    t0 = (cb * G * L_).to(tl.int64)
    base = seq + h.to(tl.int64) * stride_h + t0 * stride_t
    cols = tl.arange(0, K)
    offs = (gi[:, None, None] * L_ + rows[None, :, None]) * stride_t + cols[None, None, :]
    ld = inb[:, :, None]
    keep = valid[:, :, None]
    ok = (c < NC)[:, None, None]
    out0 = (bh.to(tl.int64) * NC + cb * G) * L_ * K
    tiles = (gi[:, None, None] * L_ + rows[None, :, None]) * K + cols[None, None, :]
    incl = (rows[:, None] >= rows[None, :])[None, :, :]
    strict = (rows[:, None] > rows[None, :])[None, :, :]

    w = load_f32(w_ptr + base + offs, ld, FULL)
    lam_in, lam_ex, lam_mid, lam_end = chunk_log2_decays(w, valid, FULL)
    mid = lam_mid[:, None, :]
    to_mid = exp2_(lam_mid)[:, None, :]
    mid_to_end = exp2_(lam_end - lam_mid)[:, None, :]
    store_cast(deco_ptr + (bh.to(tl.int64) * NC + c[:, None]) * K + cols[None, :], exp2_(lam_end),
               (c < NC)[:, None], FULL)

    # k^, b^ = x exp(Lam_mid - Lam_i); a~ = a exp(Lam_{i-1} - Lam_mid); q~ = r exp(Lam_i - Lam_mid);
    # a_s, q_s and k_s, b_bar: the same anchored at the chunk's start and at its end
    e_inv = exp2_(mid - lam_in)
    k_h = zero_invalid(load_f32(k_ptr + base + offs, ld, FULL), keep, FULL) * e_inv
    k_s = k_h * mid_to_end
    b_h = load_f32(b_ptr + base + offs, ld, FULL) * e_inv
    b_bar = tf32(b_h * mid_to_end, PREC)
    scales = sco_ptr + (bh.to(tl.int64) * NC + c) * SCALES_          # [G]
    store_scaled(bo_ptr + out0 + tiles, b_bar, scales + SCALE_B_, ok, c < NC, FULL)
    q_t = load_f32(r_ptr + base + offs, ld, FULL) * exp2_(lam_in - mid)
    q_s = q_t * to_mid
    a_t = zero_invalid(load_f32(a_ptr + base + offs, ld, FULL), keep, FULL) * exp2_(lam_ex - mid)
    a_s = tf32(a_t * to_mid, PREC)
    q_r = tf32(q_t, PREC)
    a_r = tf32(a_t, PREC)
    kT = tl.trans(tf32(k_h, PREC), 0, 2, 1)
    bT = tl.trans(tf32(b_h, PREC), 0, 2, 1)

    # the chunk's L x L algebra. Pair products carry exactly the decay between their steps;
    # entries above the diagonal may overflow and are selected away, never multiplied by 0.
    A_ab = tl.dot(a_r, bT, input_precision=PREC)
    A_ak = tl.dot(a_r, kT, input_precision=PREC)
    A_qb = tl.dot(q_r, bT, input_precision=PREC)
    A_qk = tl.dot(q_r, kT, input_precision=PREC)
    N = tf32(unit_lower_inverse(tl.where(strict, A_ab, 0.0), PREC_INV), PREC)
    A_ak_r = tf32(tl.where(strict, A_ak, 0.0), PREC)
    Ak = tf32(tl.dot(N, A_ak_r, input_precision=PREC), PREC)
    A_qb_r = tf32(tl.where(incl, A_qb, 0.0), PREC)
    if SAVE_PAIRS:
        pq = (gi[:, None, None] * PAIRS_ * L_ + rows[None, :, None]) * L_ + rows[None, None, :]
        store_pair_matrices(pm_ptr + (bh.to(tl.int64) * NC + cb * G) * PAIRS_ * L_ * L_ + pq,
                            tf32(tl.where(incl, A_qk, 0.0), PREC), A_qb_r, A_ak_r, N, ok, FULL)

    # W = N a_s, Kc = Ak^T b_bar + k_s, R2 = A_qb W + q_s, Qc = A_qk + A_qb Ak, stored
    # tf32-rounded (R2 and Qc zero at invalid steps)
    W_r = tf32(tl.dot(N, a_s, input_precision=PREC), PREC)
    store_scaled(wo_ptr + out0 + tiles, W_r, scales + SCALE_W_, ok, c < NC, FULL)
    Kc = tl.dot(tl.trans(Ak, 0, 2, 1), b_bar, k_s, input_precision=PREC)
    store_rounded(kco_ptr + out0 + tiles, Kc, scales + SCALE_KC_, ok, c < NC, PREC, FULL)
    R2 = zero_invalid(tl.dot(A_qb_r, W_r, q_s, input_precision=PREC), keep, FULL)
    store_rounded(r2o_ptr + out0 + tiles, R2, scales + SCALE_R2_, ok, c < NC, PREC, FULL)
    Qc = zero_invalid(tl.dot(A_qb_r, Ak, tl.where(incl, A_qk, 0.0), input_precision=PREC), keep,
                      FULL)
    sq = (gi[:, None, None] * L_ + rows[None, :, None]) * L_ + rows[None, None, :]
    store_cast(qco_ptr + (bh.to(tl.int64) * NC + cb * G) * L_ * L_ + sq, tf32(Qc, PREC), ok, FULL)


@triton.jit
def _scan_step_loads(dec_ptr, sc_ptr, v_ptr, bh, NC, c, c_end, T_n, stride_t, rows, cols,
                     K: tl.constexpr):
    """The forward scan's per-step operands that are not products' shared-memory tiles: chunk c's
    decay dec ([K], from the prep tiles), its four inverse tile scales (``load_scales``; the
    scan reduces them with ``tile_scales``) and its transposed [BV, 16] tile of v (v_ptr points
    at the tile of step 0; returned in v's dtype).
    Nothing is read for c >= c_end (the scan loads one chunk ahead). The state-gradient scan
    leaves its loads to the software pipeliner instead: the same prefetch by hand there raised
    its registers from 128 to 168, and 512 programs (shape S) no longer fit in one wave (H200:
    1.68 vs 1.13 ms)."""
    c_k = c + cols * 0                    # c as tensors: the masks stay tensors in the interpreter
    c_l = c + rows * 0
    c_s = c + tl.arange(0, SCALES_) * 0
    dec = tl.load(dec_ptr + (bh.to(tl.int64) * NC + c) * K + cols, mask=c_k < c_end, other=1.0)
    sc = load_scales(sc_ptr + (bh.to(tl.int64) * NC + c) * SCALES_, c_s < c_end)
    t0 = c * L_
    live = (c_l < c_end) & (c_l * L_ + rows < T_n)
    v = tl.load(v_ptr + t0.to(tl.int64) * stride_t, mask=live[None, :], other=0.0)
    return dec, sc, v


@triton.jit(do_not_specialize=["T", "H", "BH", "NC", "CPS"])
def chunk_scan_fwd_kernel(
    v_ptr, wt_ptr, bt_ptr, kct_ptr, r2t_ptr, qct_ptr, dect_ptr, sct_ptr, init_ptr, cu_ptr,
    y_ptr, ckpt_ptr, cks_ptr, send_ptr, mend_ptr,
    T, H, BH, NC, CPS,
    stride_b, stride_t, stride_h,
    init_sb, init_sh, init_ss,
    send_sbh, send_ss,
    K: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, LOCAL: tl.constexpr,
    WRITE_Y: tl.constexpr, SAVE_CKPT: tl.constexpr, WRITE_END: tl.constexpr,
    PREC: tl.constexpr, VARLEN: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_L1: tl.constexpr,
):
    """Serial scan of the state over one segment of chunks. Grid: (n_blocks * BH * n_segments,),
    n_blocks = K // BV (2 K // BV when LOCAL: the second half computes M's rows).

    v: [B, T, H, K] by the strides. wt, bt, kct, r2t, qct, dect, sct: the prep kernel's tiles
    and the inverse scales of the first four (each product with one is multiplied by them).
    init: the state entering each segment at init + b * init_sb + h * init_sh + segment * init_ss
    ([K, K] row-major, any float dtype; zero without HAS_INIT). y: like v. ckpt: [B*H, NC, K, K],
    the state entering every chunk as the products use it (SAVE_CKPT), fp16 scaled per row in
    tf32 mode (``store_operand_rows``; the rows' inverse scales in cks, fp32 [B*H, NC, K]) or fp32.
    send / mend: end state (LOCAL: and M) at ptr + bh * send_sbh + segment * send_ss; without
    LOCAL only the last segment writes.
    VARLEN: packed sequences (cu, as in the prep kernel); y is written at the sequence's own steps
    only, and its chunks past the end (identity tiles) carry the state unchanged to the end.
    The V-side tiles are handled transposed ([BV, 16]), so every product has the BV rows as M.
    PREFETCH > 0 (GPU only, ``configs.ChunkConfig.prefetch_fwd``): with SAVE_CKPT each step asks
    L2 for the tiles of the chunk PREFETCH ahead (H200, shape S, 4 ahead: 1.237 against 1.264
    ms; under no_grad the same was slower, 0.927 against 0.869, so it is not done there).
    PREFETCH_L1: that prefetch goes into the SM's L1 as well (``configs.ChunkConfig``
    .prefetch_fwd_l1).
    """
    NV: tl.constexpr = K // BV
    NB: tl.constexpr = 2 * NV if LOCAL else NV
    blk, bh, seg, b, h, vrow, state_tile, T_n, vt_off = scan_program(
        cu_ptr, T, H, BH, stride_b, stride_t, stride_h, NB, NV, K, BV, VARLEN)
    is_m = blk >= NV
    rows = tl.arange(0, L_)
    cols = tl.arange(0, K)
    ktile = rows[:, None] * K + cols[None, :]
    qtile = rows[:, None] * L_ + rows[None, :]

    S = segment_start_state(init_ptr, b, h, seg, init_sb, init_sh, init_ss, state_tile, HAS_INIT,
                            BV, K)
    if LOCAL:
        # the blocks of M start from the identity's rows; those of S_loc from zero
        eye = tl.where(vrow[:, None] == cols[None, :], 1.0, 0.0)
        S = tl.where(is_m, eye, tl.zeros([BV, K], dtype=tl.float32))
    v_scale = tl.where(is_m, 0.0, 1.0)

    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    c_end = c_hi
    if VARLEN:
        # chunks wholly past the sequence's end are identity chunks: skipped (their checkpoints
        # are left unwritten; only gradient programs that store nothing read them)
        c_end = tl.minimum(c_hi, tl.cdiv(T_n, L_))
    # dec, the tile scales and v are loaded one chunk ahead, by hand: the software pipeliner
    # prefetches only the tiles that feed products from shared memory, and the scan would
    # otherwise wait on these loads at every step
    dec_next, sc_next, Vt_next = _scan_step_loads(
        dect_ptr, sct_ptr, v_ptr + vt_off, bh, NC, c_lo, c_end, T_n, stride_t, rows, cols, K)
    # With checkpoints the scales are reduced in the step that uses them: reduced right after
    # their load, every step waited on it (11.5% of the scan's stall samples; H200, shape S: scan
    # 1.270 against 1.347 ms). Without checkpoints reducing them ahead is faster (0.866 against
    # 0.890 ms).
    if not SAVE_CKPT:
        s_wb_next, s_kc_next, s_r2_next = tile_scales(sc_next)
    for c in range(c_lo, c_end):
        t0 = c * L_
        t_off = t0.to(tl.int64) * stride_t  # 64-bit: T * H * K may pass 2^31
        inb = (t0 + rows) < T_n
        cbase = (bh.to(tl.int64) * NC + c) * L_ * K
        if SAVE_CKPT:
            if PREFETCH > 0:
                c_ahead = tl.minimum(c + PREFETCH, c_end - 1)
                prefetch_tile(wt_ptr, bh, NC, c_ahead, K, PREFETCH_L1)
                prefetch_tile(bt_ptr, bh, NC, c_ahead, K, PREFETCH_L1)
                prefetch_tile(kct_ptr, bh, NC, c_ahead, K, PREFETCH_L1)
                if WRITE_Y:
                    prefetch_tile(r2t_ptr, bh, NC, c_ahead, K, PREFETCH_L1)
                    prefetch_tile(qct_ptr, bh, NC, c_ahead, L_, PREFETCH_L1)
        Wc = tl.load(wt_ptr + cbase + ktile)
        Bc = tl.load(bt_ptr + cbase + ktile)
        Kc = tl.load(kct_ptr + cbase + ktile)
        dec = dec_next
        if SAVE_CKPT:
            s_wb, s_kc, s_r2 = tile_scales(sc_next)
        else:
            s_wb = s_wb_next
            s_kc = s_kc_next
            s_r2 = s_r2_next
        Vt = Vt_next.to(tl.float32)
        dec_next, sc_next, Vt_next = _scan_step_loads(
            dect_ptr, sct_ptr, v_ptr + vt_off, bh, NC, c + 1, c_end, T_n, stride_t, rows, cols,
            K)
        if not SAVE_CKPT:
            s_wb_next, s_kc_next, s_r2_next = tile_scales(sc_next)
        if LOCAL:
            Vt = Vt * v_scale

        # the state as an operand: scaled per row (fp16 in tf32 mode, see row_operand)
        S_o, s_inv = row_operand(S, PREC)
        if SAVE_CKPT:
            # the state entering chunk c, as the products take it (the gradient kernel's S0)
            store_operand_rows(ckpt_ptr, cks_ptr, bh, NC, c, S_o, s_inv, state_tile, vrow, K)
        if WRITE_Y:
            R2 = tl.load(r2t_ptr + cbase + ktile)
            Qc = tl.load(qct_ptr + (bh.to(tl.int64) * NC + c) * L_ * L_ + qtile)
            Yt = (tl.dot(S_o.to(R2.dtype), tl.trans(R2), input_precision=PREC)
                  * (s_inv * s_r2)[:, None])
            Yt = tl.dot(Vt, tl.trans(Qc), Yt, input_precision=PREC)
            tl.store(y_ptr + vt_off + t_off, Yt.to(y_ptr.dtype.element_ty), mask=inb[None, :])
        # the scales are powers of two: every product below equals the unscaled tiles' exactly
        X1 = tl.dot(S_o.to(Wc.dtype), tl.trans(Wc), input_precision=PREC) * (s_inv * s_wb)[:, None]
        X_o, V_o, p_inv = joint_row_operands(X1, Vt, s_kc, PREC)
        P = tl.dot(V_o.to(Kc.dtype), Kc, input_precision=PREC)
        P = tl.dot(X_o.to(Bc.dtype), Bc, P, input_precision=PREC)
        S = S * dec[None, :] + P * p_inv[:, None]

    if WRITE_END:
        ep = bh.to(tl.int64) * send_sbh + seg.to(tl.int64) * send_ss + state_tile
        if LOCAL:
            if is_m:
                tl.store(mend_ptr + ep, S)
            else:
                tl.store(send_ptr + ep, S)
        else:
            # only the segment holding the last chunk has the final state
            if c_hi >= NC:
                tl.store(send_ptr + ep, S)


@triton.jit(do_not_specialize=["H", "BH", "NSEG"])
def state_combine_kernel(
    loc_ptr, m_ptr, init_ptr,
    out_ptr,
    H, BH, NSEG,
    init_sb, init_sh,
    K: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
):
    """Chain the segments (the short sequential pass of the segment algebra), in fp32 ieee.

    Forward (REVERSE=False): X_0 = init, X_{s+1} = X_s M_s + loc_s; writes X_s (the state entering
    segment s). Backward (REVERSE=True): X_{NSEG-1} = init (the final-state gradient),
    X_{s-1} = X_s M_s^T + loc_s; writes X_s (the gradient at the end of segment s).
    loc, m, out: [B*H, NSEG, K, K] fp32. init: rows at init + b * init_sb + h * init_sh.
    Grid: (K // BV * BH,).
    """
    NV: tl.constexpr = K // BV
    BK: tl.constexpr = 16
    pid = tl.program_id(0)
    vb = pid % NV
    bh = pid // NV
    b = bh // H
    h = bh % H
    cols = tl.arange(0, K)
    vrow = vb * BV + tl.arange(0, BV)
    kk = tl.arange(0, BK)
    tile = vrow[:, None] * K + cols[None, :]
    if HAS_INIT:
        ip = init_ptr + b.to(tl.int64) * init_sb + h.to(tl.int64) * init_sh
        X = tl.load(ip + tile).to(tl.float32)
    else:
        X = tl.zeros([BV, K], dtype=tl.float32)
    seg_base = bh.to(tl.int64) * NSEG * K * K
    for i in range(0, NSEG):
        if REVERSE:
            s = NSEG - 1 - i
        else:
            s = i
        off = seg_base + s * K * K
        tl.store(out_ptr + off + tile, X)
        # the product runs over 16-wide slices of X read back from out (a whole [K, K] operand
        # in registers spills): the barrier makes this program's stores visible to all its threads
        tl.debug_barrier()
        acc = tl.load(loc_ptr + off + tile)
        for kb in range(0, K // BK):
            xk = tl.load(out_ptr + off + vrow[:, None] * K + kb * BK + kk[None, :])
            if REVERSE:
                # rows kb of M^T = columns kb of M
                mk = tl.load(m_ptr + off + cols[None, :] * K + kb * BK + kk[:, None])
            else:
                mk = tl.load(m_ptr + off + (kb * BK + kk[:, None]) * K + cols[None, :])
            acc = tl.dot(xk, mk, acc, input_precision="ieee")
        X = acc
        tl.debug_barrier()
