// The two composite ops of the op layer (docs/op_layer.md, "Composite ops"), for CPU and CUDA:
// `bn_train_forward` = bn_stats, bn_apply, then bn_update_running_stats (when there are running
// statistics); `bn_backward` = bn_backward_reduce (when its sums are needed) and
// bn_backward_apply. They compute nothing of their own: each step is the primitive op's
// kernel, reached by a typed redispatch to the same backend key, so their numerics are the
// primitives' bit for bit.
//
// Why they exist (issue 21): a call from Python into a custom op costs ~10K instructions of
// schema-driven argument parsing and boxing on top of its kernel, several times what the
// kernels of a small BatchNorm cost, so the unsynchronized training step (five such calls)
// was 1.2x eager's host time per call. A redispatch from C++ costs a few hundred. The
// primitives stay: a SyncBatchNorm all-reduces between them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_checks.h"

namespace fused_residual {
namespace {

using Tensor = at::Tensor;
using OptionalTensor = std::optional<Tensor>;

using StatsSignature = std::tuple<Tensor, Tensor>(const Tensor&);
using UpdateSignature = void(const Tensor&, const Tensor&, int64_t, Tensor&, Tensor&, double);
using ApplySignature = std::tuple<Tensor, Tensor>(const Tensor&, const OptionalTensor&, const Tensor&,
                                                  const Tensor&, const OptionalTensor&,
                                                  const OptionalTensor&, double, bool);
using ReduceSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, double);
using BackwardApplySignature = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptionalTensor&,
    const OptionalTensor&, const OptionalTensor&, double, int64_t, bool, bool);

template <typename Signature>
c10::TypedOperatorHandle<Signature> primitive(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The backend kernel of a primitive op for the same tensors: everything above the backend
// key (autograd, functionalization, Python modes) was handled by the composite's own call.
c10::DispatchKeySet below_autograd(c10::DispatchKeySet ks) {
  return ks & c10::after_ADInplaceOrView_keyset;
}

int64_t values_per_channel(const Tensor& input) {
  return input.size(0) * input.size(2) * input.size(3);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_train_forward(
    c10::DispatchKeySet ks, const Tensor& input, const OptionalTensor& residual,
    const OptionalTensor& running_mean, const OptionalTensor& running_var,
    const OptionalTensor& weight, const OptionalTensor& bias, double momentum, double eps,
    bool save_mask) {
  static const auto stats = primitive<StatsSignature>("fused_residual::bn_stats");
  static const auto update = primitive<UpdateSignature>("fused_residual::bn_update_running_stats");
  static const auto apply = primitive<ApplySignature>("fused_residual::bn_apply");
  TORCH_CHECK_VALUE(running_mean.has_value() == running_var.has_value(),
                    "fused_residual: running_mean and running_var must both be given or both be None");
  const c10::DispatchKeySet backend = below_autograd(ks);
  auto [mean, var] = stats.redispatch(backend, input);
  // The update last: every argument has passed its op's checks before anything is written.
  auto [out, mask] = apply.redispatch(backend, input, residual, mean, var, weight, bias, eps, save_mask);
  if (running_mean.has_value()) {
    Tensor rm = *running_mean;
    Tensor rv = *running_var;
    update.redispatch(backend, mean, var, values_per_channel(input), rm, rv, momentum);
  }
  return {out, mask, mean, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_backward(
    c10::DispatchKeySet ks, const Tensor& grad_out, const Tensor& mask, const Tensor& input,
    const Tensor& mean, const Tensor& var, const OptionalTensor& weight, double eps, bool training,
    std::array<bool, 4> output_mask) {
  static const auto reduce = primitive<ReduceSignature>("fused_residual::bn_backward_reduce");
  static const auto backward_apply = primitive<BackwardApplySignature>("fused_residual::bn_backward_apply");
  const auto [need_input, need_residual, need_weight, need_bias] = output_mask;
  const c10::DispatchKeySet backend = below_autograd(ks);
  const at::TensorOptions acc = input.options().dtype(acc_type(input.scalar_type()));
  Tensor sum_dy, sum_dy_xmu, grad_weight;
  if ((training && need_input) || need_weight || need_bias) {
    std::tie(sum_dy, sum_dy_xmu, grad_weight) = reduce.redispatch(backend, grad_out, mask, input, mean, var, eps);
  }
  Tensor grad_input, grad_residual;
  if (need_input || need_residual) {
    // The sums make it a training backward_apply; grad_residual alone needs none of them.
    const bool sums = training && sum_dy.defined();
    std::tie(grad_input, grad_residual) = backward_apply.redispatch(
        backend, grad_out, mask, input, mean, var, weight,
        sums ? OptionalTensor(sum_dy) : std::nullopt, sums ? OptionalTensor(sum_dy_xmu) : std::nullopt,
        eps, values_per_channel(input), need_input, need_residual);
  } else {
    grad_input = at::empty({0}, input.options());
    grad_residual = at::empty({0}, input.options());
  }
  return {grad_input, grad_residual, need_weight ? grad_weight : at::empty({0}, acc),
          need_bias ? sum_dy : at::empty({0}, acc)};
}

}  // namespace
}  // namespace fused_residual

TORCH_LIBRARY_IMPL(fused_residual, CPU, m) {
  m.impl("bn_train_forward", &fused_residual::bn_train_forward);
  m.impl("bn_backward", &fused_residual::bn_backward);
}

#if defined(FUSED_RESIDUAL_WITH_CUDA)
TORCH_LIBRARY_IMPL(fused_residual, CUDA, m) {
  m.impl("bn_train_forward", &fused_residual::bn_train_forward);
  m.impl("bn_backward", &fused_residual::bn_backward);
}
#endif
