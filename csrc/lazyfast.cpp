// Module init for lazyfast._C and the ONE schema block of the library.
// Every op of lazyfast is declared here; each backend file registers its
// implementations with TORCH_LIBRARY_IMPL next to its kernels.
#include <pybind11/pybind11.h>
#include <torch/library.h>

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

}  // namespace lazyfast

TORCH_LIBRARY(lazyfast, m) {
  // CUDA runtime version the extension was compiled against, -1 in CPU-only builds.
  m.def("cuda_version() -> int", &lazyfast::cuda_version);
  // Gram of flattened Jacobians: (n1, P), (n2, P) -> (n1, n2) = j1 @ j2.T.
  m.def("gram(Tensor j1, Tensor j2, bool accumulate_f64=False) -> Tensor");
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
}
