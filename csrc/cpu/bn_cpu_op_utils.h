// Op-level helpers shared by the CPU op files (bn_add_relu_cpu.cpp: the five single-input
// ops; bn_dual_apply_cpu.cpp: the two-BatchNorm apply): the KernelSet chosen for this CPU,
// the working layout and geometry, per-channel acc vectors and the apply constants.
// Everything here is an inline function of fused_residual::cpu; the kernels themselves
// live in the ISA units (bn_kernels_*.cpp) behind bn_cpu_kernels.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/bn_cpu_kernels.h"
#include "op_checks.h"

namespace fused_residual::cpu {

// The AVX2 kernels when ATen itself runs AVX2 or AVX512 kernels on this CPU (honouring
// ATEN_CPU_CAPABILITY), else the baseline ones. Chosen once per process.
inline const KernelSet& kernels() {
  static const KernelSet* const chosen = [] {
#if defined(FUSED_RESIDUAL_HAVE_AVX2_KERNELS)
    const std::string capability = at::get_cpu_capability();
    if ((capability == "AVX2" || capability == "AVX512") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return &avx2::kKernels;
    }
#endif
    return &baseline::kKernels;
  }();
  return *chosen;
}

inline Geometry geometry_of(const at::Tensor& x, bool channels_last) {
  return Geometry{x.size(0), x.size(1), x.size(2) * x.size(3), channels_last};
}

struct Working {
  at::MemoryFormat format;
  Geometry geometry;
};

inline Working working_of(const at::Tensor& input) {
  const at::MemoryFormat format = working_layout(input);
  return {format, geometry_of(input, format == at::MemoryFormat::ChannelsLast)};
}

// A per-channel tensor (any floating dtype, any stride) as a contiguous acc tensor; no copy
// when it already is one. The common case (an acc tensor, contiguous) returns without a
// dispatcher call: `to` and `contiguous` each cost one even when they return `t`, and the
// per-call host time of the ops is most of their time on small tensors (issue 21).
inline at::Tensor channel_acc(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous()) {
    return t;
  }
  return t.to(acc).contiguous();
}

inline at::Tensor channel_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? channel_acc(*t, acc) : at::Tensor();
}

// Data of a contiguous acc tensor, or nullptr for an undefined one.
template <typename acc_t>
const acc_t* acc_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

inline at::Tensor new_channels(int64_t c, const at::Tensor& like, at::ScalarType acc) {
  return at::empty({c}, like.options().dtype(acc));
}

// Stores acc values into a per-channel tensor of any floating dtype and stride.
template <typename acc_t>
void store_channels(at::Tensor& dst, const acc_t* values) {
  const at::ScalarType dtype = dst.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "store_channels", [&] {
    scalar_t* p = dst.mutable_data_ptr<scalar_t>();
    const int64_t stride = dst.stride(0);
    for (int64_t i = 0; i < dst.size(0); ++i) {
      p[i * stride] = static_cast<scalar_t>(values[i]);
    }
  });
}

// invstd_c = 1 / sqrt(var_c + eps) in acc.
template <typename acc_t>
inline acc_t invstd_of(acc_t var, double eps) {
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// Per-channel acc constants of one op call, in host memory (a std::vector, not a tensor:
// no allocator or dispatcher call; the kernels take raw pointers). `at(k)` is the k-th array
// of C values; storage is in doubles, so it holds C floats or C doubles per array.
class ChannelConstants {
 public:
  ChannelConstants(int64_t c, int arrays) : c_(c), storage_(static_cast<size_t>(c * arrays)) {}

  template <typename acc_t>
  acc_t* at(int k) {
    static_assert(sizeof(acc_t) <= sizeof(double));
    return reinterpret_cast<acc_t*>(storage_.data() + k * c_);
  }

  template <typename acc_t>
  const acc_t* at(int k) const {
    return reinterpret_cast<const acc_t*>(storage_.data() + k * c_);
  }

 private:
  int64_t c_;
  std::vector<double> storage_;
};

// The apply kernels' per-channel constants of one BatchNorm, y = (x - mean_c) * scale_c +
// shift_c: scale_c = invstd_c * w_c (w = 1 when absent) and shift_c = b_c (0 when absent),
// plus `extra_shift` (another BatchNorm's bias folded into the same add; may be nullptr,
// else C acc values). Returns (scale, shift) as arrays 0 and 1 of C acc values.
inline ChannelConstants affine_constants(const at::Tensor& var,
                                         const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, double eps,
                                         at::ScalarType acc, const void* extra_shift = nullptr) {
  const int64_t c = var.size(0);
  ChannelConstants k(c, 2);
  AT_DISPATCH_FLOATING_TYPES(acc, "affine_constants", [&] {
    using acc_t = scalar_t;
    const at::Tensor v = channel_acc(var, acc);
    const at::Tensor wt = channel_acc(weight, acc);
    const at::Tensor bs = channel_acc(bias, acc);
    const acc_t* vp = acc_data<acc_t>(v);
    const acc_t* wp = acc_data<acc_t>(wt);
    const acc_t* bp = acc_data<acc_t>(bs);
    const acc_t* ep = static_cast<const acc_t*>(extra_shift);
    acc_t* sp = k.at<acc_t>(0);
    acc_t* hp = k.at<acc_t>(1);
    for (int64_t i = 0; i < c; ++i) {
      const acc_t inv = invstd_of(vp[i], eps);
      sp[i] = wp != nullptr ? inv * wp[i] : inv;
      hp[i] = bp != nullptr ? bp[i] : acc_t(0);
      if (ep != nullptr) {
        hp[i] += ep[i];
      }
    }
  });
  return k;
}

}  // namespace fused_residual::cpu
