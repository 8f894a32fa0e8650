// lazyfast::gram, G = J1 J2^T, as ATen GEMM blocks: ONE driver for the CPU (MKL/oneDNN)
// and CUDA (cuBLAS) backends (docs/gpu.md).
//   * float32 / float64: one GEMM in the inputs' precision;
//   * accumulate_f64 (float32 inputs): P is walked in slabs converted to float64 and
//     accumulated by DGEMM, one rounding to float32 at the end (extra memory: 256 MiB of
//     slabs and the float64 (n1, n2) accumulator);
//   * symmetric case (j2 is j1): only the block upper triangle is multiplied, the rest is
//     mirrored, so the result is exactly symmetric and costs about half the flops.
// The caller (backend entry point) sets the device guard and the matmul precision.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "checks.h"
#include "lazyfast/common.h"

namespace lazyfast {

// Float64 slabs of the accumulate_f64 path: 256 MiB for both operands (at least 512 columns).
constexpr int64_t kGramSlabBytes = int64_t(256) << 20;

// Block rows of the symmetric case: about a quarter of n (5/8 of the flops), but at least
// 256 rows in float32 and 64 in float64: thinner blocks with a long P fall off the BLAS peak
// (measured with MKL on 2 cores: at n = 256, P = 20000 one float32 GEMM beats any split,
// while float64 gains ~25 % from 4 block rows; at n = 1024 4 block rows win in both).
inline int64_t gram_sym_block(int64_t n, at::ScalarType dtype) {
  const int64_t lo = dtype == at::kFloat ? 256 : 64;
  return std::max<int64_t>(lo, ((ceil_div(n, 4) + 63) / 64) * 64);
}

// out (n, n) (+)= a a^T for a (n, p): block upper triangle only, GEMMs straight into `out`.
inline void gram_sym_accumulate(at::Tensor& out, const at::Tensor& a, bool accumulate) {
  const int64_t n = a.size(0), tb = gram_sym_block(n, a.scalar_type());
  for (int64_t i0 = 0; i0 < n; i0 += tb) {
    const int64_t ib = std::min(tb, n - i0);
    at::Tensor o = out.narrow(0, i0, ib).narrow(1, i0, n - i0);
    if (accumulate) {
      o.addmm_(a.narrow(0, i0, ib), a.narrow(0, i0, n - i0).t());
    } else {
      at::mm_out(o, a.narrow(0, i0, ib), a.narrow(0, i0, n - i0).t());
    }
  }
}

// CPU: one serial pass (the O(n^2) mirror is far cheaper than a parallel region's wake-up on
// a loaded machine). Entry (i, j), i < j: averaged within a diagonal block, copied below it.
template <typename T>
void gram_sym_mirror_host(T* o, int64_t n, int64_t tb) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) {
      if (i / tb == j / tb) {
        const T v = T(0.5) * (o[i * n + j] + o[j * n + i]);
        o[i * n + j] = v;
        o[j * n + i] = v;
      } else {
        o[j * n + i] = o[i * n + j];
      }
    }
}

// Lower block triangle := transpose of the upper one; diagonal blocks averaged with their
// transposes, so the result is exactly symmetric.
inline void gram_sym_mirror(at::Tensor& out, at::ScalarType dtype) {
  const int64_t n = out.size(0), tb = gram_sym_block(n, dtype);
  if (out.is_cpu()) {
    LF_DISPATCH_FLOAT(out, "out (symmetric Gram mirror)", "gram_sym_mirror_cpu",
                      [&] { gram_sym_mirror_host<scalar_t>(out.data_ptr<scalar_t>(), n, tb); });
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += tb) {
    const int64_t ib = std::min(tb, n - i0), i1 = i0 + ib;
    at::Tensor blk = out.narrow(0, i0, ib).narrow(1, i0, ib);
    blk.copy_((blk + blk.t()).mul_(0.5));
    if (i1 < n) out.narrow(0, i1, n - i1).narrow(1, i0, ib).copy_(out.narrow(0, i0, ib).narrow(1, i1, n - i1).t());
  }
}

// j1: (n1, P), j2: (n2, P) -> (n1, n2)
inline at::Tensor gram_aten(const at::Tensor& j1, const at::Tensor& j2, bool accumulate_f64) {
  LF_CHECK_DIM(j1, 2, "j1");
  LF_CHECK_DIM(j2, 2, "j2");
  LF_CHECK_FLOAT(j1, "j1");
  LF_CHECK_SAME_DTYPE(j1, j2, "j1", "j2");
  LF_CHECK_SAME_DEVICE(j1, j2, "j1", "j2");
  TORCH_CHECK(j1.size(1) == j2.size(1), "lazyfast: j2 has ", j2.size(1), " columns but j1 has ", j1.size(1),
              " (both must be flattened Jacobians over the same parameters)");
  const bool sym = j1.is_same(j2) || (j1.data_ptr() == j2.data_ptr() && j1.sizes() == j2.sizes() &&
                                      j1.strides() == j2.strides());
  const at::Tensor a = j1.contiguous(), b = sym ? a : j2.contiguous();
  const int64_t n1 = a.size(0), n2 = b.size(0), p = a.size(1);
  const bool acc64 = accumulate_f64 && a.scalar_type() == at::kFloat;
  if (n1 == 0 || n2 == 0 || p == 0) return at::zeros({n1, n2}, a.options());
  if (!acc64) {
    if (!sym) return at::mm(a, b.t());
    at::Tensor g = at::empty({n1, n1}, a.options());
    gram_sym_accumulate(g, a, /*accumulate=*/false);
    gram_sym_mirror(g, a.scalar_type());
    return g;
  }
  at::Tensor g = at::zeros({n1, n2}, a.options().dtype(at::kDouble));
  const int64_t slab = std::max<int64_t>(512, kGramSlabBytes / (8 * (n1 + (sym ? 0 : n2))));
  for (int64_t p0 = 0; p0 < p; p0 += slab) {
    const int64_t len = std::min(slab, p - p0);
    const at::Tensor a64 = a.narrow(1, p0, len).to(at::kDouble);
    if (sym) {
      gram_sym_accumulate(g, a64, /*accumulate=*/true);  // float64 blocks: a64 is float64
    } else {
      g.addmm_(a64, b.narrow(1, p0, len).to(at::kDouble).t());
    }
  }
  if (sym) gram_sym_mirror(g, at::kDouble);
  return g.to(at::kFloat);
}

}  // namespace lazyfast
