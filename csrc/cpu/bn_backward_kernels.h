// bn_backward_reduce and bn_backward_apply kernels.
//
// Both start from dy = grad_out where the saved ReLU mask bit is 1, else 0 (a select, so a
// masked-out NaN gradient gives 0 like threshold_backward). The mask is read as bits, one
// byte per 8 elements; no full-size dy tensor is ever materialized.
#pragma once

#include <vector>

#include "cpu/bn_kernel_utils.h"

namespace fused_residual::cpu::FUSED_RESIDUAL_ISA {
namespace {

// ---- bn_backward_reduce ----
// Math: sum_dy_c = sum(dy), sum_dy_xmu_c = sum(dy * (x - mean_c)). Vector accumulators in
// acc cover kInnerLen elements (a ChannelSlots window of channels_last rows) and are then
// added into double block partials; the partials of the fixed blocks are added per channel
// in block order: deterministic for any thread count.
// Bytes: read grad_out and x (2 * numel * sizeof(scalar_t)) and the mask (numel / 8).

// Sums over the contiguous run [e0, e0 + len) of one channel (a piece of an NCHW row).
template <typename scalar_t>
void contiguous_backward_sums(const scalar_t* gp, const scalar_t* xp, const uint8_t* mask,
                              int64_t nbytes, int64_t e0, int64_t len,
                              at::opmath_type<scalar_t> m,
                              const LaneSelect<at::opmath_type<scalar_t>>& select,
                              double& sum_dy, double& sum_dy_xmu) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t vlen = len - len % L;
  const Vec zero(acc_t(0));
  const Vec vm(m);
  const scalar_t* g = gp + e0;
  const scalar_t* x = xp + e0;

  double s1 = 0, s2 = 0;
  for (int64_t s = 0; s < vlen; s += kInnerLen) {
    const int64_t e = std::min(vlen, s + kInnerLen);
    Vec a0 = zero, a1 = zero, b0 = zero, b1 = zero;
    int64_t i = s;
    for (; i + 2 * L <= e; i += 2 * L) {
      const uint32_t bits = read_mask_bits(mask, e0 + i, static_cast<int>(2 * L), nbytes);
      const Vec dy0 = select(IO::load(g + i), bits);
      const Vec dy1 = select(IO::load(g + i + L), bits >> L);
      a0 += dy0;
      a1 += dy1;
      b0 += dy0 * (IO::load(x + i) - vm);
      b1 += dy1 * (IO::load(x + i + L) - vm);
    }
    for (; i < e; i += L) {
      const Vec dy =
          select(IO::load(g + i), read_mask_bits(mask, e0 + i, static_cast<int>(L), nbytes));
      a0 += dy;
      b0 += dy * (IO::load(x + i) - vm);
    }
    s1 += static_cast<double>(sum_lanes(a0 + a1));
    s2 += static_cast<double>(sum_lanes(b0 + b1));
  }
  for (int64_t i = vlen; i < len; ++i) {
    if (read_mask_bit(mask, e0 + i)) {
      const acc_t dy = static_cast<acc_t>(g[i]);
      s1 += static_cast<double>(dy);
      s2 += static_cast<double>(dy * (static_cast<acc_t>(x[i]) - m));
    }
  }
  sum_dy = s1;
  sum_dy_xmu = s2;
}

template <typename scalar_t>
void backward_reduce_nchw(const BackwardReduceArgs& args, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* gp = static_cast<const scalar_t*>(args.grad_out);
  const auto* xp = static_cast<const scalar_t*>(args.x);
  const auto* mean = static_cast<const acc_t*>(args.mean);
  const RowPieces rp(g.hw);
  const int64_t nblocks = g.n * g.c * rp.pieces;
  std::vector<double> p1(nblocks), p2(nblocks);
  const LaneSelect<acc_t> select;

  at::parallel_for(0, nblocks, block_grain(rp.piece_len), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b / rp.pieces;
      const int64_t j = b - row * rp.pieces;
      contiguous_backward_sums(gp, xp, args.mask, args.mask_bytes, row * g.hw + rp.start(j),
                               rp.length(j, g.hw), mean[row % g.c], select, p1[b], p2[b]);
    }
  });

  auto* sum_dy = static_cast<acc_t*>(args.sum_dy);
  auto* sum_dy_xmu = static_cast<acc_t*>(args.sum_dy_xmu);
  for (int64_t c = 0; c < g.c; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < g.n; ++n) {
      const int64_t base = (n * g.c + c) * rp.pieces;
      for (int64_t j = 0; j < rp.pieces; ++j) {
        s1 += p1[base + j];
        s2 += p2[base + j];
      }
    }
    sum_dy[c] = static_cast<acc_t>(s1);
    sum_dy_xmu[c] = static_cast<acc_t>(s2);
  }
}

template <typename scalar_t>
void backward_reduce_channels_last(const BackwardReduceArgs& args, const Geometry& g) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const auto* gp = static_cast<const scalar_t*>(args.grad_out);
  const auto* xp = static_cast<const scalar_t*>(args.x);
  const uint8_t* mask = args.mask;
  const int64_t nbytes = args.mask_bytes;
  const int64_t C = g.c;
  const RowBlocks blocks(g.n * g.hw, C);
  const ChannelSlots slots(C, L);
  const int64_t P = slots.period;
  const int64_t win_rows = slots.window_rows();
  std::vector<acc_t> mean_slots(P);
  slots.expand(static_cast<const acc_t*>(args.mean), mean_slots.data());
  const acc_t* ms = mean_slots.data();
  // Block b's sums of channel c at [b * C + c].
  std::vector<double> p1(blocks.nblocks * C, 0.0), p2(blocks.nblocks * C, 0.0);
  const LaneSelect<acc_t> select;
  const Vec zero(acc_t(0));

  at::parallel_for(0, blocks.nblocks, block_grain(blocks.rows_per_block * C), [&](int64_t begin,
                                                                                  int64_t end) {
    std::vector<acc_t> inner(2 * P);
    acc_t* in1 = inner.data();
    acc_t* in2 = in1 + P;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = blocks.first(b);
      const int64_t r_end = r0 + blocks.count(b);
      for (int64_t rs = r0; rs < r_end; rs += win_rows) {
        const int64_t re = std::min(r_end, rs + win_rows);
        const int64_t ws = rs * C;
        const int64_t wp = ws + slots.whole_periods((re - rs) * C);
        if (wp > ws) {
          // Periods outer, a group of slot vectors inner (a whole row for C = 64 float, so
          // memory is read in order): the group's accumulators stay in registers as
          // independent chains, its mask bits come from one or two reads.
          for_slot_groups<L, kSlotGroup<L>>(P, [&](auto gc, int64_t t) {
            constexpr int G = decltype(gc)::value;
            const GroupSelect<acc_t, G> gsel;
            Vec a[G], q[G];
            c10::ForcedUnroll<G>{}([&](auto kc) {
              a[kc] = zero;
              q[kc] = zero;
            });
            for (int64_t e = ws + t; e < wp; e += P) {
              const auto words =
                  gsel.prepare(read_group_bits<static_cast<int>(G * L)>(mask, e, nbytes));
              c10::ForcedUnroll<G>{}([&](auto kc) {
                constexpr int k = decltype(kc)::value;
                const Vec dy = gsel.template apply<k>(IO::load(gp + e + k * L), words);
                a[k] += dy;
                q[k] = at::vec::fmadd(dy, IO::load(xp + e + k * L) - Vec::loadu(ms + t + k * L),
                                      q[k]);
              });
            }
            c10::ForcedUnroll<G>{}([&](auto kc) {
              a[kc].store(in1 + t + kc * L);
              q[kc].store(in2 + t + kc * L);
            });
          });
        } else {
          std::fill(inner.begin(), inner.end(), acc_t(0));
        }
        slots.walk<L>(
            wp, re * C,
            [&](int64_t e, int64_t t) {
              const Vec dy = select(IO::load(gp + e),
                                    read_mask_bits(mask, e, static_cast<int>(L), nbytes));
              (Vec::loadu(in1 + t) + dy).store(in1 + t);
              at::vec::fmadd(dy, IO::load(xp + e) - Vec::loadu(ms + t), Vec::loadu(in2 + t))
                  .store(in2 + t);
            },
            [&](int64_t e, int64_t t) {
              if (read_mask_bit(mask, e)) {
                const acc_t dy = static_cast<acc_t>(gp[e]);
                in1[t] += dy;
                in2[t] += dy * (static_cast<acc_t>(xp[e]) - ms[t]);
              }
            });
        slots.fold_into(p1.data() + b * C, in1);
        slots.fold_into(p2.data() + b * C, in2);
      }
    }
  });

  auto* sum_dy = static_cast<acc_t*>(args.sum_dy);
  auto* sum_dy_xmu = static_cast<acc_t*>(args.sum_dy_xmu);
  at::parallel_for(0, C, 256, [&](int64_t cb, int64_t ce) {
    const int64_t w = ce - cb;
    std::vector<double> s(2 * w, 0.0);
    for (int64_t b = 0; b < blocks.nblocks; ++b) {
      const double* b1 = p1.data() + b * C + cb;
      const double* b2 = p2.data() + b * C + cb;
      for (int64_t c = 0; c < w; ++c) {
        s[c] += b1[c];
        s[w + c] += b2[c];
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      sum_dy[cb + c] = static_cast<acc_t>(s[c]);
      sum_dy_xmu[cb + c] = static_cast<acc_t>(s[w + c]);
    }
  });
}

template <typename scalar_t>
void backward_reduce_typed(const Geometry& g, const BackwardReduceArgs& a) {
  if (g.channels_last) {
    backward_reduce_channels_last<scalar_t>(a, g);
  } else {
    backward_reduce_nchw<scalar_t>(a, g);
  }
}

// ---- bn_backward_apply ----
// Math per element in acc: grad_input = dy * k_dy + (x - mean_c) * k_xmu + k_const, with
// k_dy = w invstd, k_xmu = -w invstd^3 sum_dy_xmu / count, k_const = -w invstd sum_dy /
// count (training), or grad_input = dy * k_dy (eval: x is not read); grad_residual = dy.
// Bytes: read grad_out, x (training grad_input only) and the mask (numel / 8); write
// grad_input and/or grad_residual: up to 4 * numel * sizeof(scalar_t).

template <typename scalar_t>
struct BackwardApplyPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;
  const uint8_t* mask;
  int64_t nbytes;
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* k_dy;
  const acc_t* k_xmu;
  const acc_t* k_const;
  scalar_t* gi;
  scalar_t* gr;
  bool stream;  // streaming stores for gi and gr (large outputs)
};

// One element in scalar code, with the constants of its channel at index k.
template <typename scalar_t, bool kTrain, bool kGradInput, bool kGradResidual>
C10_ALWAYS_INLINE void backward_apply_one(const BackwardApplyPtrs<scalar_t>& a, int64_t e,
                                          int64_t k) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t dy = read_mask_bit(a.mask, e) ? static_cast<acc_t>(a.g[e]) : acc_t(0);
  if constexpr (kGradResidual) {
    a.gr[e] = static_cast<scalar_t>(dy);
  }
  if constexpr (kGradInput) {
    acc_t v = dy * a.k_dy[k];
    if constexpr (kTrain) {
      v += (static_cast<acc_t>(a.x[e]) - a.mean[k]) * a.k_xmu[k] + a.k_const[k];
    }
    a.gi[e] = static_cast<scalar_t>(v);
  }
}

// One vector at flat index e with per-lane constants (broadcast or loaded by the caller).
template <typename scalar_t, bool kTrain, bool kGradInput, bool kGradResidual>
C10_ALWAYS_INLINE void backward_apply_vec(
    const BackwardApplyPtrs<scalar_t>& a, const LaneSelect<at::opmath_type<scalar_t>>& select,
    int64_t e, const Vectorized<at::opmath_type<scalar_t>>& vm,
    const Vectorized<at::opmath_type<scalar_t>>& vkd,
    const Vectorized<at::opmath_type<scalar_t>>& vkx,
    const Vectorized<at::opmath_type<scalar_t>>& vkc) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int L = static_cast<int>(IO::kLanes);
  const Vec dy = select(IO::load(a.g + e), read_mask_bits(a.mask, e, L, a.nbytes));
  if constexpr (kGradResidual) {
    IO::store_out(a.gr + e, dy, a.stream);
  }
  if constexpr (kGradInput) {
    Vec v = dy * vkd;
    if constexpr (kTrain) {
      v += (IO::load(a.x + e) - vm) * vkx + vkc;
    }
    IO::store_out(a.gi + e, v, a.stream);
  }
}

template <typename scalar_t, bool kTrain, bool kGradInput, bool kGradResidual>
void backward_apply_all(const BackwardApplyPtrs<scalar_t>& args, const Geometry& geometry) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const LaneSelect<acc_t> select;

  parallel_chunks(geometry.numel(), [&](int64_t begin, int64_t end) {
    // Local copies: streaming stores go through may-alias vector types, and the compiler
    // would otherwise reload every field from memory after each of them.
    const BackwardApplyPtrs<scalar_t> a = args;
    const Geometry g = geometry;
    if (!g.channels_last) {
      // Runs that stay in one (n, c) row: broadcast constants.
      int64_t pos = begin;
      int64_t row = pos / g.hw;
      int64_t off = pos - row * g.hw;
      while (pos < end) {
        const int64_t len = std::min(g.hw - off, end - pos);
        const int64_t c = row % g.c;
        Vec vm, vkd, vkx, vkc;  // only the constants the variant uses are read
        if constexpr (kGradInput) {
          vkd = Vec(a.k_dy[c]);
        }
        if constexpr (kTrain) {
          vm = Vec(a.mean[c]);
          vkx = Vec(a.k_xmu[c]);
          vkc = Vec(a.k_const[c]);
        }
        int64_t i = 0;
        for (; i + L <= len; i += L) {
          backward_apply_vec<scalar_t, kTrain, kGradInput, kGradResidual>(a, select, pos + i, vm,
                                                                          vkd, vkx, vkc);
        }
        for (; i < len; ++i) {
          backward_apply_one<scalar_t, kTrain, kGradInput, kGradResidual>(a, pos + i, c);
        }
        pos += len;
        ++row;
        off = 0;
      }
    } else {
      // One flat run; the constants are periodic_extend()ed (see apply_flat).
      const int64_t step = L % g.c;
      int64_t c0 = begin % g.c;
      int64_t e = begin;
      for (; e + L <= end; e += L) {
        Vec vm, vkd, vkx, vkc;
        if constexpr (kGradInput) {
          vkd = Vec::loadu(a.k_dy + c0);
        }
        if constexpr (kTrain) {
          vm = Vec::loadu(a.mean + c0);
          vkx = Vec::loadu(a.k_xmu + c0);
          vkc = Vec::loadu(a.k_const + c0);
        }
        backward_apply_vec<scalar_t, kTrain, kGradInput, kGradResidual>(a, select, e, vm, vkd,
                                                                        vkx, vkc);
        c0 += step;
        c0 -= c0 >= g.c ? g.c : 0;
      }
      for (; e < end; ++e) {
        backward_apply_one<scalar_t, kTrain, kGradInput, kGradResidual>(a, e, c0);
        c0 = c0 + 1 == g.c ? 0 : c0 + 1;
      }
    }
    stream_fence();
  });
}

template <typename scalar_t>
void backward_apply_typed(const Geometry& g, const BackwardApplyArgs& args) {
  using acc_t = at::opmath_type<scalar_t>;
  BackwardApplyPtrs<scalar_t> a{static_cast<const scalar_t*>(args.grad_out),
                                args.mask,
                                args.mask_bytes,
                                static_cast<const scalar_t*>(args.x),
                                static_cast<const acc_t*>(args.mean),
                                static_cast<const acc_t*>(args.k_dy),
                                static_cast<const acc_t*>(args.k_xmu),
                                static_cast<const acc_t*>(args.k_const),
                                static_cast<scalar_t*>(args.grad_input),
                                static_cast<scalar_t*>(args.grad_residual),
                                g.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes};
  std::vector<acc_t> ext[4];
  if (g.channels_last) {
    constexpr int64_t L = VecIO<scalar_t>::kLanes;
    const acc_t** fields[4] = {&a.mean, &a.k_dy, &a.k_xmu, &a.k_const};
    for (int f = 0; f < 4; ++f) {
      if (*fields[f] != nullptr) {
        ext[f] = periodic_extend(*fields[f], g.c, L);
        *fields[f] = ext[f].data();
      }
    }
  }
  const bool train = a.k_xmu != nullptr;
  if (a.gi != nullptr && a.gr != nullptr) {
    if (train) {
      backward_apply_all<scalar_t, true, true, true>(a, g);
    } else {
      backward_apply_all<scalar_t, false, true, true>(a, g);
    }
  } else if (a.gi != nullptr) {
    if (train) {
      backward_apply_all<scalar_t, true, true, false>(a, g);
    } else {
      backward_apply_all<scalar_t, false, true, false>(a, g);
    }
  } else if (a.gr != nullptr) {
    backward_apply_all<scalar_t, false, false, true>(a, g);
  }
}

}  // namespace
}  // namespace fused_residual::cpu::FUSED_RESIDUAL_ISA
