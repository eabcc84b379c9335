// CPU implementations of the five single-input fused_residual ops (contract: docs/op_layer.md;
// the sixth, bn_dual_apply, is in bn_dual_apply_cpu.cpp).
//
// This file owns the op-level work: argument checks (op_checks.h), the working layout
// (NCHW-contiguous or channels_last-contiguous tensors are used as they are; any other
// strides, and a residual / grad_out in another layout, are copied into the input's
// working layout), output allocation without zero-fill, and the O(C) per-channel constants.
// The streaming kernels (bn_*_kernels.h) are reached through a KernelSet chosen once per
// process by the CPU's ISA (see bn_cpu_kernels.h); the helpers shared with
// bn_dual_apply_cpu.cpp are in bn_cpu_op_utils.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/bn_cpu_op_utils.h"
#include "op_checks.h"

namespace fused_residual::cpu {
namespace {

// ---- the ops ----

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input) {
  check_stats_args(input, c10::DeviceType::CPU);
  const Working w = working_of(input);
  const at::Tensor x = input.contiguous(w.format);
  const at::ScalarType acc = acc_type(input.scalar_type());
  at::Tensor mean = new_channels(w.geometry.c, input, acc);
  at::Tensor var = new_channels(w.geometry.c, input, acc);
  if (w.geometry.c > 0) {
    kernels().stats(x.scalar_type(), w.geometry,
                    StatsArgs{x.const_data_ptr(), mean.mutable_data_ptr(), var.mutable_data_ptr()});
  }
  return {mean, var};
}

// O(C): running = (1 - momentum) * running + momentum * batch, with the unbiased variance.
void bn_update_running_stats_cpu(const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                 at::Tensor& running_mean, at::Tensor& running_var,
                                 double momentum) {
  const int64_t c = check_update_running_stats_args(mean, var, count, running_mean, running_var,
                                                    c10::DeviceType::CPU);
  const at::ScalarType acc = acc_type(mean.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_update_running_stats_cpu", [&] {
    using acc_t = scalar_t;
    const at::Tensor m = channel_acc(mean, acc);
    const at::Tensor v = channel_acc(var, acc);
    const at::Tensor rm = channel_acc(running_mean, acc);
    const at::Tensor rv = channel_acc(running_var, acc);
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* vp = v.const_data_ptr<acc_t>();
    const acc_t* rmp = rm.const_data_ptr<acc_t>();
    const acc_t* rvp = rv.const_data_ptr<acc_t>();
    const acc_t keep = static_cast<acc_t>(1.0 - momentum);
    const acc_t mom = static_cast<acc_t>(momentum);
    const acc_t unbias = static_cast<acc_t>(static_cast<double>(count) / (count - 1));
    std::vector<acc_t> new_mean(c), new_var(c);
    for (int64_t i = 0; i < c; ++i) {
      new_mean[i] = keep * rmp[i] + mom * mp[i];
      new_var[i] = keep * rvp[i] + mom * vp[i] * unbias;
    }
    store_channels(running_mean, new_mean.data());
    store_channels(running_var, new_var.data());
  });
}

std::tuple<at::Tensor, at::Tensor> bn_apply_cpu(const at::Tensor& input,
                                                const std::optional<at::Tensor>& residual,
                                                const at::Tensor& mean, const at::Tensor& var,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias,
                                                double eps, bool save_mask) {
  check_apply_args(input, residual, mean, var, weight, bias, c10::DeviceType::CPU);

  const Working w = working_of(input);
  const at::Tensor x = input.contiguous(w.format);
  std::optional<at::Tensor> r;
  if (residual.has_value()) {
    r = residual->contiguous(w.format);
  }
  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean_acc = channel_acc(mean, acc);
  const ChannelConstants k = affine_constants(var, weight, bias, eps, acc);

  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(w.format));
  at::Tensor mask = at::empty({save_mask ? (input.numel() + 7) / 8 : 0},
                              input.options().dtype(at::kByte));
  if (input.numel() > 0) {
    kernels().apply(x.scalar_type(), w.geometry,
                    ApplyArgs{x.const_data_ptr(), r.has_value() ? r->const_data_ptr() : nullptr,
                              mean_acc.const_data_ptr(), k.at<double>(0), k.at<double>(1),
                              out.mutable_data_ptr(),
                              save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr});
  }
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_reduce_cpu(
    const at::Tensor& grad_out, const at::Tensor& mask, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& var, double eps) {
  check_backward_reduce_args(grad_out, mask, input, mean, var, c10::DeviceType::CPU);
  const int64_t c = input.size(1);

  const Working w = working_of(input);
  const at::Tensor x = input.contiguous(w.format);
  const at::Tensor g = grad_out.contiguous(w.format);
  const at::Tensor& m = mask;  // contiguous (check_mask)
  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean_acc = channel_acc(mean, acc);
  at::Tensor sum_dy = new_channels(c, input, acc);
  at::Tensor sum_dy_xmu = new_channels(c, input, acc);
  if (c > 0) {
    kernels().backward_reduce(
        x.scalar_type(), w.geometry,
        BackwardReduceArgs{g.const_data_ptr(), m.const_data_ptr<uint8_t>(), m.numel(),
                           x.const_data_ptr(), mean_acc.const_data_ptr(),
                           sum_dy.mutable_data_ptr(), sum_dy_xmu.mutable_data_ptr()});
  }

  at::Tensor grad_weight = new_channels(c, input, acc);
  AT_DISPATCH_FLOATING_TYPES(acc, "bn_backward_reduce_cpu_weight", [&] {
    using acc_t = scalar_t;
    const at::Tensor v = channel_acc(var, acc);
    const acc_t* vp = v.const_data_ptr<acc_t>();
    const acc_t* s2 = sum_dy_xmu.const_data_ptr<acc_t>();
    acc_t* gw = grad_weight.mutable_data_ptr<acc_t>();
    for (int64_t i = 0; i < c; ++i) {
      gw[i] = s2[i] * invstd_of(vp[i], eps);
    }
  });
  return {sum_dy, sum_dy_xmu, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cpu(
    const at::Tensor& grad_out, const at::Tensor& mask, const at::Tensor& input,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& sum_dy, const std::optional<at::Tensor>& sum_dy_xmu,
    double eps, int64_t count, bool need_grad_input, bool need_grad_residual) {
  check_backward_apply_args(grad_out, mask, input, mean, var, weight, sum_dy, sum_dy_xmu, count,
                            c10::DeviceType::CPU);
  const int64_t c = input.size(1);
  const bool train = sum_dy.has_value();

  if (!need_grad_input && !need_grad_residual) {
    return {at::empty({0}, input.options()), at::empty({0}, input.options())};
  }
  const Working w = working_of(input);
  const at::Tensor g = grad_out.contiguous(w.format);
  const at::Tensor& m = mask;  // contiguous (check_mask)
  const bool read_x = need_grad_input && train;  // eval and grad_residual never read x
  const at::Tensor x = read_x ? input.contiguous(w.format) : input;
  const at::ScalarType acc = acc_type(input.scalar_type());

  at::Tensor mean_acc = read_x ? channel_acc(mean, acc) : at::Tensor();
  // Arrays 0, 1, 2: k_dy, k_xmu, k_const (host memory; see ChannelConstants).
  ChannelConstants k(need_grad_input ? c : 0, 3);
  if (need_grad_input) {
    AT_DISPATCH_FLOATING_TYPES(acc, "bn_backward_apply_cpu_constants", [&] {
      using acc_t = scalar_t;
      const at::Tensor v = channel_acc(var, acc);
      const at::Tensor wt = channel_acc(weight, acc);
      const at::Tensor s1 = channel_acc(sum_dy, acc);
      const at::Tensor s2 = channel_acc(sum_dy_xmu, acc);
      const acc_t* vp = acc_data<acc_t>(v);
      const acc_t* wp = acc_data<acc_t>(wt);
      const acc_t* s1p = acc_data<acc_t>(s1);
      const acc_t* s2p = acc_data<acc_t>(s2);
      acc_t* kd = k.at<acc_t>(0);
      acc_t* kx = k.at<acc_t>(1);
      acc_t* kc = k.at<acc_t>(2);
      const acc_t n = static_cast<acc_t>(count);
      for (int64_t i = 0; i < c; ++i) {
        const acc_t inv = invstd_of(vp[i], eps);
        kd[i] = wp != nullptr ? wp[i] * inv : inv;
        if (train) {
          // w invstd (dy - sum_dy / n - (x - mean) invstd^2 sum_dy_xmu / n), distributed.
          kx[i] = -kd[i] * (inv * inv * (s2p[i] / n));
          kc[i] = -kd[i] * (s1p[i] / n);
        }
      }
    });
  }

  const at::TensorOptions out_opts = input.options().memory_format(w.format);
  const auto output = [&](bool needed) {
    return needed ? at::empty(input.sizes(), out_opts) : at::empty({0}, input.options());
  };
  at::Tensor grad_input = output(need_grad_input);
  at::Tensor grad_residual = output(need_grad_residual);
  if (input.numel() > 0) {
    const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; };
    kernels().backward_apply(
        input.scalar_type(), w.geometry,
        BackwardApplyArgs{g.const_data_ptr(), m.const_data_ptr<uint8_t>(), m.numel(),
                          read_x ? x.const_data_ptr() : nullptr, ptr(mean_acc),
                          need_grad_input ? k.at<double>(0) : nullptr,
                          need_grad_input && train ? k.at<double>(1) : nullptr,
                          need_grad_input && train ? k.at<double>(2) : nullptr,
                          need_grad_input ? grad_input.mutable_data_ptr() : nullptr,
                          need_grad_residual ? grad_residual.mutable_data_ptr() : nullptr});
  }
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace fused_residual::cpu

TORCH_LIBRARY_IMPL(fused_residual, CPU, m) {
  m.impl("bn_stats", &fused_residual::cpu::bn_stats_cpu);
  m.impl("bn_update_running_stats", &fused_residual::cpu::bn_update_running_stats_cpu);
  m.impl("bn_apply", &fused_residual::cpu::bn_apply_cpu);
  m.impl("bn_backward_reduce", &fused_residual::cpu::bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &fused_residual::cpu::bn_backward_apply_cpu);
}
