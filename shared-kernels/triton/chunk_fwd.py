"""Triton forward of the RWKV-7 generalized delta rule (chunked, WY form; ALGORITHM.md s.2, s.7).

One program owns BV value rows of the state S (V x K) of one (batch, head) over one segment of
chunks, and walks the segment's chunks in order. Rows of S are independent once the chunk's K-side
L x L matrices are known, so every program recomputes those (cheap tensor-core work) and the V
split multiplies the independent work per (batch, head) by K / BV.

Per chunk (L = 16 steps), with S0 the rows entering the chunk::

    U = N (A_ak V + a_s S0^T)             N = (I - A_ab)^-1, rows u_i = S_{i-1} a_i
    Y = r_s S0^T + A_qk V + A_qb U
    S_L = S0 diag(exp(Lam_end)) + V^T k_bar + U^T b_bar

``chunk_fwd_kernel`` runs in two modes:

* ``LOCAL=False``: the ordinary forward from a given initial state (one per segment); writes y,
  optionally the fp32 state entering every chunk (checkpoints for the backward) and the final state.
* ``LOCAL=True``: the first pass of the segment algebra: for every segment, the state reached from
  zero (``S_loc``, rows 0..K-1, program blocks 0..NV-1) and the segment's transition matrix
  ``M = G_1 ... G_n`` (from S = I with v = 0, program blocks NV..2NV-1), so that
  ``S_out = S_in M + S_loc``. ``state_combine_kernel`` then chains the segments.

Kernel signature order (shared with JAX): input pointers, output pointers, then scalars/constexprs.
"""

import triton
import triton.language as tl

from .chunk_common import L_, chunk_log_decays, load_tile, step_validity, unit_lower_inverse


@triton.jit(do_not_specialize=["T", "H", "BH", "NC", "CPS"])
def chunk_fwd_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, mask_ptr, init_ptr,
    y_ptr, ckpt_ptr, send_ptr, mend_ptr,
    T, H, BH, NC, CPS,
    stride_b, stride_t, stride_h,
    init_sb, init_sh, init_ss,
    send_sbh, send_ss,
    K: tl.constexpr, BV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr, LOCAL: tl.constexpr,
    WRITE_Y: tl.constexpr, SAVE_CKPT: tl.constexpr, WRITE_END: tl.constexpr,
    PREC: tl.constexpr,
):
    """Grid: (n_blocks * BH * n_segments,), n_blocks = K // BV (2 K // BV when LOCAL).

    r..b: [B, T, H, K] addressed by (stride_b, stride_t, stride_h), unit stride over K.
    mask: [B, T] (0 = padding) when HAS_MASK. init: rows of the state entering each segment at
    init + b * init_sb + h * init_sh + segment * init_ss (fp32 or any float; [K, K] row-major).
    y: like r. ckpt: [B*H, NC, K, K] fp32 (state entering each chunk) when SAVE_CKPT.
    send / mend: the end state (and in LOCAL mode the transition M) at
    ptr + bh * send_sbh + segment * send_ss, [K, K] fp32.
    """
    NV: tl.constexpr = K // BV
    NB: tl.constexpr = 2 * NV if LOCAL else NV
    pid = tl.program_id(0)
    blk = pid % NB
    bh = (pid // NB) % BH
    seg = pid // (NB * BH)
    b = bh // H
    h = bh % H
    is_m = blk >= NV
    vb = blk % NV

    rows = tl.arange(0, L_)
    cols = tl.arange(0, K)
    vrow = vb * BV + tl.arange(0, BV)
    vcol = vb * BV + tl.arange(0, BV)
    incl = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]

    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    rp = r_ptr + base
    wp = w_ptr + base
    kp = k_ptr + base
    vp = v_ptr + base
    ap = a_ptr + base
    bp = b_ptr + base
    mp = mask_ptr + b.to(tl.int64) * T
    tile = vrow[:, None] * K + cols[None, :]

    if HAS_INIT:
        ip = init_ptr + b.to(tl.int64) * init_sb + h.to(tl.int64) * init_sh + seg.to(tl.int64) * init_ss
        S = tl.load(ip + tile).to(tl.float32)
    else:
        S = tl.zeros([BV, K], dtype=tl.float32)
    if LOCAL:
        # blocks of M start from the identity's rows; blocks of S_loc from zero
        eye = tl.where(vrow[:, None] == cols[None, :], 1.0, 0.0)
        S = tl.where(is_m, eye, tl.zeros([BV, K], dtype=tl.float32))
    v_scale = tl.where(is_m, 0.0, 1.0)

    c_lo = seg * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for c in range(c_lo, c_hi):
        t = c * L_ + rows
        valid = step_validity(mp, t, T, HAS_MASK)
        w = load_tile(wp, t, T, cols, stride_t)
        lam_in, lam_ex, lam_mid, lam_end = chunk_log_decays(w, valid)
        e_in = tl.exp(lam_in - lam_mid[None, :])
        e_ex = tl.exp(lam_ex - lam_mid[None, :])
        e_inv = tl.exp(lam_mid[None, :] - lam_in)
        to_mid = tl.exp(lam_mid)
        mid_to_end = tl.exp(lam_end - lam_mid)
        decay_end = tl.exp(lam_end)

        kk = tl.where(valid[:, None], load_tile(kp, t, T, cols, stride_t), 0.0)
        aa = tl.where(valid[:, None], load_tile(ap, t, T, cols, stride_t), 0.0)
        bb = load_tile(bp, t, T, cols, stride_t)
        vv = load_tile(vp, t, T, vcol, stride_t)
        if LOCAL:
            vv = vv * v_scale

        a_t = aa * e_ex
        k_h = kk * e_inv
        b_h = bb * e_inv
        a_s = a_t * to_mid[None, :]
        k_bar = k_h * mid_to_end[None, :]
        b_bar = b_h * mid_to_end[None, :]
        # pair products carry exactly the decay between their steps; entries above the diagonal
        # may overflow and are selected away, never multiplied by 0
        A_ak = tl.where(strict, tl.dot(a_t, tl.trans(k_h), input_precision=PREC), 0.0)
        A_ab = tl.where(strict, tl.dot(a_t, tl.trans(b_h), input_precision=PREC), 0.0)
        N = unit_lower_inverse(A_ab)

        if SAVE_CKPT:
            cp = ckpt_ptr + (bh.to(tl.int64) * NC + c) * K * K
            tl.store(cp + tile, S)

        X = tl.dot(A_ak, vv, input_precision=PREC)
        X = tl.dot(a_s, tl.trans(S), X, input_precision=PREC)
        U = tl.dot(N, X, input_precision=PREC)

        if WRITE_Y:
            rr = load_tile(rp, t, T, cols, stride_t)
            q_t = rr * e_in
            r_s = q_t * to_mid[None, :]
            A_qk = tl.where(incl, tl.dot(q_t, tl.trans(k_h), input_precision=PREC), 0.0)
            A_qb = tl.where(incl, tl.dot(q_t, tl.trans(b_h), input_precision=PREC), 0.0)
            Y = tl.dot(r_s, tl.trans(S), input_precision=PREC)
            Y = tl.dot(A_qk, vv, Y, input_precision=PREC)
            Y = tl.dot(A_qb, U, Y, input_precision=PREC)
            Y = tl.where(valid[:, None], Y, 0.0)
            yp = y_ptr + base + t[:, None] * stride_t + vcol[None, :]
            tl.store(yp, Y.to(y_ptr.dtype.element_ty), mask=(t < T)[:, None])

        S = S * decay_end[None, :]
        S = tl.dot(tl.trans(vv), k_bar, S, input_precision=PREC)
        S = tl.dot(tl.trans(U), b_bar, S, input_precision=PREC)

    if WRITE_END:
        ep = bh.to(tl.int64) * send_sbh + seg.to(tl.int64) * send_ss + tile
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
    pid = tl.program_id(0)
    vb = pid % NV
    bh = pid // NV
    b = bh // H
    h = bh % H
    cols = tl.arange(0, K)
    vrow = vb * BV + tl.arange(0, BV)
    tile = vrow[:, None] * K + cols[None, :]
    full = cols[:, None] * K + cols[None, :]
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
        M = tl.load(m_ptr + off + full)
        loc = tl.load(loc_ptr + off + tile)
        if REVERSE:
            X = tl.dot(X, tl.trans(M), loc, input_precision="ieee")
        else:
            X = tl.dot(X, M, loc, input_precision="ieee")
