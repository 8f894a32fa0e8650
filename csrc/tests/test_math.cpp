// Unit tests of the torch-free math shared by the CPU and CUDA kernels.
// Built and run by CMake/ctest (no torch, no GPU).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "lazyfast/activations.h"

namespace {

int g_pass = 0, g_fail = 0;

void check(bool ok, const char* what, double got, double want) {
  if (ok) {
    ++g_pass;
  } else {
    ++g_fail;
    std::printf("FAIL %s: got %.17g want %.17g\n", what, got, want);
  }
}

void check_close(double got, double want, double tol, const char* what) {
  check(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)), what, got, want);
}

using lazyfast::Activation;

double ref_value(Activation a, double z) {
  switch (a) {
    case Activation::ReLU: return z > 0 ? z : 0;
    case Activation::Tanh: return std::tanh(z);
    case Activation::GELU: return 0.5 * z * (1 + std::erf(z / std::sqrt(2.0)));
    case Activation::Softplus: return std::log1p(std::exp(z));
    default: return z;
  }
}

void test_activation_values_and_derivatives() {
  const Activation acts[] = {Activation::Identity, Activation::ReLU, Activation::Tanh, Activation::GELU,
                             Activation::Softplus};
  const double zs[] = {-3.1, -0.7, -1e-3, 0.25, 1.3, 4.0};
  for (Activation a : acts) {
    for (double z : zs) {
      check_close(lazyfast::act_value<double>(a, z), ref_value(a, z), 1e-14, "act_value<double>");
      check_close(lazyfast::act_value<float>(a, static_cast<float>(z)), ref_value(a, z), 2e-6, "act_value<float>");
      // Central finite difference of the value (away from the ReLU kink).
      const double h = 1e-6;
      const double fd = (lazyfast::act_value<double>(a, z + h) - lazyfast::act_value<double>(a, z - h)) / (2 * h);
      check_close(lazyfast::act_deriv<double>(a, z), fd, 1e-8, "act_deriv<double> vs finite difference");
      check_close(lazyfast::act_deriv<float>(a, static_cast<float>(z)), fd, 2e-6, "act_deriv<float>");
    }
  }
  // Conventions and overflow safety.
  check(lazyfast::act_deriv<double>(Activation::ReLU, 0.0) == 0.0, "relu'(0) == 0", lazyfast::act_deriv<double>(Activation::ReLU, 0.0), 0.0);
  const double big = lazyfast::act_value<double>(Activation::Softplus, 1000.0);
  check(std::isfinite(big) && std::fabs(big - 1000.0) < 1e-12, "softplus(1000) finite", big, 1000.0);
  const double sig = lazyfast::act_deriv<double>(Activation::Softplus, -1000.0);
  check(std::isfinite(sig) && sig >= 0.0 && sig < 1e-300, "sigmoid(-1000) ~ 0", sig, 0.0);
  check(lazyfast::valid_activation(4) && !lazyfast::valid_activation(5) && !lazyfast::valid_activation(-1),
        "valid_activation range", 0, 0);
}

}  // namespace

int main() {
  test_activation_values_and_derivatives();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail == 0 ? 0 : 1;
}
