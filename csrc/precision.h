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

#include "lazyfast/shared_flag.h"

namespace lazyfast {

constexpr int64_t kMatmulHighest = 0;
constexpr int64_t kMatmulTF32 = 1;

inline std::atomic<int64_t>& matmul_mode_flag() {
  static std::atomic<int64_t> mode{kMatmulHighest};
  return mode;
}

// torch's cuBLAS TF32 switch, read and written by the guards below.
inline bool cublas_tf32_get() {
  bool on = false;
  try {
    on = at::globalContext().allowTF32CuBLAS();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "lazyfast: cannot read torch's cuBLAS TF32 setting (", e.what_without_backtrace(),
                "); set torch.backends.cuda.matmul.allow_tf32 (or fp32_precision) consistently");
  }
  return on;
}

inline void cublas_tf32_set(bool on) { at::globalContext().setAllowTF32CuBLAS(on); }

// The one arbiter of that switch among lazyfast ops (lazyfast/shared_flag.h).
inline SharedFlagState& cublas_tf32_state() {
  static SharedFlagState state;
  return state;
}

// Sets torch's cuBLAS TF32 switch to what the lazyfast mode asks for for the op's duration
// and restores it afterwards (also when the op throws). Thread-safe among lazyfast ops
// (lazyfast/shared_flag.h): the first live guard records torch's value and sets the wanted
// one, concurrent or nested guards wanting the same value share it, a guard wanting the other
// value (the mode changed meanwhile) waits until the live ones are gone, and the last one
// restores torch's value. The switch is torch's process-wide state: code outside lazyfast
// running in other threads meanwhile reads the lazyfast value, and a change it makes is
// overwritten by the restore (docs/gpu.md, "Precision modes").
class CudaMatmulPrecisionGuard {
 public:
  CudaMatmulPrecisionGuard()
      : guard_(cublas_tf32_state(), matmul_mode_flag().load() == kMatmulTF32, &cublas_tf32_get, &cublas_tf32_set) {}
  CudaMatmulPrecisionGuard(const CudaMatmulPrecisionGuard&) = delete;
  CudaMatmulPrecisionGuard& operator=(const CudaMatmulPrecisionGuard&) = delete;

  // Whether the op runs with TF32 allowed.
  bool tf32() const { return guard_.value(); }

 private:
  SharedFlagGuard<void (*)(bool)> guard_;
};

}  // namespace lazyfast
