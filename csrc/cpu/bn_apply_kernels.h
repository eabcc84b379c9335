// bn_apply / bn_dual_apply kernel: normalize, affine, residual add (or a second normalized
// input) and ReLU in one streaming pass.
//
// Math, per element in acc: y = (x - mean_c) * scale_c + bias_c + addend, with scale_c =
// invstd_c * w_c precomputed per channel, and addend one of
//   Addend::kNone        0                                (bn_apply, no residual)
//   Addend::kResidual    r                                (bn_apply)
//   Addend::kNormalized  (x2 - mean2_c) * scale2_c        (bn_dual_apply; bias_c = b_c + b2_c)
// x - mean comes first, because folding the mean into a shift (x * scale + (b - mean *
// scale)) cancels catastrophically for a large mean.
// out = y < 0 ? 0 : y (NaN propagates), rounded once to the input dtype; mask bit = y > 0.
// Bytes: read x (and r or x2), write out: 2 (3) * numel * sizeof(scalar_t), plus numel / 8
// bytes of mask. Chunks of kElementChunk elements (a multiple of 8) own their mask bytes.
#pragma once

#include <vector>

#include "cpu/bn_kernel_utils.h"

namespace fused_residual::cpu::FUSED_RESIDUAL_ISA {
namespace {

enum class Addend { kNone, kResidual, kNormalized };

template <typename scalar_t>
struct ApplyPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const scalar_t* r;  // the residual (kResidual) or the second input x2 (kNormalized)
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* bias;
  const acc_t* mean2;   // kNormalized only
  const acc_t* scale2;  // kNormalized only
  scalar_t* out;
  uint8_t* mask;
  bool stream;  // streaming stores for `out` (a large output)
};

// Per-channel constants of one NCHW row.
template <typename acc_t>
struct RowConstants {
  acc_t m, s, b, m2, s2;
};

// NCHW: elements [pos, pos + len) of one row, i.e. one channel with constants k.
template <typename scalar_t, Addend kAdd, bool kMask>
C10_ALWAYS_INLINE void apply_row(const ApplyPtrs<scalar_t>& a, int64_t pos, int64_t len,
                                 const RowConstants<at::opmath_type<scalar_t>>& k,
                                 BitWriter& bits) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const scalar_t* x = a.x + pos;
  const scalar_t* r = kAdd != Addend::kNone ? a.r + pos : nullptr;
  scalar_t* out = a.out + pos;
  const Vec vm(k.m), vs(k.s), vb(k.b), vm2(k.m2), vs2(k.s2);
  int64_t i = 0;
  for (; i + L <= len; i += L) {
    Vec y = (IO::load(x + i) - vm) * vs + vb;
    if constexpr (kAdd == Addend::kResidual) {
      y += IO::load(r + i);
    } else if constexpr (kAdd == Addend::kNormalized) {
      y += (IO::load(r + i) - vm2) * vs2;
    }
    IO::store_out(out + i, relu(y), a.stream);
    if constexpr (kMask) {
      bits.push(positive_bits(y), static_cast<int>(L));
    }
  }
  for (; i < len; ++i) {
    acc_t y = (static_cast<acc_t>(x[i]) - k.m) * k.s + k.b;
    if constexpr (kAdd == Addend::kResidual) {
      y += static_cast<acc_t>(r[i]);
    } else if constexpr (kAdd == Addend::kNormalized) {
      y += (static_cast<acc_t>(r[i]) - k.m2) * k.s2;
    }
    out[i] = static_cast<scalar_t>(y < acc_t(0) ? acc_t(0) : y);
    if constexpr (kMask) {
      bits.push(y > acc_t(0) ? 1u : 0u, 1);
    }
  }
}

// channels_last: [begin, end) as one flat run; the per-channel arrays of `a` are
// periodic_extend()ed, so the vector at e takes its per-lane constants from offset e % C.
template <typename scalar_t, Addend kAdd, bool kMask>
C10_ALWAYS_INLINE void apply_flat(const ApplyPtrs<scalar_t>& a, int64_t C, int64_t begin,
                                  int64_t end, BitWriter& bits) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t step = L % C;
  int64_t c0 = begin % C;
  int64_t e = begin;
  for (; e + L <= end; e += L) {
    Vec y = (IO::load(a.x + e) - Vec::loadu(a.mean + c0)) * Vec::loadu(a.scale + c0) +
            Vec::loadu(a.bias + c0);
    if constexpr (kAdd == Addend::kResidual) {
      y += IO::load(a.r + e);
    } else if constexpr (kAdd == Addend::kNormalized) {
      y += (IO::load(a.r + e) - Vec::loadu(a.mean2 + c0)) * Vec::loadu(a.scale2 + c0);
    }
    IO::store_out(a.out + e, relu(y), a.stream);
    if constexpr (kMask) {
      bits.push(positive_bits(y), static_cast<int>(L));
    }
    c0 += step;
    c0 -= c0 >= C ? C : 0;
  }
  for (; e < end; ++e) {
    acc_t y = (static_cast<acc_t>(a.x[e]) - a.mean[c0]) * a.scale[c0] + a.bias[c0];
    if constexpr (kAdd == Addend::kResidual) {
      y += static_cast<acc_t>(a.r[e]);
    } else if constexpr (kAdd == Addend::kNormalized) {
      y += (static_cast<acc_t>(a.r[e]) - a.mean2[c0]) * a.scale2[c0];
    }
    a.out[e] = static_cast<scalar_t>(y < acc_t(0) ? acc_t(0) : y);
    if constexpr (kMask) {
      bits.push(y > acc_t(0) ? 1u : 0u, 1);
    }
    c0 = c0 + 1 == C ? 0 : c0 + 1;
  }
}

// One chunk [begin, end) of the flat range.
template <typename scalar_t, Addend kAdd, bool kMask>
void apply_chunk(const ApplyPtrs<scalar_t>& args, const Geometry& geometry, int64_t begin,
                 int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  // Local copies: the mask bytes and the streaming stores may alias anything, and the
  // compiler would otherwise reload every field from memory after each of them.
  const ApplyPtrs<scalar_t> a = args;
  const Geometry g = geometry;
  BitWriter bits(kMask ? a.mask + begin / 8 : nullptr);
  if (!g.channels_last) {
    // Runs that stay in one (n, c) row.
    int64_t pos = begin;
    int64_t row = pos / g.hw;
    int64_t off = pos - row * g.hw;
    while (pos < end) {
      const int64_t len = std::min(g.hw - off, end - pos);
      const int64_t c = row % g.c;
      RowConstants<acc_t> k{a.mean[c], a.scale[c], a.bias[c], acc_t(0), acc_t(0)};
      if constexpr (kAdd == Addend::kNormalized) {
        k.m2 = a.mean2[c];
        k.s2 = a.scale2[c];
      }
      apply_row<scalar_t, kAdd, kMask>(a, pos, len, k, bits);
      pos += len;
      ++row;
      off = 0;
    }
  } else {
    apply_flat<scalar_t, kAdd, kMask>(a, g.c, begin, end, bits);
  }
  if constexpr (kMask) {
    bits.flush();
  }
  stream_fence();
}

template <typename scalar_t, Addend kAdd, bool kMask>
void apply_all(const ApplyPtrs<scalar_t>& a, const Geometry& g) {
  parallel_chunks(g.numel(), [&](int64_t begin, int64_t end) {
    apply_chunk<scalar_t, kAdd, kMask>(a, g, begin, end);
  });
}

template <typename scalar_t, Addend kAdd>
void apply_masked(const ApplyPtrs<scalar_t>& a, const Geometry& g) {
  if (a.mask != nullptr) {
    apply_all<scalar_t, kAdd, true>(a, g);
  } else {
    apply_all<scalar_t, kAdd, false>(a, g);
  }
}

template <typename scalar_t>
void apply_typed(const Geometry& g, const ApplyArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool dual = args.x2 != nullptr;
  ApplyPtrs<scalar_t> a{static_cast<const scalar_t*>(args.x),
                        static_cast<const scalar_t*>(dual ? args.x2 : args.residual),
                        static_cast<const acc_t*>(args.mean),
                        static_cast<const acc_t*>(args.scale),
                        static_cast<const acc_t*>(args.bias),
                        static_cast<const acc_t*>(args.mean2),
                        static_cast<const acc_t*>(args.scale2),
                        static_cast<scalar_t*>(args.out),
                        args.mask,
                        g.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes};
  std::vector<acc_t> ext[5];
  if (g.channels_last) {
    constexpr int64_t L = VecIO<scalar_t>::kLanes;
    const acc_t** arrays[5] = {&a.mean, &a.scale, &a.bias, &a.mean2, &a.scale2};
    for (int i = 0; i < (dual ? 5 : 3); ++i) {
      ext[i] = periodic_extend(*arrays[i], g.c, L);
      *arrays[i] = ext[i].data();
    }
  }
  if (dual) {
    apply_masked<scalar_t, Addend::kNormalized>(a, g);
  } else if (a.r != nullptr) {
    apply_masked<scalar_t, Addend::kResidual>(a, g);
  } else {
    apply_masked<scalar_t, Addend::kNone>(a, g);
  }
}

}  // namespace
}  // namespace fused_residual::cpu::FUSED_RESIDUAL_ISA
