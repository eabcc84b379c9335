// CUDA kernels of bn_stats and bn_update_running_stats (docs/op_layer.md).
//
// bn_stats is a deterministic two-pass reduction: pass 1 writes one (count, mean, M2) Welford
// partial per (channel, split) block into a workspace whose size depends only on the shape and
// the device's SM count; pass 2 merges each channel's partials in a fixed order. No float
// atomics, no host synchronization, so the op is bitwise reproducible on a given device and
// can be captured in a CUDA graph.
//
// Shifted data, as in the Triton and CPU kernels: every value of channel c enters the
// accumulators as x - K_c, with the pilot K_c = x[0, c, 0, 0] (element offset c * H*W in NCHW,
// c in channels_last), and pass 2 adds K_c back to the mean. The running means then stay
// within a few standard deviations of 0, so a channel with a mean offset of 1e4 and a spread of
// 1 keeps the full fp32 precision of its variance (unshifted, the running mean's rounding,
// ~1e-3 at 1e4, would leak into every delta).
//
// A channel whose merged mean is not finite (a +-inf or NaN among its values) is summed again
// by its warp in pass 2 as nn.BatchNorm2d sums on CPU (exact_channel_moments), as the CPU and
// Triton kernels do.
#include "reduce.cuh"

namespace fused_residual {
namespace cuda {
namespace {

// Pass 1, NCHW. Math: per thread, Welford over the VEC-element chunks it visits of x - K_c
// (each chunk's own mean/M2, then a Chan merge); then a fixed-order merge over the block (warp
// shuffle tree, then the 8 warp results). Grid (C, S), block (tx, ty): see plan_reduce.
// Bytes: reads the input once (numel * sizeof(T)); writes 2 * sizeof(A) + 8 per block.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    stats_nchw_kernel(const T* __restrict__ x, int64_t planes_n, int64_t channels, int64_t hw,
                      int64_t col_chunks, int64_t row_groups, acc_of<T>* __restrict__ part_mean,
                      acc_of<T>* __restrict__ part_m2, int64_t* __restrict__ part_n) {
  using A = acc_of<T>;
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t splits = gridDim.y;
  const int64_t hwv = hw / VEC;
  const A pilot = static_cast<A>(x[c * hw]);  // x[0, c, 0, 0]
  Welford<A> w{A(0), A(0), 0};
  for (TileWalk t(s, splits, col_chunks); t.rg < row_groups; t.next()) {
    const int64_t n = t.rg * blockDim.y + threadIdx.y;
    const int64_t j = t.cc * blockDim.x + threadIdx.x;
    if (n < planes_n && j < hwv) {
      A v[VEC];
      // 64-bit offset: (n*C + c)*HW + j*VEC; a multiple of VEC, hence 16-byte aligned when
      // VEC > 1 (the host checked HW % VEC == 0 and the base pointer).
      load_vec<VEC>(x + (n * channels + c) * hw + j * VEC, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) v[i] -= pilot;
      welford_add<VEC>(w, v);
    }
  }
  __shared__ Welford<A> smem[kBlock / kWarp];
  w = block_reduce(w, smem, Welford<A>{A(0), A(0), 0});
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int64_t idx = c * splits + s;
    part_mean[idx] = w.mean;
    part_m2[idx] = w.m2;
    part_n[idx] = w.n;
  }
}

// Pass 1, channels_last ((N*H*W) x C row-major). Math: each thread runs VEC per-channel
// Welford recurrences of x - K_c (one shared count, so one reciprocal per row) over the rows it
// visits; then the ty threads of each column are merged by a fixed binary tree in shared
// memory. Grid (ceil(C/VEC/tx), S), block (tx, ty). Bytes: reads the input once; writes the
// partials.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    stats_cl_kernel(const T* __restrict__ x, int64_t rows, int64_t channels,
                    acc_of<T>* __restrict__ part_mean, acc_of<T>* __restrict__ part_m2,
                    int64_t* __restrict__ part_n) {
  using A = acc_of<T>;
  const int tx = blockDim.x;
  const int ty = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x) * VEC;
  const bool active = c0 < channels;  // C % VEC == 0, so all VEC channels exist
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = A(0);
  int64_t cnt = 0;
  if (active) {
    A pilot[VEC];
    load_vec<VEC>(x + c0, pilot);  // row 0: x[0, c, 0, 0]
    const int64_t row_stride = static_cast<int64_t>(gridDim.y) * ty;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * ty + threadIdx.y; m < rows; m += row_stride) {
      A v[VEC];
      load_vec<VEC>(x + m * channels + c0, v);  // m*C + c0 is a multiple of VEC
      ++cnt;
      const A r = div_rn(A(1), static_cast<A>(cnt));
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        v[i] -= pilot[i];
        const A d = v[i] - mean[i];
        mean[i] += d * r;
        m2[i] += d * (v[i] - mean[i]);
      }
    }
  }
  // Shared layout [i][tid] (not [tid][i]) so that a warp's accesses hit 32 distinct banks.
  __shared__ A s_mean[VEC * kBlock];
  __shared__ A s_m2[VEC * kBlock];
  __shared__ int64_t s_n[kBlock];
  const int tid = threadIdx.y * tx + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_mean[i * kBlock + tid] = mean[i];
    s_m2[i * kBlock + tid] = m2[i];
  }
  s_n[tid] = cnt;
  __syncthreads();
  // Tree over rows: at each step row y < half absorbs row y + half of the same column. Reads
  // touch rows >= half only, writes rows < half only, so one barrier per step suffices.
  for (int half = ty / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.y) < half) {
      const int other = tid + half * tx;
      const int64_t na = s_n[tid];
      const int64_t nb = s_n[other];
      if (nb > 0) {
        if (na == 0) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            s_mean[i * kBlock + tid] = s_mean[i * kBlock + other];
            s_m2[i * kBlock + tid] = s_m2[i * kBlock + other];
          }
        } else {
          const int64_t n = na + nb;
          const A ratio = div_rn(static_cast<A>(nb), static_cast<A>(n));
          const A fa = static_cast<A>(na) * ratio;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const A ma = s_mean[i * kBlock + tid];
            const A delta = s_mean[i * kBlock + other] - ma;
            s_mean[i * kBlock + tid] = ma + delta * ratio;
            s_m2[i * kBlock + tid] += s_m2[i * kBlock + other] + delta * delta * fa;
          }
        }
        s_n[tid] = na + nb;
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t splits = gridDim.y;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t idx = (c0 + i) * splits + blockIdx.y;
      part_mean[idx] = s_mean[i * kBlock + tid];
      part_m2[idx] = s_m2[i * kBlock + tid];
      part_n[idx] = s_n[tid];
    }
  }
}

// Sum over the warp by an xor butterfly: every lane ends with bitwise the same total (each
// step adds a pair in either order, and IEEE addition commutes).
__device__ __forceinline__ double warp_all_sum(double v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    v = add_rn(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// The rare path of pass 2, for a channel whose merged mean is not finite: it holds a +-inf or
// NaN (or x - K_c overflowed), and shifted Welford sums cannot tell +inf alone from +inf and
// -inf (both reach inf - inf = NaN). The warp sums the channel again as nn.BatchNorm2d does
// on CPU, in double: mean = sum(x) / count, var = sum((x - mean)^2) / count. +inf among
// finite values gives mean +inf, -inf gives -inf, NaN or both infinities NaN, and var NaN.
// Element (n, c, j) is x[(n*C + c)*HW + j] (NCHW: pilot_stride = HW) or x[(n*HW + j)*C + c]
// (channels_last: pilot_stride = 1; the two agree when HW = 1). Lane l takes j = l, l + 32,
// ... of each plane in order: deterministic. Bytes: two reads of the channel.
template <typename T>
__device__ void exact_channel_moments(const T* __restrict__ x, int64_t c, int64_t channels,
                                      int64_t planes_n, int64_t hw, int64_t pilot_stride, int lane,
                                      double& mean, double& var) {
  using A = acc_of<T>;
  const bool nchw = pilot_stride != 1;
  const auto value = [&](int64_t n, int64_t j) {
    const int64_t off = nchw ? (n * channels + c) * hw + j : (n * hw + j) * channels + c;
    return static_cast<double>(static_cast<A>(x[off]));
  };
  const double count = static_cast<double>(planes_n * hw);
  double sum = 0;
  for (int64_t n = 0; n < planes_n; ++n) {
    for (int64_t j = lane; j < hw; j += kWarp) sum = add_rn(sum, value(n, j));
  }
  mean = div_rn(warp_all_sum(sum), count);
  double sq = 0;
  for (int64_t n = 0; n < planes_n; ++n) {
    for (int64_t j = lane; j < hw; j += kWarp) {
      const double d = sub_rn(value(n, j), mean);
      sq = add_rn(sq, mul_rn(d, d));
    }
  }
  var = div_rn(warp_all_sum(sq), count);
}

// Pass 2: one warp per channel merges its S partials: lane l takes s = l, l+32, ... in order,
// then the fixed shuffle tree. mean = K_c + merged mean, var = M2 / count (biased), with the
// pilot K_c = x[c * pilot_stride]; a mean that is not finite takes exact_channel_moments.
// Bytes: reads C*S partials and C pilots, writes 2C.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    stats_finalize_kernel(const T* __restrict__ x, int64_t pilot_stride, int64_t planes_n,
                          int64_t hw, const A* __restrict__ part_mean, const A* __restrict__ part_m2,
                          const int64_t* __restrict__ part_n, int64_t channels, int64_t splits,
                          A* __restrict__ mean_out, A* __restrict__ var_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;  // c is uniform per warp, so whole warps leave: shuffles stay full
  Welford<A> w{A(0), A(0), 0};
  for (int64_t s = lane; s < splits; s += kWarp) {
    const int64_t idx = c * splits + s;
    const Welford<A> p{part_mean[idx], part_m2[idx], part_n[idx]};
    welford_merge(w, p);
  }
  w = warp_reduce(w);
  // Lane 0 holds the merge; the whole warp takes the rare path or none.
  const A mean = add_rn(static_cast<A>(x[c * pilot_stride]), w.mean);
  if (__shfl_sync(kFullMask, static_cast<int>(!isfinite(mean)), 0)) {
    double exact_mean, exact_var;
    exact_channel_moments(x, c, channels, planes_n, hw, pilot_stride, lane, exact_mean, exact_var);
    if (lane == 0) {
      mean_out[c] = static_cast<A>(exact_mean);
      var_out[c] = static_cast<A>(exact_var);
    }
    return;
  }
  if (lane == 0) {
    mean_out[c] = mean;
    var_out[c] = div_rn(w.m2, static_cast<A>(w.n));  // n = N*H*W > 0 (checked on the host)
  }
}

// running = (1 - momentum) * running + momentum * batch, the variance term scaled by
// count / (count - 1), in acc with the reference's operation order and roundings (no FMA
// contraction), then stored in the running stats' dtype R. Bytes: 2C reads of acc, 2C reads
// and 2C writes of R.
template <typename A, typename R>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    running_stats_kernel(const A* __restrict__ mean, const A* __restrict__ var,
                         R* __restrict__ running_mean, R* __restrict__ running_var,
                         int64_t channels, A one_minus_momentum, A momentum, A unbias) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const A rm = static_cast<A>(running_mean[c]);
  const A rv = static_cast<A>(running_var[c]);
  const A new_mean = add_rn(mul_rn(one_minus_momentum, rm), mul_rn(momentum, mean[c]));
  const A new_var = add_rn(mul_rn(one_minus_momentum, rv), mul_rn(mul_rn(momentum, var[c]), unbias));
  running_mean[c] = static_cast<R>(new_mean);
  running_var[c] = static_cast<R>(new_var);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input_arg) {
  check_stats_args(input_arg, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::MemoryFormat layout = working_layout(input_arg);
  const at::Tensor input = input_arg.contiguous(layout);
  const Geometry g = geometry_of(input, layout);
  const at::ScalarType acc = acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor mean = at::empty({g.c}, acc_opts);
  at::Tensor var = at::empty({g.c}, acc_opts);
  if (g.c == 0) return {mean, var};
  const int sms = sm_count(input.get_device());
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_residual::bn_stats", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    constexpr int kVec = 16 / sizeof(T);
    const T* x = input.const_data_ptr<T>();
    // 128-bit loads need the base 16-byte aligned and every vector inside one plane (NCHW) or
    // one row (channels_last).
    const bool vec = aligned16(x) && (g.channels_last ? g.c : g.hw) % kVec == 0;
    const ReducePlan p = plan_reduce(g, vec ? kVec : 1, sms);
    const int64_t nparts = g.c * p.splits;
    // Workspace: a function of the shape and SM count only (CUDA-graph safe).
    at::Tensor ws = at::empty({2 * nparts}, acc_opts);
    at::Tensor ws_n = at::empty({nparts}, input.options().dtype(at::kLong));
    A* part_mean = ws.mutable_data_ptr<A>();
    A* part_m2 = part_mean + nparts;
    int64_t* part_n = ws_n.mutable_data_ptr<int64_t>();
    if (!g.channels_last) {
      if (vec) {
        stats_nchw_kernel<T, kVec><<<p.grid, p.block, 0, stream>>>(
            x, g.n, g.c, g.hw, p.col_chunks, p.row_groups, part_mean, part_m2, part_n);
      } else {
        stats_nchw_kernel<T, 1><<<p.grid, p.block, 0, stream>>>(
            x, g.n, g.c, g.hw, p.col_chunks, p.row_groups, part_mean, part_m2, part_n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (vec) {
        stats_cl_kernel<T, kVec><<<p.grid, p.block, 0, stream>>>(x, g.n * g.hw, g.c, part_mean,
                                                                 part_m2, part_n);
      } else {
        stats_cl_kernel<T, 1><<<p.grid, p.block, 0, stream>>>(x, g.n * g.hw, g.c, part_mean,
                                                              part_m2, part_n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned fin_blocks = static_cast<unsigned>(ceil_div(g.c, kBlock / kWarp));
    stats_finalize_kernel<T, A><<<fin_blocks, kBlock, 0, stream>>>(
        x, g.inner(), g.n, g.hw, part_mean, part_m2, part_n, g.c, p.splits,
        mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

// The C++ signature (Tensor& for the mutated running stats) must match the CPU kernel's: the
// dispatcher rejects two kernels of one op with different C++ signatures.
void bn_update_running_stats_cuda(const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                  at::Tensor& running_mean, at::Tensor& running_var,
                                  double momentum) {
  const int64_t channels = check_update_running_stats_args(mean, var, count, running_mean,
                                                           running_var, c10::DeviceType::CUDA);
  if (channels == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const at::ScalarType acc = acc_type(mean.scalar_type());
  const at::Tensor m = to_acc(mean, acc);
  const at::Tensor v = to_acc(var, acc);
  // Write straight into the running stats when they share a dtype and are contiguous (the
  // module-buffer case); else into acc temporaries copied back with one rounding by copy_.
  const bool direct = running_mean.scalar_type() == running_var.scalar_type() &&
                      running_mean.is_contiguous() && running_var.is_contiguous() &&
                      !running_mean.is_same(running_var);
  at::Tensor rm = direct ? running_mean : running_mean.to(acc, false, /*copy=*/true).contiguous();
  at::Tensor rv = direct ? running_var : running_var.to(acc, false, /*copy=*/true).contiguous();
  const cudaStream_t stream = current_stream();
  const unsigned blocks = static_cast<unsigned>(ceil_div(channels, kBlock));

  AT_DISPATCH_FLOATING_TYPES(acc, "fused_residual::bn_update_running_stats", [&] {
    using A = scalar_t;
    const A one_minus = static_cast<A>(1.0 - momentum);
    const A mom = static_cast<A>(momentum);
    const A unbias = static_cast<A>(static_cast<double>(count) / static_cast<double>(count - 1));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(),
                                    "fused_residual::bn_update_running_stats", [&] {
      using R = scalar_t;
      running_stats_kernel<A, R><<<blocks, kBlock, 0, stream>>>(
          m.const_data_ptr<A>(), v.const_data_ptr<A>(), rm.mutable_data_ptr<R>(),
          rv.mutable_data_ptr<R>(), channels, one_minus, mom, unbias);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!direct) {
    running_mean.copy_(rm);
    running_var.copy_(rv);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fused_residual

TORCH_LIBRARY_IMPL(fused_residual, CUDA, m) {
  m.impl("bn_stats", &fused_residual::cuda::bn_stats_cuda);
  m.impl("bn_update_running_stats", &fused_residual::cuda::bn_update_running_stats_cuda);
}
