// The plain C++ interface between the CUDA kernels (gdr_kernels.cu, no PyTorch headers, fast to
// compile) and the PyTorch binding (gdr_binding.cpp).
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include <string>

namespace gdr {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Sizes and element strides shared by the six inputs, o, dy and the input gradients.
struct Problem {
  int B, T, H;
  long long sb, st, sh;
  const uint8_t* mask;   // [B, T] or null
};

struct FwdBuffers {
  const void *r, *w, *k, *v, *a, *b;
  void* o;
  const float* s0;             // [B or 1, H, K, K] or null
  long long s0_batch_stride;   // 0 when s0 broadcasts over the batch
  float* sT;                   // [B, H, K, K] or null
  float* ckpt;                 // [B, H, NC, K, K] or null
};

struct BwdBuffers {
  const void *r, *w, *k, *v, *a, *b, *dy;
  const float* ckpt;
  const float* dsT;            // or null (zero)
  void *dr, *dw, *dk, *dv, *da, *db;
  float* ds0;                  // [B, H, K, K] or null
};

// The head size this build was compiled for (-DGDR_HEAD_SIZE) and the kernels' shared memory.
int head_size();
size_t forward_shared_memory();
size_t backward_shared_memory();

// Launch on `stream`; return "" on success, else a message saying what went wrong.
std::string launch_forward(DType dtype, const Problem& problem, const FwdBuffers& buffers,
                           cudaStream_t stream);
std::string launch_backward(DType dtype, const Problem& problem, const BwdBuffers& buffers,
                            cudaStream_t stream);

}  // namespace gdr
