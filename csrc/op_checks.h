// Argument checks and layout helpers shared by the CPU and CUDA kernels of the op layer
// (docs/op_layer.md). Every precondition is a TORCH_CHECK with a message that names the
// argument, so a bad call raises a Python RuntimeError instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

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
  TORCH_CHECK(input.dim() == 4, "fused_residual: input must be 4-D (N, C, H, W), got ",
              input.dim(), "-D");
  TORCH_CHECK(is_supported_float(input.scalar_type()),
              "fused_residual: input dtype must be float16, bfloat16, float32 or float64, got ",
              input.scalar_type());
}

// `t` must match `input` in shape, dtype and device (residual, grad_out).
inline void check_like_input(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.sizes() == input.sizes(), "fused_residual: ", name, " shape ", t.sizes(),
              " does not match input shape ", input.sizes());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_residual: ", name, " dtype ",
              t.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fused_residual: ", name, " is on ", t.device(),
              " but input is on ", input.device());
}

// A per-channel vector (mean, var, weight, bias, running stats, sums): 1-D of length C,
// floating, on the input's device.
inline void check_per_channel(const at::Tensor& t, int64_t channels, const at::Device& device,
                              const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, "fused_residual: ", name,
              " must have shape (", channels, ",), got ", t.sizes());
  TORCH_CHECK(is_supported_float(t.scalar_type()), "fused_residual: ", name,
              " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "fused_residual: ", name, " is on ", t.device(),
              " but input is on ", device);
}

inline void check_per_channel(const std::optional<at::Tensor>& t, int64_t channels,
                              const at::Device& device, const char* name) {
  if (t.has_value()) {
    check_per_channel(*t, channels, device, name);
  }
}

// The packed ReLU mask: uint8, ceil(numel / 8) bytes, on the input's device.
inline void check_mask(const at::Tensor& mask, const at::Tensor& input) {
  const int64_t bytes = (input.numel() + 7) / 8;
  TORCH_CHECK(mask.scalar_type() == at::kByte, "fused_residual: mask must be uint8, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.size(0) == bytes, "fused_residual: mask must have shape (",
              bytes, ",) for an input of ", input.numel(), " elements, got ", mask.sizes());
  TORCH_CHECK(mask.device() == input.device(), "fused_residual: mask is on ", mask.device(),
              " but input is on ", input.device());
}

inline void check_count(int64_t count) {
  TORCH_CHECK(count >= 1, "fused_residual: count (values per channel) must be >= 1, got ", count);
}

// The length C of a per-channel vector that defines it (mean in bn_update_running_stats,
// which has no input tensor): it must be 1-D.
inline int64_t per_channel_length(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, "fused_residual: ", name, " must be 1-D (C,), got ", t.sizes());
  return t.size(0);
}

// The kernel registered for `type` only runs on tensors of that device type.
inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* name) {
  TORCH_CHECK(t.device().type() == type, "fused_residual: ", name, " must be a ", type,
              " tensor, got one on ", t.device());
}

// Statistics need at least one value per channel (N * H * W >= 1).
inline void check_reduction_size(const at::Tensor& input) {
  const int64_t per_channel = input.size(0) * input.size(2) * input.size(3);
  TORCH_CHECK(per_channel >= 1, "fused_residual: batch statistics need N*H*W >= 1 values per "
              "channel, got input of shape ", input.sizes());
}

// The unbiased variance var * count / (count - 1) needs count >= 2.
inline void check_unbiased_count(int64_t count) {
  TORCH_CHECK(count >= 2,
              "fused_residual: count (values per channel) must be >= 2 for the unbiased running "
              "variance, got ", count);
}

// bn_backward_apply: sum_dy and sum_dy_xmu come together (training) or not at all (eval).
inline void check_backward_sums(const std::optional<at::Tensor>& sum_dy,
                                const std::optional<at::Tensor>& sum_dy_xmu) {
  TORCH_CHECK(sum_dy.has_value() == sum_dy_xmu.has_value(),
              "fused_residual: sum_dy and sum_dy_xmu must both be given (training) or both be "
              "None (eval)");
}

// Every tensor argument of bn_dual_apply, for the kernels of `device_type` (CPU or CUDA).
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
  const int64_t c = input.size(1);
  const at::Device device = input.device();
  check_per_channel(mean, c, device, "mean");
  check_per_channel(var, c, device, "var");
  check_per_channel(weight, c, device, "weight");
  check_per_channel(bias, c, device, "bias");
  check_per_channel(mean2, c, device, "mean2");
  check_per_channel(var2, c, device, "var2");
  check_per_channel(weight2, c, device, "weight2");
  check_per_channel(bias2, c, device, "bias2");
}

}  // namespace fused_residual
