// Activation functions and their derivatives, written once for the CPU and the
// CUDA kernels (host+device under nvcc). The integer codes are part of the op
// schemas: keep them in sync with lazyfast/_activations.py.
#pragma once

#include <math.h>

#include "lazyfast/common.h"

namespace lazyfast {

enum class Activation : int {
  Identity = 0,
  ReLU = 1,
  Tanh = 2,
  GELU = 3,  // exact (erf) form: x * Phi(x)
  Softplus = 4,
};

constexpr int kNumActivations = 5;

LF_HD bool valid_activation(int64_t code) { return code >= 0 && code < kNumActivations; }

// Precision-specific libm calls, so float stays float on host and device.
LF_HD float lf_tanh(float x) { return tanhf(x); }
LF_HD double lf_tanh(double x) { return tanh(x); }
LF_HD float lf_erf(float x) { return erff(x); }
LF_HD double lf_erf(double x) { return erf(x); }
LF_HD float lf_exp(float x) { return expf(x); }
LF_HD double lf_exp(double x) { return exp(x); }
LF_HD float lf_log1p(float x) { return log1pf(x); }
LF_HD double lf_log1p(double x) { return log1p(x); }

template <typename T>
LF_HD T act_value(Activation a, T z) {
  switch (a) {
    case Activation::ReLU:
      return z > T(0) ? z : T(0);
    case Activation::Tanh:
      return lf_tanh(z);
    case Activation::GELU:
      return T(0.5) * z * (T(1) + lf_erf(z * T(0.70710678118654752440)));
    case Activation::Softplus: {
      // log(1 + e^z) without overflow: max(z, 0) + log1p(e^{-|z|}).
      const T az = z > T(0) ? z : -z;
      return (z > T(0) ? z : T(0)) + lf_log1p(lf_exp(-az));
    }
    case Activation::Identity:
    default:
      return z;
  }
}

// sigma'(z). ReLU'(0) is taken as 0, as torch.autograd does.
template <typename T>
LF_HD T act_deriv(Activation a, T z) {
  switch (a) {
    case Activation::ReLU:
      return z > T(0) ? T(1) : T(0);
    case Activation::Tanh: {
      const T t = lf_tanh(z);
      return T(1) - t * t;
    }
    case Activation::GELU:
      // Phi(z) + z * phi(z)
      return T(0.5) * (T(1) + lf_erf(z * T(0.70710678118654752440))) +
             z * T(0.39894228040143267794) * lf_exp(T(-0.5) * z * z);
    case Activation::Softplus:
      // sigmoid(z), evaluated stably on both sides.
      if (z >= T(0)) {
        return T(1) / (T(1) + lf_exp(-z));
      } else {
        const T e = lf_exp(z);
        return e / (T(1) + e);
      }
    case Activation::Identity:
    default:
      return T(1);
  }
}

}  // namespace lazyfast
