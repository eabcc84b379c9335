// The KernelSet of one ISA: dtype dispatch over the kernels of bn_stats_kernels.h,
// bn_apply_kernels.h and bn_backward_kernels.h. Included once by each kernel unit, after
// it has defined FUSED_RESIDUAL_ISA.
#pragma once

#include <ATen/Dispatch.h>

#include "cpu/bn_apply_kernels.h"
#include "cpu/bn_backward_kernels.h"
#include "cpu/bn_stats_kernels.h"

namespace fused_residual::cpu::FUSED_RESIDUAL_ISA {
namespace {

#define FUSED_RESIDUAL_DISPATCH(DTYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, DTYPE, NAME, __VA_ARGS__)

void stats(c10::ScalarType dtype, const Geometry& g, const StatsArgs& a) {
  FUSED_RESIDUAL_DISPATCH(dtype, "bn_stats_cpu", [&] { stats_typed<scalar_t>(g, a); });
}

void apply(c10::ScalarType dtype, const Geometry& g, const ApplyArgs& a) {
  FUSED_RESIDUAL_DISPATCH(dtype, "bn_apply_cpu", [&] { apply_typed<scalar_t>(g, a); });
}

void backward_reduce(c10::ScalarType dtype, const Geometry& g, const BackwardReduceArgs& a) {
  FUSED_RESIDUAL_DISPATCH(dtype, "bn_backward_reduce_cpu",
                          [&] { backward_reduce_typed<scalar_t>(g, a); });
}

void backward_apply(c10::ScalarType dtype, const Geometry& g, const BackwardApplyArgs& a) {
  FUSED_RESIDUAL_DISPATCH(dtype, "bn_backward_apply_cpu",
                          [&] { backward_apply_typed<scalar_t>(g, a); });
}

#undef FUSED_RESIDUAL_DISPATCH

}  // namespace

extern const KernelSet kKernels;
const KernelSet kKernels = {
    FUSED_RESIDUAL_ISA_NAME, &stats, &apply, &backward_reduce, &backward_apply,
};

}  // namespace fused_residual::cpu::FUSED_RESIDUAL_ISA
