// Per-channel two-pass reductions shared by bn_stats and bn_backward_reduce: Welford / Chan
// states and sum pairs, their fixed-order warp and block merges, and the launch plan of the
// partial-reduction grids (docs/op_layer.md).
#pragma once

#include "common.cuh"

namespace fused_residual {
namespace cuda {

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
  const A ratio = div_rn(A(VEC), static_cast<A>(n));
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

}  // namespace cuda
}  // namespace fused_residual
