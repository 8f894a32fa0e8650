// Sum of Hadamard products of Gram matrices (torch-free), the structured eNTK of
// deep MLPs (docs/gpu.md, "The math"):
//   out[i, j, a, b] += scale * <D1_a[i], D2_b[j]> * (gamma * <H1[i], H2[j]> + beta)
// for one layer; the op sums this over layers. Layouts (row-major, contiguous):
//   D1: (k, n1, w), D2: (k, n2, w), H1: (n1, v), H2: (n2, v), out: (n1, n2, k, k).
// Trace mode is the k = 1 case of the same rule: the launchers flatten D to
// (1, n, k*w) and pass scale = 1/k. The shared driver (csrc/hadamard_gram_aten.h) forms
// the two Gram tiles with ATen GEMMs (BLAS on the CPU, cuBLAS on CUDA) and each backend
// applies hadamard_accumulate_entry() to them: hadamard_accumulate_tile() on the CPU, a
// grid-stride kernel on CUDA; hadamard_mirror_entry() fills the symmetric case.
#pragma once

#include <cstdint>

#include "lazyfast/common.h"

namespace lazyfast {

struct HadamardGramParams {
  int64_t n1 = 0;
  int64_t n2 = 0;
  int64_t k = 1;   // outputs (1 in trace mode, after flattening)
  int64_t w = 0;   // D feature length of this layer
  int64_t v = 0;   // H feature length of this layer
  double gamma = 1.0;
  double beta = 0.0;
  double scale = 1.0;  // 1/k in trace mode
  bool symmetric = false;  // D2 == D1 and H2 == H1: only tiles with j-tile >= i-tile are needed
};

// One entry of one layer's contribution.
template <typename acc_t>
LF_HD acc_t hadamard_term(acc_t gd, acc_t gh, acc_t gamma, acc_t beta, acc_t scale) {
  return scale * gd * (gamma * gh + beta);
}

// out[(i*n2 + j)*kk + ab] += term(gd[i*ldg + j], gh[i*ldg + j]) for a (ti x tj) tile
// whose top-left output entry is `out` (row stride n2*kk, column stride kk).
template <typename scalar_t>
inline void hadamard_accumulate_tile(scalar_t* out, int64_t n2, int64_t kk, const scalar_t* gd, const scalar_t* gh,
                                     int64_t ldg, int64_t ti, int64_t tj, scalar_t gamma, scalar_t beta,
                                     scalar_t scale) {
  for (int64_t i = 0; i < ti; ++i) {
    scalar_t* orow = out + i * n2 * kk;
    const scalar_t* drow = gd + i * ldg;
    const scalar_t* hrow = gh + i * ldg;
    if (kk == 1) {
      for (int64_t j = 0; j < tj; ++j) orow[j] += hadamard_term<scalar_t>(drow[j], hrow[j], gamma, beta, scale);
    } else {
      for (int64_t j = 0; j < tj; ++j) orow[j * kk] += hadamard_term<scalar_t>(drow[j], hrow[j], gamma, beta, scale);
    }
  }
}

// Pointers of one accumulate step: out[(i*n2 + j)*kk] += term(gd[i*ldg + j], gh[i*ldg + j])
// for i < ti, j < tj, `out` pointing at the tile's top-left output entry [.., a, b].
template <typename T>
struct HadamardAccumulateParams {
  T* out = nullptr;
  int64_t n2 = 0, kk = 1;
  const T* gd = nullptr;
  const T* gh = nullptr;
  int64_t ldg = 0, ti = 0, tj = 0;
  T gamma = T(1), beta = T(0), scale = T(1);
};

template <typename T>
LF_HD void hadamard_accumulate_entry(const HadamardAccumulateParams<T>& p, int64_t i, int64_t j) {
  p.out[(i * p.n2 + j) * p.kk] += hadamard_term<T>(p.gd[i * p.ldg + j], p.gh[i * p.ldg + j], p.gamma, p.beta, p.scale);
}

// Symmetric case (X2 = X1), out (n, n, k, k): out[i, j, a, b] = out[j, i, b, a] for i > j, and
// below the diagonal of each k x k block on the diagonal. Reads only entries it never writes.
template <typename T>
LF_HD void hadamard_mirror_entry(T* out, int64_t n, int64_t k, int64_t i, int64_t j, int64_t a, int64_t b) {
  if (i > j || (i == j && a > b)) out[((i * n + j) * k + a) * k + b] = out[((j * n + i) * k + b) * k + a];
}

// Naive reference for one layer (tests and tiny sizes): direct dot products.
template <typename scalar_t, typename acc_t>
inline void hadamard_gram_layer_naive(const HadamardGramParams& p, const scalar_t* d1, const scalar_t* h1,
                                      const scalar_t* d2, const scalar_t* h2, scalar_t* out) {
  for (int64_t i = 0; i < p.n1; ++i)
    for (int64_t j = 0; j < p.n2; ++j) {
      acc_t gh = 0;
      for (int64_t t = 0; t < p.v; ++t) gh += static_cast<acc_t>(h1[i * p.v + t]) * static_cast<acc_t>(h2[j * p.v + t]);
      for (int64_t a = 0; a < p.k; ++a)
        for (int64_t b = 0; b < p.k; ++b) {
          acc_t gd = 0;
          const scalar_t* x = d1 + (a * p.n1 + i) * p.w;
          const scalar_t* y = d2 + (b * p.n2 + j) * p.w;
          for (int64_t t = 0; t < p.w; ++t) gd += static_cast<acc_t>(x[t]) * static_cast<acc_t>(y[t]);
          out[((i * p.n2 + j) * p.k + a) * p.k + b] += static_cast<scalar_t>(
              hadamard_term<acc_t>(gd, gh, acc_t(p.gamma), acc_t(p.beta), acc_t(p.scale)));
        }
    }
}

}  // namespace lazyfast
