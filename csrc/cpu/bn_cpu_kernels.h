// Interface between the CPU op layer (bn_add_relu_cpu.cpp: checks, layouts, allocation,
// per-channel constants) and the streaming kernels (bn_*_kernels.h).
//
// The kernels are compiled twice from the same source: bn_kernels_baseline.cpp with the
// build's baseline ISA, and bn_kernels_x86_avx2.cpp with AVX2/FMA/F16C enabled for that
// one translation unit, so that at::vec::Vectorized<T> is ATen's AVX2 specialization
// there. The generic Vectorized<T> of a baseline build is an array loop that GCC leaves
// largely scalar (compares, blends and masks element by element), several times slower
// than eager PyTorch's own AVX2/AVX512 kernels. The op layer picks the AVX2 set at run time
// when ATen itself runs AVX2 or AVX512 kernels (so ATEN_CPU_CAPABILITY=default also forces
// the baseline set, which is how its tests reach it).
//
// Kernels receive raw pointers into tensors that are contiguous in the working layout, so
// an element is addressed by its flat memory index e:
//   NCHW:          e = (n * C + c) * HW + hw   -> rows of HW values of one channel
//   channels_last: e = (n * HW + hw) * C + c   -> rows of C values, one per channel
// Per-channel arrays are contiguous, of the accumulation type acc (double for double input,
// float otherwise). This header stays light (no ATen.h): the AVX2 unit includes it.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fused_residual::cpu {

// Geometry of a 4-D tensor in its working layout.
struct Geometry {
  int64_t n;
  int64_t c;
  int64_t hw;
  bool channels_last;

  int64_t numel() const { return n * c * hw; }
};

struct StatsArgs {
  const void* x;
  void* mean;  // (C,) acc, output
  void* var;   // (C,) acc, output (population variance)
};

// bn_apply: y = (x - mean) * scale + bias (+ residual). bn_dual_apply sets x2/mean2/scale2
// instead of a residual: y = (x - mean) * scale + (x2 - mean2) * scale2 + bias, with both
// BatchNorms' biases folded into `bias`.
struct ApplyArgs {
  const void* x;
  const void* residual;  // nullptr when absent
  const void* mean;      // (C,) acc
  const void* scale;     // (C,) acc: invstd * weight
  const void* bias;      // (C,) acc
  void* out;
  uint8_t* mask;                  // ceil(numel / 8) bytes, nullptr when not saved
  const void* x2 = nullptr;       // second input (same layout as x), nullptr for bn_apply
  const void* mean2 = nullptr;    // (C,) acc
  const void* scale2 = nullptr;   // (C,) acc: invstd2 * weight2
};

struct BackwardReduceArgs {
  const void* grad_out;
  const uint8_t* mask;
  int64_t mask_bytes;
  const void* x;
  const void* mean;  // (C,) acc
  void* sum_dy;      // (C,) acc, output
  void* sum_dy_xmu;  // (C,) acc, output
};

// grad_input = dy * k_dy + (x - mean) * k_xmu + k_const per channel (training), or
// dy * k_dy (eval: k_xmu == nullptr; x and mean are not read). grad_residual = dy.
struct BackwardApplyArgs {
  const void* grad_out;
  const uint8_t* mask;
  int64_t mask_bytes;
  const void* x;
  const void* mean;     // (C,) acc, training only
  const void* k_dy;     // (C,) acc, when grad_input is requested
  const void* k_xmu;    // (C,) acc, training only
  const void* k_const;  // (C,) acc, training only
  void* grad_input;     // nullptr when not requested
  void* grad_residual;  // nullptr when not requested
};

// One compiled set of kernels. `dtype` is the element dtype (float, double, half, bfloat16).
struct KernelSet {
  const char* isa;
  void (*stats)(c10::ScalarType dtype, const Geometry& g, const StatsArgs& a);
  void (*apply)(c10::ScalarType dtype, const Geometry& g, const ApplyArgs& a);
  void (*backward_reduce)(c10::ScalarType dtype, const Geometry& g, const BackwardReduceArgs& a);
  void (*backward_apply)(c10::ScalarType dtype, const Geometry& g, const BackwardApplyArgs& a);
};

// The AVX2 unit is built with GCC on x86-64 (it relies on `#pragma GCC target`); elsewhere
// the baseline set is the only one (on aarch64 it already uses ATen's NEON Vectorized).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_RESIDUAL_HAVE_AVX2_KERNELS 1
#endif

namespace baseline {
extern const KernelSet kKernels;
}
#if defined(FUSED_RESIDUAL_HAVE_AVX2_KERNELS)
namespace avx2 {
extern const KernelSet kKernels;
}
#endif

}  // namespace fused_residual::cpu
