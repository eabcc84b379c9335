// Shared host and device helpers of the CUDA kernels of the op layer (docs/op_layer.md).
//
// Deliberately free of ATen/cuda/*: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers
// that some CUDA toolkits lack, so the stream, the device guard and the SM count come from
// c10/cuda and the CUDA runtime directly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "op_checks.h"

namespace fused_residual {
namespace cuda {

// Every kernel runs 256-thread blocks: 8 warps, enough to hide latency with a few blocks per
// SM and small enough that the fixed-order block reductions stay short.
constexpr int kBlock = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Occupancy plan. A grid is sized for a number of resident blocks per SM, and every kernel is
// compiled with __launch_bounds__(kBlock, that number), which caps its registers at
// 65536 / (256 * blocks) (64 for 4, 80 for 3) so that the blocks the plan counts on do fit;
// tests/test_gpu_static.py reads the sm_90 cubin and fails on any spill this could cause.
// Reductions and the small per-channel kernels: kBlocksPerSm. Element-wise kernels:
// Op::kBlocksPerSm (elementwise_blocks below). Grids are sized from shapes and the SM count
// only, never from data, so workspaces are CUDA-graph safe.
constexpr int kBlocksPerSm = 4;

// Accumulation ("acc") type: double for double, float for float/half/bfloat16.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of = typename AccOf<T>::type;

// Resident blocks per SM an element-wise Op over T plans for: `blocks` for float accumulation,
// 1 for double (a correctness path, not a fast one: its registers are not capped).
template <typename T>
constexpr int elementwise_blocks(int blocks) {
  return std::is_same_v<acc_of<T>, double> ? 1 : blocks;
}

// ---------------------------------------------------------------------------------------------
// Host helpers
// ---------------------------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Smallest power of two >= v, clamped to [1, cap] (cap a power of two).
inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < cap && p < v) p <<= 1;
  return p;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Multiprocessor count of a device, queried once per device and cached: grid sizes depend on
// it, and cudaDeviceGetAttribute is cheap but not free on every launch.
inline int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // zero-initialized (static storage)
  if (device >= 0 && device < kMaxDevices) {
    int v = cache[device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  v = std::max(v, 1);
  if (device >= 0 && device < kMaxDevices) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A per-channel vector (mean, var, weight, ...) as a contiguous tensor of the acc dtype, so
// that kernels read one dtype whatever the caller passed (running stats of a half model are
// half). A no-op (no copy, no launch) in the common case where it already is.
inline at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc).contiguous();
}

inline at::Tensor to_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? to_acc(*t, acc) : at::Tensor();
}

template <typename T>
inline const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// Geometry of a 4-D tensor in its working layout, seen as [outer, C, inner] in memory order:
// NCHW is [N, C, H*W], channels_last is [N*H*W, C, 1]. An NCHW tensor with H*W == 1 has the
// memory order of channels_last, and takes the channels_last kernels (coalesced reductions).
struct Geometry {
  int64_t n, c, hw, numel;
  bool channels_last;
  int64_t inner() const { return channels_last ? 1 : hw; }
};

inline Geometry geometry_of(const at::Tensor& input, at::MemoryFormat layout) {
  Geometry g;
  g.n = input.size(0);
  g.c = input.size(1);
  g.hw = input.size(2) * input.size(3);
  g.numel = input.numel();
  g.channels_last = layout == at::MemoryFormat::ChannelsLast || g.hw == 1;
  return g;
}

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

// Correctly rounded arithmetic that nvcc may not contract into FMAs (nvcc's default -fmad=true
// fuses a * b + c): the elementwise kernels keep the reference's operation order and
// roundings. The numerics contract (docs/op_layer.md) does not need bit equality with another
// backend; this keeps the CUDA results close to PyTorch's unfused ops at no cost in a
// memory-bound kernel. The build has no fast-math: denormals are kept (-ftz=false), `/` and
// sqrt are IEEE (-prec-div=true -prec-sqrt=true).
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
// IEEE division, spelled out where few divisions happen (merges of partials, the final
// variance).
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// invstd = 1 / sqrt(v) as PyTorch's BatchNorm computes it (`1 / device_sqrt(var + eps)`): a
// correctly rounded square root, then a correctly rounded division; PTX sqrt.rn + div.rn. Never
// rsqrtf / rsqrt (rsqrt.approx, ~2 ulp): |x - mean| scales that error in the output, invstd^2
// in the backward coefficients. The intrinsics do not depend on -prec-div/-prec-sqrt.
// tests/test_gpu_static.py reads the embedded PTX of a "+PTX" build for approximations.
__device__ __forceinline__ float inv_sqrt_rn(float v) { return __fdiv_rn(1.0f, __fsqrt_rn(v)); }
__device__ __forceinline__ double inv_sqrt_rn(double v) { return __ddiv_rn(1.0, __dsqrt_rn(v)); }

// 8 consecutive elements (one mask byte's worth) of T. `vec` means the pointer is 16-byte
// aligned and all 8 are in bounds: then they are moved as 8*sizeof(T)/16 128-bit accesses
// (one for half/bfloat16, two for float, four for double); otherwise element by element,
// reading only the first n and filling the rest with zero.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, bool vec, int n, T (&v)[8]) {
  static_assert((8 * sizeof(T)) % 16 == 0, "8 elements must be a whole number of 16-byte words");
  constexpr int kWords = 8 * sizeof(T) / 16;
  if (vec) {
    uint4 raw[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) raw[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
    memcpy(&v[0], &raw[0], sizeof(raw));
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = i < n ? p[i] : static_cast<T>(0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, bool vec, int n, const T (&v)[8]) {
  constexpr int kWords = 8 * sizeof(T) / 16;
  if (vec) {
    uint4 raw[kWords];
    memcpy(&raw[0], &v[0], sizeof(raw));
#pragma unroll
    for (int k = 0; k < kWords; ++k) reinterpret_cast<uint4*>(p)[k] = raw[k];
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < n) p[i] = v[i];
  }
}

// VEC consecutive elements converted to acc. VEC == 16 / sizeof(T) means one aligned 128-bit
// load (the caller guarantees alignment); VEC == 1 is the scalar fallback.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&v)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T t[VEC];
    memcpy(&t[0], &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = static_cast<A>(t[i]);
  } else {
    static_assert(VEC == 1, "load_vec: VEC must be 1 or 16 / sizeof(T)");
    v[0] = static_cast<A>(p[0]);
  }
}

// VEC mask bits of elements e .. e+VEC-1 (e a multiple of VEC, VEC a power of two <= 8, so
// they sit in one byte), as bits 0 .. VEC-1. Packed format: element e is bit e % 8 of byte e / 8.
template <int VEC>
__device__ __forceinline__ unsigned mask_bits(const uint8_t* __restrict__ mask, int64_t e) {
  static_assert(VEC >= 1 && VEC <= 8 && (VEC & (VEC - 1)) == 0, "VEC must be 1, 2, 4 or 8");
  const unsigned byte = __ldg(mask + (e >> 3));
  return (byte >> static_cast<unsigned>(e & 7)) & ((1u << VEC) - 1u);
}

}  // namespace cuda
}  // namespace fused_residual
