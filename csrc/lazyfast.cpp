// Module init for lazyfast._C and the ONE schema block of the library.
// Every op of lazyfast is declared here; each backend file registers its
// implementations with TORCH_LIBRARY_IMPL next to its kernels.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "knobs.h"
#include "precision.h"

#ifdef LAZYFAST_WITH_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lazyfast {

int64_t cuda_version() {
#ifdef LAZYFAST_WITH_CUDA
  return CUDART_VERSION;
#else
  return -1;
#endif
}

// Process-wide matmul precision mode (precision.h): returns the previous mode.
int64_t set_matmul_mode(int64_t mode) {
  TORCH_CHECK(mode == kMatmulHighest || mode == kMatmulTF32, "lazyfast: matmul mode must be 0 (highest) or 1 (tf32), got ",
              mode);
  return matmul_mode_flag().exchange(mode);
}

int64_t matmul_mode() { return matmul_mode_flag().load(); }

// The runtime knobs (knobs.h) as {variable: value}; 0 = unset (the op's default applies).
pybind11::dict knobs_dict(const Knobs& k) {
  pybind11::dict d;
  d["LAZYFAST_TWO_LAYER_WORKSPACE_BYTES"] = k.two_layer_workspace_bytes;
  d["LAZYFAST_TL_RB"] = k.tl_rb;
  d["LAZYFAST_TL_MC"] = k.tl_mc;
  d["LAZYFAST_DRIVER_WALK"] = k.driver_walk_cuda ? "cuda" : "cpu";
  d["LAZYFAST_HADAMARD_PANEL_ROWS"] = k.hadamard_panel_rows;
  d["LAZYFAST_HADAMARD_PANEL_COLS"] = k.hadamard_panel_cols;
  return d;
}

}  // namespace lazyfast

TORCH_LIBRARY(lazyfast, m) {
  // CUDA runtime version the extension was compiled against, -1 in CPU-only builds.
  m.def("cuda_version() -> int", &lazyfast::cuda_version);
  // Matmul precision of the lazyfast ops (precision.h): 0 = highest (IEEE float32), 1 = tf32 (CUDA, opt-in).
  m.def("set_matmul_mode(int mode) -> int", &lazyfast::set_matmul_mode);
  m.def("matmul_mode() -> int", &lazyfast::matmul_mode);
  // Gram of flattened Jacobians: (n1, P), (n2, P) -> (n1, n2) = j1 @ j2.T.
  m.def("gram(Tensor j1, Tensor j2, bool accumulate_f64=False) -> Tensor");
  // Two-layer net f(x) = scale * B act(A x + c) (docs/gpu.md); activation codes in activations.h.
  // eNTK: (n1, d), (n2, d) or None (= x1) -> (n1, n2) trace, (n1, n2, k, k) when full.
  m.def("two_layer_ntk(Tensor x1, Tensor? x2, Tensor A, Tensor? c, Tensor B, float scale, int activation, bool full) -> Tensor");
  // T tangents dA (T, m, d), dc (T, m), dB (T, k, m), each optional -> (T, n, k).
  m.def("two_layer_jvp(Tensor x, Tensor A, Tensor? c, Tensor B, float scale, int activation, Tensor? dA, Tensor? dc, Tensor? dB) -> Tensor");
  // Cotangent r (n, k) -> (dA (m, d), dc (m,), dB (k, m)).
  m.def("two_layer_vjp(Tensor x, Tensor A, Tensor? c, Tensor B, float scale, int activation, Tensor r) -> (Tensor, Tensor, Tensor)");
  // Theta(x1, x2) v without forming Theta: v (n2, k) -> (n1, k).
  m.def("two_layer_ntk_vp(Tensor x1, Tensor? x2, Tensor A, Tensor? c, Tensor B, float scale, int activation, Tensor v) -> Tensor");
  // Structured eNTK of deep MLPs: sum_l (D1_l D2_l^T) * (h_scale_l H1_l H2_l^T + beta_l), elementwise *.
  // d1[l]: (k, n1, w_l), h1[l]: (n1, v_l); d2 = h2 = [] means the symmetric case X2 = X1.
  // -> (n1, n2, k, k) if full else (n1, n2) = (1/k) sum_a [.., a, a]. Lists (Tensor[]) rather than stacked or
  // padded tensors: layer widths differ (d, 2048, ..., k), padding would waste flops and a copy, and the lists
  // are exactly what the forward/backward produce.
  m.def("hadamard_gram_sum(Tensor[] d1, Tensor[] h1, Tensor[] d2, Tensor[] h2, float[] h_scale, float[] beta, "
        "bool full) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "lazyfast compiled kernels (ops are registered as torch.ops.lazyfast.*)";
  mod.def("build_info", []() {
    pybind11::dict d;
    d["cpu_kernels"] = true;
#ifdef LAZYFAST_WITH_CUDA
    d["cuda_kernels"] = true;
#else
    d["cuda_kernels"] = false;
#endif
    d["cuda_version"] = lazyfast::cuda_version();
#ifdef _OPENMP
    d["openmp"] = true;
    d["openmp_version"] = static_cast<int>(_OPENMP);
#else
    d["openmp"] = false;
    d["openmp_version"] = 0;
#endif
    d["cxx_standard"] = static_cast<long>(__cplusplus);
    return d;
  });
  // The runtime knobs are read from the environment once (knobs.h); these query and re-read them.
  mod.def("knobs", []() { return lazyfast::knobs_dict(lazyfast::knobs()); },
          "The LAZYFAST_* runtime knobs the compiled ops use now ({name: value}, 0 = unset).");
  mod.def("reload_knobs", []() { return lazyfast::knobs_dict(lazyfast::reload_knobs()); },
          "Re-reads the LAZYFAST_* runtime knobs from the environment; returns the new values.");
}
