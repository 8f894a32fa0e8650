// CPU implementations of the two-layer ops: the chunked ATen-GEMM drivers of
// two_layer_aten.h (MKL on bounded tiles) plus the elementwise activate step,
// parallel over rows with the activation fixed at compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../two_layer_aten.h"

namespace lazyfast {
namespace {

template <typename T, int kAct>
void activate_cpu_typed(const ActivateArgs& args) {
  const ActivateParams<T> p = activate_params<T>(args);
  if (p.rows == 0 || p.cols == 0) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / p.cols);
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) activate_row<T, kAct>(p, i);
  });
}

template <typename T>
void activate_cpu_dtype(int64_t act, const ActivateArgs& args) {
  switch (static_cast<Activation>(act)) {
    case Activation::Identity:
      return activate_cpu_typed<T, 0>(args);
    case Activation::ReLU:
      return activate_cpu_typed<T, 1>(args);
    case Activation::Tanh:
      return activate_cpu_typed<T, 2>(args);
    case Activation::GELU:
      return activate_cpu_typed<T, 3>(args);
    case Activation::Softplus:
      return activate_cpu_typed<T, 4>(args);
  }
  TORCH_CHECK(false, "lazyfast: unknown activation code ", act);
}

void activate_cpu(int64_t act, const ActivateArgs& args) {
  TORCH_CHECK(args.z.device().is_cpu(), "lazyfast: two-layer CPU kernel got a tensor on ", args.z.device());
  if (args.z.scalar_type() == at::kDouble) {
    activate_cpu_dtype<double>(act, args);
  } else {
    activate_cpu_dtype<float>(act, args);
  }
}

// x1: (n1, d), x2: (n2, d) or None, A: (m, d), c: (m,) or None, B: (k, m) -> (n1, n2) | (n1, n2, k, k)
at::Tensor two_layer_ntk_cpu(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                             const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                             int64_t activation, bool full) {
  return two_layer_ntk_aten(&activate_cpu, x1, x2, A, c, B, scale, activation, full);
}

// x: (n, d), dA: (T, m, d), dc: (T, m), dB: (T, k, m) (each optional) -> (T, n, k)
at::Tensor two_layer_jvp_cpu(const at::Tensor& x, const at::Tensor& A, const std::optional<at::Tensor>& c,
                             const at::Tensor& B, double scale, int64_t activation,
                             const std::optional<at::Tensor>& dA, const std::optional<at::Tensor>& dc,
                             const std::optional<at::Tensor>& dB) {
  return two_layer_jvp_aten(&activate_cpu, x, A, c, B, scale, activation, dA, dc, dB);
}

// x: (n, d), r: (n, k) -> dA (m, d), dc (m,), dB (k, m)
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_layer_vjp_cpu(const at::Tensor& x, const at::Tensor& A,
                                                                 const std::optional<at::Tensor>& c,
                                                                 const at::Tensor& B, double scale,
                                                                 int64_t activation, const at::Tensor& r) {
  return two_layer_vjp_aten(&activate_cpu, x, A, c, B, scale, activation, r);
}

// x1: (n1, d), x2: (n2, d) or None, v: (n2, k) -> (n1, k)
at::Tensor two_layer_ntk_vp_cpu(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                                const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                                int64_t activation, const at::Tensor& v) {
  return two_layer_ntk_vp_aten(&activate_cpu, x1, x2, A, c, B, scale, activation, v);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) {
  m.impl("two_layer_ntk", &two_layer_ntk_cpu);
  m.impl("two_layer_jvp", &two_layer_jvp_cpu);
  m.impl("two_layer_vjp", &two_layer_vjp_cpu);
  m.impl("two_layer_ntk_vp", &two_layer_ntk_vp_cpu);
}

}  // namespace lazyfast
