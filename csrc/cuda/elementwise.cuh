// The element-wise kernels shared by bn_apply, bn_dual_apply and bn_backward_apply: groups of 8
// memory-order elements (one mask byte) walked by a flat kernel or, for channels_last with
// C % 8 == 0, by a kernel that keeps 8 channels per thread; and their launch plans.
#pragma once

#include "common.cuh"

namespace fused_residual {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Elementwise launch geometry (bn_apply, bn_dual_apply, bn_backward_apply)
// ---------------------------------------------------------------------------------------------
//
// Every thread handles "groups" of 8 consecutive memory-order elements, which is exactly one
// byte of the packed mask, so mask bytes are written whole by one thread (no read-modify-write,
// no atomics) and the data moves as 128-bit words. Two kernels per op:
//  * flat: groups g = thread, thread + G, ... over the whole tensor, G = total threads. The
//    channel of each element is tracked incrementally as (q, c) = (e % inner, (e / inner) % C)
//    ([outer, C, inner] view), advanced by precomputed steps, so the loop has no division.
//    Used for NCHW, and for channels_last when C % 8 != 0.
//  * cl8: channels_last with C % 8 == 0. Each thread owns 8 consecutive channels and walks
//    rows, so the per-channel parameters live in registers for the whole kernel.
// Both grids are sized for Op::kBlocksPerSm resident blocks per SM, the kernels' launch bounds.
struct FlatPlan {
  dim3 grid;
  int64_t step_q, step_c;
};

inline FlatPlan plan_flat(const Geometry& g, int sms, int blocks_per_sm) {
  FlatPlan p;
  const int64_t groups = ceil_div(g.numel, 8);
  const int64_t blocks =
      std::clamp<int64_t>(ceil_div(groups, kBlock), 1, static_cast<int64_t>(sms) * blocks_per_sm);
  p.grid = dim3(static_cast<unsigned>(blocks));
  const int64_t delta = blocks * kBlock * 8;  // elements between a thread's consecutive groups
  const int64_t inner = g.inner();
  p.step_q = delta % inner;
  p.step_c = (delta / inner) % g.c;
  return p;
}

struct Cl8Plan {
  dim3 grid, block;
};

inline Cl8Plan plan_cl8(const Geometry& g, int sms, int blocks_per_sm) {
  Cl8Plan p;
  const int64_t cg = g.c / 8;
  const int64_t rows = g.n * g.hw;
  const int tx = pow2_at_least(cg, kWarp);
  const int ty = kBlock / tx;
  const int64_t ctiles = ceil_div(cg, tx);
  const int64_t want = std::max<int64_t>(1, ceil_div(static_cast<int64_t>(sms) * blocks_per_sm, ctiles));
  const int64_t rtiles = std::min<int64_t>({ceil_div(rows, ty), want, 65535});
  p.block = dim3(tx, ty);
  p.grid = dim3(static_cast<unsigned>(ctiles), static_cast<unsigned>(rtiles));
  return p;
}

// The channel of consecutive memory-order elements, walked one element at a time from
// (q, c) = (e % inner, (e / inner) % C), with the Op's per-channel parameters recomputed only
// when the channel changes (NCHW: at most once per group of 8 when H*W >= 8). Only the
// current parameters are live, not one set per element of the group.
template <class Op>
struct ChannelWalk {
  using P = typename Op::Params;
  const Op& op;
  int64_t q, c, loaded;
  const int64_t inner, channels;
  P cur;

  __device__ __forceinline__ ChannelWalk(const Op& op_, int64_t q_, int64_t c_, int64_t inner_,
                                         int64_t channels_)
      : op(op_), q(q_), c(c_), loaded(c_), inner(inner_), channels(channels_), cur(op_.params(c_)) {}

  // Parameters of the next element (call once per element, in order; the index is unused).
  // Past the tensor's end the walk keeps wrapping within [0, C), so reads stay in bounds.
  __device__ __forceinline__ P operator()(int) {
    if (c != loaded) {
      cur = op.params(c);
      loaded = c;
    }
    if (++q == inner) {
      q = 0;
      if (++c == channels) c = 0;
    }
    return cur;
  }
};

// Per-thread parameters of 8 fixed channels (cl8): element i of a group is channel c0 + i.
// Indexed by the unrolled loop's constant i, so the array stays in registers.
template <class Op>
struct FixedChannels {
  typename Op::Params p[8];
  __device__ __forceinline__ const typename Op::Params& operator()(int i) const { return p[i]; }
};

// The flat kernel. Op provides:
//   using Params;                                  per-channel constants
//   static constexpr int kBlocksPerSm;             its occupancy plan
//   Params params(int64_t c) const;                computes them for channel c
//   template <class Channels> void group(int64_t e0, int n, Channels& ch) const;
//     elements e0 .. e0+n-1 (n <= 8); element i's parameters are ch(i), asked for once per i
//     in increasing order inside a fully unrolled loop
template <class Op>
__global__ void __launch_bounds__(kBlock, Op::kBlocksPerSm)
    flat_kernel(const Op op, int64_t numel, int64_t inner, int64_t channels, int64_t step_q,
                int64_t step_c) {
  const int64_t ngroups = (numel + 7) >> 3;
  int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= ngroups) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t q = (g * 8) % inner;
  int64_t c = ((g * 8) / inner) % channels;
  for (; g < ngroups; g += stride) {
    const int64_t e0 = g * 8;
    const int n = numel - e0 < 8 ? static_cast<int>(numel - e0) : 8;
    ChannelWalk<Op> walk(op, q, c, inner, channels);
    op.group(e0, n, walk);
    q += step_q;
    c += step_c;
    if (q >= inner) {
      q -= inner;
      ++c;
    }
    if (c >= channels) c -= channels;
  }
}

// The channels_last kernel for C % 8 == 0: thread (x, y) of block (bx, by) owns channels
// 8 * (bx * tx + x) .. +7 and rows by * ty + y, then + gridDim.y * ty, ... Every group is a
// full, 8-aligned run of 8 channels of one row, i.e. one mask byte.
template <class Op>
__global__ void __launch_bounds__(kBlock, Op::kBlocksPerSm)
    cl8_kernel(const Op op, int64_t rows, int64_t channels) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (c0 >= channels) return;  // no block-level synchronization in this kernel
  FixedChannels<Op> fixed;
#pragma unroll
  for (int i = 0; i < 8; ++i) fixed.p[i] = op.params(c0 + i);
  const int64_t row_stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < rows;
       m += row_stride) {
    op.group(m * channels + c0, 8, fixed);
  }
}

// Launches `op` over a tensor of geometry g with the kernel that fits the layout.
template <class Op>
inline void launch_elementwise(const Op& op, const Geometry& g, int sms, cudaStream_t stream) {
  if (g.numel == 0) return;
  if (g.channels_last && g.c % 8 == 0) {
    const Cl8Plan p = plan_cl8(g, sms, Op::kBlocksPerSm);
    cl8_kernel<Op><<<p.grid, p.block, 0, stream>>>(op, g.n * g.hw, g.c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const FlatPlan p = plan_flat(g, sms, Op::kBlocksPerSm);
    flat_kernel<Op><<<p.grid, kBlock, 0, stream>>>(op, g.numel, g.inner(), g.c, p.step_q, p.step_c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace fused_residual
