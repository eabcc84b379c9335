// CUDA kernels of bn_apply and bn_dual_apply (docs/op_layer.md): the fused normalize + affine
// + residual add (or + a second normalized input) + ReLU forward, with the packed 1-bit mask.
#include "elementwise.cuh"

namespace fused_residual {
namespace cuda {
namespace {

// Per group of 8 consecutive memory-order elements (one mask byte):
//   y = (x - mean_c) * (invstd_c * w_c) + b_c (+ r),  out = y < 0 ? 0 : y (NaN propagates),
//   mask bit i = (y > 0).
// Computed in acc with the reference's operation order and no FMA contraction (add_rn & co.),
// rounded once to T. Bytes per element: sizeof(T) read x, sizeof(T) read r (if any),
// sizeof(T) write out, 1/8 write mask (if saved). Per-channel constants come from a few
// L1-resident acc vectors (C values each).
// Per-channel constants of one BatchNorm, y = (x - mean) * scale + shift, in acc.
template <typename A>
struct Affine {
  A mean, scale, shift;
};

template <typename A>
__device__ __forceinline__ Affine<A> affine_of(const A* __restrict__ mean, const A* __restrict__ var,
                                               const A* __restrict__ weight,
                                               const A* __restrict__ bias, A eps, int64_t c) {
  const A invstd = inv_sqrt_rn(add_rn(var[c], eps));
  Affine<A> p;
  p.mean = mean[c];
  p.scale = weight != nullptr ? mul_rn(invstd, weight[c]) : invstd;
  // The reference adds b = 0 when bias is absent, which turns a -0 product into +0; adding
  // the 0 here too keeps the output bitwise equal.
  p.shift = bias != nullptr ? bias[c] : A(0);
  return p;
}

template <typename A>
__device__ __forceinline__ A normalized(A x, const Affine<A>& p) {
  return add_rn(mul_rn(sub_rn(x, p.mean), p.scale), p.shift);
}

template <typename T>
struct ApplyOp {
  using A = acc_of<T>;
  using Params = Affine<A>;
  static constexpr int kBlocksPerSm = elementwise_blocks<T>(4);
  const T* __restrict__ x;
  const T* __restrict__ r;  // nullptr: no residual
  T* __restrict__ out;
  uint8_t* __restrict__ mask;  // nullptr: save_mask = false
  const A* __restrict__ mean;
  const A* __restrict__ var;
  const A* __restrict__ weight;  // nullptr: w = 1
  const A* __restrict__ bias;    // nullptr: b = 0
  A eps;
  bool vec;  // x, r and out are 16-byte aligned

  __device__ __forceinline__ Params params(int64_t c) const {
    return affine_of(mean, var, weight, bias, eps, c);
  }

  template <class Channels>
  __device__ __forceinline__ void group(int64_t e0, int n, Channels& channel) const {
    const bool full = vec && n == 8;  // 128-bit path: e0 % 8 == 0 keeps 16-byte alignment
    T xv[8];
    load8(x + e0, full, n, xv);
    T rv[8];
    if (r != nullptr) load8(r + e0, full, n, rv);
    T ov[8];
    unsigned bits = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      A y = normalized(static_cast<A>(xv[i]), channel(i));
      if (r != nullptr) y = add_rn(y, static_cast<A>(rv[i]));
      ov[i] = static_cast<T>(y < A(0) ? A(0) : y);
      // Bit i of the byte is element e0 + i (LSB first); bits past the tensor's end stay 0.
      bits |= (i < n && y > A(0)) ? (1u << i) : 0u;
    }
    store8(out + e0, full, n, ov);
    if (mask != nullptr) mask[e0 >> 3] = static_cast<uint8_t>(bits);
  }
};

// bn_dual_apply: the tail of a downsampling block, two BatchNorms feeding one add,
//   y = [(x - mean_c) * scale_c + (x2 - mean2_c) * scale2_c] + (shift_c + shift2_c),
// without FMA contraction, then ReLU and the mask as ApplyOp. The two shifts are added once per
// channel: five constants per channel, cl8 holds eight channels of them (40 registers). With
// 16-bit data that fits the 64-register budget of 4 blocks per SM; with fp32 data (16 more
// registers for the two inputs' values) the plan is 3 blocks per SM, 80 registers.
// Bytes per element: sizeof(T) read x, sizeof(T) read x2, sizeof(T) write out, 1/8 write mask
// (if saved).
template <typename T>
struct DualApplyOp {
  using A = acc_of<T>;
  struct Params {
    A mean, scale, mean2, scale2, shift;
  };
  static constexpr int kBlocksPerSm = elementwise_blocks<T>(sizeof(T) == 2 ? 4 : 3);
  const T* __restrict__ x;
  const T* __restrict__ x2;
  T* __restrict__ out;
  uint8_t* __restrict__ mask;  // nullptr: save_mask = false
  const A* __restrict__ mean;
  const A* __restrict__ var;
  const A* __restrict__ weight;  // nullptr: w = 1
  const A* __restrict__ bias;    // nullptr: b = 0
  const A* __restrict__ mean2;
  const A* __restrict__ var2;
  const A* __restrict__ weight2;
  const A* __restrict__ bias2;
  A eps, eps2;
  bool vec;  // x, x2 and out are 16-byte aligned

  __device__ __forceinline__ Params params(int64_t c) const {
    const Affine<A> a = affine_of(mean, var, weight, bias, eps, c);
    const Affine<A> b = affine_of(mean2, var2, weight2, bias2, eps2, c);
    return {a.mean, a.scale, b.mean, b.scale, add_rn(a.shift, b.shift)};
  }

  template <class Channels>
  __device__ __forceinline__ void group(int64_t e0, int n, Channels& channel) const {
    const bool full = vec && n == 8;
    T xv[8];
    load8(x + e0, full, n, xv);
    T x2v[8];
    load8(x2 + e0, full, n, x2v);
    T ov[8];
    unsigned bits = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const Params p = channel(i);
      const A y = add_rn(add_rn(mul_rn(sub_rn(static_cast<A>(xv[i]), p.mean), p.scale),
                                mul_rn(sub_rn(static_cast<A>(x2v[i]), p.mean2), p.scale2)),
                         p.shift);
      ov[i] = static_cast<T>(y < A(0) ? A(0) : y);
      bits |= (i < n && y > A(0)) ? (1u << i) : 0u;
    }
    store8(out + e0, full, n, ov);
    if (mask != nullptr) mask[e0 >> 3] = static_cast<uint8_t>(bits);
  }
};

std::tuple<at::Tensor, at::Tensor> bn_apply_cuda(const at::Tensor& input_arg,
                                                 const std::optional<at::Tensor>& residual_arg,
                                                 const at::Tensor& mean_arg,
                                                 const at::Tensor& var_arg,
                                                 const std::optional<at::Tensor>& weight_arg,
                                                 const std::optional<at::Tensor>& bias_arg,
                                                 double eps, bool save_mask) {
  check_apply_args(input_arg, residual_arg, mean_arg, var_arg, weight_arg, bias_arg,
                   c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::MemoryFormat layout = working_layout(input_arg);
  const at::Tensor input = input_arg.contiguous(layout);
  const at::Tensor residual =
      residual_arg.has_value() ? residual_arg->contiguous(layout) : at::Tensor();
  const Geometry g = geometry_of(input, layout);
  at::Tensor out = at::empty(input.sizes(), input.options(), layout);
  at::Tensor mask = at::empty({save_mask ? ceil_div(g.numel, 8) : 0},
                              input.options().dtype(at::kByte));
  if (g.numel == 0) return {out, mask};

  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean = to_acc(mean_arg, acc);
  const at::Tensor var = to_acc(var_arg, acc);
  const at::Tensor weight = to_acc(weight_arg, acc);
  const at::Tensor bias = to_acc(bias_arg, acc);
  const int sms = sm_count(input.get_device());
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_residual::bn_apply", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    ApplyOp<T> op;
    op.x = input.const_data_ptr<T>();
    op.r = ptr_or_null<T>(residual);
    op.out = out.mutable_data_ptr<T>();
    op.mask = save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    op.mean = mean.const_data_ptr<A>();
    op.var = var.const_data_ptr<A>();
    op.weight = ptr_or_null<A>(weight);
    op.bias = ptr_or_null<A>(bias);
    op.eps = static_cast<A>(eps);
    op.vec = aligned16(op.x) && aligned16(op.out) && (op.r == nullptr || aligned16(op.r));
    launch_elementwise(op, g, sms, stream);
  });
  return {out, mask};
}

std::tuple<at::Tensor, at::Tensor> bn_dual_apply_cuda(
    const at::Tensor& input_arg, const at::Tensor& mean_arg, const at::Tensor& var_arg,
    const std::optional<at::Tensor>& weight_arg, const std::optional<at::Tensor>& bias_arg,
    const at::Tensor& input2_arg, const at::Tensor& mean2_arg, const at::Tensor& var2_arg,
    const std::optional<at::Tensor>& weight2_arg, const std::optional<at::Tensor>& bias2_arg,
    double eps, double eps2, bool save_mask) {
  check_dual_apply_args(input_arg, mean_arg, var_arg, weight_arg, bias_arg, input2_arg, mean2_arg,
                        var2_arg, weight2_arg, bias2_arg, c10::DeviceType::CUDA);
  const at::Device device = input_arg.device();

  const c10::cuda::CUDAGuard guard(device);
  const at::MemoryFormat layout = working_layout(input_arg);
  const at::Tensor input = input_arg.contiguous(layout);
  const at::Tensor input2 = input2_arg.contiguous(layout);  // into input's working layout
  const Geometry g = geometry_of(input, layout);
  at::Tensor out = at::empty(input.sizes(), input.options(), layout);
  at::Tensor mask = at::empty({save_mask ? ceil_div(g.numel, 8) : 0},
                              input.options().dtype(at::kByte));
  if (g.numel == 0) return {out, mask};

  const at::ScalarType acc = acc_type(input.scalar_type());
  const at::Tensor mean = to_acc(mean_arg, acc), var = to_acc(var_arg, acc);
  const at::Tensor weight = to_acc(weight_arg, acc), bias = to_acc(bias_arg, acc);
  const at::Tensor mean2 = to_acc(mean2_arg, acc), var2 = to_acc(var2_arg, acc);
  const at::Tensor weight2 = to_acc(weight2_arg, acc), bias2 = to_acc(bias2_arg, acc);
  const int sms = sm_count(input.get_device());
  const cudaStream_t stream = current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_residual::bn_dual_apply", [&] {
    using T = scalar_t;
    using A = acc_of<T>;
    DualApplyOp<T> op;
    op.x = input.const_data_ptr<T>();
    op.x2 = input2.const_data_ptr<T>();
    op.out = out.mutable_data_ptr<T>();
    op.mask = save_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr;
    op.mean = mean.const_data_ptr<A>();
    op.var = var.const_data_ptr<A>();
    op.weight = ptr_or_null<A>(weight);
    op.bias = ptr_or_null<A>(bias);
    op.mean2 = mean2.const_data_ptr<A>();
    op.var2 = var2.const_data_ptr<A>();
    op.weight2 = ptr_or_null<A>(weight2);
    op.bias2 = ptr_or_null<A>(bias2);
    op.eps = static_cast<A>(eps);
    op.eps2 = static_cast<A>(eps2);
    op.vec = aligned16(op.x) && aligned16(op.x2) && aligned16(op.out);
    launch_elementwise(op, g, sms, stream);
  });
  return {out, mask};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_residual

TORCH_LIBRARY_IMPL(fused_residual, CUDA, m) {
  m.impl("bn_apply", &fused_residual::cuda::bn_apply_cuda);
  m.impl("bn_dual_apply", &fused_residual::cuda::bn_dual_apply_cuda);
}
