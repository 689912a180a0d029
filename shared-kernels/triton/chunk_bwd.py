"""Triton backward of the RWKV-7 generalized delta rule, in two kernels.

The gradient G of the state (G = dloss/dS at a chunk's end, V x K) obeys a recursion that needs no
forward state at all, only the forward prep kernel's tiles (chunk_fwd.py)::

    G_prev = G diag(dec) + (G b_bar^T) W + dY^T R2        (= G M_c^T + dY^T R2)

Its rows are independent, so ``chunk_scan_bwd_kernel`` walks the chunks in reverse with the V rows
split over programs (like the forward scan) and stores G at the end of every chunk. With G and the
forward's checkpoint S0 of every chunk known, the remaining gradients of a chunk depend on that
chunk alone: ``chunk_bwd_kernel`` runs one program per (batch, head, chunk), all in parallel, with
all V rows and the key channels in blocks (no atomics, a fixed order, bitwise deterministic).

The segment algebra (s.7) applies to G as well: G_start = G_end M^T + G_loc, with the forward's M.

With ``VARLEN`` (packed sequences, see chunk_fwd.py) both kernels work on each sequence's own
steps: the reverse scan starts at the sequence's last chunk (G passes the identity chunks after it
unchanged), and a gradient program of a chunk wholly past the end returns at once.
"""

import triton
import triton.language as tl

from .chunk_common import (FLOOR_, L_, PAIRS_, SCALE_B_, SCALE_KC_, SCALE_W_, SCALES_,
                           chunk_log_decays, exp_, joint_row_operands, load_operand,
                           load_pair_matrices, load_scales,
                           load_tile, prefetch_rows, prefetch_span, row_operand, scan_program,
                           segment_start_state, sequence_span, step_sums, step_validity,
                           store_cast, store_operand_rows, tf32, tile_scale, tile_scales,
                           zero_invalid)


@triton.jit(do_not_specialize=["T", "H", "BH", "NC", "CPS"])
def chunk_scan_bwd_kernel(
    dy_ptr, wt_ptr, bt_ptr, r2t_ptr, dect_ptr, sct_ptr, init_ptr, cu_ptr,
    gck_ptr, gks_ptr, gend_ptr,
    T, H, BH, NC, CPS,
    stride_b, stride_t, stride_h,
    init_sb, init_sh, init_ss,
    gend_sbh, gend_ss,
    K: tl.constexpr, BV: tl.constexpr,
    HAS_INIT: tl.constexpr, LOCAL: tl.constexpr, SAVE_CKPT: tl.constexpr,
    WRITE_END: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, L1_PREFETCH: tl.constexpr,
):
    """Reverse scan of the state gradient over one segment. Grid: (K // BV * BH * n_segments,).

    dy: [B, T, H, K] by the strides. wt, bt, r2t, dect, sct: the forward prep kernel's W, b_bar,
    R2 and dec tiles and the inverse tile scales (R2 is 0 at padded / masked steps, so their dy
    is ignored). init: the gradient at the end of each segment, rows at init + b * init_sb
    + h * init_sh + segment * init_ss (zero without HAS_INIT). gck: [B*H, NC, K, K], the gradient
    at the end of every chunk as the gradient kernel's products use it (SAVE_CKPT), fp16 scaled
    per row in tf32 mode (inverse scales in gks, fp32 [B*H, NC, K]) or fp32, as the forward's
    checkpoints. gend: the gradient at the segment's start, at gend + bh * gend_sbh
    + segment * gend_ss; LOCAL writes it for every segment, otherwise only segment 0 (the
    initial-state gradient). VARLEN: packed sequences (cu, as in the forward kernels).
    L1_PREFETCH (GPU only, ``configs.ChunkConfig.l1_prefetch_state``): each step asks its SM's
    L1 for the next chunk's decays, a plain load that the software pipeliner does not stage and
    that the state update waits on (a load ahead by hand raised the registers, see
    chunk_fwd._scan_step_loads; the next dy rows prefetched as well took 132 registers on sm_90,
    3 programs per SM instead of 4).
    """
    NV: tl.constexpr = K // BV
    _, bh, seg, b, h, vrow, state_tile, T_n, vt_off = scan_program(
        cu_ptr, T, H, BH, stride_b, stride_t, stride_h, NV, NV, K, BV, VARLEN)
    rows = tl.arange(0, L_)
    cols = tl.arange(0, K)
    ktile = rows[:, None] * K + cols[None, :]
    G = segment_start_state(init_ptr, b, h, seg, init_sb, init_sh, init_ss, state_tile, HAS_INIT,
                            BV, K)

    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    if VARLEN:
        # chunks wholly past the sequence's end are identity chunks: skipped, as in the forward
        c_hi = tl.minimum(c_hi, tl.cdiv(T_n, L_))
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        t0 = c * L_
        t_off = t0.to(tl.int64) * stride_t  # 64-bit: T * H * K may pass 2^31
        inb = (t0 + rows) < T_n
        cbase = (bh.to(tl.int64) * NC + c) * L_ * K
        if L1_PREFETCH:
            c_next = tl.maximum(c - 1, c_lo)
            prefetch_span(dect_ptr + (bh.to(tl.int64) * NC + c_next) * K, K, TO_L1=True)
        # G_prev = G M_c^T + dY^T R2, with M_c^T = diag(dec) + b_bar^T W. The tile scales (powers
        # of two) multiply the products with b_bar (by W's and its own) and R2, so they equal the
        # unscaled tiles' exactly; G, X2 and dY are operands scaled per row (``row_operand``).
        G_o, g_inv = row_operand(G, PREC)
        if SAVE_CKPT:
            # the gradient at the end of chunk c, as the products take it
            store_operand_rows(gck_ptr, gks_ptr, bh, NC, c, G_o, g_inv, state_tile, vrow, K)
        sc = load_scales(sct_ptr + (bh.to(tl.int64) * NC + c) * SCALES_,
                         tl.full([SCALES_], 1, tl.int1))
        s_wb, _s_kc, s_r2 = tile_scales(sc)
        Bc = tl.load(bt_ptr + cbase + ktile)
        X2 = tl.dot(G_o.to(Bc.dtype), tl.trans(Bc), input_precision=PREC) * (g_inv * s_wb)[:, None]
        dec = tl.load(dect_ptr + (bh.to(tl.int64) * NC + c) * K + cols)
        dYt = tl.load(dy_ptr + vt_off + t_off, mask=inb[None, :], other=0.0).to(tl.float32)
        X_o, D_o, p_inv = joint_row_operands(X2, dYt, s_r2, PREC)
        R2 = tl.load(r2t_ptr + cbase + ktile)
        P = tl.dot(D_o.to(R2.dtype), R2, input_precision=PREC)
        Wc = tl.load(wt_ptr + cbase + ktile)
        P = tl.dot(X_o.to(Wc.dtype), Wc, P, input_precision=PREC)
        G = G * dec[None, :] + P * p_inv[:, None]

    if WRITE_END:
        ep = gend_ptr + bh.to(tl.int64) * gend_sbh + seg.to(tl.int64) * gend_ss + state_tile
        if LOCAL:
            tl.store(ep, G)
        else:
            if seg == 0:
                tl.store(ep, G)


@triton.jit
def _chunk_factors(r_ptr, w_ptr, k_ptr, a_ptr, b_ptr, t, T, cols, stride_t, valid,
                   PREC: tl.constexpr, FULL: tl.constexpr):
    """The mid-anchored factors of one chunk: q~, k^, a~, b^ ([CHUNK, K]), the same rounded as the
    products use them (tf32-exact in tf32 mode), the exponentials e_in, e_ex, e_inv ([CHUNK, K]),
    to_mid, mid_to_end, decay_end ([K]) and lambda before the floor ([CHUNK, K]); see
    chunk_fwd.py. The five input tiles are read before any is used, so that their loads wait
    together (H200, shape S: gradient kernel 8.87 against 9.14 ms with each load next to its use;
    the same order in the prep kernel was slower, 1.30 against 1.26 ms)."""
    w = load_tile(w_ptr, t, T, cols, stride_t, FULL)
    r_in = load_tile(r_ptr, t, T, cols, stride_t, FULL)
    a_in = load_tile(a_ptr, t, T, cols, stride_t, FULL)
    k_in = load_tile(k_ptr, t, T, cols, stride_t, FULL)
    b_in = load_tile(b_ptr, t, T, cols, stride_t, FULL)
    lam_in, lam_ex, lam_mid, lam_end = chunk_log_decays(w, valid, PREC, FULL)
    e_in = exp_(lam_in - lam_mid[None, :])
    e_ex = exp_(lam_ex - lam_mid[None, :])
    e_inv = exp_(lam_mid[None, :] - lam_in)
    q_t = r_in * e_in
    a_t = zero_invalid(a_in, valid[:, None], FULL) * e_ex
    k_h = zero_invalid(k_in, valid[:, None], FULL) * e_inv
    b_h = b_in * e_inv
    return (q_t, k_h, a_t, b_h, tf32(q_t, PREC), tf32(k_h, PREC), tf32(a_t, PREC), tf32(b_h, PREC),
            e_in, e_ex, e_inv, exp_(lam_mid), exp_(lam_end - lam_mid), exp_(lam_end),
            -exp_(w))


@triton.jit
def _state_factors(a_t, k_h, b_h, to_mid, mid_to_end, PREC: tl.constexpr):
    """(a_s, k_bar, b_bar): the factors that meet the state, anchored at the chunk's start (a)
    and end (k, b), from the mid-anchored ones of ``_chunk_factors``; rounded from the unrounded
    factors as the forward does (its exponentials are in log2 units, ``chunk_log2_decays``: a
    factor may differ in its last bit)."""
    return (tf32(a_t * to_mid[None, :], PREC), tf32(k_h * mid_to_end[None, :], PREC),
            tf32(b_h * mid_to_end[None, :], PREC))


@triton.jit
def _prefetch_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, ckpt_ptr, gck_ptr, pm_ptr,
                    c, bh, H, NC, seq, T_n, stride_t, stride_h, K: tl.constexpr):
    """Prefetch into L2 what the gradient program of chunk c of sequence bh reads (its sequence
    at element offset seq, T_n steps, T_n >= 1): its seven [CHUNK, K] input tiles (rows past the
    end: the last row again), its pair matrices and its two checkpoints, about 34 KB at K = 64
    with bf16 inputs."""
    t = tl.minimum(c * L_ + tl.arange(0, L_), T_n - 1)
    off = seq + (bh % H).to(tl.int64) * stride_h + t.to(tl.int64) * stride_t
    chunk = bh.to(tl.int64) * NC + c
    prefetch_span(pm_ptr + chunk * PAIRS_ * L_ * L_, PAIRS_ * L_ * L_)
    prefetch_rows(w_ptr, off, K)
    prefetch_rows(r_ptr, off, K)
    prefetch_rows(a_ptr, off, K)
    prefetch_rows(k_ptr, off, K)
    prefetch_rows(b_ptr, off, K)
    prefetch_rows(v_ptr, off, K)
    prefetch_rows(dy_ptr, off, K)
    prefetch_span(ckpt_ptr + chunk * K * K, K * K)
    prefetch_span(gck_ptr + chunk * K * K, K * K)


@triton.jit
def _prefetch_inputs(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, ckpt_ptr, gck_ptr, pm_ptr,
                     cu_ptr, pid, T, H, NC, stride_b, stride_t, stride_h, K: tl.constexpr,
                     VARLEN: tl.constexpr):
    """``_prefetch_chunk`` of gradient program pid: nothing when pid is past the grid, nor (with
    VARLEN) when its chunk lies wholly past its sequence's end."""
    if pid < tl.num_programs(0):
        c = pid % NC
        bh = pid // NC
        seq, T_n = sequence_span(cu_ptr, bh // H, T, stride_b, stride_t, VARLEN)
        live = True  # a dense chunk always holds a step
        if VARLEN:
            live = c * L_ < T_n
        if live:
            _prefetch_chunk(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, ckpt_ptr, gck_ptr,
                            pm_ptr, c, bh, H, NC, seq, T_n, stride_t, stride_h, K)


@triton.jit(do_not_specialize=["T", "H", "BH", "NC"])
def chunk_bwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, mask_ptr, ckpt_ptr, cks_ptr, gck_ptr, gks_ptr,
    pm_ptr, cu_ptr, wt_ptr, bt_ptr, kct_ptr, sct_ptr,
    dr_ptr, dw_ptr, dk_ptr, dv_ptr, da_ptr, db_ptr,
    T, H, BH, NC,
    stride_b, stride_t, stride_h,
    K: tl.constexpr, KB: tl.constexpr,
    HAS_MASK: tl.constexpr, PREC: tl.constexpr, VARLEN: tl.constexpr, FULL: tl.constexpr,
    PREFETCH: tl.constexpr, L1_PREFETCH: tl.constexpr,
):
    """Gradients of r, w, k, v, a, b for one (batch, head, chunk). Grid: (NC * BH,).

    Inputs as in the forward; dy like r; ckpt: [B*H, NC, K, K] state entering each chunk and gck
    the state gradient at each chunk's end, as the scans stored them (fp16 scaled per row, inverse
    scales in cks and gks [B*H, NC, K], or fp32): tf32-exact in tf32 mode, so this kernel's
    products read them as they are. pm: the pair matrices A_qk, A_qb, A_ak and N of every chunk
    as the prep kernel computed them for the forward ([B*H, NC, PAIR_MATRICES, 16, 16] fp32,
    ``store_pair_matrices``). wt, bt, kct, sct: the prep kernel's W, b_bar and Kc tiles of
    every chunk and their inverse scales, as the forward scan used them. Outputs: like their
    inputs. VARLEN: packed sequences (cu, as in the forward); a chunk wholly past its
    sequence's end stores nothing. FULL: every chunk is whole
    and every step valid (``configs.whole_chunks``): no masks, loads or stores. PREFETCH > 0 (GPU
    only): each program first asks L2 for the inputs of the program PREFETCH ahead of it
    (``configs.ChunkConfig.prefetch_bwd``: one program per SM ahead, where it pays: K = 32 and
    fp32 inputs; at K = 64 the launchers cap the kernel at 168 registers instead, 3 programs per
    SM, where the prefetch no longer pays, ``configs.BWD_MAXNREG``). L1_PREFETCH (GPU only): each
    program first asks its SM's L1 for its own seven input tiles (``configs.ChunkConfig``
    .l1_prefetch_bwd): pass 2 reads five of them only after pass 1 and the V-side chain, one
    after the other (each goes through shared memory for its layout), and they then hit L1.

    Layout: the V-side tiles hold all K value rows and the 16 steps ([K, 16]). Every factor of
    the chunk (decays, exponentials, q~, k^, a~, b^ and their gradients) belongs to one key
    channel, so the channels are worked in blocks of KB, in two passes:

    1. the products that sum over the state's key columns, from the prep's kept tiles, one
       block of KB columns at a time: S0 W^T (U = S0 W^T + V Ak^T, Ak = N A_ak, the forward's
       own form), G b_bar^T and G Kc^T (G k_bar^T = G Kc^T - G b_bar^T Ak); no factor of the
       chunk is computed in this pass;
    2. after the V-side chain (U, dU, dX, dv and the four [16, 16] pair gradients, which need
       those sums whole), for each block of KB channels: its K-side sums (S0^T dy, S0^T dX,
       G^T v, G^T U), its factors rebuilt from the (cached) inputs, and its five gradients.

    Only one block's factors and state columns are live at a time. Small blocks cost more than
    they save (each recomputes the chunk's decays; its products have N = KB): one block up to
    K = 64 with tf32 products (``configs.chunk_config``). The row scales of the checkpoints
    (powers of two) multiply the [K, 16] V-side tiles, never the [K, K] states.
    """
    NKB: tl.constexpr = K // KB
    pid = tl.program_id(0)
    c = pid % NC
    bh = pid // NC
    b = bh // H
    h = bh % H

    rows = tl.arange(0, L_)
    vrow = tl.arange(0, K)
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    seq, T_n = sequence_span(cu_ptr, b, T, stride_b, stride_t, VARLEN)
    if VARLEN:
        if c * L_ >= T_n:
            return  # wholly past the sequence's end: nothing to store (nor read: not scanned)
    base = seq + h.to(tl.int64) * stride_h
    t = c * L_ + rows
    valid = step_validity(mask_ptr + b.to(tl.int64) * T, t, T_n, HAS_MASK)
    if L1_PREFETCH:
        own = base + tl.minimum(t, T_n - 1).to(tl.int64) * stride_t
        prefetch_rows(w_ptr, own, K, TO_L1=True)
        prefetch_rows(r_ptr, own, K, TO_L1=True)
        prefetch_rows(a_ptr, own, K, TO_L1=True)
        prefetch_rows(k_ptr, own, K, TO_L1=True)
        prefetch_rows(b_ptr, own, K, TO_L1=True)
        prefetch_rows(v_ptr, own, K, TO_L1=True)
        prefetch_rows(dy_ptr, own, K, TO_L1=True)

    if PREFETCH > 0:
        _prefetch_inputs(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, dy_ptr, ckpt_ptr, gck_ptr,
                         pm_ptr, cu_ptr, pid + PREFETCH, T, H, NC, stride_b, stride_t, stride_h, K,
                         VARLEN)
    chunk = bh.to(tl.int64) * NC + c  # index of the chunk's entry in the per-chunk buffers
    A_qk, A_qb, A_ak, N = load_pair_matrices(
        pm_ptr + chunk * PAIRS_ * L_ * L_ + rows[:, None] * L_ + rows[None, :])
    st_base = chunk * K * K
    sc_base = chunk * K
    vt = base + vrow[:, None] + t.to(tl.int64)[None, :] * stride_t
    inb = (t < T_n)[None, :]
    vvT = load_operand(v_ptr + vt, inb, PREC, FULL)
    dyT = load_operand(dy_ptr + vt, valid[None, :], PREC, FULL)
    s_ck = tl.load(cks_ptr + sc_base + vrow)
    s_gk = tl.load(gks_ptr + sc_base + vrow)

    # pass 1: the products with the state's key columns, from the prep's kept tiles (fp16 scaled
    # per chunk, or fp32: the values the forward's products took), KB columns at a time:
    # U = X N^T = S0 W^T + V Ak^T (W = N a_s, Ak = N A_ak), G b_bar^T, and
    # G k_bar^T = G Kc^T - (G b_bar^T) Ak (Kc = k_bar + Ak^T b_bar)
    sc = load_scales(sct_ptr + chunk * SCALES_, tl.full([SCALES_], 1, tl.int1))
    Ak = tf32(tl.dot(N, A_ak, input_precision=PREC), PREC)
    SW = tl.zeros([K, L_], dtype=tl.float32)     # S0 W^T
    GB = tl.zeros([K, L_], dtype=tl.float32)     # G b_bar^T
    GKc = tl.zeros([K, L_], dtype=tl.float32)    # G Kc^T
    cbase = chunk * L_ * K
    for kb in range(0, NKB):
        kcol = kb * KB + tl.arange(0, KB)
        ktile = rows[:, None] * K + kcol[None, :]
        Wc = tl.load(wt_ptr + cbase + ktile)
        Bc = tl.load(bt_ptr + cbase + ktile)
        Kc = tl.load(kct_ptr + cbase + ktile)
        tile = vrow[:, None] * K + kcol[None, :]
        S0 = tl.load(ckpt_ptr + st_base + tile)
        G = tl.load(gck_ptr + st_base + tile)
        SW = tl.dot(S0, tl.trans(Wc), SW, input_precision=PREC)
        GB = tl.dot(G, tl.trans(Bc), GB, input_precision=PREC)
        GKc = tl.dot(G, tl.trans(Kc), GKc, input_precision=PREC)

    # the V-side chain, all value rows at once (the tile and row scales are powers of two)
    UT = tl.dot(vvT, tl.trans(Ak), input_precision=PREC)
    UT = tf32(UT + SW * (s_ck * tile_scale(sc, SCALE_W_))[:, None], PREC)
    GB = GB * (s_gk * tile_scale(sc, SCALE_B_))[:, None]
    dUT = tl.dot(dyT, A_qb, input_precision=PREC) + GB
    GK = (GKc * (s_gk * tile_scale(sc, SCALE_KC_))[:, None]
          - tl.dot(tf32(GB, PREC), Ak, input_precision=PREC))
    dXT = tf32(tl.dot(tf32(dUT, PREC), N, input_precision=PREC), PREC)
    dvT = tl.dot(dyT, A_qk, input_precision=PREC)
    dvT = tl.dot(dXT, A_ak, dvT, input_precision=PREC)
    dvT = zero_invalid(dvT + GK, valid[None, :], FULL)
    store_cast(dv_ptr + vt, dvT, inb, FULL)
    dA_qk = tl.where(incl, tl.dot(tl.trans(dyT), vvT, input_precision=PREC), 0.0)
    dA_qb = tl.where(incl, tl.dot(tl.trans(dyT), UT, input_precision=PREC), 0.0)
    dA_ak = tl.where(strict, tl.dot(tl.trans(dXT), vvT, input_precision=PREC), 0.0)
    dA_ab = tl.where(strict, tl.dot(tl.trans(dXT), UT, input_precision=PREC), 0.0)
    # the V-side operands of the K-side sums, with the checkpoints' row scales (powers of two)
    dy_s = dyT * s_ck[:, None]
    dX_s = dXT * s_ck[:, None]
    v_s = vvT * s_gk[:, None]
    U_s = UT * s_gk[:, None]
    s_cg = s_ck * s_gk

    # pass 2: each block of KB channels' K-side sums, factors and gradients
    for kb in range(0, NKB):
        kcol = kb * KB + tl.arange(0, KB)
        # the transposed states are read from memory (cached) rather than transposed in registers
        # (H200, shape S: 10.0 vs 10.1 ms in the one-pass form)
        tile_t = kcol[:, None] + vrow[None, :] * K
        S0t = tl.load(ckpt_ptr + st_base + tile_t).to(tl.float32)
        Gt = tl.load(gck_ptr + st_base + tile_t).to(tl.float32)
        dr_s = tl.trans(tl.dot(S0t, dy_s, input_precision=PREC))
        da_s = tl.trans(tl.dot(S0t, dX_s, input_precision=PREC))
        dk_bar = tl.trans(tl.dot(Gt, v_s, input_precision=PREC))
        db_bar = tl.trans(tl.dot(Gt, U_s, input_precision=PREC))
        d_end = tl.sum(S0t * Gt * s_cg[None, :], axis=1)
        q_t, k_h, a_t, b_h, q_r, k_r, a_r, b_r, e_in, e_ex, e_inv, to_mid, mid_to_end, \
            decay_end, lam_raw = _chunk_factors(
            r_ptr + base, w_ptr + base, k_ptr + base, a_ptr + base, b_ptr + base, t, T_n, kcol,
            stride_t, valid, PREC, FULL)
        a_s, k_bar, b_bar = _state_factors(a_t, k_h, b_h, to_mid, mid_to_end, PREC)
        # the pair gradients use the same tf32-exact factors as the products they differentiate:
        # each pair term dA_ij q_i k_j then comes out identical (exact products, fp32 sums) in its
        # row and in its column, and the telescoping sum of dlambda below cancels it exactly
        dq_t = tl.dot(dA_qk, k_r, input_precision=PREC)
        dq_t = tl.dot(dA_qb, b_r, dq_t, input_precision=PREC)
        dk_h = tl.dot(tl.trans(dA_qk), q_r, input_precision=PREC)
        dk_h = tl.dot(tl.trans(dA_ak), a_r, dk_h, input_precision=PREC)
        da_t = tl.dot(dA_ak, k_r, input_precision=PREC)
        da_t = tl.dot(dA_ab, b_r, da_t, input_precision=PREC)
        db_h = tl.dot(tl.trans(dA_qb), q_r, input_precision=PREC)
        db_h = tl.dot(tl.trans(dA_ab), a_r, db_h, input_precision=PREC)

        # d/dLam of every factor; the anchor Lam_mid cancels exactly (each pair product is free
        # of it)
        k_bar_t = dk_bar * k_bar + db_bar * b_bar
        d_lin = dq_t * q_r + dr_s * (q_t * to_mid[None, :]) - dk_h * k_r - db_h * b_r - k_bar_t
        d_lex = da_t * a_r + da_s * a_s
        d_lend = tl.sum(k_bar_t, axis=0) + d_end * decay_end
        # dlam_t = sum_{i >= t} d_lin_i + sum_{i > t} d_lex_i + d_lend
        d_lam = step_sums(tl.where(incl, 0.0, 1.0), d_lex, PREC)
        d_lam += step_sums(tl.where(strict, 0.0, 1.0), d_lin, PREC)
        d_lam = d_lam + d_lend[None, :]
        keep = valid[:, None]
        # dlam/dw = lam (lambda = -exp(w)). Where the floor clamps lambda, the forward used the
        # decay e^-FLOOR instead of d; dloss/dd is nearly the same at both, so chain it through
        # the true dd/dw = lam * d: d_lam / e^-FLOOR * lam * d = d_lam * lam * exp(lam + FLOOR)
        # (-> 0, and exactly 0 rather than -inf * 0 for huge w).
        dlam_dw = tl.where(lam_raw >= -FLOOR_, lam_raw,
                           tl.where(lam_raw > -100.0, lam_raw * exp_(lam_raw + FLOOR_), 0.0))
        dw = zero_invalid(d_lam * dlam_dw, keep, FULL)
        dr = zero_invalid((dq_t + dr_s * to_mid[None, :]) * e_in, keep, FULL)
        da = zero_invalid((da_t + da_s * to_mid[None, :]) * e_ex, keep, FULL)
        dk = zero_invalid((dk_h + dk_bar * mid_to_end[None, :]) * e_inv, keep, FULL)
        db = zero_invalid((db_h + db_bar * mid_to_end[None, :]) * e_inv, keep, FULL)

        out = base + t.to(tl.int64)[:, None] * stride_t + kcol[None, :]
        inb_k = (t < T_n)[:, None]
        store_cast(dr_ptr + out, dr, inb_k, FULL)
        store_cast(dw_ptr + out, dw, inb_k, FULL)
        store_cast(dk_ptr + out, dk, inb_k, FULL)
        store_cast(da_ptr + out, da, inb_k, FULL)
        store_cast(db_ptr + out, db, inb_k, FULL)
