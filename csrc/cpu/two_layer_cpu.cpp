// CPU implementations of the two-layer ops: the Gram drivers below and the
// chunked JVP/VJP/NTK.v drivers of two_layer_aten.h (BLAS on bounded tiles),
// plus the elementwise activate step, parallel over rows with the activation
// fixed at compile time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <vector>

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
  if (args.z.scalar_type() == at::kDouble) {
    activate_cpu_dtype<double>(act, args);
  } else {
    activate_cpu_dtype<float>(act, args);
  }
}

// q (.)= G with G = X1 X2^T (+ 1 with a hidden bias), formed `sub` rows at a
// time so no second (rows x n2) buffer is needed.
void mul_by_input_gram(const at::Tensor& q, const at::Tensor& x1, const at::Tensor& x2, bool bias) {
  const int64_t rows = q.size(0);
  const int64_t sub = 256;
  for (int64_t r0 = 0; r0 < rows; r0 += sub) {
    const int64_t len = std::min(sub, rows - r0);
    at::Tensor g = at::mm(x1.narrow(0, r0, len), x2.t());
    if (bias) g.add_(1.0);
    q.narrow(0, r0, len).mul_(g);
  }
}

// ----------------------------------------------------------------------------- Gram
// The tile GEMMs run inside at::parallel_for: ATen then keeps each one on its
// calling thread, and the dispatcher state (inference mode, ...) of the caller is
// carried into the worker threads.
// Tile order for the triangular work: long and short strips alternate, so the
// contiguous halves at::parallel_for hands to the threads carry equal work.
inline std::vector<int64_t> balanced_order(int64_t nt) {
  std::vector<int64_t> order;
  for (int64_t a = 0, b = nt - 1; a <= b;) {
    order.push_back(a++);
    if (a <= b) order.push_back(b--);
  }
  return order;
}

// Trace mode, X2 = X1: m-chunks outer; per chunk the features of all n rows
// (n x mc). Only the block upper triangle is multiplied: P strips go to the
// upper triangle of `out`, Q strips (transposed) to its strict block-lower
// triangle, the diagonal Q blocks to a small side buffer; a final pass forms
// s^2 (P + G (.) Q) and mirrors it. Extra memory: 2 n mc + n tb (+ a G strip per
// thread). Tiles run in parallel, one single-threaded GEMM each: one barrier per
// chunk instead of one per GEMM, which matters on a loaded machine.
template <typename T>
void ntk_trace_sym_cpu(ActivateFn activate, const at::Tensor& x, const at::Tensor& A,
                       const std::optional<at::Tensor>& c, const at::Tensor& sw, double scale, int64_t act,
                       at::Tensor& out) {
  const int64_t n = x.size(0), m = A.size(0);
  // Block rows: small enough that the triangle saves work, large enough for efficient GEMMs.
  const int64_t tb = std::min<int64_t>(n, std::max<int64_t>(64, std::min<int64_t>(512, ((n / 8 + 63) / 64) * 64)));
  const int64_t nt = ceil_div(n, tb);
  const int64_t mc = two_layer_chunk(m, n, 2, elem_budget(x), 64, 2048);
  at::Tensor fphi = at::empty({n, mc}, x.options()), fd = at::empty({n, mc}, x.options());
  at::Tensor qdiag = at::zeros({nt, tb, tb}, x.options());
  const std::vector<int64_t> order = balanced_order(nt);
  const at::ThreadLocalState tls;
  for (int64_t c0 = 0; c0 < m; c0 += mc) {
    const int64_t len = std::min(mc, m - c0);
    at::Tensor phi = fphi.narrow(1, 0, len), dv = fd.narrow(1, 0, len);
    chunk_features(activate, act, x, A.narrow(0, c0, len), opt_narrow(c, 0, c0, len), sw.narrow(0, c0, len),
                   at::Tensor(), phi, phi, dv);
    at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard guard(tls);
      for (int64_t q = begin; q < end; ++q) {
        const int64_t t = order[q], i0 = t * tb, ib = std::min(tb, n - i0), i1 = i0 + ib;
        at::Tensor phi_i = phi.narrow(0, i0, ib), d_i = dv.narrow(0, i0, ib);
        out.narrow(0, i0, ib).narrow(1, i0, n - i0).addmm_(phi_i, phi.narrow(0, i0, n - i0).t());
        qdiag[t].narrow(0, 0, ib).narrow(1, 0, ib).addmm_(d_i, d_i.t());
        if (i1 < n) out.narrow(0, i1, n - i1).narrow(1, i0, ib).addmm_(dv.narrow(0, i1, n - i1), d_i.t());
      }
    });
  }
  T* o = out.data_ptr<T>();
  const T* qd = qdiag.data_ptr<T>();
  const bool bias = c.has_value();
  const T s2 = static_cast<T>(scale * scale);
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(tls);
    for (int64_t q = begin; q < end; ++q) {
      const int64_t t = order[q], i0 = t * tb, ib = std::min(tb, n - i0), i1 = i0 + ib, w = n - i0;
      at::Tensor gt = at::mm(x.narrow(0, i0, ib), x.narrow(0, i0, w).t());  // (ib, w)
      T* g = gt.data_ptr<T>();
      if (bias)
        for (int64_t e = 0; e < ib * w; ++e) g[e] += T(1);
      // Diagonal block: Q from the side buffer; averaged with its transpose so it is exactly symmetric.
      const T* qt = qd + t * tb * tb;
      for (int64_t i = 0; i < ib; ++i)
        for (int64_t j = 0; j < ib; ++j) o[(i0 + i) * n + i0 + j] += g[i * w + j] * qt[i * tb + j];
      for (int64_t i = 0; i < ib; ++i) {
        T* row = o + (i0 + i) * n + i0;
        row[i] *= s2;
        for (int64_t j = i + 1; j < ib; ++j) {
          const T v = T(0.5) * s2 * (row[j] + o[(i0 + j) * n + i0 + i]);
          row[j] = v;
          o[(i0 + j) * n + i0 + i] = v;
        }
      }
      // Upper strip: Q sits transposed below the diagonal; 64-column panels keep it in cache.
      for (int64_t j0 = i1; j0 < n; j0 += 64) {
        const int64_t j1 = std::min<int64_t>(n, j0 + 64);
        for (int64_t i = 0; i < ib; ++i) {
          T* row = o + (i0 + i) * n;
          const T* grow = g + i * w - i0;
          for (int64_t j = j0; j < j1; ++j) row[j] = s2 * (row[j] + grow[j] * o[j * n + i0 + i]);
        }
        for (int64_t j = j0; j < j1; ++j)
          for (int64_t i = 0; i < ib; ++i) o[j * n + i0 + i] = o[(i0 + i) * n + j];
      }
    }
  });
}

// General Gram (X2 given, or full mode): blocks of X1 rows outer, m-chunks
// inner. P accumulates in place (trace) or in a block buffer (full), each
// distinct Q_ab = D1 diag(B_a B_b) D2^T in its own (rb x nc) buffer; the block
// is finalized as s^2 (delta_ab P + G (.) Q_ab). With `sym` (X2 = X1, full
// mode) a block only computes columns >= its first row and the rest is mirrored.
at::Tensor two_layer_ntk_general(ActivateFn activate, const at::Tensor& x1, const at::Tensor& x2,
                                        const at::Tensor& A, const std::optional<at::Tensor>& c,
                                        const at::Tensor& B, const at::Tensor& sw, double scale, int64_t act,
                                        bool full, bool sym) {
  const int64_t n1 = x1.size(0), n2 = x2.size(0), m = A.size(0), k = B.size(0);
  at::Tensor out = full ? at::zeros({n1, n2, k, k}, x1.options()) : at::zeros({n1, n2}, x1.options());
  if (n1 == 0 || n2 == 0) return out;
  const int64_t npair = full ? k * (k + 1) / 2 : 1;
  const int64_t nacc = full ? npair + 1 : npair;  // + P buffer in full mode
  const int64_t budget = elem_budget(x1);
  // Half the workspace for the accumulators, half for the chunk features.
  int64_t rb = std::max<int64_t>(16, budget / 2 / (nacc * std::max<int64_t>(n2, 1)));
  if (sym) rb = std::min(rb, std::max<int64_t>(64, ceil_div(n1, 4)));
  rb = std::min(rb, n1);
  const int64_t mc = two_layer_chunk(m, rb + n2, 3, budget / 2, 64, 2048);
  at::Tensor phi1b = at::empty({rb, mc}, x1.options()), d1b = at::empty({rb, mc}, x1.options());
  at::Tensor phi2b = at::empty({n2, mc}, x1.options()), d2b = at::empty({n2, mc}, x1.options());
  at::Tensor tmpb = full ? at::empty({rb, mc}, x1.options()) : at::Tensor();
  at::Tensor accb = at::empty({nacc, rb, n2}, x1.options());
  at::Tensor wpair;  // (npair, m): B_a * B_b for a <= b
  if (full) {
    wpair = at::empty({npair, m}, x1.options());
    int64_t p = 0;
    for (int64_t a = 0; a < k; ++a)
      for (int64_t b = a; b < k; ++b) wpair[p++].copy_(B[a] * B[b]);
  }
  const bool bias = c.has_value();
  const at::ThreadLocalState tls;
  for (int64_t i0 = 0; i0 < n1; i0 += rb) {
    const int64_t ib = std::min(rb, n1 - i0);
    const int64_t j0 = sym ? i0 : 0, nc = n2 - j0;
    at::Tensor x1b = x1.narrow(0, i0, ib), x2b = x2.narrow(0, j0, nc);
    at::Tensor acc = accb.narrow(1, 0, ib).narrow(2, 0, nc);
    acc.zero_();
    at::Tensor pacc = full ? acc[npair] : out.narrow(0, i0, ib).narrow(1, j0, nc);
    for (int64_t c0 = 0; c0 < m; c0 += mc) {
      const int64_t len = std::min(mc, m - c0);
      at::Tensor A_c = A.narrow(0, c0, len), c_c = opt_narrow(c, 0, c0, len);
      at::Tensor w_c = full ? at::Tensor() : sw.narrow(0, c0, len);
      at::Tensor phi1 = phi1b.narrow(0, 0, ib).narrow(1, 0, len), d1 = d1b.narrow(0, 0, ib).narrow(1, 0, len);
      at::Tensor phi2 = phi2b.narrow(0, 0, nc).narrow(1, 0, len), d2 = d2b.narrow(0, 0, nc).narrow(1, 0, len);
      chunk_features(activate, act, x2b, A_c, c_c, w_c, at::Tensor(), phi2, phi2, d2);
      // Rows of the block split over the threads, single-threaded GEMMs: one barrier.
      at::parallel_for(0, ib, 64, [&](int64_t r0, int64_t r1) {
        const at::ThreadLocalStateGuard guard(tls);
        const int64_t rl = r1 - r0;
        at::Tensor p1 = phi1.narrow(0, r0, rl), q1 = d1.narrow(0, r0, rl);
        chunk_features(activate, act, x1b.narrow(0, r0, rl), A_c, c_c, w_c, at::Tensor(), p1, p1, q1);
        pacc.narrow(0, r0, rl).addmm_(p1, phi2.t());
        if (!full) {
          acc[0].narrow(0, r0, rl).addmm_(q1, d2.t());
        } else {
          at::Tensor tmp = tmpb.narrow(0, r0, rl).narrow(1, 0, len);
          for (int64_t p = 0; p < npair; ++p) {
            at::mul_out(tmp, q1, wpair[p].narrow(0, c0, len));
            acc[p].narrow(0, r0, rl).addmm_(tmp, d2.t());
          }
        }
      });
    }
    if (!full) {
      at::parallel_for(0, ib, 64, [&](int64_t r0, int64_t r1) {
        const at::ThreadLocalStateGuard guard(tls);
        at::Tensor q = acc[0].narrow(0, r0, r1 - r0);
        mul_by_input_gram(q, x1b.narrow(0, r0, r1 - r0), x2b, bias);
        pacc.narrow(0, r0, r1 - r0).add_(q).mul_(scale * scale);
      });
    } else {
      at::Tensor o = out.narrow(0, i0, ib).narrow(1, j0, nc);  // (ib, nc, k, k)
      int64_t p = 0;
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = a; b < k; ++b, ++p) {
          at::Tensor q = acc[p];
          mul_by_input_gram(q, x1b, x2b, bias);
          if (a == b) q.add_(pacc);
          q.mul_(scale * scale);
          o.select(3, b).select(2, a).copy_(q);
          if (a != b) o.select(3, a).select(2, b).copy_(q);
        }
      }
    }
  }
  if (sym) {
    // Diagonal blocks exactly symmetric (up to rounding only, from the GEMMs).
    for (int64_t i0 = 0; i0 < n1; i0 += rb) {
      const int64_t ib = std::min(rb, n1 - i0);
      at::Tensor blk = out.narrow(0, i0, ib).narrow(1, i0, ib);
      blk.copy_((blk + (full ? blk.permute({1, 0, 3, 2}) : blk.t())).mul_(0.5));
    }
    // Fill the blocks left of each row block: Theta(x_i, x_j)_ab = Theta(x_j, x_i)_ba.
    for (int64_t i0 = rb; i0 < n1; i0 += rb) {
      const int64_t ib = std::min(rb, n1 - i0);
      at::Tensor dst = out.narrow(0, i0, ib).narrow(1, 0, i0);
      at::Tensor src = out.narrow(0, 0, i0).narrow(1, i0, ib);
      dst.copy_(full ? src.permute({1, 0, 3, 2}) : src.t());
    }
  }
  return out;
}

// (n1, d), (n2, d) or None -> (n1, n2) trace or (n1, n2, k, k) full.
at::Tensor two_layer_ntk_aten(ActivateFn activate, const at::Tensor& x1_in,
                                     const std::optional<at::Tensor>& x2_in, const at::Tensor& A_in,
                                     const std::optional<at::Tensor>& c_in, const at::Tensor& B_in, double scale,
                                     int64_t act, bool full) {
  const char* op = "two_layer_ntk";
  check_two_layer_weights(A_in, c_in, B_in, scale, act, op);
  check_two_layer_input(x1_in, A_in, "x1", op);
  if (x2_in.has_value()) check_two_layer_input(*x2_in, A_in, "x2", op);
  const at::Tensor x1 = x1_in.contiguous(), A = A_in.contiguous(), B = B_in.contiguous();
  std::optional<at::Tensor> c;
  if (c_in.has_value()) c = c_in->contiguous();
  // Trace weights: sigma'(z_j) * sqrt(mean_a B_aj^2) on both sides gives (1/k) sum_a Q_aa.
  const at::Tensor sw = full ? at::Tensor() : (B * B).mean(0).sqrt_().contiguous();
  if (!x2_in.has_value()) {
    if (!full) {
      at::Tensor out = at::zeros({x1.size(0), x1.size(0)}, x1.options());
      if (x1.size(0) == 0) return out;
      if (x1.scalar_type() == at::kDouble) {
        ntk_trace_sym_cpu<double>(activate, x1, A, c, sw, scale, act, out);
      } else {
        ntk_trace_sym_cpu<float>(activate, x1, A, c, sw, scale, act, out);
      }
      return out;
    }
    return two_layer_ntk_general(activate, x1, x1, A, c, B, sw, scale, act, full, /*sym=*/true);
  }
  const at::Tensor x2 = x2_in->contiguous();
  return two_layer_ntk_general(activate, x1, x2, A, c, B, sw, scale, act, full, /*sym=*/false);
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
