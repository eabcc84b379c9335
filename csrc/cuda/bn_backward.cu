// CUDA kernels of bn_backward_reduce and bn_backward_apply (docs/op_layer.md).
//
// With dy = grad_out where the saved mask bit is 1, else 0 (the gradient of the pre-ReLU sum):
//   reduce: sum_dy_c = sum dy, sum_dy_xmu_c = sum dy * (x - mean_c), grad_weight_c =
//           sum_dy_xmu_c * invstd_c, as a deterministic two-pass reduction (per-block partial
//           sums in a (C, S) workspace, then a fixed-order merge; no atomics, no host sync);
//   apply:  grad_residual = dy, grad_input = w invstd (dy - sum_dy/count - (x - mean) invstd^2
//           sum_dy_xmu/count) in training, or dy w invstd in eval.
#include "elementwise.cuh"
#include "reduce.cuh"

namespace fused_residual {
namespace cuda {
namespace {

// dy * (x - mean) and dy, accumulated for VEC elements with their mask bits (bit i of `bits`).
// dy is selected, not multiplied, so that a NaN/inf gradient under a 0 bit contributes 0 (as
// torch.where / threshold_backward do).
template <int VEC, typename A>
__device__ __forceinline__ void accumulate_dy(SumPair<A>& s, const A (&gv)[VEC], const A (&xv)[VEC],
                                              unsigned bits, A mean) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const A dy = ((bits >> i) & 1u) ? gv[i] : A(0);
    s.dy += dy;
    s.dyxmu += dy * (xv[i] - mean);
  }
}

// Pass 1, NCHW. Same tiling as stats_nchw_kernel (grid (C, S), block (tx, ty)); each thread
// sums over its VEC-element chunks, then a fixed-order block reduction.
// Bytes: reads grad_out and x once (2 * numel * sizeof(T)) and the mask (numel / 8); writes
// 2 * sizeof(A) per block.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    bwd_reduce_nchw_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                           const uint8_t* __restrict__ mask, const acc_of<T>* __restrict__ mean,
                           int64_t planes_n, int64_t channels, int64_t hw, int64_t col_chunks,
                           int64_t row_groups, acc_of<T>* __restrict__ part_dy,
                           acc_of<T>* __restrict__ part_dyxmu) {
  using A = acc_of<T>;
  const int64_t c = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t splits = gridDim.y;
  const int64_t hwv = hw / VEC;
  const A mc = mean[c];
  SumPair<A> acc{A(0), A(0)};
  for (TileWalk t(s, splits, col_chunks); t.rg < row_groups; t.next()) {
    const int64_t n = t.rg * blockDim.y + threadIdx.y;
    const int64_t j = t.cc * blockDim.x + threadIdx.x;
    if (n < planes_n && j < hwv) {
      // e is a multiple of VEC (HW % VEC == 0 when VEC > 1): 16-byte aligned vectors, and the
      // VEC mask bits lie in one byte.
      const int64_t e = (n * channels + c) * hw + j * VEC;
      A gv[VEC], xv[VEC];
      load_vec<VEC>(grad + e, gv);
      load_vec<VEC>(x + e, xv);
      accumulate_dy<VEC>(acc, gv, xv, mask_bits<VEC>(mask, e), mc);
    }
  }
  __shared__ SumPair<A> smem[kBlock / kWarp];
  acc = block_reduce(acc, smem, SumPair<A>{A(0), A(0)});
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int64_t idx = c * splits + s;
    part_dy[idx] = acc.dy;
    part_dyxmu[idx] = acc.dyxmu;
  }
}

// Pass 1, channels_last. Same tiling as stats_cl_kernel: each thread sums VEC channels over
// its rows, then a fixed binary tree over the ty rows of the block in shared memory.
// Bytes: as the NCHW kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    bwd_reduce_cl_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                         const uint8_t* __restrict__ mask, const acc_of<T>* __restrict__ mean,
                         int64_t rows, int64_t channels, acc_of<T>* __restrict__ part_dy,
                         acc_of<T>* __restrict__ part_dyxmu) {
  using A = acc_of<T>;
  const int tx = blockDim.x;
  const int ty = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x) * VEC;
  const bool active = c0 < channels;  // C % VEC == 0, so all VEC channels exist
  A sdy[VEC], sdyxmu[VEC], mc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    sdy[i] = sdyxmu[i] = A(0);
    mc[i] = active ? mean[c0 + i] : A(0);
  }
  if (active) {
    const int64_t row_stride = static_cast<int64_t>(gridDim.y) * ty;
    for (int64_t m = static_cast<int64_t>(blockIdx.y) * ty + threadIdx.y; m < rows; m += row_stride) {
      const int64_t e = m * channels + c0;  // a multiple of VEC
      A gv[VEC], xv[VEC];
      load_vec<VEC>(grad + e, gv);
      load_vec<VEC>(x + e, xv);
      const unsigned bits = mask_bits<VEC>(mask, e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const A dy = ((bits >> i) & 1u) ? gv[i] : A(0);
        sdy[i] += dy;
        sdyxmu[i] += dy * (xv[i] - mc[i]);
      }
    }
  }
  // Shared layout [i][tid]: conflict-free across a warp.
  __shared__ A s_dy[VEC * kBlock];
  __shared__ A s_dyxmu[VEC * kBlock];
  const int tid = threadIdx.y * tx + threadIdx.x;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s_dy[i * kBlock + tid] = sdy[i];
    s_dyxmu[i * kBlock + tid] = sdyxmu[i];
  }
  __syncthreads();
  // Row y < half absorbs row y + half of its column; reads rows >= half, writes rows < half.
  for (int half = ty / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.y) < half) {
      const int other = tid + half * tx;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        s_dy[i * kBlock + tid] += s_dy[i * kBlock + other];
        s_dyxmu[i * kBlock + tid] += s_dyxmu[i * kBlock + other];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t splits = gridDim.y;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t idx = (c0 + i) * splits + blockIdx.y;
      part_dy[idx] = s_dy[i * kBlock + tid];
      part_dyxmu[idx] = s_dyxmu[i * kBlock + tid];
    }
  }
}

// Pass 2: one warp per channel sums its S partials (lane l: s = l, l+32, ... in order, then
// the fixed shuffle tree) and scales by invstd. Bytes: reads 2*C*S partials + C var, writes 3C.
template <typename A>
__global__ void __launch_bounds__(kBlock, kBlocksPerSm)
    bwd_reduce_finalize_kernel(const A* __restrict__ part_dy, const A* __restrict__ part_dyxmu,
                               const A* __restrict__ var, A eps, int64_t channels,
                               int64_t splits, A* __restrict__ sum_dy,
                               A* __restrict__ sum_dy_xmu, A* __restrict__ grad_weight) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kBlock / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;  // uniform per warp
  SumPair<A> acc{A(0), A(0)};
  for (int64_t s = lane; s < splits; s += kWarp) {
    acc.dy += part_dy[c * splits + s];
    acc.dyxmu += part_dyxmu[c * splits + s];
  }
  acc = warp_reduce(acc);
  if (lane == 0) {
    sum_dy[c] = acc.dy;
    sum_dy_xmu[c] = acc.dyxmu;
    grad_weight[c] = mul_rn(acc.dyxmu, inv_sqrt_rn(add_rn(var[c], eps)));
  }
}

// Elementwise backward, per group of 8 memory-order elements (one mask byte):
//   dy = bit ? g : 0;  grad_residual = dy;
//   grad_input = k * dy - (a * (x - mean) + b)    (training)
//              = k * dy                          (eval)
// with k = w * invstd, a = k * invstd^2 * sum_dy_xmu / count, b = k * sum_dy / count: the
// reference's k * (dy - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count) with k
// distributed once per channel (as the CPU and Triton kernels do), without FMA contraction.
// Four constants per channel, so that cl8's eight channels of them fit the 64-register budget
// of kBlocksPerSm = 4. x is read only in training.
// Bytes per element: sizeof(T) read grad_out, 1/8 read mask, sizeof(T) read x (training and
// grad_input only), sizeof(T) write each requested gradient.
template <typename T>
struct BackwardApplyOp {
  using A = acc_of<T>;
  struct Params {
    A mean, k, a, b;
  };
  static constexpr int kBlocksPerSm = elementwise_blocks<T>(4);
  const T* __restrict__ grad;
  const T* __restrict__ x;
  const uint8_t* __restrict__ mask;
  T* __restrict__ grad_input;     // nullptr: not requested
  T* __restrict__ grad_residual;  // nullptr: not requested
  const A* __restrict__ mean;
  const A* __restrict__ var;
  const A* __restrict__ weight;      // nullptr: w = 1
  const A* __restrict__ sum_dy;      // nullptr: eval
  const A* __restrict__ sum_dy_xmu;  // nullptr: eval
  A eps;
  A inv_count;  // 1 / count rounded to A, as PyTorch divides a CUDA tensor by a scalar
  bool vec;     // all element pointers 16-byte aligned

  __device__ __forceinline__ Params params(int64_t c) const {
    const A invstd = inv_sqrt_rn(add_rn(var[c], eps));
    Params p;
    p.k = weight != nullptr ? mul_rn(weight[c], invstd) : invstd;
    if (sum_dy != nullptr) {
      p.mean = mean[c];
      p.a = mul_rn(mul_rn(p.k, mul_rn(invstd, invstd)), mul_rn(sum_dy_xmu[c], inv_count));
      p.b = mul_rn(p.k, mul_rn(sum_dy[c], inv_count));
    } else {
      p.mean = p.a = p.b = A(0);
    }
    return p;
  }

  template <class Channels>
  __device__ __forceinline__ void group(int64_t e0, int n, Channels& channel) const {
    const bool full = vec && n == 8;
    T gv[8];
    load8(grad + e0, full, n, gv);
    // Padding bits of the last byte are 0 by the mask format, and lanes i >= n are never
    // stored, so the tail needs no extra masking here.
    const unsigned bits = __ldg(mask + (e0 >> 3));
    if (grad_residual != nullptr) {
      T rv[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) rv[i] = ((bits >> i) & 1u) ? gv[i] : static_cast<T>(0.0f);
      store8(grad_residual + e0, full, n, rv);
    }
    if (grad_input != nullptr) {
      const bool train = sum_dy != nullptr;
      T xv[8];
      if (train) load8(x + e0, full, n, xv);
      T ov[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const Params p = channel(i);
        const A dy = ((bits >> i) & 1u) ? static_cast<A>(gv[i]) : A(0);
        A gi;
        if (train) {
          const A xmu = sub_rn(static_cast<A>(xv[i]), p.mean);
          gi = sub_rn(mul_rn(p.k, dy), add_rn(mul_rn(p.a, xmu), p.b));
        } else {
          gi = mul_rn(dy, p.k);
        }
        ov[i] = static_cast<T>(gi);
      }
      store8(grad_input + e0, full, n, ov);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_reduce_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& mask_arg, const at::Tensor& input_arg,
    const at::Tensor& mean_arg, const at::Tensor& var_arg, double eps) {
  check_backward_reduce_args(grad_out_arg, mask_arg, input_arg, mean_arg, var_arg,
                             c10::DeviceType::CUDA);
  const at::MemoryFormat layout = working_layout(input_arg);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::Tensor input = input_arg.contiguous(layout);
  const at::Tensor grad_out = grad_out_arg.contiguous(layout);
  const at::Tensor& mask = mask_arg;  // contiguous (check_mask)
  const Geometry g = geometry_of(input, layout);
  const at::ScalarType acc = acc_type(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  at::Tensor sum_dy = at::empty({g.c}, acc_opts);
  at::Tensor sum_dy_xmu = at::empty({g.c}, acc_opts);
  at::Tensor grad_weight = at::empty({g.c}, acc_opts);
  if (g.c == 0) return {sum_dy, sum_dy_xmu, grad_weight};
  const at::Tensor mean = to_acc(mean_arg, acc);
  const at::Tensor var = to_acc(var_arg, acc);
  const int sms = sm_count(input.get_device());
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_residual::bn_backward_reduce", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    constexpr int kVec = 16 / sizeof(T);
    const T* gp = grad_out.const_data_ptr<T>();
    const T* xp = input.const_data_ptr<T>();
    const uint8_t* mp = mask.const_data_ptr<uint8_t>();
    const A* meanp = mean.const_data_ptr<A>();
    const bool vec = aligned16(gp) && aligned16(xp) && (g.channels_last ? g.c : g.hw) % kVec == 0;
    const ReducePlan p = plan_reduce(g, vec ? kVec : 1, sms);
    const int64_t nparts = g.c * p.splits;
    at::Tensor ws = at::empty({2 * nparts}, acc_opts);  // shape-only size: graph safe
    A* part_dy = ws.mutable_data_ptr<A>();
    A* part_dyxmu = part_dy + nparts;
    if (!g.channels_last) {
      if (vec) {
        bwd_reduce_nchw_kernel<T, kVec><<<p.grid, p.block, 0, stream>>>(
            gp, xp, mp, meanp, g.n, g.c, g.hw, p.col_chunks, p.row_groups, part_dy, part_dyxmu);
      } else {
        bwd_reduce_nchw_kernel<T, 1><<<p.grid, p.block, 0, stream>>>(
            gp, xp, mp, meanp, g.n, g.c, g.hw, p.col_chunks, p.row_groups, part_dy, part_dyxmu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      if (vec) {
        bwd_reduce_cl_kernel<T, kVec><<<p.grid, p.block, 0, stream>>>(
            gp, xp, mp, meanp, g.n * g.hw, g.c, part_dy, part_dyxmu);
      } else {
        bwd_reduce_cl_kernel<T, 1><<<p.grid, p.block, 0, stream>>>(
            gp, xp, mp, meanp, g.n * g.hw, g.c, part_dy, part_dyxmu);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const unsigned fin_blocks = static_cast<unsigned>(ceil_div(g.c, kBlock / kWarp));
    bwd_reduce_finalize_kernel<A><<<fin_blocks, kBlock, 0, stream>>>(
        part_dy, part_dyxmu, var.const_data_ptr<A>(), static_cast<A>(eps), g.c, p.splits,
        sum_dy.mutable_data_ptr<A>(), sum_dy_xmu.mutable_data_ptr<A>(),
        grad_weight.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> bn_backward_apply_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& mask_arg, const at::Tensor& input_arg,
    const at::Tensor& mean_arg, const at::Tensor& var_arg,
    const std::optional<at::Tensor>& weight_arg, const std::optional<at::Tensor>& sum_dy_arg,
    const std::optional<at::Tensor>& sum_dy_xmu_arg, double eps, int64_t count,
    bool need_grad_input, bool need_grad_residual) {
  check_backward_apply_args(grad_out_arg, mask_arg, input_arg, mean_arg, var_arg, weight_arg,
                            sum_dy_arg, sum_dy_xmu_arg, count, c10::DeviceType::CUDA);
  const at::MemoryFormat layout = working_layout(input_arg);
  const bool train = sum_dy_arg.has_value();

  const c10::cuda::CUDAGuard guard(input_arg.device());
  // x is read only for a training grad_input: eval and grad_residual never copy or touch it.
  const bool read_x = train && need_grad_input;
  const at::Tensor input = read_x ? input_arg.contiguous(layout) : input_arg;
  const Geometry g = geometry_of(input_arg, layout);
  at::Tensor grad_input = need_grad_input ? at::empty(input.sizes(), input.options(), layout)
                                          : at::empty({0}, input.options());
  at::Tensor grad_residual = need_grad_residual
                                 ? at::empty(input.sizes(), input.options(), layout)
                                 : at::empty({0}, input.options());
  if (g.numel == 0 || (!need_grad_input && !need_grad_residual)) {
    return {grad_input, grad_residual};
  }
  const at::Tensor grad_out = grad_out_arg.contiguous(layout);
  const at::Tensor& mask = mask_arg;  // contiguous (check_mask)
  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean = to_acc(mean_arg, acc);
  const at::Tensor var = to_acc(var_arg, acc);
  const at::Tensor weight = to_acc(weight_arg, acc);
  const at::Tensor sum_dy = to_acc(sum_dy_arg, acc);
  const at::Tensor sum_dy_xmu = to_acc(sum_dy_xmu_arg, acc);
  const int sms = sm_count(input_arg.get_device());
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_residual::bn_backward_apply", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    BackwardApplyOp<T> op;
    op.grad = grad_out.const_data_ptr<T>();
    op.x = read_x ? input.const_data_ptr<T>() : nullptr;
    op.mask = mask.const_data_ptr<uint8_t>();
    op.grad_input = need_grad_input ? grad_input.mutable_data_ptr<T>() : nullptr;
    op.grad_residual = need_grad_residual ? grad_residual.mutable_data_ptr<T>() : nullptr;
    op.mean = mean.const_data_ptr<A>();
    op.var = var.const_data_ptr<A>();
    op.weight = ptr_or_null<A>(weight);
    // The kernel takes the training formula iff sum_dy is set: only when grad_input is wanted.
    op.sum_dy = read_x ? sum_dy.const_data_ptr<A>() : nullptr;
    op.sum_dy_xmu = read_x ? sum_dy_xmu.const_data_ptr<A>() : nullptr;
    op.eps = static_cast<A>(eps);
    op.inv_count = read_x ? A(1) / static_cast<A>(count) : A(0);
    op.vec = aligned16(op.grad) && (op.x == nullptr || aligned16(op.x)) &&
             (op.grad_input == nullptr || aligned16(op.grad_input)) &&
             (op.grad_residual == nullptr || aligned16(op.grad_residual));
    launch_elementwise(op, g, sms, stream);
  });
  return {grad_input, grad_residual};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_residual

TORCH_LIBRARY_IMPL(fused_residual, CUDA, m) {
  m.impl("bn_backward_reduce", &fused_residual::cuda::bn_backward_reduce_cuda);
  m.impl("bn_backward_apply", &fused_residual::cuda::bn_backward_apply_cuda);
}
