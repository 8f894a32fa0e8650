// Blocked Gram matrix G = J1 J2^T of flattened Jacobians (torch-free).
//   J1: (n1, P), J2: (n2, P), G: (n1, n2), all row-major and contiguous.
// The CPU launcher parallelises over output tiles and calls gram_tile(); the
// CUDA kernel uses the same accumulation rule (acc_t, then one rounding to
// scalar_t on store).
#pragma once

#include <cstdint>

#include "lazyfast/common.h"

namespace lazyfast {

struct GramParams {
  int64_t n1 = 0;
  int64_t n2 = 0;
  int64_t p = 0;  // feature length (number of parameters)
};

// Tile sizes for the CPU path: a (kGramTileI x kGramTileJ) block of G is
// accumulated over P in chunks of kGramTileP so the rows of both operands stay in L1/L2.
constexpr int64_t kGramTileI = 16;
constexpr int64_t kGramTileJ = 16;
constexpr int64_t kGramTileP = 512;

template <typename scalar_t, typename acc_t>
LF_HD acc_t dot_acc(const scalar_t* a, const scalar_t* b, int64_t len, acc_t init) {
  acc_t s = init;
  for (int64_t t = 0; t < len; ++t) s += static_cast<acc_t>(a[t]) * static_cast<acc_t>(b[t]);
  return s;
}

// Computes G[i0:i1, j0:j1]. `acc` is caller-provided scratch of
// kGramTileI * kGramTileJ accumulators (so the routine allocates nothing).
template <typename scalar_t, typename acc_t>
inline void gram_tile(const GramParams& prm, const scalar_t* j1, const scalar_t* j2, scalar_t* g,
                      int64_t i0, int64_t i1, int64_t j0, int64_t j1e, acc_t* acc) {
  const int64_t ti = i1 - i0, tj = j1e - j0;
  for (int64_t t = 0; t < ti * tj; ++t) acc[t] = acc_t(0);
  for (int64_t p0 = 0; p0 < prm.p; p0 += kGramTileP) {
    const int64_t len = (prm.p - p0 < kGramTileP) ? prm.p - p0 : kGramTileP;
    for (int64_t i = 0; i < ti; ++i) {
      const scalar_t* a = j1 + (i0 + i) * prm.p + p0;
      for (int64_t j = 0; j < tj; ++j) {
        const scalar_t* b = j2 + (j0 + j) * prm.p + p0;
        acc[i * tj + j] = dot_acc<scalar_t, acc_t>(a, b, len, acc[i * tj + j]);
      }
    }
  }
  for (int64_t i = 0; i < ti; ++i)
    for (int64_t j = 0; j < tj; ++j) g[(i0 + i) * prm.n2 + (j0 + j)] = static_cast<scalar_t>(acc[i * tj + j]);
}

}  // namespace lazyfast
