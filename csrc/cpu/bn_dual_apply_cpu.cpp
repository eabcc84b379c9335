// CPU implementation of bn_dual_apply (contract: docs/op_layer.md): the tail of a
// downsampling residual block, where the main path's last BatchNorm and the shortcut's
// BatchNorm feed the same add,
//
//   y = (x - mean_c) * invstd_c * w_c + b_c + (x2 - mean2_c) * invstd2_c * w2_c + b2_c
//   out = y < 0 ? 0 : y,  mask bit = y > 0
//
// in one pass: read x and x2, write out and the mask, the bytes of bn_apply with a
// residual. The eager block runs a normalize pass per BatchNorm, an add and a ReLU, and
// writes both normalized tensors and the sum. The streaming kernel is the apply kernel
// (bn_apply_kernels.h) in its Addend::kNormalized form; both biases are folded into one
// per-channel shift.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu/bn_cpu_op_utils.h"
#include "op_checks.h"

namespace fused_residual::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> bn_dual_apply_cpu(
    const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& input2, const at::Tensor& mean2, const at::Tensor& var2,
    const std::optional<at::Tensor>& weight2, const std::optional<at::Tensor>& bias2,
    double eps, double eps2, bool save_mask) {
  check_dual_apply_args(input, mean, var, weight, bias, input2, mean2, var2, weight2, bias2,
                        c10::DeviceType::CPU);

  // input2 may come in another layout (the shortcut conv's output): copied into input's.
  const Working w = working_of(input);
  const at::Tensor x = input.contiguous(w.format);
  const at::Tensor x2 = input2.contiguous(w.format);
  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean_acc = channel_acc(mean, acc);
  const at::Tensor mean2_acc = channel_acc(mean2, acc);
  const ChannelConstants k2 = affine_constants(var2, weight2, bias2, eps2, acc);
  const ChannelConstants k = affine_constants(var, weight, bias, eps, acc, k2.at<double>(1));

  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(w.format));
  at::Tensor mask = at::empty({save_mask ? (input.numel() + 7) / 8 : 0},
                              input.options().dtype(at::kByte));
  if (input.numel() > 0) {
    ApplyArgs args{x.const_data_ptr(), nullptr, mean_acc.const_data_ptr(), k.at<double>(0),
                   k.at<double>(1), out.mutable_data_ptr(),
                   save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr};
    args.x2 = x2.const_data_ptr();
    args.mean2 = mean2_acc.const_data_ptr();
    args.scale2 = k2.at<double>(0);
    kernels().apply(x.scalar_type(), w.geometry, args);
  }
  return {out, mask};
}

}  // namespace
}  // namespace fused_residual::cpu

TORCH_LIBRARY_IMPL(fused_residual, CPU, m) {
  m.impl("bn_dual_apply", &fused_residual::cpu::bn_dual_apply_cpu);
}
