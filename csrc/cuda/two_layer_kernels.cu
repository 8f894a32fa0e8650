// Torch-free CUDA kernels of the two-layer ops (DESIGN.md §1.1). Compiled into
// the extension by setup.py and standalone by nvcc as a CI compile check.
//
// Gram, per m-chunk of neurons (the host loops over chunks):
//   1. two_layer_features_kernel: Z = X A_c^T + c (a small GEMM, K = d) and the
//      activation, written k-major as Phi^T, Sigma~^T (mc x n) so the Gram
//      kernel's shared-memory loads are contiguous.
//   2. two_layer_gram_kernel: one (BM x BN) output tile per block, register-
//      tiled (TM x TN per thread), accumulating P = Phi1 Phi2^T and
//      Q = S1 S2^T together in registers over the chunk, then
//      out += s^2 (P + (X1 X2^T + 1_bias) (.) Q) with G formed in the same block.
//   3. (X2 = X1) only tiles with tile_j >= tile_i run; two_layer_mirror fills the rest.
#include <cuda_runtime.h>

#include "lazyfast/activations.h"
#include "lazyfast/cuda_launch.h"
#include "lazyfast/two_layer.h"

namespace lazyfast {
namespace cuda {
namespace {

// ----------------------------------------------------------------------------- elementwise activate
template <typename T, int kAct>
__global__ void two_layer_activate_kernel(ActivateParams<T> p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    activate_entry<T, kAct>(p, e / p.cols, e % p.cols);
  }
}

// ----------------------------------------------------------------------------- features
constexpr int kFeatTile = 64;  // 64 neurons x 64 rows per block, 16 x 16 threads, 4 x 4 each
constexpr int kFeatK = 16;     // slab of the input dimension d

template <typename T, int kAct>
__global__ void __launch_bounds__(256) two_layer_features_kernel(TwoLayerFeatureParams<T> p) {
  constexpr Activation act = static_cast<Activation>(kAct);
  __shared__ T xs[kFeatK][kFeatTile + 1];  // xs[e][i]
  __shared__ T as[kFeatK][kFeatTile + 1];  // as[e][j]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kFeatTile;  // rows of x
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kFeatTile;  // neurons of the chunk
  T acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = T(0);
  for (int64_t e0 = 0; e0 < p.d; e0 += kFeatK) {
    for (int t = threadIdx.x; t < kFeatK * kFeatTile; t += blockDim.x) {
      const int row = t / kFeatK, e = t % kFeatK;  // consecutive threads walk along d
      const int64_t gi = i0 + row, gj = j0 + row, ge = e0 + e;
      xs[e][row] = (gi < p.n && ge < p.d) ? p.x[gi * p.d + ge] : T(0);
      as[e][row] = (gj < p.mc && ge < p.d) ? p.A[gj * p.d + ge] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int e = 0; e < kFeatK; ++e) {
      T xv[4], av[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = xs[e][tx + 16 * q];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = as[e][ty + 16 * r];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += av[r] * xv[q];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t j = j0 + ty + 16 * r;
    if (j >= p.mc) continue;
    const T b = p.bias ? p.bias[j] : T(0);
    const T w = p.w ? p.w[j] : T(1);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + tx + 16 * q;
      if (i >= p.n) continue;
      const T z = acc[r][q] + b;
      if (p.phiT) p.phiT[j * p.ld + i] = act_value<T>(act, z);
      if (p.sigT) p.sigT[j * p.ld + i] = act_deriv<T>(act, z) * w;
    }
  }
}

// ----------------------------------------------------------------------------- Gram tile
template <typename T, int BM, int BN, int BK, int TM, int TN, bool kWithP>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
    two_layer_gram_kernel(TwoLayerGramParams<T> p) {
  constexpr int kThreadsN = BN / TN;
  constexpr int kThreads = (BM / TM) * kThreadsN;
  if (p.upper_only && blockIdx.x < blockIdx.y) return;  // symmetric: tile_j >= tile_i only
  __shared__ T s_a[BK][BM];  // Phi1^T slab   (reused for X1^T when forming G)
  __shared__ T s_b[BK][BN];  // Phi2^T slab   (reused for X2^T)
  __shared__ T s_c[BK][BM];  // S1^T slab
  __shared__ T s_d[BK][BN];  // S2^T slab
  const int tx = threadIdx.x % kThreadsN, ty = threadIdx.x / kThreadsN;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * BN;
  T accp[TM][TN], accq[TM][TN];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int q = 0; q < TN; ++q) {
      accp[r][q] = T(0);
      accq[r][q] = T(0);
    }

  for (int64_t k0 = 0; k0 < p.mc; k0 += BK) {
    // Coalesced: consecutive threads read consecutive rows of the k-major features.
    for (int t = threadIdx.x; t < BK * BM; t += kThreads) {
      const int kk = t / BM, ii = t % BM;
      const int64_t gk = k0 + kk, gi = i0 + ii;
      const bool ok = gk < p.mc && gi < p.n1;
      if (kWithP) s_a[kk][ii] = ok ? p.phi1[gk * p.ld1 + gi] : T(0);
      s_c[kk][ii] = ok ? p.sig1[gk * p.ld1 + gi] : T(0);
    }
    for (int t = threadIdx.x; t < BK * BN; t += kThreads) {
      const int kk = t / BN, jj = t % BN;
      const int64_t gk = k0 + kk, gj = j0 + jj;
      const bool ok = gk < p.mc && gj < p.n2;
      if (kWithP) s_b[kk][jj] = ok ? p.phi2[gk * p.ld2 + gj] : T(0);
      s_d[kk][jj] = ok ? p.sig2[gk * p.ld2 + gj] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      T a[TM], c[TM], b[TN], dd[TN];
#pragma unroll
      for (int r = 0; r < TM; ++r) {
        if (kWithP) a[r] = s_a[kk][ty + r * (BM / TM)];
        c[r] = s_c[kk][ty + r * (BM / TM)];
      }
#pragma unroll
      for (int q = 0; q < TN; ++q) {
        if (kWithP) b[q] = s_b[kk][tx + q * kThreadsN];
        dd[q] = s_d[kk][tx + q * kThreadsN];
      }
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int q = 0; q < TN; ++q) {
          if (kWithP) accp[r][q] += a[r] * b[q];
          accq[r][q] += c[r] * dd[q];
        }
    }
    __syncthreads();
  }

  // G = X1 X2^T for this tile, accumulated in the (now free) P registers after P is flushed.
  const T s2 = p.scale2;
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int q = 0; q < TN; ++q) {
      if (kWithP) {
        const int64_t i = i0 + ty + r * (BM / TM), j = j0 + tx + q * kThreadsN;
        if (i < p.n1 && j < p.n2) {
          T* o = p.out + i * p.out_rs + j * p.out_cs;
          const T v = *o + s2 * accp[r][q];
          *o = v;
          if (p.out_mirror) p.out_mirror[i * p.out_rs + j * p.out_cs] = v;
        }
      }
      accp[r][q] = p.bias ? T(1) : T(0);
    }
  for (int64_t e0 = 0; e0 < p.d; e0 += BK) {
    for (int t = threadIdx.x; t < BK * BM; t += kThreads) {
      const int ii = t / BK, kk = t % BK;
      const int64_t gi = i0 + ii, ge = e0 + kk;
      s_a[kk][ii] = (gi < p.n1 && ge < p.d) ? p.x1[gi * p.d + ge] : T(0);
    }
    for (int t = threadIdx.x; t < BK * BN; t += kThreads) {
      const int jj = t / BK, kk = t % BK;
      const int64_t gj = j0 + jj, ge = e0 + kk;
      s_b[kk][jj] = (gj < p.n2 && ge < p.d) ? p.x2[gj * p.d + ge] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      T a[TM], b[TN];
#pragma unroll
      for (int r = 0; r < TM; ++r) a[r] = s_a[kk][ty + r * (BM / TM)];
#pragma unroll
      for (int q = 0; q < TN; ++q) b[q] = s_b[kk][tx + q * kThreadsN];
#pragma unroll
      for (int r = 0; r < TM; ++r)
#pragma unroll
        for (int q = 0; q < TN; ++q) accp[r][q] += a[r] * b[q];
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int q = 0; q < TN; ++q) {
      const int64_t i = i0 + ty + r * (BM / TM), j = j0 + tx + q * kThreadsN;
      if (i < p.n1 && j < p.n2) {
        T* o = p.out + i * p.out_rs + j * p.out_cs;
        const T v = *o + s2 * (accp[r][q] * accq[r][q]);
        *o = v;
        if (p.out_mirror) p.out_mirror[i * p.out_rs + j * p.out_cs] = v;
      }
    }
}

// ----------------------------------------------------------------------------- mirror
// out[i, j, a, b] = out[j, i, b, a] for i > j; k = 1 goes through a shared-memory transpose.
constexpr int kMirrorTile = 32;

template <typename T>
__global__ void two_layer_mirror_kernel(T* out, int64_t n) {
  __shared__ T tile[kMirrorTile][kMirrorTile + 1];
  const int64_t bi = blockIdx.y, bj = blockIdx.x;  // destination tile (rows bi, cols bj), bi >= bj
  if (bi < bj) return;
  const int64_t src_r0 = bj * kMirrorTile, src_c0 = bi * kMirrorTile;
  for (int r = threadIdx.y; r < kMirrorTile; r += blockDim.y) {
    const int64_t gr = src_r0 + r, gc = src_c0 + threadIdx.x;
    if (gr < n && gc < n) tile[r][threadIdx.x] = out[gr * n + gc];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kMirrorTile; r += blockDim.y) {
    const int64_t gi = bi * kMirrorTile + r, gj = bj * kMirrorTile + threadIdx.x;
    if (gi < n && gj < n && gi > gj) out[gi * n + gj] = tile[threadIdx.x][r];
  }
}

template <typename T>
__global__ void two_layer_mirror_full_kernel(T* out, int64_t n, int64_t k) {
  const int64_t kk = k * k, total = n * n * kk;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ab = e % kk, ij = e / kk;
    const int64_t i = ij / n, j = ij % n;
    if (i <= j) continue;
    const int64_t a = ab / k, b = ab % k;
    out[e] = out[(j * n + i) * kk + b * k + a];
  }
}

unsigned grid_1d(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

template <typename T, int kAct>
cudaError_t launch_activate(const ActivateParams<T>& p, cudaStream_t stream) {
  two_layer_activate_kernel<T, kAct><<<grid_1d(p.rows * p.cols, 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kAct>
cudaError_t launch_features(const TwoLayerFeatureParams<T>& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kFeatTile)), static_cast<unsigned>(ceil_div(p.mc, kFeatTile)));
  two_layer_features_kernel<T, kAct><<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// Tile shapes: float32 128 x 128 per block (8 x 8 per thread); float64 64 x 64 (4 x 4 per
// thread) so both P and Q accumulators stay in registers.
template <typename T>
struct GramTile;
template <>
struct GramTile<float> {
  static constexpr int BM = 128, BN = 128, BK = 8, TM = 8, TN = 8;
};
template <>
struct GramTile<double> {
  static constexpr int BM = 64, BN = 64, BK = 8, TM = 4, TN = 4;
};

}  // namespace

template <typename T>
cudaError_t two_layer_activate(const ActivateParams<T>& p, int act, cudaStream_t stream) {
  if (p.rows == 0 || p.cols == 0) return cudaSuccess;
  switch (act) {
    case 0: return launch_activate<T, 0>(p, stream);
    case 1: return launch_activate<T, 1>(p, stream);
    case 2: return launch_activate<T, 2>(p, stream);
    case 3: return launch_activate<T, 3>(p, stream);
    case 4: return launch_activate<T, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t two_layer_features(const TwoLayerFeatureParams<T>& p, int act, cudaStream_t stream) {
  if (p.n == 0 || p.mc == 0) return cudaSuccess;
  switch (act) {
    case 0: return launch_features<T, 0>(p, stream);
    case 1: return launch_features<T, 1>(p, stream);
    case 2: return launch_features<T, 2>(p, stream);
    case 3: return launch_features<T, 3>(p, stream);
    case 4: return launch_features<T, 4>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t two_layer_gram_chunk(const TwoLayerGramParams<T>& p, cudaStream_t stream) {
  if (p.n1 == 0 || p.n2 == 0) return cudaSuccess;
  using Tile = GramTile<T>;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n2, Tile::BN)), static_cast<unsigned>(ceil_div(p.n1, Tile::BM)));
  constexpr int threads = (Tile::BM / Tile::TM) * (Tile::BN / Tile::TN);
  if (p.with_p) {
    two_layer_gram_kernel<T, Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN, true><<<grid, threads, 0, stream>>>(p);
  } else {
    two_layer_gram_kernel<T, Tile::BM, Tile::BN, Tile::BK, Tile::TM, Tile::TN, false><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
int64_t two_layer_gram_tile_rows() {
  return GramTile<T>::BM;
}

template <typename T>
cudaError_t two_layer_mirror(T* out, int64_t n, int64_t k, cudaStream_t stream) {
  if (n <= 1) return cudaSuccess;
  if (k == 1) {
    const unsigned t = static_cast<unsigned>(ceil_div(n, kMirrorTile));
    two_layer_mirror_kernel<T><<<dim3(t, t), dim3(kMirrorTile, 8), 0, stream>>>(out, n);
  } else {
    two_layer_mirror_full_kernel<T><<<grid_1d(n * n * k * k, 256), 256, 0, stream>>>(out, n, k);
  }
  return cudaGetLastError();
}

#define LF_INSTANTIATE(T)                                                                          \
  template cudaError_t two_layer_activate<T>(const ActivateParams<T>&, int, cudaStream_t);          \
  template cudaError_t two_layer_features<T>(const TwoLayerFeatureParams<T>&, int, cudaStream_t);  \
  template cudaError_t two_layer_gram_chunk<T>(const TwoLayerGramParams<T>&, cudaStream_t);        \
  template int64_t two_layer_gram_tile_rows<T>();                                                  \
  template cudaError_t two_layer_mirror<T>(T*, int64_t, int64_t, cudaStream_t);
LF_INSTANTIATE(float)
LF_INSTANTIATE(double)
#undef LF_INSTANTIATE

}  // namespace cuda
}  // namespace lazyfast
