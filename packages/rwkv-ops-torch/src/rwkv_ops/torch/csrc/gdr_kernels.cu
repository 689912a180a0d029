// CUDA kernels of the chunked generalized delta rule, for one head size chosen at build time
// (-DGDR_HEAD_SIZE=K) and bf16 / fp16 / fp32 inputs; state, checkpoints and arithmetic are fp32.
// The maths lives in gdr_chunked.cuh, shared with the CPU emulation used by the tests.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "gdr_launch.h"

namespace gdr {
__device__ __forceinline__ float load_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load_value(__half x) { return __half2float(x); }
__device__ __forceinline__ void store_value(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void store_value(__half* p, float x) { *p = __float2half(x); }
}  // namespace gdr

#include "gdr_chunked.cuh"

#ifndef GDR_HEAD_SIZE
#error "build with -DGDR_HEAD_SIZE=32, 64 or 128"
#endif

namespace gdr {
namespace {

constexpr int kHeadSize = GDR_HEAD_SIZE;
using KDims = Dims<kHeadSize>;
constexpr size_t kFwdSmemBytes = sizeof(float) * FwdSmem<kHeadSize>::kFloats;
constexpr size_t kBwdSmemBytes = sizeof(float) * BwdSmem<kHeadSize>::kFloats;

// Runs one phase of a block program on every thread, then waits for the whole block.
template <class Regs>
struct BlockPhase {
  Regs regs;
  template <class F>
  __device__ __forceinline__ void operator()(F&& f) {
    f(static_cast<int>(threadIdx.x), regs);
    __syncthreads();
  }
};

// Grid: (H, B); one block per (batch, head).
template <typename In>
__global__ void __launch_bounds__(KDims::NT) gdr_fwd_kernel(const FwdParams<In> p) {
  extern __shared__ __align__(16) float smem[];
  BlockPhase<FwdRegs> phase;
  fwd_program<kHeadSize>(p, static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x), smem, phase);
}

template <typename In>
__global__ void __launch_bounds__(KDims::NT) gdr_bwd_kernel(const BwdParams<In> p) {
  extern __shared__ __align__(16) float smem[];
  BlockPhase<BwdRegs> phase;
  bwd_program<kHeadSize>(p, static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x), smem, phase);
}

std::string cuda_error(cudaError_t e, const char* what) {
  return std::string("rwkv-ops: ") + what + ": " + cudaGetErrorString(e);
}

// Opts the kernel into its dynamic shared memory (above the 48 KB default), saying clearly when the
// GPU offers less per block than the kernel needs. Cheap, but done once per device and kernel.
template <typename Kernel>
std::string prepare(Kernel kernel, size_t bytes, const char* what, bool* prepared) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return cuda_error(e, "cudaGetDevice");
  if (device < 64 && prepared[device]) return "";
  int optin = 0;
  e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return cuda_error(e, "cudaDeviceGetAttribute");
  if (static_cast<size_t>(optin) < bytes)
    return "rwkv-ops: the cuda " + std::string(what) + " kernel for K = " +
           std::to_string(kHeadSize) + " needs " + std::to_string(bytes) +
           " bytes of shared memory per block, this GPU offers " + std::to_string(optin) +
           "; use KERNEL_TYPE='triton' or 'native'";
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
  if (e != cudaSuccess) return cuda_error(e, "cudaFuncSetAttribute");
  if (device < 64) prepared[device] = true;
  return "";
}

template <typename In>
std::string forward(const Problem& pr, const FwdBuffers& bu, cudaStream_t stream) {
  static bool prepared[64] = {};
  std::string err = prepare(gdr_fwd_kernel<In>, kFwdSmemBytes, "forward", prepared);
  if (!err.empty()) return err;
  FwdParams<In> p{};
  p.r = static_cast<const In*>(bu.r);
  p.w = static_cast<const In*>(bu.w);
  p.k = static_cast<const In*>(bu.k);
  p.v = static_cast<const In*>(bu.v);
  p.a = static_cast<const In*>(bu.a);
  p.b = static_cast<const In*>(bu.b);
  p.o = static_cast<In*>(bu.o);
  p.mask = pr.mask;
  p.s0 = bu.s0;
  p.s0_batch_stride = bu.s0_batch_stride;
  p.sT = bu.sT;
  p.ckpt = bu.ckpt;
  p.B = pr.B;
  p.T = pr.T;
  p.H = pr.H;
  p.NC = (pr.T + L - 1) / L;
  p.sb = pr.sb;
  p.st = pr.st;
  p.sh = pr.sh;
  gdr_fwd_kernel<In><<<dim3(pr.H, pr.B), KDims::NT, kFwdSmemBytes, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cuda_error(e, "forward kernel launch");
}

template <typename In>
std::string backward(const Problem& pr, const BwdBuffers& bu, cudaStream_t stream) {
  static bool prepared[64] = {};
  std::string err = prepare(gdr_bwd_kernel<In>, kBwdSmemBytes, "backward", prepared);
  if (!err.empty()) return err;
  BwdParams<In> p{};
  p.r = static_cast<const In*>(bu.r);
  p.w = static_cast<const In*>(bu.w);
  p.k = static_cast<const In*>(bu.k);
  p.v = static_cast<const In*>(bu.v);
  p.a = static_cast<const In*>(bu.a);
  p.b = static_cast<const In*>(bu.b);
  p.dy = static_cast<const In*>(bu.dy);
  p.mask = pr.mask;
  p.ckpt = bu.ckpt;
  p.dsT = bu.dsT;
  p.dr = static_cast<In*>(bu.dr);
  p.dw = static_cast<In*>(bu.dw);
  p.dk = static_cast<In*>(bu.dk);
  p.dv = static_cast<In*>(bu.dv);
  p.da = static_cast<In*>(bu.da);
  p.db = static_cast<In*>(bu.db);
  p.ds0 = bu.ds0;
  p.B = pr.B;
  p.T = pr.T;
  p.H = pr.H;
  p.NC = (pr.T + L - 1) / L;
  p.sb = pr.sb;
  p.st = pr.st;
  p.sh = pr.sh;
  gdr_bwd_kernel<In><<<dim3(pr.H, pr.B), KDims::NT, kBwdSmemBytes, stream>>>(p);
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cuda_error(e, "backward kernel launch");
}

}  // namespace

int head_size() { return kHeadSize; }
size_t forward_shared_memory() { return kFwdSmemBytes; }
size_t backward_shared_memory() { return kBwdSmemBytes; }

std::string launch_forward(DType dtype, const Problem& problem, const FwdBuffers& buffers,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward<float>(problem, buffers, stream);
    case DType::kFloat16: return forward<__half>(problem, buffers, stream);
    case DType::kBFloat16: return forward<__nv_bfloat16>(problem, buffers, stream);
  }
  return "rwkv-ops: unsupported dtype";
}

std::string launch_backward(DType dtype, const Problem& problem, const BwdBuffers& buffers,
                            cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return backward<float>(problem, buffers, stream);
    case DType::kFloat16: return backward<__half>(problem, buffers, stream);
    case DType::kBFloat16: return backward<__nv_bfloat16>(problem, buffers, stream);
  }
  return "rwkv-ops: unsupported dtype";
}

}  // namespace gdr
