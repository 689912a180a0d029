// The chunked forward and backward of the RWKV-7 generalized delta rule, as block programs.
//
// One thread block owns one (batch, head) pair and walks its chunks of L = 16 steps (forward in
// order, backward in reverse), with the state S (V x K, fp32) in shared memory. The maths is that of
// rwkv_ops/numpy/native.py (mid-chunk anchoring, LAMBDA_FLOOR clamp) and ALGORITHM.md section 2; the
// backward is derived in the comments of bwd_program.
//
// A block program is a sequence of phases. Each phase is a lambda run by every thread of the block
// (argument `tid`), followed by a block-wide barrier. Between phases, data lives in shared memory or
// in the thread's own `Regs`. The same source therefore runs in two ways:
//   - on the GPU (gdr_kernels.cu): the phase runs once per thread, then __syncthreads();
//   - on the CPU (gdr_emulate.cpp, tests only): the phase runs for every tid in a shuffled order,
//     with one Regs per tid, so the program can be checked against the float64 reference without a
//     GPU, and a phase that reads what another thread writes in the same phase shows as a mismatch.
// Rules that keep both ways equal: no warp shuffles, no cross-thread communication inside a phase,
// and within a phase every shared-memory element is written by at most one thread and then not read
// by another.
//
// Measured on an H200 (B=8, T=4096, H=64, K=64, bf16): forward 5.6-6.2 ms, forward+backward 20.7 ms;
// both kernels are bound by shared-memory traffic and issue stalls on the fp32 CUDA cores (Nsight
// Compute: L1/shared throughput ~72-75%, ~53% of issue slots used). Tensor cores are the next step.
//
// Layouts (floats): [L][SK] per-chunk arrays (row = step, column = channel), [K][SK] matrices
// (row = value channel v, column = key channel n), [L][SL] chunk-local L x L matrices. The row
// padding keeps 16-byte loads of different rows on different shared-memory banks.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define GDR_FN __device__ __forceinline__
#define GDR_PRAGMA(x) _Pragma(#x)
#else
#define GDR_FN inline
#define GDR_PRAGMA(x)
#endif

// Largest head size whose backward keeps the chunk checkpoint in shared memory (a tuning knob).
#ifndef GDR_S0_IN_SMEM_MAX_K
#define GDR_S0_IN_SMEM_MAX_K 64
#endif

namespace gdr {

constexpr int L = 16;            // chunk length
constexpr int MID = L / 2 - 1;   // anchor step of the factorised decays
// lambda = -exp(w) is clamped at -LAMBDA_FLOOR so that no factor exp(+-sum of 8 lambdas) leaves the
// float32 range (exp(80) = 5.5e34). Decays below exp(-10) = 4.5e-5 act as 4.5e-5.
constexpr float LAMBDA_FLOOR = 10.0f;
// In shared memory lambda and its cumulative sums are kept in log2 units (lambda * log2(e)), so that
// every decay factor is one exp2f.
constexpr float LOG2E = 1.4426950408889634f;

template <int K>
struct Dims {
  static_assert(K % 32 == 0 && K >= 32 && K <= 128, "head size must be 32, 64 or 128");
  static constexpr int NT = 4 * K;      // threads per block
  static constexpr int SK = K + 4;      // row stride of [L][K] and [K][K] arrays
  static constexpr int SL = L + 4;      // row stride of [L][L] arrays
  static constexpr int LK = L * SK;
  static constexpr int VK = K * SK;
  static constexpr int LL = L * SL;
  static constexpr int UPDATE_ROWS = K / 16;   // state rows per thread in rank_update
  // The backward keeps the chunk's checkpoint in shared memory up to K = 64; at K = 128 it reads it
  // from global memory (L1/L2), so that the block fits in the 163 KB of an A100.
  static constexpr bool S0_IN_SMEM = K <= GDR_S0_IN_SMEM_MAX_K;
};

// ---------------------------------------------------------------------------------------------
// Small vector helpers (float4 on the GPU, plain floats on the CPU).

struct f4 {
  float x, y, z, w;
};

GDR_FN f4 ld4(const float* p) {
#if defined(__CUDA_ARCH__)
  const float4 t = *reinterpret_cast<const float4*>(p);
  return f4{t.x, t.y, t.z, t.w};
#else
  return f4{p[0], p[1], p[2], p[3]};
#endif
}

GDR_FN void st4(float* p, const f4& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(p) = make_float4(v.x, v.y, v.z, v.w);
#else
  p[0] = v.x;
  p[1] = v.y;
  p[2] = v.z;
  p[3] = v.w;
#endif
}

GDR_FN float fma4(float acc, const f4& a, const f4& b) {
  acc += a.x * b.x;
  acc += a.y * b.y;
  acc += a.z * b.z;
  acc += a.w * b.w;
  return acc;
}

GDR_FN float load_value(float x) { return x; }
GDR_FN void store_value(float* p, float x) { *p = x; }

// ---------------------------------------------------------------------------------------------
// Block-level building blocks. "Row-group mapping": thread tid owns column tid % K and the four
// rows 4 * (tid / K) .. +3 of an [L][K] result (NT = 4K threads cover L = 16 rows).

// The four chunk-local L x L products C_xy[i][j] = sum_n X_x[i][n] Y_y[j][n], lower triangle only:
// C00, C01 keep j <= i, C10, C11 keep j < i. The L(L+1)/2 pairs j <= i are packed onto consecutive
// threads (no idle lanes); entries above the diagonal are never computed (their factorised products
// may overflow) and stay 0 from zero_upper (a select, never inf * 0 = NaN).
template <int K>
GDR_FN void pair_products(int tid, const float* X0, const float* X1, const float* Y0,
                          const float* Y1, float* C00, float* C01, float* C10, float* C11) {
  using D = Dims<K>;
  for (int p = tid; p < L * (L + 1) / 2; p += D::NT) {
    int i = static_cast<int>((sqrtf(8.f * p + 1.f) - 1.f) * 0.5f);
    if ((i + 1) * (i + 2) / 2 <= p) ++i;
    if (i * (i + 1) / 2 > p) --i;
    const int j = p - i * (i + 1) / 2;
    float c00 = 0.f, c01 = 0.f, c10 = 0.f, c11 = 0.f;
    const float* x0 = X0 + i * D::SK;
    const float* x1 = X1 + i * D::SK;
    const float* y0 = Y0 + j * D::SK;
    const float* y1 = Y1 + j * D::SK;
    GDR_PRAGMA(unroll 4)
    for (int n = 0; n < K; n += 4) {
      const f4 a0 = ld4(x0 + n), a1 = ld4(x1 + n), b0 = ld4(y0 + n), b1 = ld4(y1 + n);
      c00 = fma4(c00, a0, b0);
      c01 = fma4(c01, a0, b1);
      c10 = fma4(c10, a1, b0);
      c11 = fma4(c11, a1, b1);
    }
    const int o = i * D::SL + j;
    C00[o] = c00;
    C01[o] = c01;
    C10[o] = j < i ? c10 : 0.f;
    C11[o] = j < i ? c11 : 0.f;
  }
}

// Zeroes the strict upper triangle of `count` consecutive L x L matrices starting at M (once per
// block: pair_products never writes there).
template <int K>
GDR_FN void zero_upper(int tid, float* M, int count) {
  using D = Dims<K>;
  for (int e = tid; e < count * L * L; e += D::NT) {
    const int m = e / (L * L), i = (e / L) % L, j = e % L;
    if (j > i) M[m * D::LL + i * D::SL + j] = 0.f;
  }
}

// acc[x][r] += sum_n X_x[i0 + r][n] * M[v][n]  (X M^T; row-group mapping with v = tid % K).
// M has row stride ldm and may live in shared or global memory.
template <int K, int NX>
GDR_FN void rows_times_mt(int tid, const float* const (&X)[NX], const float* M, int ldm,
                          float (&acc)[NX][4]) {
  using D = Dims<K>;
  const int v = tid % K, i0 = (tid / K) * 4;
  const float* m = M + v * ldm;
  GDR_PRAGMA(unroll 4)
  for (int n = 0; n < K; n += 4) {
    const f4 mv = ld4(m + n);
    GDR_PRAGMA(unroll)
    for (int x = 0; x < NX; ++x) {
      GDR_PRAGMA(unroll)
      for (int r = 0; r < 4; ++r) acc[x][r] = fma4(acc[x][r], ld4(X[x] + (i0 + r) * D::SK + n), mv);
    }
  }
}

// acc[x][r] += sum_v X_x[i0 + r][v] * M[v][n]  (X M; row-group mapping with n = tid % K).
template <int K, int NX>
GDR_FN void rows_times_m(int tid, const float* const (&X)[NX], const float* M, int ldm,
                         float (&acc)[NX][4]) {
  using D = Dims<K>;
  const int n = tid % K, i0 = (tid / K) * 4;
  GDR_PRAGMA(unroll 2)
  for (int v = 0; v < K; v += 4) {
    const f4 mv{M[v * ldm + n], M[(v + 1) * ldm + n], M[(v + 2) * ldm + n], M[(v + 3) * ldm + n]};
    GDR_PRAGMA(unroll)
    for (int x = 0; x < NX; ++x) {
      GDR_PRAGMA(unroll)
      for (int r = 0; r < 4; ++r) acc[x][r] = fma4(acc[x][r], ld4(X[x] + (i0 + r) * D::SK + v), mv);
    }
  }
}

// acc[r] += sum_j A[i0 + r][j] X[j][col]   (TRANS = false), or
// acc[r] += sum_j A[j][i0 + r] X[j][col]   (TRANS = true); A is L x L lower triangular (only
// j <= i0 + 3, resp. j >= i0, can be non-zero; i0 is uniform across a warp), X is [L][K].
template <int K, bool TRANS>
GDR_FN void lmul(int tid, const float* A, const float* X, float (&acc)[4]) {
  using D = Dims<K>;
  const int col = tid % K, i0 = (tid / K) * 4;
  if constexpr (!TRANS) {
    GDR_PRAGMA(unroll)
    for (int j = 0; j < L; j += 4) {
      if (j > i0) continue;
      const f4 xv{X[j * D::SK + col], X[(j + 1) * D::SK + col], X[(j + 2) * D::SK + col],
                  X[(j + 3) * D::SK + col]};
      GDR_PRAGMA(unroll)
      for (int r = 0; r < 4; ++r) acc[r] = fma4(acc[r], ld4(A + (i0 + r) * D::SL + j), xv);
    }
  } else {
    GDR_PRAGMA(unroll)
    for (int j = 0; j < L; ++j) {
      if (j < i0) continue;
      const float x = X[j * D::SK + col];
      const f4 a = ld4(A + j * D::SL + i0);
      acc[0] += a.x * x;
      acc[1] += a.y * x;
      acc[2] += a.z * x;
      acc[3] += a.w * x;
    }
  }
}

// M[v][n] = M[v][n] * Dv[n] + (sum_i X0[i][v] Y0[i][n] + X1[i][v] Y1[i][n]) * sc[n]
// (sc = 1 unless SCALED). Each thread owns UPDATE_ROWS rows x 4 columns of M.
template <int K, bool SCALED>
GDR_FN void rank_update(int tid, float* M, const float* Dv, const float* X0, const float* Y0,
                        const float* X1, const float* Y1, const float* sc) {
  using D = Dims<K>;
  constexpr int R = D::UPDATE_ROWS;
  const int n = (tid % (K / 4)) * 4, v0 = (tid / (K / 4)) * R;
  float acc[R][4];
  GDR_PRAGMA(unroll)
  for (int q = 0; q < R; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;
  GDR_PRAGMA(unroll 4)
  for (int i = 0; i < L; ++i) {
    const f4 y0 = ld4(Y0 + i * D::SK + n), y1 = ld4(Y1 + i * D::SK + n);
    float x0[R], x1[R];
    if constexpr (R % 4 == 0) {
      GDR_PRAGMA(unroll)
      for (int q = 0; q < R; q += 4) {
        const f4 a = ld4(X0 + i * D::SK + v0 + q), b = ld4(X1 + i * D::SK + v0 + q);
        x0[q] = a.x; x0[q + 1] = a.y; x0[q + 2] = a.z; x0[q + 3] = a.w;
        x1[q] = b.x; x1[q + 1] = b.y; x1[q + 2] = b.z; x1[q + 3] = b.w;
      }
    } else {
      GDR_PRAGMA(unroll)
      for (int q = 0; q < R; ++q) {
        x0[q] = X0[i * D::SK + v0 + q];
        x1[q] = X1[i * D::SK + v0 + q];
      }
    }
    GDR_PRAGMA(unroll)
    for (int q = 0; q < R; ++q) {
      acc[q][0] += x0[q] * y0.x;
      acc[q][1] += x0[q] * y0.y;
      acc[q][2] += x0[q] * y0.z;
      acc[q][3] += x0[q] * y0.w;
      acc[q][0] += x1[q] * y1.x;
      acc[q][1] += x1[q] * y1.y;
      acc[q][2] += x1[q] * y1.z;
      acc[q][3] += x1[q] * y1.w;
    }
  }
  const f4 d = ld4(Dv + n);
  f4 s{1.f, 1.f, 1.f, 1.f};
  if constexpr (SCALED) s = ld4(sc + n);
  GDR_PRAGMA(unroll)
  for (int q = 0; q < R; ++q) {
    float* m = M + (v0 + q) * D::SK + n;
    f4 mv = ld4(m);
    mv.x = mv.x * d.x + acc[q][0] * s.x;
    mv.y = mv.y * d.y + acc[q][1] * s.y;
    mv.z = mv.z * d.z + acc[q][2] * s.z;
    mv.w = mv.w * d.w + acc[q][3] * s.w;
    st4(m, mv);
  }
}

// Column `col` of X <- (I - A)^-1 X, A strictly lower triangular (forward substitution).
template <int K>
GDR_FN void solve_lower(int col, float* X, const float* A) {
  using D = Dims<K>;
  float x[L];
  GDR_PRAGMA(unroll)
  for (int i = 0; i < L; ++i) x[i] = X[i * D::SK + col];
  GDR_PRAGMA(unroll)
  for (int i = 1; i < L; ++i) {
    float s = x[i];
    GDR_PRAGMA(unroll)
    for (int j = 0; j < i; ++j) s += A[i * D::SL + j] * x[j];
    x[i] = s;
  }
  GDR_PRAGMA(unroll)
  for (int i = 0; i < L; ++i) X[i * D::SK + col] = x[i];
}

// Column `col` of X <- (I - A)^-T X (back substitution with the transpose).
template <int K>
GDR_FN void solve_upper_t(int col, float* X, const float* A) {
  using D = Dims<K>;
  float x[L];
  GDR_PRAGMA(unroll)
  for (int i = 0; i < L; ++i) x[i] = X[i * D::SK + col];
  GDR_PRAGMA(unroll)
  for (int i = L - 2; i >= 0; --i) {
    float s = x[i];
    GDR_PRAGMA(unroll)
    for (int j = i + 1; j < L; ++j) s += A[j * D::SL + i] * x[j];
    x[i] = s;
  }
  GDR_PRAGMA(unroll)
  for (int i = 0; i < L; ++i) X[i * D::SK + col] = x[i];
}

// ---------------------------------------------------------------------------------------------
// Parameters. The six inputs (and o, dy and the input gradients) share one layout, given by element
// strides: [B, T, H, K] has sb = T*H*K, st = H*K, sh = K; [B, H, T, K] has sb = H*T*K, sh = T*K,
// st = K. States are contiguous fp32 [.., K, K] with S[v][n] at v * K + n.

template <typename In>
struct FwdParams {
  const In *r, *w, *k, *v, *a, *b;
  In* o;
  const uint8_t* mask;         // [B, T], nonzero = real token; null = no mask
  const float* s0;             // [B or 1, H, K, K]; null = zeros
  long long s0_batch_stride;   // 0 broadcasts one state over the batch
  float* sT;                   // [B, H, K, K]; null = not wanted
  float* ckpt;                 // [B, H, NC, K, K], the state entering each chunk; null = inference
  int B, T, H, NC;
  long long sb, st, sh;
};

template <typename In>
struct BwdParams {
  const In *r, *w, *k, *v, *a, *b, *dy;
  const uint8_t* mask;
  const float* ckpt;           // from the forward
  const float* dsT;            // gradient of the final state; null = zero
  In *dr, *dw, *dk, *dv, *da, *db;
  float* ds0;                  // [B, H, K, K]; null = not wanted
  int B, T, H, NC;
  long long sb, st, sh;
};

template <typename P>
GDR_FN bool step_valid(const P& p, int b, int t) {
  return t < p.T && (p.mask == nullptr || p.mask[(long long)b * p.T + t] != 0);
}

// Loads step i of chunk c for the threads' elements: raw r, k, a, b, v and lambda (clamped, log2);
// padding (mask 0) and steps past T become identity steps: lambda = 0 and r = k = v = a = b = 0.
template <int K, typename P>
GDR_FN void load_chunk(const P& p, int tid, int b, long long base, int t0, float* R, float* W,
                       float* Kk, float* V, float* A, float* Bb) {
  using D = Dims<K>;
  for (int e = tid; e < L * K; e += D::NT) {
    const int i = e / K, n = e % K, t = t0 + i, o = i * D::SK + n;
    float r = 0.f, lam = 0.f, k = 0.f, v = 0.f, a = 0.f, bb = 0.f;
    if (step_valid(p, b, t)) {
      const long long off = base + (long long)t * p.st + n;
      r = load_value(p.r[off]);
      lam = fmaxf(-expf(load_value(p.w[off])), -LAMBDA_FLOOR) * LOG2E;
      k = load_value(p.k[off]);
      v = load_value(p.v[off]);
      a = load_value(p.a[off]);
      bb = load_value(p.b[off]);
    }
    R[o] = r;
    W[o] = lam;
    Kk[o] = k;
    V[o] = v;
    A[o] = a;
    Bb[o] = bb;
  }
}

// Cumulative log2 decays Lam_i = sum_{t <= i} lambda_t of column n, from the raw lambdas in LAM
// (which stay raw): Lam_MID, Lam_{L-1}, and Lam_i, Lam_{i-1} of the four rows the thread owns:
// rows sel, sel + 4, sel + 8, sel + 12 (elementwise mapping, CONTIGUOUS = false) or rows
// 4 sel .. 4 sel + 3 (row-group mapping, CONTIGUOUS = true). Every thread sums its column itself
// (16 loads) instead of waiting for a serial cumsum phase.
template <int K, bool CONTIGUOUS>
GDR_FN void column_cumsum(const float* LAM, int n, int sel, float (&li)[4], float (&lp)[4],
                          float& lm, float& le) {
  using D = Dims<K>;
  float run = 0.f;
  GDR_PRAGMA(unroll)
  for (int i = 0; i < L; ++i) {
    const float prev = run;
    run += LAM[i * D::SK + n];
    if (i == MID) lm = run;
    if ((CONTIGUOUS ? (i >> 2) : (i & 3)) == sel) {
      li[CONTIGUOUS ? (i & 3) : (i >> 2)] = run;
      lp[CONTIGUOUS ? (i & 3) : (i >> 2)] = prev;
    }
  }
  le = run;
}

// Per channel n: LM = Lam_MID, LE = Lam_{L-1}, CM = 2^LM, CE = 2^(LE - LM), DD = 2^LE (the decay
// over the whole chunk).
GDR_FN void chunk_vectors(int n, float lm, float le, float* LM, float* LE, float* CM, float* CE,
                          float* DD) {
  LM[n] = lm;
  LE[n] = le;
  CM[n] = exp2f(lm);
  CE[n] = exp2f(le - lm);
  DD[n] = exp2f(le);
}

// Global [K][K] -> shared [K][SK]; src = null gives zeros. Scalar global loads: a user's state
// tensor may be a view that is not 16-byte aligned.
template <int K>
GDR_FN void copy_state_in(int tid, float* dst, const float* src) {
  using D = Dims<K>;
  for (int e = tid; e < K * K; e += D::NT) {
    const int v = e / K, n = e % K;
    dst[v * D::SK + n] = src ? src[e] : 0.f;
  }
}

// Shared [K][SK] -> global [K][K] (buffers allocated by the launcher, 16-byte aligned).
template <int K>
GDR_FN void copy_state_out(int tid, float* dst, const float* src) {
  using D = Dims<K>;
  for (int e = tid; e < K * K / 4; e += D::NT) {
    const int v = e / (K / 4), n = (e % (K / 4)) * 4;
    st4(dst + v * K + n, ld4(src + v * D::SK + n));
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.
//
// Per chunk, with Lam the in-chunk cumulative log decay and m = MID:
//   q~ = r e^(Lam_i - Lam_m), a~ = a e^(Lam_{i-1} - Lam_m), k^ = k e^(Lam_m - Lam_i), b^ likewise,
//   r_s = r e^(Lam_i), a_s = a e^(Lam_{i-1}), k_bar = k e^(Lam_L - Lam_i), b_bar likewise;
//   A_qk = tril(q~ k^T), A_qb = tril(q~ b^T), A_ak = tril_(a~ k^T), A_ab = tril_(a~ b^T);
//   U = (I - A_ab)^-1 (A_ak V + a_s S^T)      (rows u_i = S_{i-1} a_i)
//   Y = r_s S^T + A_qk V + A_qb U
//   S <- S diag(e^Lam_L) + U^T b_bar + V^T k_bar

template <int K>
struct FwdSmem {
  using D = Dims<K>;
  static constexpr int kFloats = D::VK + 9 * D::LK + 4 * D::LL + 5 * K;
  float *S, *LAM, *QT, *AT, *KH, *BH, *RS, *AS, *VV, *UU, *Aqk, *Aqb, *Aak, *Aab, *LM, *LE, *CM,
      *CE, *DD;
  GDR_FN explicit FwdSmem(float* p) {
    S = p;   p += D::VK;
    LAM = p; p += D::LK;
    QT = p;  p += D::LK;
    AT = p;  p += D::LK;
    KH = p;  p += D::LK;
    BH = p;  p += D::LK;
    RS = p;  p += D::LK;   // r_s, then k_bar
    AS = p;  p += D::LK;   // a_s, then b_bar
    VV = p;  p += D::LK;
    UU = p;  p += D::LK;
    Aqk = p; p += D::LL;
    Aqb = p; p += D::LL;
    Aak = p; p += D::LL;
    Aab = p; p += D::LL;
    LM = p;  p += K;
    LE = p;  p += K;
    CM = p;  p += K;
    CE = p;  p += K;
    DD = p;
  }
};

struct FwdRegs {
  float r[4];   // a_s S^T, rows of U before the solve
  float y[4];   // r_s S^T, rows of Y
};

template <int K, typename In, class Phase>
GDR_FN void fwd_program(const FwdParams<In>& p, const int b, const int h, float* smem,
                        Phase& phase) {
  using D = Dims<K>;
  constexpr int SK = D::SK;
  const FwdSmem<K> sm(smem);
  const long long base = (long long)b * p.sb + (long long)h * p.sh;
  const long long state = ((long long)b * p.H + h) * K * K;

  phase([&](int tid, FwdRegs&) {
    copy_state_in<K>(tid, sm.S,
                     p.s0 ? p.s0 + (long long)b * p.s0_batch_stride + (long long)h * K * K
                          : nullptr);
    zero_upper<K>(tid, sm.Aqk, 4);
  });

  for (int c = 0; c < p.NC; ++c) {
    const int t0 = c * L;
    phase([&](int tid, FwdRegs&) {
      if (p.ckpt) copy_state_out<K>(tid, p.ckpt + state * p.NC + (long long)c * K * K, sm.S);
      load_chunk<K>(p, tid, b, base, t0, sm.QT, sm.LAM, sm.KH, sm.VV, sm.AT, sm.BH);
    });
    phase([&](int tid, FwdRegs&) {
      const int n = tid % K, g = tid / K;
      float li[4], lp[4], lm = 0.f, le = 0.f;
      column_cumsum<K, false>(sm.LAM, n, g, li, lp, lm, le);
      if (g == 0) chunk_vectors(n, lm, le, sm.LM, sm.LE, sm.CM, sm.CE, sm.DD);
      GDR_PRAGMA(unroll)
      for (int q = 0; q < 4; ++q) {
        const int o = (g + 4 * q) * SK + n;
        const float r = sm.QT[o], a = sm.AT[o], inv = exp2f(lm - li[q]);
        sm.QT[o] = r * exp2f(li[q] - lm);
        sm.RS[o] = r * exp2f(li[q]);
        sm.AT[o] = a * exp2f(lp[q] - lm);
        sm.AS[o] = a * exp2f(lp[q]);
        sm.KH[o] *= inv;
        sm.BH[o] *= inv;
      }
    });
    phase([&](int tid, FwdRegs& rg) {
      pair_products<K>(tid, sm.QT, sm.AT, sm.KH, sm.BH, sm.Aqk, sm.Aqb, sm.Aak, sm.Aab);
      const float* X[2] = {sm.AS, sm.RS};
      float acc[2][4] = {};
      rows_times_mt<K, 2>(tid, X, sm.S, SK, acc);
      for (int r = 0; r < 4; ++r) {
        rg.r[r] = acc[0][r];
        rg.y[r] = acc[1][r];
      }
    });
    phase([&](int tid, FwdRegs& rg) {
      const int v = tid % K, i0 = (tid / K) * 4;
      float acc[4] = {rg.r[0], rg.r[1], rg.r[2], rg.r[3]};
      lmul<K, false>(tid, sm.Aak, sm.VV, acc);
      for (int r = 0; r < 4; ++r) sm.UU[(i0 + r) * SK + v] = acc[r];
      // k_bar = k^ e^(Lam_L - Lam_m): both factors are finite and the product is <= |k|.
      for (int e = tid; e < L * K; e += D::NT) {
        const int i = e / K, n = e % K, o = i * SK + n;
        sm.RS[o] = sm.KH[o] * sm.CE[n];
        sm.AS[o] = sm.BH[o] * sm.CE[n];
      }
    });
    phase([&](int tid, FwdRegs&) {
      if (tid < K) solve_lower<K>(tid, sm.UU, sm.Aab);
    });
    phase([&](int tid, FwdRegs& rg) {
      const int v = tid % K, i0 = (tid / K) * 4;
      float acc[4] = {rg.y[0], rg.y[1], rg.y[2], rg.y[3]};
      lmul<K, false>(tid, sm.Aqk, sm.VV, acc);
      lmul<K, false>(tid, sm.Aqb, sm.UU, acc);
      for (int r = 0; r < 4; ++r) {
        const int t = t0 + i0 + r;
        if (t < p.T)
          store_value(p.o + base + (long long)t * p.st + v, step_valid(p, b, t) ? acc[r] : 0.f);
      }
      rank_update<K, false>(tid, sm.S, sm.DD, sm.UU, sm.AS, sm.VV, sm.RS, nullptr);
    });
  }

  if (p.sT) phase([&](int tid, FwdRegs&) { copy_state_out<K>(tid, p.sT + state, sm.S); });
}

// ---------------------------------------------------------------------------------------------
// Backward.
//
// G is the gradient of the state at the end of the chunk (dS_T for the last one). Per chunk, after
// recomputing the forward quantities from the checkpoint S0:
//   dU = b_bar G^T + A_qb^T dY;     dR = (I - A_ab)^-T dU
//   dV = k_bar G^T + A_qk^T dY + A_ak^T dR
//   dA_qk = tril(dY V^T), dA_qb = tril(dY U^T), dA_ak = tril_(dR V^T), dA_ab = tril_(dR U^T)
//   dq~ = dA_qk k^ + dA_qb b^,  da~ = dA_ak k^ + dA_ab b^
//   dk^ = dA_qk^T q~ + dA_ak^T a~,  db^ = dA_qb^T q~ + dA_ab^T a~
//   dr_s = dY S0, da_s = dR S0, db_bar = U G, dk_bar = V G
//   dr = dq~ e^(Lam_i - Lam_m) + dr_s e^Lam_i, and likewise for a, k, b
//   G <- G diag(e^Lam_L) + (dY^T q~ + dR^T a~) diag(e^Lam_m)      (= dS0)
// The decay gradient: every scaled operand x~ = x e^E gives d/dE = dx~ * x~. Collected per step as
// coefficients of Lam_i (c_i), of Lam_{i-1} (h_i), of Lam_m (mu_i) and of Lam_L (eps_i, plus
// e^Lam_L colsum(S0 * G)), then dlambda_t = sum over the Lam_j that contain lambda_t, and
// dw = dlambda * lambda. Where lambda was clamped, dw keeps the chain rule of the unclamped decay
// (dL/dd is nearly constant near d = 0): dw = dlambda * lambda_w * e^(lambda_w + FLOOR).

template <int K>
struct BwdSmem {
  using D = Dims<K>;
  static constexpr int kFloats =
      (D::S0_IN_SMEM ? 2 : 1) * D::VK + 9 * D::LK + 8 * D::LL + 5 * K + 16 * K;
  float *S0, *G, *LAM, *QT, *AT, *KH, *BH, *VV, *UU, *DY, *DR, *Aqk, *Aqb, *Aak, *Aab, *dAqk,
      *dAqb, *dAak, *dAab, *LM, *LE, *CM, *CE, *DD, *GD, *CH, *MU, *EP;
  GDR_FN explicit BwdSmem(float* p) {
    S0 = nullptr;
    if (D::S0_IN_SMEM) { S0 = p; p += D::VK; }
    G = p;    p += D::VK;
    LAM = p;  p += D::LK;
    QT = p;   p += D::LK;
    AT = p;   p += D::LK;
    KH = p;   p += D::LK;
    BH = p;   p += D::LK;
    VV = p;   p += D::LK;
    UU = p;   p += D::LK;   // a_s, then U
    DY = p;   p += D::LK;   // k_bar, then dY
    DR = p;   p += D::LK;   // b_bar, then dU, then dR
    Aqk = p;  p += D::LL;
    Aqb = p;  p += D::LL;
    Aak = p;  p += D::LL;
    Aab = p;  p += D::LL;
    dAqk = p; p += D::LL;
    dAqb = p; p += D::LL;
    dAak = p; p += D::LL;
    dAab = p; p += D::LL;
    LM = p;   p += K;
    LE = p;   p += K;
    CM = p;   p += K;
    CE = p;   p += K;
    DD = p;   p += K;
    GD = p;   p += 4 * K;   // per row group: partial colsum(S0 * G)
    CH = p;   p += 4 * K;   // per row group: sum of c_i + h_i
    MU = p;   p += 4 * K;   // per row group: sum of mu_i
    EP = p;                 // per row group: sum of eps_i
  }
};

struct BwdRegs {
  float r[4];    // a_s S0^T
  float du[4];   // b_bar G^T
  float dv[4];   // k_bar G^T
  float c[4];    // coefficients of Lam_i of the thread's rows
  float h[4];    // coefficients of Lam_{i-1}
};

template <int K, typename In, class Phase>
GDR_FN void bwd_program(const BwdParams<In>& p, const int b, const int h, float* smem,
                        Phase& phase) {
  using D = Dims<K>;
  constexpr int SK = D::SK;
  const BwdSmem<K> sm(smem);
  const long long base = (long long)b * p.sb + (long long)h * p.sh;
  const long long state = ((long long)b * p.H + h) * K * K;

  phase([&](int tid, BwdRegs&) {
    copy_state_in<K>(tid, sm.G, p.dsT ? p.dsT + state : nullptr);
    zero_upper<K>(tid, sm.Aqk, 8);
  });

  for (int c = p.NC - 1; c >= 0; --c) {
    const int t0 = c * L;
    const float* ck = p.ckpt + state * p.NC + (long long)c * K * K;
    const float* S0 = D::S0_IN_SMEM ? sm.S0 : ck;
    const int ldS0 = D::S0_IN_SMEM ? SK : K;

    phase([&](int tid, BwdRegs&) {
      if (D::S0_IN_SMEM) copy_state_in<K>(tid, sm.S0, ck);
      load_chunk<K>(p, tid, b, base, t0, sm.QT, sm.LAM, sm.KH, sm.VV, sm.AT, sm.BH);
    });
    phase([&](int tid, BwdRegs&) {
      const int n = tid % K, g = tid / K;
      float li[4], lp[4], lm = 0.f, le = 0.f;
      column_cumsum<K, false>(sm.LAM, n, g, li, lp, lm, le);
      if (g == 0) chunk_vectors(n, lm, le, sm.LM, sm.LE, sm.CM, sm.CE, sm.DD);
      GDR_PRAGMA(unroll)
      for (int q = 0; q < 4; ++q) {
        const int o = (g + 4 * q) * SK + n;
        const float r = sm.QT[o], a = sm.AT[o], k = sm.KH[o], bb = sm.BH[o];
        const float inv = exp2f(lm - li[q]), tail = exp2f(le - li[q]);
        sm.QT[o] = r * exp2f(li[q] - lm);
        sm.AT[o] = a * exp2f(lp[q] - lm);
        sm.KH[o] = k * inv;
        sm.BH[o] = bb * inv;
        sm.UU[o] = a * exp2f(lp[q]);   // a_s
        sm.DY[o] = k * tail;          // k_bar
        sm.DR[o] = bb * tail;         // b_bar
      }
    });
    phase([&](int tid, BwdRegs& rg) {
      pair_products<K>(tid, sm.QT, sm.AT, sm.KH, sm.BH, sm.Aqk, sm.Aqb, sm.Aak, sm.Aab);
      {
        const float* X[1] = {sm.UU};
        float acc[1][4] = {};
        rows_times_mt<K, 1>(tid, X, S0, ldS0, acc);
        for (int r = 0; r < 4; ++r) rg.r[r] = acc[0][r];
      }
      {
        const float* X[2] = {sm.DR, sm.DY};
        float acc[2][4] = {};
        rows_times_mt<K, 2>(tid, X, sm.G, SK, acc);
        for (int r = 0; r < 4; ++r) {
          rg.du[r] = acc[0][r];
          rg.dv[r] = acc[1][r];
        }
      }
      {
        // Partial colsum(S0 * G) over a quarter of the rows; summed (and scaled by DD) in the dw phase.
        const int n = tid % K, g = tid / K;
        float s = 0.f;
        GDR_PRAGMA(unroll 4)
        for (int v = g * (K / 4); v < (g + 1) * (K / 4); ++v) s += S0[v * ldS0 + n] * sm.G[v * SK + n];
        sm.GD[g * K + n] = s;
      }
    });
    phase([&](int tid, BwdRegs& rg) {
      const int v = tid % K, i0 = (tid / K) * 4;
      // This thread's column of dY, straight from global memory (the dY buffer still held k_bar
      // during the previous phase); it also writes its own four rows of the shared copy.
      float dyc[L];
      GDR_PRAGMA(unroll)
      for (int j = 0; j < L; ++j) {
        const int t = t0 + j;
        dyc[j] = step_valid(p, b, t) ? load_value(p.dy[base + (long long)t * p.st + v]) : 0.f;
      }
      float acc[4] = {rg.r[0], rg.r[1], rg.r[2], rg.r[3]};
      lmul<K, false>(tid, sm.Aak, sm.VV, acc);
      float du[4] = {rg.du[0], rg.du[1], rg.du[2], rg.du[3]};
      GDR_PRAGMA(unroll)
      for (int j = 0; j < L; ++j) {
        if (j < i0) continue;
        const f4 a = ld4(sm.Aqb + j * D::SL + i0);
        du[0] += a.x * dyc[j];
        du[1] += a.y * dyc[j];
        du[2] += a.z * dyc[j];
        du[3] += a.w * dyc[j];
        if (j < i0 + 4) sm.DY[j * SK + v] = dyc[j];
      }
      for (int r = 0; r < 4; ++r) {
        sm.UU[(i0 + r) * SK + v] = acc[r];
        sm.DR[(i0 + r) * SK + v] = du[r];
      }
    });
    phase([&](int tid, BwdRegs&) {
      if (tid < K)
        solve_lower<K>(tid, sm.UU, sm.Aab);
      else if (tid < 2 * K)
        solve_upper_t<K>(tid - K, sm.DR, sm.Aab);
    });
    phase([&](int tid, BwdRegs& rg) {
      const int v = tid % K, i0 = (tid / K) * 4;
      float acc[4] = {rg.dv[0], rg.dv[1], rg.dv[2], rg.dv[3]};
      lmul<K, true>(tid, sm.Aqk, sm.DY, acc);
      lmul<K, true>(tid, sm.Aak, sm.DR, acc);
      for (int r = 0; r < 4; ++r) {
        const int t = t0 + i0 + r;
        if (t < p.T)
          store_value(p.dv + base + (long long)t * p.st + v, step_valid(p, b, t) ? acc[r] : 0.f);
      }
      pair_products<K>(tid, sm.DY, sm.DR, sm.VV, sm.UU, sm.dAqk, sm.dAqb, sm.dAak, sm.dAab);
    });
    phase([&](int tid, BwdRegs& rg) {
      const int n = tid % K, g = tid / K, i0 = g * 4;
      float s0p[2][4] = {}, gp[2][4] = {};
      {
        const float* X[2] = {sm.DY, sm.DR};
        rows_times_m<K, 2>(tid, X, S0, ldS0, s0p);   // dr_s, da_s
      }
      {
        const float* X[2] = {sm.UU, sm.VV};
        rows_times_m<K, 2>(tid, X, sm.G, SK, gp);    // db_bar, dk_bar
      }
      float dq[4] = {}, dat[4] = {}, dkh[4] = {}, dbh[4] = {};
      lmul<K, false>(tid, sm.dAqk, sm.KH, dq);
      lmul<K, false>(tid, sm.dAqb, sm.BH, dq);
      lmul<K, false>(tid, sm.dAak, sm.KH, dat);
      lmul<K, false>(tid, sm.dAab, sm.BH, dat);
      lmul<K, true>(tid, sm.dAqk, sm.QT, dkh);
      lmul<K, true>(tid, sm.dAak, sm.AT, dkh);
      lmul<K, true>(tid, sm.dAqb, sm.QT, dbh);
      lmul<K, true>(tid, sm.dAab, sm.AT, dbh);
      const float cm = sm.CM[n], ce = sm.CE[n];
      float lis[4], lps[4], lm = 0.f, le = 0.f;
      column_cumsum<K, true>(sm.LAM, n, g, lis, lps, lm, le);
      float ch = 0.f, mu = 0.f, ep = 0.f;
      GDR_PRAGMA(unroll)
      for (int r = 0; r < 4; ++r) {
        const int i = i0 + r, o = i * SK + n, t = t0 + i;
        const float li = lis[r], lp = lps[r];
        const float qt = sm.QT[o], at = sm.AT[o], kh = sm.KH[o], bh = sm.BH[o];
        const float e_mk = exp2f(lm - li), e_ek = exp2f(le - li);
        const float drs = s0p[0][r], das = s0p[1][r], dbb = gp[0][r], dkb = gp[1][r];
        if (t < p.T) {
          const bool ok = step_valid(p, b, t);
          const long long off = base + (long long)t * p.st + n;
          store_value(p.dr + off, ok ? dq[r] * exp2f(li - lm) + drs * exp2f(li) : 0.f);
          store_value(p.da + off, ok ? dat[r] * exp2f(lp - lm) + das * exp2f(lp) : 0.f);
          store_value(p.dk + off, ok ? dkh[r] * e_mk + dkb * e_ek : 0.f);
          store_value(p.db + off, ok ? dbh[r] * e_mk + dbb * e_ek : 0.f);
        }
        // Scale factors are applied to the operand first: q~ * e^Lam_m = r_s is <= |r|.
        const float g_qt = dq[r] * qt, g_rs = drs * (qt * cm);
        const float g_at = dat[r] * at, g_as = das * (at * cm);
        const float g_kh = dkh[r] * kh, g_bh = dbh[r] * bh;
        const float g_kb = dkb * (kh * ce), g_bb = dbb * (bh * ce);
        rg.c[r] = g_qt + g_rs - g_kh - g_bh - g_kb - g_bb;
        rg.h[r] = g_at + g_as;
        ch += rg.c[r] + rg.h[r];
        mu += g_kh + g_bh - g_qt - g_at;
        ep += g_kb + g_bb;
      }
      sm.CH[g * K + n] = ch;
      sm.MU[g * K + n] = mu;
      sm.EP[g * K + n] = ep;
    });
    phase([&](int tid, BwdRegs& rg) {
      const int n = tid % K, g = tid / K, i0 = g * 4;
      float later = 0.f, mu = 0.f, ep = 0.f, gd = 0.f;
      for (int q = 0; q < 4; ++q) {
        if (q > g) later += sm.CH[q * K + n];
        mu += sm.MU[q * K + n];
        ep += sm.EP[q * K + n];
        gd += sm.GD[q * K + n];
      }
      ep += gd * sm.DD[n];
      float sc = 0.f, sh = 0.f;
      GDR_PRAGMA(unroll)
      for (int r = 3; r >= 0; --r) {
        const int i = i0 + r, t = t0 + i;
        sc += rg.c[r];
        const float dlam = sc + sh + later + ep + (i <= MID ? mu : 0.f);
        sh += rg.h[r];
        if (t < p.T) {
          float dw = 0.f;
          if (step_valid(p, b, t)) {
            const long long off = base + (long long)t * p.st + n;
            const float lam = -expf(load_value(p.w[off]));
            if (lam >= -LAMBDA_FLOOR) {
              dw = dlam * lam;
            } else {
              const float e = expf(lam + LAMBDA_FLOOR);
              dw = e > 0.f ? dlam * lam * e : 0.f;
            }
          }
          store_value(p.dw + base + (long long)t * p.st + n, dw);
        }
      }
      rank_update<K, true>(tid, sm.G, sm.DD, sm.DY, sm.QT, sm.DR, sm.AT, sm.CM);
    });
  }

  if (p.ds0) phase([&](int tid, BwdRegs&) { copy_state_out<K>(tid, p.ds0 + state, sm.G); });
}

}  // namespace gdr
