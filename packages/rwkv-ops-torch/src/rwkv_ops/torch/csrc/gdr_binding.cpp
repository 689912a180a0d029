// PyTorch binding of the chunked CUDA kernels (gdr_kernels.cu).
//
// cuda_launcher.py validates the user's call, makes the inputs contiguous, allocates every output
// and passes it in; the checks here only guard the raw entry points against misuse.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <utility>

#include "gdr_launch.h"

namespace gdr {
namespace {

constexpr int kChunk = 16;

struct Sizes {
  Problem problem;
  int K;
};

Sizes sizes_of(const at::Tensor& r, bool head_first) {
  TORCH_CHECK(r.is_cuda(), "rwkv-ops: the cuda kernels need CUDA tensors");
  TORCH_CHECK(r.dim() == 4 && r.stride(3) == 1,
              "rwkv-ops: expected rank-4 inputs with a contiguous last dimension");
  Sizes s{};
  s.K = static_cast<int>(r.size(3));
  TORCH_CHECK(s.K == head_size(), "rwkv-ops: this build of the cuda kernels is for K = ",
              head_size(), ", got K = ", s.K);
  Problem& p = s.problem;
  p.B = static_cast<int>(r.size(0));
  p.H = static_cast<int>(r.size(head_first ? 1 : 2));
  p.T = static_cast<int>(r.size(head_first ? 2 : 1));
  p.sb = r.stride(0);
  p.st = r.stride(head_first ? 2 : 1);
  p.sh = r.stride(head_first ? 1 : 2);
  p.mask = nullptr;
  return s;
}

DType dtype_of(const at::Tensor& r) {
  switch (r.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "rwkv-ops: the cuda kernels take float32, float16 or bfloat16 inputs");
  }
  return DType::kFloat32;
}

void check_like(const at::Tensor& x, const at::Tensor& r, const char* name) {
  TORCH_CHECK(x.device() == r.device() && x.scalar_type() == r.scalar_type() &&
                  x.sizes() == r.sizes() && x.strides() == r.strides(),
              "rwkv-ops: `", name, "` must have the device, dtype, shape and strides of `r`");
}

float* state_ptr(const c10::optional<at::Tensor>& s, const Sizes& z, const at::Tensor& r,
                 const char* name, bool allow_broadcast) {
  if (!s.has_value()) return nullptr;
  const at::Tensor& t = *s;
  const Problem& p = z.problem;
  TORCH_CHECK(t.device() == r.device() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.dim() == 4 && (t.size(0) == p.B || (allow_broadcast && t.size(0) == 1)) &&
                  t.size(1) == p.H && t.size(2) == z.K && t.size(3) == z.K,
              "rwkv-ops: `", name, "` must be a contiguous float32 [B, H, K, K] tensor on the device of `r`");
  return t.data_ptr<float>();
}

float* checkpoint_ptr(const at::Tensor& c, const Sizes& z, const at::Tensor& r) {
  const Problem& p = z.problem;
  const long long expected =
      static_cast<long long>(p.B) * p.H * ((p.T + kChunk - 1) / kChunk) * z.K * z.K;
  TORCH_CHECK(c.device() == r.device() && c.scalar_type() == at::kFloat && c.is_contiguous() &&
                  c.numel() == expected,
              "rwkv-ops: `checkpoints` must be a contiguous float32 [B, H, ceil(T/16), K, K] tensor");
  return c.data_ptr<float>();
}

const uint8_t* mask_ptr(const c10::optional<at::Tensor>& mask, const Problem& p, const at::Tensor& r) {
  if (!mask.has_value()) return nullptr;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == r.device() && m.scalar_type() == at::kByte && m.is_contiguous() &&
                  m.dim() == 2 && m.size(0) == p.B && m.size(1) == p.T,
              "rwkv-ops: `mask` must be a contiguous uint8 [B, T] tensor on the device of `r`");
  return m.data_ptr<uint8_t>();
}

}  // namespace

// Fills o and, when given, the final state sT and the per-chunk checkpoints (needed by backward).
void forward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
             const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& s0,
             const c10::optional<at::Tensor>& mask, bool head_first, const at::Tensor& o,
             const c10::optional<at::Tensor>& sT, const c10::optional<at::Tensor>& ckpt) {
  Sizes z = sizes_of(r, head_first);
  for (const auto& [x, name] : {std::pair{&w, "w"}, {&k, "k"}, {&v, "v"}, {&a, "a"}, {&b, "b"}, {&o, "o"}})
    check_like(*x, r, name);
  const c10::cuda::CUDAGuard guard(r.device());
  z.problem.mask = mask_ptr(mask, z.problem, r);
  FwdBuffers bu{};
  bu.r = r.data_ptr();
  bu.w = w.data_ptr();
  bu.k = k.data_ptr();
  bu.v = v.data_ptr();
  bu.a = a.data_ptr();
  bu.b = b.data_ptr();
  bu.o = o.data_ptr();
  bu.s0 = state_ptr(s0, z, r, "initial_state", true);
  bu.s0_batch_stride =
      (s0.has_value() && s0->size(0) == 1) ? 0 : static_cast<long long>(z.problem.H) * z.K * z.K;
  bu.sT = state_ptr(sT, z, r, "final_state", false);
  bu.ckpt = ckpt.has_value() ? checkpoint_ptr(*ckpt, z, r) : nullptr;
  if (z.problem.T == 0 || z.problem.B == 0 || z.problem.H == 0) return;
  const std::string err =
      launch_forward(dtype_of(r), z.problem, bu, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err.empty(), err);
}

// Fills dr..db (the inputs' layout and dtype) and, when given, ds0 [B, H, K, K] (per batch element,
// not summed over a broadcast initial state). dsT absent means a zero final-state gradient.
void backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& a, const at::Tensor& b, const at::Tensor& dy, const at::Tensor& ckpt,
              const c10::optional<at::Tensor>& dsT, const c10::optional<at::Tensor>& mask,
              bool head_first, const at::Tensor& dr, const at::Tensor& dw, const at::Tensor& dk,
              const at::Tensor& dv, const at::Tensor& da, const at::Tensor& db,
              const c10::optional<at::Tensor>& ds0) {
  Sizes z = sizes_of(r, head_first);
  for (const auto& [x, name] : {std::pair{&w, "w"}, {&k, "k"}, {&v, "v"}, {&a, "a"}, {&b, "b"},
                                {&dy, "do"}, {&dr, "dr"}, {&dw, "dw"}, {&dk, "dk"}, {&dv, "dv"},
                                {&da, "da"}, {&db, "db"}})
    check_like(*x, r, name);
  const c10::cuda::CUDAGuard guard(r.device());
  z.problem.mask = mask_ptr(mask, z.problem, r);
  BwdBuffers bu{};
  bu.r = r.data_ptr();
  bu.w = w.data_ptr();
  bu.k = k.data_ptr();
  bu.v = v.data_ptr();
  bu.a = a.data_ptr();
  bu.b = b.data_ptr();
  bu.dy = dy.data_ptr();
  bu.ckpt = checkpoint_ptr(ckpt, z, r);
  bu.dsT = state_ptr(dsT, z, r, "final_state gradient", false);
  bu.dr = dr.data_ptr();
  bu.dw = dw.data_ptr();
  bu.dk = dk.data_ptr();
  bu.dv = dv.data_ptr();
  bu.da = da.data_ptr();
  bu.db = db.data_ptr();
  bu.ds0 = state_ptr(ds0, z, r, "initial_state gradient", false);
  if (z.problem.T == 0 || z.problem.B == 0 || z.problem.H == 0) return;
  const std::string err =
      launch_backward(dtype_of(r), z.problem, bu, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err.empty(), err);
}

}  // namespace gdr

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rwkv-ops: chunked CUDA kernels of the RWKV-7 generalized delta rule";
  m.def("forward", &gdr::forward, "chunked forward; every output is passed in");
  m.def("backward", &gdr::backward, "chunked backward; every output is passed in");
  m.attr("head_size") = gdr::head_size();
  m.attr("forward_shared_memory") = gdr::forward_shared_memory();
  m.attr("backward_shared_memory") = gdr::backward_shared_memory();
}
