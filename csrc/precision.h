// Matmul precision of the lazyfast ops (docs/gpu.md, "Precision modes").
//   mode 0, "highest" (default): float32 GEMMs in IEEE float32 on every device; on CUDA the
//           op turns cuBLAS TF32 off for its duration, whatever torch's global setting is;
//   mode 1, "tf32" (opt-in fast mode): CUDA float32 GEMMs may use the TF32 tensor cores.
// float64 is always DGEMM. The CPU GEMMs are IEEE in both modes. The mode is process-wide
// (lazyfast.precision sets it through the set_matmul_mode op).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>

namespace lazyfast {

constexpr int64_t kMatmulHighest = 0;
constexpr int64_t kMatmulTF32 = 1;

inline std::atomic<int64_t>& matmul_mode_flag() {
  static std::atomic<int64_t> mode{kMatmulHighest};
  return mode;
}

// Sets torch's cuBLAS TF32 switch to what the lazyfast mode asks for, and restores it on
// scope exit (also when the op throws). Process-wide state, like torch's own switch: ops
// running concurrently in other threads see it while the guard lives.
class CudaMatmulPrecisionGuard {
 public:
  CudaMatmulPrecisionGuard() {
    auto& ctx = at::globalContext();
    bool prev = false;
    try {
      prev = ctx.allowTF32CuBLAS();
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "lazyfast: cannot read torch's cuBLAS TF32 setting (", e.what_without_backtrace(),
                  "); set torch.backends.cuda.matmul.allow_tf32 (or fp32_precision) consistently");
    }
    const bool want = matmul_mode_flag().load() == kMatmulTF32;
    if (want != prev) {
      ctx.setAllowTF32CuBLAS(want);
      prev_ = prev;
      changed_ = true;
    }
  }
  ~CudaMatmulPrecisionGuard() {
    if (!changed_) return;
    try {
      at::globalContext().setAllowTF32CuBLAS(prev_);
    } catch (...) {  // a destructor must not throw; the setter only stores flags
    }
  }
  CudaMatmulPrecisionGuard(const CudaMatmulPrecisionGuard&) = delete;
  CudaMatmulPrecisionGuard& operator=(const CudaMatmulPrecisionGuard&) = delete;

 private:
  bool prev_ = false;
  bool changed_ = false;
};

}  // namespace lazyfast
