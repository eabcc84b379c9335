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

// 1/sqrt(v): the same device function torch.rsqrt uses on CUDA.
__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return ::rsqrt(v); }

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

// ---- Welford / Chan et al. ------------------------------------------------------------------
// Per-channel (count, mean, M2) with M2 = sum (x - mean)^2. Partial states are combined with
// the pairwise update of Chan, Golub & LeVeque (1979):
//   n = na + nb, d = mb - ma, mean = ma + d * nb / n, M2 = M2a + M2b + d^2 * na * nb / n,
// which never forms E[x^2] - E[x]^2 and so does not cancel catastrophically.
template <typename A>
struct Welford {
  A mean;
  A m2;
  int64_t n;
};

template <typename A>
__device__ __forceinline__ void welford_merge(Welford<A>& a, const Welford<A>& b) {
  if (b.n == 0) return;  // also keeps an empty partial's zeros out of inf/NaN data
  if (a.n == 0) {
    a = b;
    return;
  }
  const int64_t n = a.n + b.n;
  const A ratio = div_rn(static_cast<A>(b.n), static_cast<A>(n));
  const A delta = b.mean - a.mean;
  a.mean += delta * ratio;
  a.m2 += b.m2 + delta * delta * static_cast<A>(a.n) * ratio;
  a.n = n;
}

// Adds VEC values of one channel: their own mean and M2 (exact two-pass over registers), then
// one Chan merge, i.e. one division per VEC values instead of one per value. An empty state
// takes the chunk as it is: the merge formula would compute delta^2 * 0, NaN once delta^2
// overflows (chunk means above ~1.8e19 in fp32).
template <int VEC, typename A>
__device__ __forceinline__ void welford_add(Welford<A>& a, const A (&v)[VEC]) {
  A sum = 0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) sum += v[i];
  const A mb = sum * (A(1) / A(VEC));  // VEC is a power of two: exact scaling
  A m2b = 0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const A d = v[i] - mb;
    m2b += d * d;
  }
  if (a.n == 0) {
    a.mean = mb;
    a.m2 = m2b;
    a.n = VEC;
    return;
  }
  const int64_t n = a.n + VEC;
  const A ratio = A(VEC) / static_cast<A>(n);
  const A delta = mb - a.mean;
  a.mean += delta * ratio;
  a.m2 += m2b + delta * delta * static_cast<A>(a.n) * ratio;
  a.n = n;
}

template <typename A>
__device__ __forceinline__ Welford<A> shfl_down(const Welford<A>& w, int offset) {
  Welford<A> r;
  r.mean = __shfl_down_sync(kFullMask, w.mean, offset);
  r.m2 = __shfl_down_sync(kFullMask, w.m2, offset);
  r.n = __shfl_down_sync(kFullMask, static_cast<long long>(w.n), offset);
  return r;
}

// ---- Pairs of sums (backward reduce) --------------------------------------------------------
template <typename A>
struct SumPair {
  A dy;    // sum dy
  A dyxmu; // sum dy * (x - mean)
};

template <typename A>
__device__ __forceinline__ void sum_merge(SumPair<A>& a, const SumPair<A>& b) {
  a.dy += b.dy;
  a.dyxmu += b.dyxmu;
}

template <typename A>
__device__ __forceinline__ SumPair<A> shfl_down(const SumPair<A>& s, int offset) {
  SumPair<A> r;
  r.dy = __shfl_down_sync(kFullMask, s.dy, offset);
  r.dyxmu = __shfl_down_sync(kFullMask, s.dyxmu, offset);
  return r;
}

template <typename A>
__device__ __forceinline__ void merge_into(Welford<A>& a, const Welford<A>& b) {
  welford_merge(a, b);
}
template <typename A>
__device__ __forceinline__ void merge_into(SumPair<A>& a, const SumPair<A>& b) {
  sum_merge(a, b);
}

// Tree over the warp with shfl_down: after the step with offset o, lanes [0, o) hold the merge
// of lanes [0, 2o); lane 0 ends with all 32. The order is fixed, so the result is
// deterministic. Lanes >= o merge values nobody reads (shfl_down returns their own value past
// lane 31), which is harmless. All 32 lanes must call it.
template <typename S>
__device__ __forceinline__ S warp_reduce(S v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const S other = shfl_down(v, offset);
    merge_into(v, other);
  }
  return v;
}

// Whole-block merge, result valid in thread 0. `smem` holds one state per warp. Identity
// `zero` is an empty state (n = 0 / zero sums). All threads of the block must call it.
template <typename S>
__device__ __forceinline__ S block_reduce(S v, S* smem, const S& zero) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int lane = tid % kWarp;
  const int warp = tid / kWarp;
  const int nwarps = (nthreads + kWarp - 1) / kWarp;
  v = warp_reduce(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? smem[lane] : zero;
    v = warp_reduce(v);
  }
  return v;
}

// Walks the tiles t = s, s + S, s + 2S, ... of a (row_groups x col_chunks) tile grid in
// row-major order without a division per step: the step S is split once into whole rows and a
// column remainder, and the column carries into the row.
struct TileWalk {
  int64_t rg, cc;
  int64_t step_rg, step_cc, col_chunks;
  __device__ __forceinline__ TileWalk(int64_t s, int64_t S, int64_t col_chunks_)
      : rg(s / col_chunks_),
        cc(s % col_chunks_),
        step_rg(S / col_chunks_),
        step_cc(S % col_chunks_),
        col_chunks(col_chunks_) {}
  __device__ __forceinline__ void next() {
    rg += step_rg;
    cc += step_cc;
    if (cc >= col_chunks) {
      cc -= col_chunks;
      ++rg;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Launch geometry of the two-pass per-channel reductions (bn_stats, bn_backward_reduce)
// ---------------------------------------------------------------------------------------------
//
// NCHW: channel c is N rows ("planes") of HW contiguous values, planes C*HW apart. A block
// (tx, ty), tx*ty = 256, owns one channel (blockIdx.x) and reads tiles of ty planes x tx*VEC
// values: tx = the smallest power of two covering HW/VEC (at most 256), so that small planes
// (7x7, 14x14) do not leave most threads idle while each row segment stays contiguous. The
// tiles of a channel are dealt to gridDim.y = S splitting blocks round-robin.
//
// channels_last: the tensor is a row-major (N*H*W) x C matrix and channel c a column. A block
// (tx, ty) owns tx*VEC consecutive channels (tx = smallest power of two covering C/VEC, at most
// 32, so a warp reads >= 512 contiguous bytes of a row when C is large) and every S-th tile of
// ty rows. Each thread keeps its VEC channels' state across rows.
//
// S is chosen so that the grid has about kBlocksPerSm blocks per SM; the partial states go to a
// (C, S) workspace merged in order by a one-warp-per-channel kernel.
constexpr int64_t kMinRowsPerSplit = 64;

struct ReducePlan {
  dim3 grid, block;
  int64_t splits;      // S
  int64_t col_chunks;  // NCHW: tiles per plane row (ceil(HW/VEC / tx))
  int64_t row_groups;  // NCHW: ceil(N / ty)
};

inline ReducePlan plan_reduce(const Geometry& g, int vec, int sms) {
  ReducePlan p;
  const int64_t target_blocks = static_cast<int64_t>(sms) * kBlocksPerSm;
  if (!g.channels_last) {
    const int64_t hwv = g.hw / vec;
    const int tx = pow2_at_least(hwv, kBlock);
    const int ty = kBlock / tx;
    p.col_chunks = ceil_div(hwv, tx);
    p.row_groups = ceil_div(g.n, ty);
    const int64_t tiles = p.col_chunks * p.row_groups;
    p.splits = std::clamp<int64_t>(ceil_div(target_blocks, g.c), 1, std::min<int64_t>(tiles, 65535));
    p.block = dim3(tx, ty);
    p.grid = dim3(static_cast<unsigned>(g.c), static_cast<unsigned>(p.splits));
  } else {
    const int64_t cv = g.c / vec;
    const int64_t rows = g.n * g.hw;
    const int tx = pow2_at_least(cv, kWarp);
    const int ty = kBlock / tx;
    const int64_t ctiles = ceil_div(cv, tx);
    const int64_t rtiles = ceil_div(rows, ty);
    // Each split writes C partials for its rows: at least kMinRowsPerSplit rows per split keep
    // that workspace traffic (<= 16 bytes per channel and split) a small fraction of the
    // input's (>= 2 bytes per channel and row) when N*H*W is small and C large.
    const int64_t max_splits = std::min<int64_t>({rtiles, ceil_div(rows, kMinRowsPerSplit), 65535});
    p.col_chunks = 0;
    p.row_groups = 0;
    p.splits = std::clamp<int64_t>(ceil_div(target_blocks, ctiles), 1, max_splits);
    p.block = dim3(tx, ty);
    p.grid = dim3(static_cast<unsigned>(ctiles), static_cast<unsigned>(p.splits));
  }
  return p;
}

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
