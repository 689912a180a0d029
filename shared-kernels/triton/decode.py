"""Triton decode step (T = 1) of the RWKV-7 generalized delta rule: one pass over the fp32 state.

Per (batch, head), with S the V x K state (rows are value channels; ALGORITHM.md section 6)::

    d = exp(-exp(w)),   u = S a,   S' = S diag(d) + u b^T + v k^T,   y = S' r

Rows of S are independent given the K-side vectors, so the grid runs over (batch * head) x
(V tiles of BV rows): each program loads its [BV, K] rows once, forms u and y as row dot products
(in-warp reductions, no barriers, no tensor cores: one step is ~1 FLOP per byte, pure bandwidth)
and writes S' and its BV outputs. No transposes, no copies, no scratch memory.

Signature order (shared with jax-triton, which passes arrays, then scalars, then outputs): the
seven inputs, then the two outputs, then compile-time constants; there are no runtime scalars,
every size follows from the grid. ``s_out_ptr`` may alias ``s_ptr`` (in-place update): each element
of S is read and written by one program only, and read before it is written. Every element of both
outputs is written.

Memory layout: the six vectors contiguous per (batch, head) at offset ``(b * H + h) * K`` (true of
contiguous [B, 1, H, K] and [B, H, 1, K] alike), y the same, S and S' contiguous [B, H, K, K].
"""

import triton
import triton.language as tl

# Head sizes the decode kernel is tuned and tested for (powers of two: tl.arange needs them).
DECODE_HEAD_SIZES = (32, 64, 128)


def decode_config(K: int) -> tuple:
    """(BV, num_warps) for head size K: a [BV, K] fp32 tile of 1024 elements (4 KB) per program.

    Measured on an H200 (16-step CUDA graph, us per step, B=32): K=64, H=64 (floor 15.7):
    BV=16/4 warps 17.1, BV=64/4 warps 16.8 (best), BV=16/2 warps 19.0, BV=4/any 22-50;
    K=32, H=128 (floor 7.9): BV=32/4 warps 8.9; K=128, H=32 (floor 31.4): BV=8/2 warps 36.4,
    BV=8/4 warps 39.5. The small tile keeps B * H * K / BV programs in flight, so small batches
    still spread over every SM.
    """
    bv = max(1, min(K, 1024 // K))
    return bv, (2 if K >= 128 else 4)


@triton.jit
def decode_kernel(
    r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, s_ptr,
    o_ptr, s_out_ptr,
    K: tl.constexpr, BV: tl.constexpr,
):
    """Grid: (B * H * (K // BV),).

    r..b: [B*H, K] rows (any float dtype). s: [B*H, K, K] fp32 state. o: [B*H, K] (r's dtype).
    s_out: [B*H, K, K] fp32, may be ``s`` itself.
    """
    NV: tl.constexpr = K // BV
    pid = tl.program_id(0)
    bh = (pid // NV).to(tl.int64)
    vb = pid % NV
    cols = tl.arange(0, K)
    vrow = vb * BV + tl.arange(0, BV)
    vec = bh * K

    w = tl.load(w_ptr + vec + cols).to(tl.float32)
    # w = -inf gives exp(w) = 0 and d = 1 exactly; huge w gives exp(w) = inf and d = 0 (no NaN)
    d = tl.exp(-tl.exp(w))
    kk = tl.load(k_ptr + vec + cols).to(tl.float32)
    aa = tl.load(a_ptr + vec + cols).to(tl.float32)
    bb = tl.load(b_ptr + vec + cols).to(tl.float32)
    rr = tl.load(r_ptr + vec + cols).to(tl.float32)
    vv = tl.load(v_ptr + vec + vrow).to(tl.float32)

    tile = bh * (K * K) + vrow[:, None] * K + cols[None, :]
    # the state is touched once: stream it past the cache
    S = tl.load(s_ptr + tile, eviction_policy="evict_first").to(tl.float32)
    u = tl.sum(S * aa[None, :], axis=1)
    S = S * d[None, :] + u[:, None] * bb[None, :] + vv[:, None] * kk[None, :]
    y = tl.sum(S * rr[None, :], axis=1)
    tl.store(s_out_ptr + tile, S.to(s_out_ptr.dtype.element_ty), eviction_policy="evict_first")
    tl.store(o_ptr + vec + vrow, y.to(o_ptr.dtype.element_ty))
