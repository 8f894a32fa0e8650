// Argument checks shared by the CPU and CUDA launchers (torch side).
#pragma once

#include <ATen/ATen.h>

#define LF_CHECK_FLOAT(t, name)                                                                 \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,           \
              "lazyfast: ", name, " must be float32 or float64, got ", (t).scalar_type())

#define LF_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), "lazyfast: ", name, " must be ", d, "-D, got shape ", (t).sizes())

#define LF_CHECK_SAME_DTYPE(a, b, na, nb)                                                   \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "lazyfast: ", nb, " has dtype ",     \
              (b).scalar_type(), " but ", na, " has dtype ", (a).scalar_type())

#define LF_CHECK_SAME_DEVICE(a, b, na, nb)                                                  \
  TORCH_CHECK((a).device() == (b).device(), "lazyfast: ", nb, " is on ", (b).device(),     \
              " but ", na, " is on ", (a).device())
