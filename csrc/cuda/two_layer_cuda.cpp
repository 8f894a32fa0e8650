// Torch glue of the CUDA two-layer ops. The Gram uses the fused tiled kernels of
// two_layer_kernels.cu (chunked over m, accumulating Theta tiles on chip); the
// JVP / VJP / NTK.v use the shared chunked drivers (two_layer_aten.h: cuBLAS
// GEMMs through ATen on bounded tiles) with the CUDA activate kernel.
// Kept in a .cpp (host compiler) so the kernels stay torch-free.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../two_layer_aten.h"
#include "cuda_check.h"
#include "lazyfast/cuda_launch.h"

namespace lazyfast {
namespace {

// Device memory the Gram may use for the k-major chunk features: 4x the driver
// workspace (512 MiB by default; LAZYFAST_TWO_LAYER_WORKSPACE_BYTES scales it).
inline int64_t gram_feature_bytes() { return 4 * two_layer_workspace_bytes(); }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
void activate_cuda_typed(int64_t act, const ActivateArgs& args) {
  LF_CUDA_CHECK(cuda::two_layer_activate<T>(activate_params<T>(args), static_cast<int>(act), current_stream()));
}

void activate_cuda(int64_t act, const ActivateArgs& args) {
  TORCH_CHECK(args.z.is_cuda(), "lazyfast: two-layer CUDA kernel got a tensor on ", args.z.device());
  if (args.z.scalar_type() == at::kDouble) {
    activate_cuda_typed<double>(act, args);
  } else {
    activate_cuda_typed<float>(act, args);
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
void features(const at::Tensor& x, const at::Tensor& A, const at::Tensor& c, int64_t c0, int64_t len,
              const at::Tensor& w, at::Tensor phiT, at::Tensor sigT, int64_t act) {
  TwoLayerFeatureParams<T> p;
  p.n = x.size(0);
  p.d = x.size(1);
  p.mc = len;
  p.x = x.data_ptr<T>();
  p.A = A.data_ptr<T>() + c0 * A.size(1);
  p.bias = c.defined() ? c.data_ptr<T>() + c0 : nullptr;
  p.w = w.defined() ? w.data_ptr<T>() + c0 : nullptr;
  p.phiT = ptr_or_null<T>(phiT);
  p.sigT = ptr_or_null<T>(sigT);
  p.ld = x.size(0);
  LF_CUDA_CHECK(cuda::two_layer_features<T>(p, static_cast<int>(act), current_stream()));
}

// x1 (n1, d), x2 (n2, d) [same tensor when sym], out (n1, n2) or (n1, n2, k, k).
template <typename T>
void gram_cuda_typed(const at::Tensor& x1, const at::Tensor& x2, bool sym, const at::Tensor& A, const at::Tensor& c,
                     const at::Tensor& B, double scale, int64_t act, bool full, at::Tensor& out) {
  const int64_t n1 = x1.size(0), n2 = x2.size(0), m = A.size(0), k = B.size(0);
  const int64_t tile = cuda::two_layer_gram_tile_rows<T>();
  // Buffers: Phi and Sigma~ per side, k-major; full mode keeps a separate unweighted Sigma'2.
  const int64_t per_neuron = static_cast<int64_t>(sizeof(T)) * (2 * n1 + ((sym && !full) ? 0 : 2 * n2));
  int64_t mc = std::max<int64_t>(tile, gram_feature_bytes() / std::max<int64_t>(per_neuron, 1));
  mc = std::min(mc, m);
  const auto opts = x1.options();
  at::Tensor phi1 = at::empty({mc, n1}, opts), sig1 = at::empty({mc, n1}, opts);
  at::Tensor phi2 = sym ? phi1 : at::empty({mc, n2}, opts);
  at::Tensor sig2 = (sym && !full) ? sig1 : at::empty({mc, n2}, opts);
  at::Tensor sw, wpair;
  if (!full) sw = (B * B).mean(0).sqrt_().contiguous();
  if (full) {
    const int64_t npair = k * (k + 1) / 2;
    wpair = at::empty({npair, m}, opts);
    int64_t p = 0;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = a; b < k; ++b) wpair[p++].copy_(B[a] * B[b]);
  }
  const cudaStream_t stream = current_stream();
  TwoLayerGramParams<T> prm;
  prm.n1 = n1;
  prm.n2 = n2;
  prm.d = x1.size(1);
  prm.phi1 = phi1.data_ptr<T>();
  prm.sig1 = sig1.data_ptr<T>();
  prm.ld1 = n1;
  prm.phi2 = phi2.data_ptr<T>();
  prm.sig2 = sig2.data_ptr<T>();
  prm.ld2 = n2;
  prm.x1 = x1.data_ptr<T>();
  prm.x2 = x2.data_ptr<T>();
  prm.scale2 = static_cast<T>(scale * scale);
  prm.bias = c.defined();
  prm.upper_only = sym;
  for (int64_t c0 = 0; c0 < m; c0 += mc) {
    const int64_t len = std::min(mc, m - c0);
    prm.mc = len;
    if (!full) {
      features<T>(x1, A, c, c0, len, sw, phi1, sig1, act);
      if (!sym) features<T>(x2, A, c, c0, len, sw, phi2, sig2, act);
      prm.out = out.data_ptr<T>();
      prm.out_mirror = nullptr;
      prm.out_rs = n2;
      prm.out_cs = 1;
      prm.with_p = true;
      LF_CUDA_CHECK(cuda::two_layer_gram_chunk<T>(prm, stream));
      continue;
    }
    // Full mode: side 2 unweighted once per chunk; side 1 weighted by B_a B_b per pair.
    features<T>(x2, A, c, c0, len, at::Tensor(), sym ? at::Tensor() : phi2, sig2, act);
    int64_t p = 0;
    for (int64_t a = 0; a < k; ++a) {
      for (int64_t b = a; b < k; ++b, ++p) {
        features<T>(x1, A, c, c0, len, wpair[p], (a == b) ? phi1 : at::Tensor(), sig1, act);
        prm.out = out.data_ptr<T>() + a * k + b;
        prm.out_mirror = (a == b) ? nullptr : out.data_ptr<T>() + b * k + a;
        prm.out_rs = n2 * k * k;
        prm.out_cs = k * k;
        prm.with_p = (a == b);
        LF_CUDA_CHECK(cuda::two_layer_gram_chunk<T>(prm, stream));
      }
    }
  }
  if (sym) LF_CUDA_CHECK(cuda::two_layer_mirror<T>(out.data_ptr<T>(), n1, full ? k : 1, stream));
}

// x1: (n1, d), x2: (n2, d) or None, A: (m, d), c: (m,) or None, B: (k, m) -> (n1, n2) | (n1, n2, k, k)
at::Tensor two_layer_ntk_cuda(const at::Tensor& x1_in, const std::optional<at::Tensor>& x2_in, const at::Tensor& A_in,
                              const std::optional<at::Tensor>& c_in, const at::Tensor& B_in, double scale,
                              int64_t activation, bool full) {
  const char* op = "two_layer_ntk";
  check_two_layer_weights(A_in, c_in, B_in, scale, activation, op);
  check_two_layer_input(x1_in, A_in, "x1", op);
  if (x2_in.has_value()) check_two_layer_input(*x2_in, A_in, "x2", op);
  TORCH_CHECK(A_in.is_cuda(), "lazyfast: two_layer_ntk (CUDA) got A on ", A_in.device());
  const c10::cuda::CUDAGuard guard(A_in.device());
  const at::Tensor x1 = x1_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  const bool sym = !x2_in.has_value();
  const at::Tensor x2 = sym ? x1 : x2_in->contiguous();
  const at::Tensor c = c_in.has_value() ? c_in->contiguous() : at::Tensor();
  const int64_t n1 = x1.size(0), n2 = x2.size(0), k = B.size(0);
  at::Tensor out = full ? at::zeros({n1, n2, k, k}, x1.options()) : at::zeros({n1, n2}, x1.options());
  if (n1 == 0 || n2 == 0 || A.size(0) == 0) return out;
  if (x1.scalar_type() == at::kDouble) {
    gram_cuda_typed<double>(x1, x2, sym, A, c, B, scale, activation, full, out);
  } else {
    gram_cuda_typed<float>(x1, x2, sym, A, c, B, scale, activation, full, out);
  }
  return out;
}

// x: (n, d), dA: (T, m, d), dc: (T, m), dB: (T, k, m) (each optional) -> (T, n, k)
at::Tensor two_layer_jvp_cuda(const at::Tensor& x, const at::Tensor& A, const std::optional<at::Tensor>& c,
                              const at::Tensor& B, double scale, int64_t activation,
                              const std::optional<at::Tensor>& dA, const std::optional<at::Tensor>& dc,
                              const std::optional<at::Tensor>& dB) {
  const c10::cuda::CUDAGuard guard(A.device());
  return two_layer_jvp_aten(&activate_cuda, x, A, c, B, scale, activation, dA, dc, dB);
}

// x: (n, d), r: (n, k) -> dA (m, d), dc (m,), dB (k, m)
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_layer_vjp_cuda(const at::Tensor& x, const at::Tensor& A,
                                                                  const std::optional<at::Tensor>& c,
                                                                  const at::Tensor& B, double scale,
                                                                  int64_t activation, const at::Tensor& r) {
  const c10::cuda::CUDAGuard guard(A.device());
  return two_layer_vjp_aten(&activate_cuda, x, A, c, B, scale, activation, r);
}

// x1: (n1, d), x2: (n2, d) or None, v: (n2, k) -> (n1, k)
at::Tensor two_layer_ntk_vp_cuda(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                                 const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                                 int64_t activation, const at::Tensor& v) {
  const c10::cuda::CUDAGuard guard(A.device());
  return two_layer_ntk_vp_aten(&activate_cuda, x1, x2, A, c, B, scale, activation, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CUDA, m) {
  m.impl("two_layer_ntk", &two_layer_ntk_cuda);
  m.impl("two_layer_jvp", &two_layer_jvp_cuda);
  m.impl("two_layer_vjp", &two_layer_vjp_cuda);
  m.impl("two_layer_ntk_vp", &two_layer_ntk_vp_cuda);
}

}  // namespace lazyfast
