// Argument checks and layout helpers shared by the CPU and CUDA kernels of the op layer
// (docs/op_layer.md). Every precondition is a check with a message that names the argument, so
// a bad call raises a Python exception instead of reading out of bounds. These are the twins of
// fused_residual/checks.py (which the Triton ops use): the same rules, the same words and the
// same Python exception types (TORCH_CHECK_VALUE raises ValueError, TORCH_CHECK_TYPE TypeError).
// Each op calls its one `check_<op>_args` below.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <utility>

namespace fused_residual {

// Statistics and accumulation dtype: double for double input, float otherwise.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The layout kernels work in: channels_last when the input is channels_last-contiguous and
// not plain contiguous, otherwise contiguous NCHW (other strides are copied into it).
inline at::MemoryFormat working_layout(const at::Tensor& input) {
  if (!input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_input(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 4, "fused_residual: expected 4-D input (N, C, H, W), got ",
                    input.dim(), "-D input of shape ", input.sizes());
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()),
                   "fused_residual: input dtype must be float16, bfloat16, float32 or float64, got ",
                   input.scalar_type());
}

// `t` must match `input` in shape, dtype and device (residual, grad_out, input2).
inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == input.sizes(), "fused_residual: ", name, " shape ", t.sizes(),
                    " does not match input shape ", input.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), "fused_residual: ", name, " dtype ",
                   t.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input.device(), "fused_residual: ", name, " is on ", t.device(),
                    " but input is on ", input.device());
}

// A per-channel vector (mean, var, weight, bias, running stats, sums): 1-D of length C,
// floating, on the input's device.
inline void check_per_channel(const at::Tensor& t, int64_t channels, const at::Device& device,
                              const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, "fused_residual: ", name,
                    " must have shape (", channels, ",) for an input with ", channels,
                    " channels, got ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "fused_residual: ", name,
                   " must be a floating tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "fused_residual: ", name, " is on ", t.device(),
                    " but input is on ", device);
}

inline void check_per_channel(const std::optional<at::Tensor>& t, int64_t channels,
                              const at::Device& device, const char* name) {
  if (t.has_value()) {
    check_per_channel(*t, channels, device, name);
  }
}

// The per-channel arguments of an op on `input`, by name (absent optionals are skipped).
inline void check_channels(
    const at::Tensor& input,
    std::initializer_list<std::pair<const char*, std::optional<at::Tensor>>> tensors) {
  for (const auto& [name, t] : tensors) {
    check_per_channel(t, input.size(1), input.device(), name);
  }
}

// The packed ReLU mask: contiguous uint8 of ceil(numel / 8) bytes on the input's device (the
// kernels index it densely).
inline void check_mask(const at::Tensor& mask, const at::Tensor& input) {
  const int64_t bytes = (input.numel() + 7) / 8;
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kByte, "fused_residual: mask must be uint8, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.size(0) == bytes,
                    "fused_residual: mask must have shape (", bytes, ",) for an input of ",
                    input.numel(), " elements, got ", mask.sizes());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "fused_residual: mask must be contiguous, got stride ",
                    mask.strides());
  TORCH_CHECK_VALUE(mask.device() == input.device(), "fused_residual: mask is on ", mask.device(),
                    " but input is on ", input.device());
}

inline void check_count(int64_t count) {
  TORCH_CHECK_VALUE(count >= 1, "fused_residual: count (values per channel) must be >= 1, got ",
                    count);
}

// The unbiased variance var * count / (count - 1) needs count >= 2.
inline void check_unbiased_count(int64_t count) {
  TORCH_CHECK_VALUE(count >= 2,
                    "fused_residual: count (values per channel) must be >= 2 for the unbiased "
                    "running variance, got ", count);
}

// The kernel registered for `type` only runs on tensors of that device type.
inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK_VALUE(t.device().type() == type, "fused_residual: ", name, " must be a ", type,
                    " tensor, got one on ", t.device());
}

// Statistics need at least one value per channel (N * H * W >= 1).
inline void check_reduction_size(const at::Tensor& input) {
  const int64_t per_channel = input.size(0) * input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(per_channel >= 1, "fused_residual: batch statistics need N*H*W >= 1 values "
                    "per channel, got input of shape ", input.sizes());
}

// ---- One function per op (twins of check_*_args in fused_residual/checks.py) ----------------
// Shared rules: a reduction (bn_stats, bn_backward_reduce) needs N*H*W >= 1; an element-wise op
// accepts N*H*W == 0 (empty outputs); count >= 2 for the running-variance update and >= 1 for a
// training bn_backward_apply; the mask as check_mask.

inline void check_stats_args(const at::Tensor& input, c10::DeviceType device_type) {
  check_input(input);
  check_device_type(input, device_type, "input");
  check_reduction_size(input);
}

// Returns C, the length of mean (bn_update_running_stats has no input tensor).
inline int64_t check_update_running_stats_args(const at::Tensor& mean, const at::Tensor& var,
                                               int64_t count, const at::Tensor& running_mean,
                                               const at::Tensor& running_var,
                                               c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(mean.dim() == 1, "fused_residual: mean must be 1-D (C,), got ", mean.sizes());
  const int64_t channels = mean.size(0);
  check_device_type(mean, device_type, "mean");
  check_per_channel(mean, channels, mean.device(), "mean");
  check_per_channel(var, channels, mean.device(), "var");
  check_per_channel(running_mean, channels, mean.device(), "running_mean");
  check_per_channel(running_var, channels, mean.device(), "running_var");
  check_unbiased_count(count);
  return channels;
}

inline void check_apply_args(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                             const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, c10::DeviceType device_type) {
  check_input(input);
  check_device_type(input, device_type, "input");
  if (residual.has_value()) check_like_input(*residual, input, "residual");
  check_channels(input, {{"mean", mean}, {"var", var}, {"weight", weight}, {"bias", bias}});
}

inline void check_dual_apply_args(const at::Tensor& input, const at::Tensor& mean,
                                  const at::Tensor& var, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& input2,
                                  const at::Tensor& mean2, const at::Tensor& var2,
                                  const std::optional<at::Tensor>& weight2,
                                  const std::optional<at::Tensor>& bias2,
                                  c10::DeviceType device_type) {
  check_input(input);
  check_device_type(input, device_type, "input");
  check_like_input(input2, input, "input2");
  check_channels(input, {{"mean", mean}, {"var", var}, {"weight", weight}, {"bias", bias},
                         {"mean2", mean2}, {"var2", var2}, {"weight2", weight2}, {"bias2", bias2}});
}

inline void check_backward_reduce_args(const at::Tensor& grad_out, const at::Tensor& mask,
                                       const at::Tensor& input, const at::Tensor& mean,
                                       const at::Tensor& var, c10::DeviceType device_type) {
  check_input(input);
  check_device_type(input, device_type, "input");
  check_reduction_size(input);
  check_like_input(grad_out, input, "grad_out");
  check_mask(mask, input);
  check_channels(input, {{"mean", mean}, {"var", var}});
}

inline void check_backward_apply_args(const at::Tensor& grad_out, const at::Tensor& mask,
                                      const at::Tensor& input, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& sum_dy,
                                      const std::optional<at::Tensor>& sum_dy_xmu, int64_t count,
                                      c10::DeviceType device_type) {
  check_input(input);
  check_device_type(input, device_type, "input");
  check_like_input(grad_out, input, "grad_out");
  check_mask(mask, input);
  check_channels(input, {{"mean", mean}, {"var", var}, {"weight", weight}, {"sum_dy", sum_dy},
                         {"sum_dy_xmu", sum_dy_xmu}});
  TORCH_CHECK_VALUE(sum_dy.has_value() == sum_dy_xmu.has_value(),
                    "fused_residual: sum_dy and sum_dy_xmu must both be given (training) or both "
                    "be None (eval)");
  if (sum_dy.has_value()) check_count(count);
}

}  // namespace fused_residual
