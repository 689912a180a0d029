// CPU emulation of the CUDA block programs in gdr_chunked.cuh, for tests on machines without a GPU.
//
// Each phase runs for every thread id in a fresh random order, with one register set per thread;
// shared memory and registers start as NaN, so an element read before it is written, or a phase
// that depends on the order of its threads, shows up as a wrong or NaN result. float32 only.
// Built with a plain C++17 compiler into a shared library and called through ctypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "gdr_chunked.cuh"

namespace {

template <class Regs>
struct EmulatedBlock {
  std::vector<Regs> regs;
  std::vector<int> order;
  std::mt19937 rng;

  EmulatedBlock(int threads, unsigned seed) : regs(threads), order(threads), rng(seed) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (auto& r : regs) {
      float* f = reinterpret_cast<float*>(&r);
      std::fill(f, f + sizeof(Regs) / sizeof(float), nan);
    }
    for (int i = 0; i < threads; ++i) order[i] = i;
  }

  template <class F>
  void operator()(F&& f) {
    std::shuffle(order.begin(), order.end(), rng);
    for (int tid : order) f(tid, regs[tid]);
  }
};

struct Strides {
  long long sb, st, sh;
};

Strides strides(int T, int H, int K, int head_first) {
  if (head_first) return {(long long)H * T * K, (long long)K, (long long)T * K};
  return {(long long)T * H * K, (long long)H * K, (long long)K};
}

template <int K>
void forward(const float* const* in, float* o, const uint8_t* mask, const float* s0, int s0_batch,
             float* sT, float* ckpt, int B, int T, int H, int head_first, unsigned seed) {
  gdr::FwdParams<float> p{};
  p.r = in[0]; p.w = in[1]; p.k = in[2]; p.v = in[3]; p.a = in[4]; p.b = in[5];
  p.o = o;
  p.mask = mask;
  p.s0 = s0;
  p.s0_batch_stride = s0_batch == 1 ? 0 : (long long)H * K * K;
  p.sT = sT;
  p.ckpt = ckpt;
  p.B = B; p.T = T; p.H = H; p.NC = (T + gdr::L - 1) / gdr::L;
  const Strides s = strides(T, H, K, head_first);
  p.sb = s.sb; p.st = s.st; p.sh = s.sh;
  std::vector<float> smem(gdr::FwdSmem<K>::kFloats);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
      EmulatedBlock<gdr::FwdRegs> block(gdr::Dims<K>::NT, seed + 7919u * (b * H + h));
      gdr::fwd_program<K>(p, b, h, smem.data(), block);
    }
  }
}

template <int K>
void backward(const float* const* in, const float* dy, const uint8_t* mask, const float* ckpt,
              const float* dsT, float* const* grads, float* ds0, int B, int T, int H,
              int head_first, unsigned seed) {
  gdr::BwdParams<float> p{};
  p.r = in[0]; p.w = in[1]; p.k = in[2]; p.v = in[3]; p.a = in[4]; p.b = in[5];
  p.dy = dy;
  p.mask = mask;
  p.ckpt = ckpt;
  p.dsT = dsT;
  p.dr = grads[0]; p.dw = grads[1]; p.dk = grads[2]; p.dv = grads[3]; p.da = grads[4];
  p.db = grads[5];
  p.ds0 = ds0;
  p.B = B; p.T = T; p.H = H; p.NC = (T + gdr::L - 1) / gdr::L;
  const Strides s = strides(T, H, K, head_first);
  p.sb = s.sb; p.st = s.st; p.sh = s.sh;
  std::vector<float> smem(gdr::BwdSmem<K>::kFloats);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      std::fill(smem.begin(), smem.end(), std::numeric_limits<float>::quiet_NaN());
      EmulatedBlock<gdr::BwdRegs> block(gdr::Dims<K>::NT, seed + 104729u * (b * H + h));
      gdr::bwd_program<K>(p, b, h, smem.data(), block);
    }
  }
}

}  // namespace

extern "C" {

// Bytes of dynamic shared memory of the CUDA forward (which = 0) or backward (which = 1) kernel.
long long gdr_shared_memory_bytes(int K, int which) {
  switch (K) {
    case 32: return 4LL * (which ? gdr::BwdSmem<32>::kFloats : gdr::FwdSmem<32>::kFloats);
    case 64: return 4LL * (which ? gdr::BwdSmem<64>::kFloats : gdr::FwdSmem<64>::kFloats);
    case 128: return 4LL * (which ? gdr::BwdSmem<128>::kFloats : gdr::FwdSmem<128>::kFloats);
    default: return -1;
  }
}

// in: r, w, k, v, a, b (float32, contiguous, [B, T, H, K] or [B, H, T, K]); mask [B, T] or null;
// s0 [s0_batch, H, K, K] or null; sT [B, H, K, K] or null; ckpt [B, H, NC, K, K] or null.
// Returns 0, or -1 for an unsupported K.
int gdr_emulate_forward(int K, const float* const* in, float* o, const uint8_t* mask,
                        const float* s0, int s0_batch, float* sT, float* ckpt, int B, int T, int H,
                        int head_first, unsigned seed) {
  switch (K) {
    case 32: forward<32>(in, o, mask, s0, s0_batch, sT, ckpt, B, T, H, head_first, seed); return 0;
    case 64: forward<64>(in, o, mask, s0, s0_batch, sT, ckpt, B, T, H, head_first, seed); return 0;
    case 128: forward<128>(in, o, mask, s0, s0_batch, sT, ckpt, B, T, H, head_first, seed); return 0;
    default: return -1;
  }
}

// grads: dr, dw, dk, dv, da, db (layout of the inputs); ds0 [B, H, K, K] or null.
int gdr_emulate_backward(int K, const float* const* in, const float* dy, const uint8_t* mask,
                         const float* ckpt, const float* dsT, float* const* grads, float* ds0,
                         int B, int T, int H, int head_first, unsigned seed) {
  switch (K) {
    case 32: backward<32>(in, dy, mask, ckpt, dsT, grads, ds0, B, T, H, head_first, seed); return 0;
    case 64: backward<64>(in, dy, mask, ckpt, dsT, grads, ds0, B, T, H, head_first, seed); return 0;
    case 128: backward<128>(in, dy, mask, ckpt, dsT, grads, ds0, B, T, H, head_first, seed); return 0;
    default: return -1;
  }
}

}  // extern "C"
