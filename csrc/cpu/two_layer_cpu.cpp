// CPU backend of the two-layer ops: the shared drivers of two_layer_aten.h
// (BLAS on bounded tiles) with the CPU elementwise steps: the activate step,
// parallel over rows with the activation fixed at compile time, and the Gram
// epilogues (serial loops inside the driver's parallel tiles).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../knobs.h"
#include "../two_layer_aten.h"

namespace lazyfast {
namespace {

template <typename T, int kAct>
void activate_cpu_typed(const ActivateArgs& args) {
  const ActivateParams<T> p = activate_params<T>(args);
  if (p.rows == 0 || p.cols == 0) return;
  // Column reductions are accumulated row by row: one thread walks the rows then.
  const bool reduce = p.phi_colsum != nullptr || p.deriv_colsum != nullptr;
  const int64_t grain = reduce ? p.rows : std::max<int64_t>(1, 16384 / p.cols);
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
  LF_DISPATCH_FLOAT(args.z, "z (activate step)", "two_layer_activate_cpu",
                    [&] { activate_cpu_dtype<scalar_t>(act, args); });
}

// ----------------------------------------------------------------------------- Gram epilogues
// Host loops over the torch-free entry rules of lazyfast/two_layer.h. They run inside the
// driver's tiles (already one per thread), so they are plain serial loops.
template <typename T>
void combine_cpu_typed(const GramCombineParams<T>& c) {
  if (c.out_cs == 1 && c.out2 == nullptr && (c.p == nullptr || c.p_cs == 1)) {
    // Trace mode: unit column strides, a loop that vectorizes.
    for (int64_t i = 0; i < c.rows; ++i) {
      T* o = c.out + i * c.out_rs;
      const T* pr = c.p ? c.p + i * c.p_rs : nullptr;
      const T* g = c.g + i * c.ld_g;
      const T* q = c.q + i * c.ld_q;
      if (pr) {
        for (int64_t j = 0; j < c.cols; ++j) o[j] = gram_combine_value<T>(pr[j], g[j], q[j], c.bias, c.s2);
      } else {
        for (int64_t j = 0; j < c.cols; ++j) o[j] = gram_combine_value<T>(T(0), g[j], q[j], c.bias, c.s2);
      }
    }
    return;
  }
  for (int64_t i = 0; i < c.rows; ++i)
    for (int64_t j = 0; j < c.cols; ++j) gram_combine_entry<T>(c, i, j);
}

void combine_cpu(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& p, const at::Tensor& g,
                 const at::Tensor& q, bool bias, double s2) {
  LF_DISPATCH_FLOAT(out, "out (Gram epilogue)", "two_layer_combine_cpu",
                    [&] { combine_cpu_typed<scalar_t>(combine_params<scalar_t>(out, out2, p, g, q, bias, s2)); });
}

void sym_finalize_cpu(const at::Tensor& out, int64_t i0, int64_t ib, const at::Tensor& g, const at::Tensor& qd,
                      bool bias, double s2) {
  LF_DISPATCH_FLOAT(out, "out (symmetric trace finalize)", "two_layer_sym_finalize_cpu", [&] {
    sym_trace_finalize_host<scalar_t>(sym_finalize_params<scalar_t>(out, i0, ib, g, qd, bias, s2));
  });
}

// LAZYFAST_DRIVER_WALK=cuda (knobs.h: read once, not per call) makes the CPU backend walk the
// tiles as the CUDA backend does (in order, CUDA tile sizes and the CUDA default workspace), so
// the CPU tests cover that walk too.
TwoLayerBackend cpu_backend() {
  TwoLayerBackend be;
  be.activate = &activate_cpu;
  be.combine = &combine_cpu;
  be.sym_finalize = &sym_finalize_cpu;
  const bool cuda_walk = knobs().driver_walk_cuda;
  be.parallel_tiles = !cuda_walk;
  be.default_workspace_bytes = cuda_walk ? kTwoLayerCudaGramWorkspaceBytes : kTwoLayerWorkspaceBytes;
  return be;
}

// x1: (n1, d), x2: (n2, d) or None, A: (m, d), c: (m,) or None, B: (k, m) -> (n1, n2) | (n1, n2, k, k)
at::Tensor two_layer_ntk_cpu(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                             const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                             int64_t activation, bool full) {
  check_op_tensors("two_layer_ntk", c10::DeviceType::CPU, {{"x1", x1}, {"x2", x2}, {"A", A}, {"c", c}, {"B", B}});
  return two_layer_ntk_aten(cpu_backend(), x1, x2, A, c, B, scale, activation, full);
}

// x: (n, d), dA: (T, m, d), dc: (T, m), dB: (T, k, m) (each optional) -> (T, n, k)
at::Tensor two_layer_jvp_cpu(const at::Tensor& x, const at::Tensor& A, const std::optional<at::Tensor>& c,
                             const at::Tensor& B, double scale, int64_t activation,
                             const std::optional<at::Tensor>& dA, const std::optional<at::Tensor>& dc,
                             const std::optional<at::Tensor>& dB) {
  check_op_tensors("two_layer_jvp", c10::DeviceType::CPU,
                   {{"x", x}, {"A", A}, {"c", c}, {"B", B}, {"dA", dA}, {"dc", dc}, {"dB", dB}});
  return two_layer_jvp_aten(&activate_cpu, x, A, c, B, scale, activation, dA, dc, dB);
}

// x: (n, d), r: (n, k) -> dA (m, d), dc (m,), dB (k, m)
std::tuple<at::Tensor, at::Tensor, at::Tensor> two_layer_vjp_cpu(const at::Tensor& x, const at::Tensor& A,
                                                                 const std::optional<at::Tensor>& c,
                                                                 const at::Tensor& B, double scale,
                                                                 int64_t activation, const at::Tensor& r) {
  check_op_tensors("two_layer_vjp", c10::DeviceType::CPU, {{"x", x}, {"A", A}, {"c", c}, {"B", B}, {"r", r}});
  return two_layer_vjp_aten(&activate_cpu, x, A, c, B, scale, activation, r);
}

// x1: (n1, d), x2: (n2, d) or None, v: (n2, k) -> (n1, k)
at::Tensor two_layer_ntk_vp_cpu(const at::Tensor& x1, const std::optional<at::Tensor>& x2, const at::Tensor& A,
                                const std::optional<at::Tensor>& c, const at::Tensor& B, double scale,
                                int64_t activation, const at::Tensor& v) {
  check_op_tensors("two_layer_ntk_vp", c10::DeviceType::CPU,
                   {{"x1", x1}, {"x2", x2}, {"A", A}, {"c", c}, {"B", B}, {"v", v}});
  return two_layer_ntk_vp_aten(&activate_cpu, x1, x2, A, c, B, scale, activation, v);
}

void register_two_layer_cpu(torch::Library& m) {
  m.impl("two_layer_ntk", &two_layer_ntk_cpu);
  m.impl("two_layer_jvp", &two_layer_jvp_cpu);
  m.impl("two_layer_vjp", &two_layer_vjp_cpu);
  m.impl("two_layer_ntk_vp", &two_layer_ntk_vp_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(lazyfast, CPU, m) { register_two_layer_cpu(m); }
TORCH_LIBRARY_IMPL(lazyfast, MkldnnCPU, m) { register_two_layer_cpu(m); }
LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(CPU, register_two_layer_cpu)

}  // namespace lazyfast
