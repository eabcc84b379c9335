// bn_stats kernels: per-channel mean and population variance.
//
// Math: NCHW blocks (pieces of one row) get a corrected two-pass result: m0 = sum(x) / n_b
// rounded to acc; d = x - m0 in acc; mean_b = m0 + sum(d) / n_b; M2_b = sum(d^2) -
// sum(d)^2 / n_b (short acc vector sums, added up in double). channels_last blocks (groups
// of rows) get the same shifted sums in one pass, with the mean of the block's first rows as
// the shift (see stats_channels_last). The blocks' (n_b, mean_b, M2_b) are then merged per
// channel in block order with Chan's formula in double. Never E[x^2] - E[x]^2: with a mean
// offset of 1e4 and std 1, d = x - shift is exact in float and the variance keeps full
// float precision.
// Bytes: one read of x from memory (numel * sizeof(scalar_t)); the NCHW second pass re-reads
// the block from L1/L2. Partials are 16 bytes per block and channel.
// A channel whose merged mean is not finite (it holds a +-inf or NaN) is recomputed as
// nn.BatchNorm2d computes it on CPU (exact_channel_moments): two more reads of that channel.
#pragma once

#include <cmath>
#include <vector>

#include "cpu/bn_kernel_utils.h"

namespace fused_residual::cpu::FUSED_RESIDUAL_ISA {
namespace {

// Chan's merge of a block (count_b, mean_b, m2_b) into the running (count, mean, m2).
inline void chan_merge(double& count, double& mean, double& m2, double count_b, double mean_b,
                       double m2_b) {
  const double total = count + count_b;
  const double delta = mean_b - mean;
  const double frac_b = count_b / total;
  mean += delta * frac_b;
  m2 += m2_b + delta * delta * count * frac_b;
  count = total;
}

// Mean and M2 of the contiguous run p[0, len), len >= 1, corrected two-pass. Vector
// accumulators cover kInnerLen elements at a time, their lane sums go to double.
template <typename scalar_t>
void contiguous_moments(const scalar_t* p, int64_t len, double& mean, double& m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t vlen = len - len % L;  // covered by whole vectors
  const Vec zero(acc_t(0));

  double sum = 0;
  for (int64_t s = 0; s < vlen; s += kInnerLen) {
    const int64_t e = std::min(vlen, s + kInnerLen);
    Vec a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    int64_t i = s;
    for (; i + 4 * L <= e; i += 4 * L) {
      a0 += IO::load(p + i);
      a1 += IO::load(p + i + L);
      a2 += IO::load(p + i + 2 * L);
      a3 += IO::load(p + i + 3 * L);
    }
    for (; i < e; i += L) {
      a0 += IO::load(p + i);
    }
    sum += static_cast<double>(sum_lanes((a0 + a1) + (a2 + a3)));
  }
  for (int64_t i = vlen; i < len; ++i) {
    sum += static_cast<double>(p[i]);
  }
  const double n = static_cast<double>(len);
  const acc_t m0 = static_cast<acc_t>(sum / n);

  const Vec vm0(m0);
  double sd = 0, sq = 0;
  for (int64_t s = 0; s < vlen; s += kInnerLen) {
    const int64_t e = std::min(vlen, s + kInnerLen);
    // Four independent (d, d^2) accumulator pairs hide the add/FMA latency.
    Vec d0 = zero, d1 = zero, d2 = zero, d3 = zero;
    Vec q0 = zero, q1 = zero, q2 = zero, q3 = zero;
    int64_t i = s;
    for (; i + 4 * L <= e; i += 4 * L) {
      prefetch_span(p + len + i, 4 * L);  // the next block (blocks are contiguous)
      const Vec a0 = IO::load(p + i) - vm0;
      const Vec a1 = IO::load(p + i + L) - vm0;
      const Vec a2 = IO::load(p + i + 2 * L) - vm0;
      const Vec a3 = IO::load(p + i + 3 * L) - vm0;
      d0 += a0;
      d1 += a1;
      d2 += a2;
      d3 += a3;
      q0 = at::vec::fmadd(a0, a0, q0);
      q1 = at::vec::fmadd(a1, a1, q1);
      q2 = at::vec::fmadd(a2, a2, q2);
      q3 = at::vec::fmadd(a3, a3, q3);
    }
    for (; i < e; i += L) {
      const Vec a = IO::load(p + i) - vm0;
      d0 += a;
      q0 = at::vec::fmadd(a, a, q0);
    }
    sd += static_cast<double>(sum_lanes((d0 + d1) + (d2 + d3)));
    sq += static_cast<double>(sum_lanes((q0 + q1) + (q2 + q3)));
  }
  for (int64_t i = vlen; i < len; ++i) {
    const acc_t a = static_cast<acc_t>(p[i]) - m0;
    sd += static_cast<double>(a);
    sq += static_cast<double>(a) * static_cast<double>(a);
  }
  mean = static_cast<double>(m0) + sd / n;
  m2 = std::max(0.0, sq - sd * sd / n);
}

// Mean and M2 of `rows` rows of `len` values of one channel, `stride` elements apart (an NCHW
// channel's rows n0 .. n1-1), corrected two-pass as contiguous_moments. A row's vector part
// adds into acc vector accumulators, flushed into double every ~kInnerLen elements; its
// scalar tail goes to double per row. For the small spatial sizes of late ResNet stages (a
// row of 4 to 64 values), one such block over many rows replaces a block per row, whose two
// passes, double partials and Chan merge cost tens of cycles per element (issue 21: the CPU
// ResNet-50 benchmark's 64x64 images give rows of 256 down to 4 values).
template <typename scalar_t>
void rows_moments(const scalar_t* p, int64_t rows, int64_t stride, int64_t len, double& mean,
                  double& m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t vlen = len - len % L;
  const int64_t flush_rows = std::max<int64_t>(1, kInnerLen / std::max<int64_t>(1, len));
  const Vec zero(acc_t(0));

  double sum = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += flush_rows) {
    const int64_t r1 = std::min(rows, r0 + flush_rows);
    Vec a = zero;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* q = p + r * stride;
      for (int64_t i = 0; i < vlen; i += L) {
        a += IO::load(q + i);
      }
      for (int64_t i = vlen; i < len; ++i) {
        sum += static_cast<double>(q[i]);
      }
    }
    sum += static_cast<double>(sum_lanes(a));
  }
  const double n = static_cast<double>(rows * len);
  const acc_t m0 = static_cast<acc_t>(sum / n);

  const Vec vm0(m0);
  double sd = 0, sq = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += flush_rows) {
    const int64_t r1 = std::min(rows, r0 + flush_rows);
    Vec d = zero, q2 = zero;
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* q = p + r * stride;
      for (int64_t i = 0; i < vlen; i += L) {
        const Vec v = IO::load(q + i) - vm0;
        d += v;
        q2 = at::vec::fmadd(v, v, q2);
      }
      for (int64_t i = vlen; i < len; ++i) {
        const acc_t v = static_cast<acc_t>(q[i]) - m0;
        sd += static_cast<double>(v);
        sq += static_cast<double>(v) * static_cast<double>(v);
      }
    }
    sd += static_cast<double>(sum_lanes(d));
    sq += static_cast<double>(sum_lanes(q2));
  }
  mean = static_cast<double>(m0) + sd / n;
  m2 = std::max(0.0, sq - sd * sd / n);
}

// The rare path of a channel whose merged mean is not finite: it holds a +-inf or NaN (or,
// channels_last, x - shift overflowed). Shifted sums cannot tell +inf alone from +inf and
// -inf (both reach inf - inf = NaN), so the channel is summed again as nn.BatchNorm2d does on
// CPU: mean = sum(x) / count, var = sum((x - mean)^2) / count, in double. Then +inf values
// among finite ones give mean +inf, -inf gives -inf, NaN or both infinities NaN, and var is
// NaN; a channel of finite values gets its exact two-pass moments.
template <typename scalar_t>
void exact_channel_moments(const scalar_t* x, const Geometry& g, int64_t c, double& mean, double& var) {
  // Element (row, j) of channel c: NCHW rows are the N planes (j < HW), channels_last rows
  // are the N*H*W pixels (j = 0).
  const int64_t rows = g.channels_last ? g.n * g.hw : g.n;
  const int64_t cols = g.channels_last ? 1 : g.hw;
  const auto value = [&](int64_t r, int64_t j) {
    return static_cast<double>(g.channels_last ? x[r * g.c + c] : x[(r * g.c + c) * g.hw + j]);
  };
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      sum += value(r, j);
    }
  }
  const double count = static_cast<double>(g.n * g.hw);
  mean = sum / count;
  double sq = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) {
      const double d = value(r, j) - mean;
      sq += d * d;
    }
  }
  var = sq / count;
}

// Rows of at most this many values take the row-group blocks of stats_nchw_small_rows.
constexpr int64_t kSmallRow = 4 * kInnerLen;

// NCHW with short rows: block (c, k) is rows n in [k * R, (k + 1) * R) of channel c, R =
// kReduceBlock / HW (so a block holds about kReduceBlock values, as elsewhere); partials at
// [c * G + k], merged per channel in k order. Fixed by the shape: deterministic for any
// thread count.
template <typename scalar_t>
void stats_nchw_small_rows(const scalar_t* x, const Geometry& g,
                           at::opmath_type<scalar_t>* mean_out,
                           at::opmath_type<scalar_t>* var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows_per_block = std::max<int64_t>(1, kReduceBlock / std::max<int64_t>(1, g.hw));
  const int64_t groups = (g.n + rows_per_block - 1) / rows_per_block;
  std::vector<double> pmean(g.c * groups), pm2(g.c * groups);
  const int64_t stride = g.c * g.hw;

  at::parallel_for(0, g.c * groups, block_grain(rows_per_block * g.hw), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = b / groups;
      const int64_t n0 = (b - c * groups) * rows_per_block;
      const int64_t rows = std::min(rows_per_block, g.n - n0);
      rows_moments(x + n0 * stride + c * g.hw, rows, stride, g.hw, pmean[b], pm2[b]);
    }
  });
  for (int64_t c = 0; c < g.c; ++c) {
    double count = 0, mean = 0, m2 = 0;
    for (int64_t k = 0; k < groups; ++k) {
      const int64_t rows = std::min(rows_per_block, g.n - k * rows_per_block);
      chan_merge(count, mean, m2, static_cast<double>(rows * g.hw), pmean[c * groups + k],
                 pm2[c * groups + k]);
    }
    double var = m2 / count;
    if (!std::isfinite(mean)) {
      exact_channel_moments(x, g, c, mean, var);
    }
    mean_out[c] = static_cast<acc_t>(mean);
    var_out[c] = static_cast<acc_t>(var);
  }
}

// NCHW: blocks are pieces of the (n, c) rows; partials at [row * pieces + j]; channel c
// merges rows n = 0 .. N-1 (pieces in order) of its own. Short rows: stats_nchw_small_rows.
template <typename scalar_t>
void stats_nchw(const scalar_t* x, const Geometry& g, at::opmath_type<scalar_t>* mean_out,
                at::opmath_type<scalar_t>* var_out) {
  using acc_t = at::opmath_type<scalar_t>;
  if (g.hw <= kSmallRow) {
    stats_nchw_small_rows(x, g, mean_out, var_out);
    return;
  }
  const RowPieces rp(g.hw);
  const int64_t nblocks = g.n * g.c * rp.pieces;
  std::vector<double> pmean(nblocks), pm2(nblocks);

  at::parallel_for(0, nblocks, block_grain(rp.piece_len), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b / rp.pieces;
      const int64_t j = b - row * rp.pieces;
      contiguous_moments(x + row * g.hw + rp.start(j), rp.length(j, g.hw), pmean[b], pm2[b]);
    }
  });

  at::parallel_for(0, g.c, 16, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      double count = 0, mean = 0, m2 = 0;
      for (int64_t n = 0; n < g.n; ++n) {
        const int64_t base = (n * g.c + c) * rp.pieces;
        for (int64_t j = 0; j < rp.pieces; ++j) {
          chan_merge(count, mean, m2, static_cast<double>(rp.length(j, g.hw)), pmean[base + j],
                     pm2[base + j]);
        }
      }
      double var = m2 / count;
      if (!std::isfinite(mean)) {
        exact_channel_moments(x, g, c, mean, var);
      }
      mean_out[c] = static_cast<acc_t>(mean);
      var_out[c] = static_cast<acc_t>(var);
    }
  });
}

// channels_last: blocks of rows of C values, one pass per block. Each block takes a
// per-channel shift s_c, the mean of its first kShiftRows rows rounded to acc, and sums
// d = x - s_c and d^2 (acc vector sums over a ChannelSlots window, added up in double);
// mean_b = s_c + sum(d) / n_b, M2_b = sum(d^2) - sum(d)^2 / n_b. s_c is within a few
// standard deviations of the block mean, so the subtraction loses at most a few bits (not
// E[x^2] - E[x]^2: a mean offset of 1e4 cancels exactly in d). Partials at [b * C + c].
constexpr int64_t kShiftRows = 8;

template <typename scalar_t>
void stats_channels_last(const scalar_t* x, const Geometry& g,
                         at::opmath_type<scalar_t>* mean_out,
                         at::opmath_type<scalar_t>* var_out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t L = IO::kLanes;
  const int64_t C = g.c;
  const RowBlocks blocks(g.n * g.hw, C);
  const ChannelSlots slots(C, L);
  const int64_t P = slots.period;
  const int64_t win_rows = slots.window_rows();
  const Vec zero(acc_t(0));
  std::vector<double> pmean(blocks.nblocks * C), pm2(blocks.nblocks * C);

  at::parallel_for(0, blocks.nblocks, block_grain(blocks.rows_per_block * C), [&](int64_t begin,
                                                                                  int64_t end) {
    std::vector<acc_t> inner(3 * P + C);
    acc_t* shs = inner.data();  // the block's shift, per slot
    acc_t* in1 = shs + P;       // inner sums of d, per slot
    acc_t* in2 = in1 + P;       // inner sums of d^2, per slot
    acc_t* sh = in2 + P;        // the block's shift, per channel
    std::vector<double> outer(2 * C);
    double* sd = outer.data();
    double* sq = sd + C;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = blocks.first(b);
      const int64_t r_end = r0 + blocks.count(b);
      std::fill(outer.begin(), outer.end(), 0.0);

      const int64_t nsh = std::min<int64_t>(kShiftRows, r_end - r0);
      for (int64_t c = 0; c < C; ++c) {
        sh[c] = acc_t(0);
      }
      for (int64_t r = r0; r < r0 + nsh; ++r) {
        const scalar_t* row = x + r * C;
        for (int64_t c = 0; c < C; ++c) {
          sh[c] += static_cast<acc_t>(row[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        sh[c] /= static_cast<acc_t>(nsh);
      }
      slots.expand(sh, shs);

      for (int64_t rs = r0; rs < r_end; rs += win_rows) {
        const int64_t re = std::min(r_end, rs + win_rows);
        const int64_t ws = rs * C;
        const int64_t wp = ws + slots.whole_periods((re - rs) * C);
        if (wp > ws) {
          // Periods outer, a group of slot vectors inner: the group's accumulators stay in
          // registers and are independent chains.
          for_slot_groups<L, kSlotGroup<L>>(P, [&](auto gc, int64_t t) {
            constexpr int G = decltype(gc)::value;
            Vec d[G], q[G];
            c10::ForcedUnroll<G>{}([&](auto kc) {
              d[kc] = zero;
              q[kc] = zero;
            });
            for (int64_t e = ws + t; e < wp; e += P) {
              c10::ForcedUnroll<G>{}([&](auto kc) {
                constexpr int k = decltype(kc)::value;
                // The shift is a memory operand (L1), leaving the registers to the sums.
                const Vec a = IO::load(x + e + k * L) - Vec::loadu(shs + t + k * L);
                d[k] += a;
                q[k] = at::vec::fmadd(a, a, q[k]);
              });
            }
            c10::ForcedUnroll<G>{}([&](auto kc) {
              d[kc].store(in1 + t + kc * L);
              q[kc].store(in2 + t + kc * L);
            });
          });
        } else {
          std::fill(in1, in1 + 2 * P, acc_t(0));
        }
        slots.walk<L>(
            wp, re * C,
            [&](int64_t e, int64_t t) {
              const Vec d = IO::load(x + e) - Vec::loadu(shs + t);
              (Vec::loadu(in1 + t) + d).store(in1 + t);
              at::vec::fmadd(d, d, Vec::loadu(in2 + t)).store(in2 + t);
            },
            [&](int64_t e, int64_t t) {
              const acc_t d = static_cast<acc_t>(x[e]) - shs[t];
              in1[t] += d;
              in2[t] += d * d;
            });
        slots.fold_into(sd, in1);
        slots.fold_into(sq, in2);
      }

      const double n = static_cast<double>(r_end - r0);
      for (int64_t c = 0; c < C; ++c) {
        pmean[b * C + c] = static_cast<double>(sh[c]) + sd[c] / n;
        pm2[b * C + c] = std::max(0.0, sq[c] - sd[c] * sd[c] / n);
      }
    }
  });

  // Merge in block order (Chan's formula, as chan_merge; a block's count is the same for
  // every channel, so its division is done once); channels are split across threads.
  at::parallel_for(0, C, 64, [&](int64_t cb, int64_t ce) {
    const int64_t w = ce - cb;
    std::vector<double> state(2 * w, 0.0);
    double* mean = state.data();
    double* m2 = mean + w;
    double count = 0;
    for (int64_t b = 0; b < blocks.nblocks; ++b) {
      const double nb = static_cast<double>(blocks.count(b));
      const double total = count + nb;
      const double frac_b = nb / total;
      const double cf = count * frac_b;
      const double* bm = pmean.data() + b * C + cb;
      const double* bq = pm2.data() + b * C + cb;
      for (int64_t c = 0; c < w; ++c) {
        const double delta = bm[c] - mean[c];
        mean[c] += delta * frac_b;
        m2[c] += bq[c] + delta * delta * cf;
      }
      count = total;
    }
    for (int64_t c = 0; c < w; ++c) {
      double var = m2[c] / count;
      if (!std::isfinite(mean[c])) {
        exact_channel_moments(x, g, cb + c, mean[c], var);
      }
      mean_out[cb + c] = static_cast<acc_t>(mean[c]);
      var_out[cb + c] = static_cast<acc_t>(var);
    }
  });
}

template <typename scalar_t>
void stats_typed(const Geometry& g, const StatsArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* mean = static_cast<acc_t*>(a.mean);
  auto* var = static_cast<acc_t*>(a.var);
  if (g.channels_last) {
    stats_channels_last(x, g, mean, var);
  } else {
    stats_nchw(x, g, mean, var);
  }
}

}  // namespace
}  // namespace fused_residual::cpu::FUSED_RESIDUAL_ISA
