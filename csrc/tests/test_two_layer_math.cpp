// Unit tests of the torch-free two-layer math (lazyfast/two_layer.h): the
// elementwise activate step of every two-layer op, against direct formulas.
// Built and run by CMake/ctest (no torch, no GPU).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "lazyfast/activations.h"
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

}  // namespace

int main() {
  test_activate_row();
  test_activate_colsums();
  test_chunk_sizes();
  std::printf("test_two_layer_math: %d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
