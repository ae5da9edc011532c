// Argument checks of the op boundary, shared by the CPU ops (csrc/cpu) and the CUDA glue (csrc/cuda): every
// tensor's shape, dtype, device and layout against the others, before a kernel reads memory. Errors name the
// op, the argument, what was expected and what came: ValueError for shapes, devices, layouts and values,
// TypeError for dtypes (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE). The fakes in pyebm/ops/_fake.py run the same
// checks in Python (pyebm/ops/_checks.py).
//
// Names are built only when a check fails (Arg), so a check costs a few comparisons on the hot path.
// ATen glue, device-generic: it compiles against a CPU-only torch for the nvcc compile check.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <sstream>
#include <string>

namespace pyebm {
namespace checks {

// An argument's name for messages: base, base[index], or base[index] (note).
struct Arg {
  const char* base;
  int64_t index = -1;
  const char* note = nullptr;
  std::string str() const {
    std::string s(base);
    if (index >= 0) s += "[" + std::to_string(index) + "]";
    if (note != nullptr) s += std::string(" (") + note + ")";
    return s;
  }
};

// "torch.float32", as Python prints a dtype.
inline std::string dtype_name(at::ScalarType st) { return "torch." + std::string(c10::getDtypeNames(st).first); }

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// "[2, 3] float32 on cpu"
inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  return shape_str(t.sizes()) + " " + dtype_name(t.scalar_type()) + " on " + t.device().str();
}

// A defined, dense (strided, not quantized) tensor: the only kind a kernel reads through data_ptr.
inline void dense(const char* op, const Arg& a, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", a.str(), " is an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", a.str(), " must be a dense (strided) tensor; got layout ",
                    t.layout());
  TORCH_CHECK_TYPE(!t.is_quantized(), op, ": ", a.str(), " must not be a quantized tensor; got ",
                   dtype_name(t.scalar_type()));
}

// t has exactly `shape` (symbolic: how the op names it, e.g. "[D, A]").
inline void shape(const char* op, const Arg& a, const at::Tensor& t, at::IntArrayRef expected,
                  const char* symbolic = nullptr) {
  if (t.sizes() == expected) return;
  TORCH_CHECK_VALUE(false, op, ": ", a.str(), " must have shape ", shape_str(expected), symbolic ? " (" : "",
                    symbolic ? symbolic : "", symbolic ? ")" : "", "; got ", describe(t));
}

// t has the dtype and device of ref (ref_name names it, e.g. "y").
inline void like(const char* op, const Arg& a, const at::Tensor& t, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", a.str(), " has dtype ", dtype_name(t.scalar_type()),
                   " but ", ref_name, " has dtype ", dtype_name(ref.scalar_type()), " (they must match)");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", a.str(), " is on ", t.device(), " but ", ref_name, " is on ",
                    ref.device(), " (they must be on one device)");
}

inline void dtype(const char* op, const Arg& a, const at::Tensor& t, at::ScalarType st) {
  TORCH_CHECK_TYPE(t.scalar_type() == st, op, ": ", a.str(), " must be ", dtype_name(st), "; got ", describe(t));
}

inline void floating(const char* op, const Arg& a, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", a.str(), " must be a floating tensor; got ",
                   describe(t));
}

inline void device(const char* op, const Arg& a, const at::Tensor& t, const at::Device& dev) {
  TORCH_CHECK_VALUE(t.device() == dev, op, ": ", a.str(), " must be on ", dev, "; got ", describe(t));
}

// A finite float argument (and, with lo_incl, >= lo).
inline void finite(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite; got ", v);
}
inline void non_negative(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, op, ": ", name, " must be a finite number >= 0; got ", v);
}

// The values of the per-coordinate options as the kernels take them (contiguous [D], compute dtype, any
// device; undefined when absent): bounds not NaN, lower <= upper, step_clip > 0. CPU tensors are read in
// place; tensors on another device are copied to the host for the check (one small synchronising copy), unless
// read_device is false (during CUDA graph capture, where no host read is allowed).
inline void event_values(const char* op, const at::Tensor& lower, const at::Tensor& upper,
                         const at::Tensor& step_clip, bool read_device = true) {
  auto host = [&](const at::Tensor& t) {
    if (!t.defined() || t.device().is_cpu()) return t;
    return read_device ? t.to(at::kCPU) : at::Tensor();
  };
  const at::Tensor lo = host(lower), hi = host(upper), sc = host(step_clip);
  const at::Tensor& any = lo.defined() ? lo : (hi.defined() ? hi : sc);
  if (!any.defined()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, any.scalar_type(), "pyebm_event_values", [&] {
    using T = scalar_t;
    const int64_t D = any.numel();
    const T* l = lo.defined() ? lo.data_ptr<T>() : nullptr;
    const T* h = hi.defined() ? hi.data_ptr<T>() : nullptr;
    const T* s = sc.defined() ? sc.data_ptr<T>() : nullptr;
    for (int64_t j = 0; j < D; ++j) {
      const double lv = l ? double(l[j]) : -INFINITY, hv = h ? double(h[j]) : INFINITY;
      TORCH_CHECK_VALUE(!std::isnan(lv), op, ": lower must not be NaN (coordinate ", j, ")");
      TORCH_CHECK_VALUE(!std::isnan(hv), op, ": upper must not be NaN (coordinate ", j, ")");
      TORCH_CHECK_VALUE(lv <= hv, op, ": lower must be <= upper; coordinate ", j, " has lower ", lv, " > upper ", hv);
      if (s) {
        const double sv = double(s[j]);
        TORCH_CHECK_VALUE(sv > 0, op, ": step_clip must be > 0; coordinate ", j, " has ", sv);
      }
    }
  });
}

}  // namespace checks
}  // namespace pyebm
