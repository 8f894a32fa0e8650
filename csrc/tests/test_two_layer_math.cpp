// Unit tests of the torch-free two-layer math (lazyfast/two_layer.h): the
// elementwise steps of every two-layer op (activate, Gram combine, symmetric
// trace finalize) and of hadamard_gram_sum (accumulate, mirror), against direct formulas.
// Built and run by CMake/ctest (no torch, no GPU).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "lazyfast/activations.h"
#include "lazyfast/hadamard_gram.h"
#include "lazyfast/two_layer.h"

namespace {

int g_pass = 0, g_fail = 0;

void check_close(double got, double want, double tol, const char* what, int act, long i) {
  if (std::fabs(got - want) <= tol * (1.0 + std::fabs(want))) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAIL %s (activation %d, entry %ld): got %.17g want %.17g\n", what, act, i, got, want);
  }
}

template <int kAct>
void run_row(const lazyfast::ActivateParams<double>& p, int64_t i) {
  lazyfast::activate_row<double, kAct>(p, i);
}

void activate_all(const lazyfast::ActivateParams<double>& p, int act) {
  for (int64_t i = 0; i < p.rows; ++i) {
    switch (act) {
      case 0: run_row<0>(p, i); break;
      case 1: run_row<1>(p, i); break;
      case 2: run_row<2>(p, i); break;
      case 3: run_row<3>(p, i); break;
      default: run_row<4>(p, i); break;
    }
  }
}

// Every combination of bias / column weight / entry multiplier / row multiplier, on a
// row longer than the 256-entry segment, with phi written over z and deriv over mul.
void test_activate_row() {
  std::mt19937 gen(7);
  std::normal_distribution<double> nd(0.0, 2.0);
  const int64_t rows = 3, cols = 300, ld = 311;
  for (int act = 0; act < lazyfast::kNumActivations; ++act) {
    for (int mask = 0; mask < 16; ++mask) {
      const bool has_bias = mask & 1, has_w = mask & 2, has_mul = mask & 4, has_row = mask & 8;
      std::vector<double> z(rows * ld), bias(cols), w(cols), mul(rows * ld), rowm(rows);
      for (auto& v : z) v = nd(gen);
      for (auto& v : bias) v = nd(gen);
      for (auto& v : w) v = nd(gen);
      for (auto& v : mul) v = nd(gen);
      for (auto& v : rowm) v = nd(gen);
      const std::vector<double> z0 = z, mul0 = mul;
      lazyfast::ActivateParams<double> p;
      p.rows = rows;
      p.cols = cols;
      p.z = z.data();
      p.ld_z = ld;
      p.bias = has_bias ? bias.data() : nullptr;
      p.w = has_w ? w.data() : nullptr;
      p.rowmul = has_row ? rowm.data() : nullptr;
      p.phi = z.data();  // in place
      p.ld_phi = ld;
      std::vector<double> deriv(rows * ld);
      if (has_mul) {
        p.mul = mul.data();
        p.ld_mul = ld;
        p.deriv = mul.data();  // in place
      } else {
        p.deriv = deriv.data();
      }
      p.ld_deriv = ld;
      activate_all(p, act);
      const auto a = static_cast<lazyfast::Activation>(act);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          const double zz = z0[i * ld + j] + (has_bias ? bias[j] : 0.0);
          double dv = lazyfast::act_deriv<double>(a, zz);
          if (has_w) dv *= w[j];
          if (has_mul) dv *= mul0[i * ld + j];
          if (has_row) dv *= rowm[i];
          check_close(z[i * ld + j], lazyfast::act_value<double>(a, zz), 1e-15, "phi", act, i * ld + j);
          check_close(has_mul ? mul[i * ld + j] : deriv[i * ld + j], dv, 1e-15, "deriv", act, i * ld + j);
        }
      }
    }
  }
}

// Column reductions of the CPU VJP: phi_colsum += r_i sigma(z_ij), deriv_colsum += D_ij,
// with sigma(z) not stored (phi == nullptr).
void test_activate_colsums() {
  std::mt19937 gen(11);
  std::normal_distribution<double> nd(0.0, 1.5);
  const int64_t rows = 5, cols = 270;
  for (int act = 0; act < lazyfast::kNumActivations; ++act) {
    std::vector<double> z(rows * cols), w(cols), r(rows), deriv(rows * cols), pcs(cols, 0.5), dcs(cols, -0.25);
    for (auto& v : z) v = nd(gen);
    for (auto& v : w) v = nd(gen);
    for (auto& v : r) v = nd(gen);
    lazyfast::ActivateParams<double> p;
    p.rows = rows;
    p.cols = cols;
    p.z = z.data();
    p.ld_z = cols;
    p.w = w.data();
    p.rowmul = r.data();
    p.deriv = deriv.data();
    p.ld_deriv = cols;
    p.phi_colsum = pcs.data();
    p.deriv_colsum = dcs.data();
    activate_all(p, act);
    const auto a = static_cast<lazyfast::Activation>(act);
    for (int64_t j = 0; j < cols; ++j) {
      double ps = 0.5, ds = -0.25;
      for (int64_t i = 0; i < rows; ++i) {
        const double zz = z[i * cols + j];
        ps += r[i] * lazyfast::act_value<double>(a, zz);
        ds += lazyfast::act_deriv<double>(a, zz) * w[j] * r[i];
      }
      check_close(pcs[j], ps, 1e-13, "phi_colsum", act, j);
      check_close(dcs[j], ds, 1e-13, "deriv_colsum", act, j);
    }
  }
}

void test_chunk_sizes() {
  using lazyfast::two_layer_chunk;
  check_close(static_cast<double>(two_layer_chunk(10000, 100, 2, 1 << 20, 64, 2048)), 2048, 0, "chunk cap", -1, 0);
  check_close(static_cast<double>(two_layer_chunk(10000, 1 << 20, 2, 1 << 20, 64, 2048)), 64, 0, "chunk floor", -1, 0);
  check_close(static_cast<double>(two_layer_chunk(33, 100, 2, 1 << 20, 64, 2048)), 33, 0, "chunk <= m", -1, 0);
  check_close(static_cast<double>(two_layer_chunk(1, 0, 2, 1 << 20, 64, 2048)), 1, 0, "chunk, no rows", -1, 0);
}

// Random (rows x cols) matrix.
std::vector<double> rand_mat(std::mt19937_64& rng, int64_t rows, int64_t cols) {
  std::normal_distribution<double> nd;
  std::vector<double> v(rows * cols);
  for (auto& x : v) x = nd(rng);
  return v;
}

void test_gram_combine() {
  std::mt19937_64 rng(7);
  const int64_t rows = 5, cols = 9, k = 3;
  const auto P = rand_mat(rng, rows, cols), G = rand_mat(rng, rows, cols), Q = rand_mat(rng, rows, cols);
  for (int with_p = 0; with_p < 2; ++with_p)
    for (int bias = 0; bias < 2; ++bias) {
      // Full-mode layout: out (rows, cols, k, k), entry [.., 0, 2] and its mirror [.., 2, 0].
      std::vector<double> out(rows * cols * k * k, -7.0);
      lazyfast::GramCombineParams<double> c;
      c.rows = rows;
      c.cols = cols;
      c.p = with_p ? P.data() : nullptr;
      c.p_rs = cols;
      c.g = G.data();
      c.ld_g = cols;
      c.q = Q.data();
      c.ld_q = cols;
      c.out = out.data() + 0 * k + 2;
      c.out2 = out.data() + 2 * k + 0;
      c.out_rs = cols * k * k;
      c.out_cs = k * k;
      c.bias = bias;
      c.s2 = 0.3;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) lazyfast::gram_combine_entry<double>(c, i, j);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          const int64_t e = i * cols + j;
          const double want = 0.3 * ((with_p ? P[e] : 0.0) + (G[e] + bias) * Q[e]);
          check_close(out[(e * k + 0) * k + 2], want, 1e-15, "gram_combine", -1, e);
          check_close(out[(e * k + 2) * k + 0], want, 1e-15, "gram_combine mirror", -1, e);
          check_close(out[(e * k + 1) * k + 1], -7.0, 0, "gram_combine leaves other entries", -1, e);
        }
    }
  // P aliasing out (trace mode, X2 given): out = s2 (out + (G + 1) Q).
  std::vector<double> out = P;
  lazyfast::GramCombineParams<double> c;
  c.rows = rows;
  c.cols = cols;
  c.p = out.data();
  c.p_rs = cols;
  c.g = G.data();
  c.ld_g = cols;
  c.q = Q.data();
  c.ld_q = cols;
  c.out = out.data();
  c.out_rs = cols;
  c.bias = 1;
  c.s2 = 2.0;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) lazyfast::gram_combine_entry<double>(c, i, j);
  for (int64_t e = 0; e < rows * cols; ++e)
    check_close(out[e], 2.0 * (P[e] + (G[e] + 1) * Q[e]), 1e-15, "gram_combine in place", -1, e);
}

// The symmetric trace Gram's layout: P (symmetric) in the block upper triangle, Q^T below it,
// diagonal Q blocks aside; finalize every block row and compare with s2 (P + (X X^T + b) Q).
void test_sym_trace_finalize(int64_t n, int64_t tb, int bias) {
  std::mt19937_64 rng(11 + n + tb);
  const int64_t d = 3;
  const auto X = rand_mat(rng, n, d), R1 = rand_mat(rng, n, 4), R2 = rand_mat(rng, n, 4);
  std::vector<double> P(n * n), Q(n * n), Gm(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double p = 0, q = 0, g = 0;
      for (int t = 0; t < 4; ++t) {
        p += R1[i * 4 + t] * R1[j * 4 + t];
        q += R2[i * 4 + t] * R2[j * 4 + t];
      }
      for (int t = 0; t < d; ++t) g += X[i * d + t] * X[j * d + t];
      P[i * n + j] = p;
      Q[i * n + j] = q;
      Gm[i * n + j] = g;
    }
  const int64_t nt = (n + tb - 1) / tb;
  std::vector<double> out(n * n), qd(nt * tb * tb, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t bi = i / tb, bj = j / tb;
      out[i * n + j] = bj >= bi ? P[i * n + j] : Q[j * n + i];
      if (bi == bj) qd[bi * tb * tb + (i - bi * tb) * tb + (j - bj * tb)] = Q[i * n + j];
    }
  const double s2 = 0.7;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t i0 = t * tb, ib = std::min(tb, n - i0), w = n - i0;
    std::vector<double> g(ib * w);
    for (int64_t i = 0; i < ib; ++i)
      for (int64_t j = 0; j < w; ++j) g[i * w + j] = Gm[(i0 + i) * n + i0 + j];
    lazyfast::SymTraceFinalizeParams<double> p;
    p.out = out.data();
    p.n = n;
    p.i0 = i0;
    p.ib = ib;
    p.g = g.data();
    p.ld_g = w;
    p.qd = qd.data() + t * tb * tb;
    p.ld_qd = tb;
    p.bias = bias;
    p.s2 = s2;
    if (t % 2 == 0) {
      lazyfast::sym_trace_finalize_host<double>(p);
    } else {  // the device walk: every (i, jj) once, in any order
      for (int64_t e = ib * w - 1; e >= 0; --e) lazyfast::sym_trace_finalize_entry<double>(p, e / w, e % w);
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const double want = s2 * (P[i * n + j] + (Gm[i * n + j] + bias) * Q[i * n + j]);
      check_close(out[i * n + j], want, 1e-13, "sym_trace_finalize", -1, i * n + j);
      if (out[i * n + j] != out[j * n + i]) check_close(1, 0, 0, "sym_trace_finalize exactly symmetric", -1, i * n + j);
    }
}

void test_hadamard_steps() {
  std::mt19937_64 rng(5);
  const int64_t n = 6, k = 2, kk = k * k;
  const auto gd = rand_mat(rng, n, n), gh = rand_mat(rng, n, n);
  std::vector<double> out(n * n * kk, 0.5);
  lazyfast::HadamardAccumulateParams<double> p;
  p.out = out.data() + 1 * k + 0;  // entry [.., 1, 0]
  p.n2 = n;
  p.kk = kk;
  p.gd = gd.data();
  p.gh = gh.data();
  p.ldg = n;
  p.ti = n;
  p.tj = n;
  p.gamma = 1.5;
  p.beta = 0.25;
  p.scale = 0.5;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) lazyfast::hadamard_accumulate_entry<double>(p, i, j);
  for (int64_t e = 0; e < n * n; ++e) {
    check_close(out[e * kk + 2], 0.5 + 0.5 * gd[e] * (1.5 * gh[e] + 0.25), 1e-15, "hadamard_accumulate", -1, e);
    check_close(out[e * kk + 1], 0.5, 0, "hadamard_accumulate leaves other entries", -1, e);
  }
  // Mirror: start from an arbitrary upper half; the result must satisfy out[i,j,a,b] = out[j,i,b,a].
  auto m = rand_mat(rng, n * n, kk);
  const auto orig = m;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = 0; b < k; ++b) lazyfast::hadamard_mirror_entry<double>(m.data(), n, k, i, j, a, b);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = 0; b < k; ++b) {
          const int64_t e = ((i * n + j) * k + a) * k + b, t = ((j * n + i) * k + b) * k + a;
          check_close(m[e], m[t], 0, "hadamard_mirror symmetric", -1, e);
          if (i < j || (i == j && a <= b)) check_close(m[e], orig[e], 0, "hadamard_mirror keeps the upper half", -1, e);
        }
}

}  // namespace

int main() {
  test_gram_combine();
  for (int bias = 0; bias < 2; ++bias) {
    test_sym_trace_finalize(1, 64, bias);
    test_sym_trace_finalize(13, 4, bias);
    test_sym_trace_finalize(17, 5, bias);
    test_sym_trace_finalize(20, 20, bias);
  }
  test_hadamard_steps();
  test_activate_row();
  test_activate_colsums();
  test_chunk_sizes();
  std::printf("test_two_layer_math: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
