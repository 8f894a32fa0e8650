// CUDA backend of the two-layer ops: the shared drivers of two_layer_aten.h (cuBLAS GEMMs
// through ATen on bounded tiles, one stream) with the CUDA elementwise steps of
// two_layer_kernels.cu. Every entry point sets the device guard and the matmul precision
// (no silent TF32). Kept in a .cpp (host compiler) so the kernels stay torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "../precision.h"
#include "../two_layer_aten.h"
#include "cuda_check.h"
#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace {

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
void activate_cuda_typed(int64_t act, const ActivateArgs& args) {
  LF_CUDA_CHECK(cuda::two_layer_activate<T>(activate_params<T>(args), static_cast<int>(act), current_stream()));
}

void activate_cuda(int64_t act, const ActivateArgs& args) {
  TORCH_CHECK(args.z.is_cuda(), "lazyfast: two-layer CUDA kernel got a tensor on ", args.z.device());
  LF_DISPATCH_FLOAT(args.z, "z (activate step)", "two_layer_activate_cuda",
                    [&] { activate_cuda_typed<scalar_t>(act, args); });
}

template <typename T>
void combine_cuda_typed(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& p, const at::Tensor& g,
                        const at::Tensor& q, bool bias, double s2) {
  LF_CUDA_CHECK(cuda::gram_combine<T>(combine_params<T>(out, out2, p, g, q, bias, s2), current_stream()));
}

void combine_cuda(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& p, const at::Tensor& g,
                  const at::Tensor& q, bool bias, double s2) {
  LF_DISPATCH_FLOAT(out, "out (Gram epilogue)", "two_layer_combine_cuda",
                    [&] { combine_cuda_typed<scalar_t>(out, out2, p, g, q, bias, s2); });
}

template <typename T>
void sym_finalize_cuda_typed(const at::Tensor& out, int64_t i0, int64_t ib, const at::Tensor& g,
                             const at::Tensor& qd, bool bias, double s2) {
  LF_CUDA_CHECK(cuda::sym_trace_finalize<T>(sym_finalize_params<T>(out, i0, ib, g, qd, bias, s2), current_stream()));
}

void sym_finalize_cuda(const at::Tensor& out, int64_t i0, int64_t ib, const at::Tensor& g, const at::Tensor& qd,
                       bool bias, double s2) {
  LF_DISPATCH_FLOAT(out, "out (symmetric trace finalize)", "two_layer_sym_finalize_cuda",
                    [&] { sym_finalize_cuda_typed<scalar_t>(out, i0, ib, g, qd, bias, s2); });
}

TwoLayerBackend cuda_backend() {
  TwoLayerBackend be;
  be.activate = &activate_cuda;
  be.combine = &combine_cuda;
  be.sym_finalize = &sym_finalize_cuda;
  be.parallel_tiles = false;  // one stream walks the tiles; the GEMMs are large
  be.default_workspace_bytes = kTwoLayerCudaGramWorkspaceBytes;  // 512 MiB unless the knob is set
  return be;
}

// x1: (n1, d), x2: (n2, d) or None, A: (m, d), c: (m,) or None, B: (k, m) -> (n1, n2) | (n1, n2, k, k)
at::Tensor two_layer_ntk_cuda(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                              const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                              int64_t activation, bool full) {
  check_op_tensors("two_layer_ntk", c10::DeviceType::CUDA, {{"x1", x1}, {"x2", x2}, {"A", A}, {"c", c}, {"B", B}});
  const c10::cuda::CUDAGuard guard(A.device());
  const CudaMatmulPrecisionGuard precision;
  return two_layer_ntk_aten(cuda_backend(), x1, x2, A, c, B, scale, activation, full);
}

// x: (n, d), dA: (T, m, d), dc: (T, m), dB: (T, k, m) (each optional) -> (T, n, k)
at::Tensor two_layer_jvp_cuda(const at::Tensor& x, const at::Tensor& A, const std::optional<at::Tensor>& c,
                              const at::Tensor& B, double scale, int64_t activation,
                              const std::optional<at::Tensor>& dA, const std::optional<at::Tensor>& dc,
                              const std::optional<at::Tensor>& dB) {
  check_op_tensors("two_layer_jvp", c10::DeviceType::CUDA,
                   {{"x", x}, {"A", A}, {"c", c}, {"B", B}, {"dA", dA}, {"dc", dc}, {"dB", dB}});
  const c10::cuda::CUDAGuard guard(A.device());
  const CudaMatmulPrecisionGuard precision;
  return two_layer_jvp_aten(&activate_cuda, x, A, c, B, scale, activation, dA, dc, dB);
}

// x: (n, d), r: (n, k) -> dA (m, d), dc (m,), dB (k, m)
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_layer_vjp_cuda(const at::Tensor& x, const at::Tensor& A,
                                                                  const std::optional<at::Tensor>& c,
                                                                  const at::Tensor& B, double scale,
                                                                  int64_t activation, const at::Tensor& r) {
  check_op_tensors("two_layer_vjp", c10::DeviceType::CUDA, {{"x", x}, {"A", A}, {"c", c}, {"B", B}, {"r", r}});
  const c10::cuda::CUDAGuard guard(A.device());
  const CudaMatmulPrecisionGuard precision;
  return two_layer_vjp_aten(&activate_cuda, x, A, c, B, scale, activation, r);
}

// x1: (n1, d), x2: (n2, d) or None, v: (n2, k) -> (n1, k)
at::Tensor two_layer_ntk_vp_cuda(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                                 const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                                 int64_t activation, const at::Tensor& v) {
  check_op_tensors("two_layer_ntk_vp", c10::DeviceType::CUDA,
                   {{"x1", x1}, {"x2", x2}, {"A", A}, {"c", c}, {"B", B}, {"v", v}});
  const c10::cuda::CUDAGuard guard(A.device());
  const CudaMatmulPrecisionGuard precision;
  return two_layer_ntk_vp_aten(&activate_cuda, x1, x2, A, c, B, scale, activation, v);
}

void register_two_layer_cuda(torch::Library& m) {
  m.impl("two_layer_ntk", &two_layer_ntk_cuda);
  m.impl("two_layer_jvp", &two_layer_jvp_cuda);
  m.impl("two_layer_vjp", &two_layer_vjp_cuda);
  m.impl("two_layer_ntk_vp", &two_layer_ntk_vp_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) { register_two_layer_cuda(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CUDA, register_two_layer_cuda)

}  // namespace lazyfast
