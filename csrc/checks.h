// Argument checks shared by the CPU and CUDA launchers (torch side).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <ostream>

#define LF_CHECK_FLOAT(t, name)                                                                 \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kDouble,           \
              "lazyfast: ", name, " must be float32 or float64, got ", (t).scalar_type())

// Runs the lambda __VA_ARGS__ with `scalar_t` = the C++ type of t's dtype, float or double
// (AT_DISPATCH_FLOATING_TYPES). Any other dtype fails first with a clear error naming the
// argument (`name`); the raw ops check dtypes on entry, so their internal steps never reach
// it. `what` (a string literal) names the step for the dispatcher's profiling record.
#define LF_DISPATCH_FLOAT(t, name, what, ...)                              \
  do {                                                                     \
    LF_CHECK_FLOAT(t, name);                                               \
    AT_DISPATCH_FLOATING_TYPES((t).scalar_type(), what, __VA_ARGS__);      \
  } while (0)

#define LF_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), "lazyfast: ", name, " must be ", d, "-D, got shape ", (t).sizes())

#define LF_CHECK_SAME_DTYPE(a, b, na, nb)                                                   \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "lazyfast: ", nb, " has dtype ",     \
              (b).scalar_type(), " but ", na, " has dtype ", (a).scalar_type())

#define LF_CHECK_SAME_DEVICE(a, b, na, nb)                                                  \
  TORCH_CHECK((a).device() == (b).device(), "lazyfast: ", nb, " is on ", (b).device(),     \
              " but ", na, " is on ", (a).device())

namespace lazyfast {

// One tensor argument of a raw op for check_op_tensors: its schema name and its tensors
// (one for a Tensor, none for an absent Tensor?, the elements of a Tensor[]).
struct OpTensorArg {
  OpTensorArg(const char* n, const at::Tensor& t) : name(n), tensors(t) {}
  OpTensorArg(const char* n, const std::optional<at::Tensor>& t)
      : name(n), tensors(t.has_value() ? at::TensorList(*t) : at::TensorList()) {}
  OpTensorArg(const char* n, at::TensorList ts) : name(n), tensors(ts), list(true) {}
  const char* name;
  at::TensorList tensors;
  bool list = false;
};

// "x1", or "d1[2]" for element 2 of a tensor list (printed only when a check fails).
struct OpTensorLabel {
  const OpTensorArg* arg;
  size_t index;
};

inline std::ostream& operator<<(std::ostream& os, const OpTensorLabel& l) {
  os << l.arg->name;
  if (l.arg->list) os << "[" << l.index << "]";
  return os;
}

// The checks every raw op runs first, in its CPU and CUDA launchers, on EVERY tensor argument
// (absent optionals skipped, each element of a tensor list checked): each must be defined,
// strided (no sparse, mkldnn or nested tensor: the kernels read raw strided memory), with the
// dtype and on the device of the first tensor argument (the reference), which must be float32
// or float64 and on a device of type `backend` (the launcher's: kCPU, or kCUDA = every
// tensor on the same GPU). The messages name the op and the argument, e.g.
// "lazyfast: two_layer_ntk: B is on meta but x1 is on cpu".
inline void check_op_tensors(const char* op, c10::DeviceType backend, std::initializer_list<OpTensorArg> args) {
  const at::Tensor* ref = nullptr;
  OpTensorLabel ref_label{nullptr, 0};
  for (const OpTensorArg& a : args) {
    for (size_t i = 0; i < a.tensors.size(); ++i) {
      const at::Tensor& t = a.tensors[i];
      const OpTensorLabel label{&a, i};
      TORCH_CHECK(t.defined(), "lazyfast: ", op, ": ", label, " is an undefined tensor");
      TORCH_CHECK(!t.is_nested(), "lazyfast: ", op, ": ", label,
                  " must be a strided (dense) tensor, got a nested tensor");
      TORCH_CHECK(t.layout() == at::kStrided, "lazyfast: ", op, ": ", label,
                  " must be a strided (dense) tensor, got layout ", t.layout());
      if (ref == nullptr) {
        ref = &t;
        ref_label = label;
        TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "lazyfast: ", op, ": ", label,
                    " must be float32 or float64, got ", t.scalar_type());
        continue;
      }
      TORCH_CHECK(t.device() == ref->device(), "lazyfast: ", op, ": ", label, " is on ", t.device(), " but ",
                  ref_label, " is on ", ref->device());
      TORCH_CHECK(t.scalar_type() == ref->scalar_type(), "lazyfast: ", op, ": ", label, " has dtype ",
                  t.scalar_type(), " but ", ref_label, " has dtype ", ref->scalar_type());
    }
  }
  TORCH_CHECK(ref != nullptr, "lazyfast: ", op, ": no tensor argument given");
  TORCH_CHECK(ref->device().type() == backend, "lazyfast: ", op, ": ", ref_label, " is on ", ref->device(),
              " but this is the ", c10::DeviceTypeName(backend), " kernel (every tensor must be on a ",
              c10::DeviceTypeName(backend, /*lower_case=*/true), " device)");
}

}  // namespace lazyfast

// Tensors of another layout or kind (sparse COO/CSR, mkldnn, nested, quantized) dispatch to
// their own keys (SparseCPU, ...), where a raw op would otherwise fail with the dispatcher's
// "Could not run ... with arguments from the 'SparseCPU' backend". Registering the backend's
// launchers there too (register_fn(torch::Library&) does the m.impl calls) lets their
// check_op_tensors refuse such a tensor naming the argument. `backend` is CPU or CUDA; the
// file using this includes <torch/library.h>.
#define LF_TORCH_LIBRARY_IMPL_LAYOUT_KEYS(backend, register_fn)                               \
  TORCH_LIBRARY_IMPL(lazyfast, Sparse##backend, m) { register_fn(m); }                         \
  TORCH_LIBRARY_IMPL(lazyfast, SparseCsr##backend, m) { register_fn(m); }                      \
  TORCH_LIBRARY_IMPL(lazyfast, NestedTensor##backend, m) { register_fn(m); }                   \
  TORCH_LIBRARY_IMPL(lazyfast, Quantized##backend, m) { register_fn(m); }
