// Vector helpers shared by the streaming kernels. Included only by the kernel units
// (bn_kernels_baseline.cpp, bn_kernels_x86_avx2.cpp), each of which defines
// FUSED_RESIDUAL_ISA (the namespace of its KernelSet) before including it; everything here
// has internal linkage, so the two compilations never share a symbol.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>
#include <c10/util/Unroll.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "cpu/bn_cpu_kernels.h"

#ifndef FUSED_RESIDUAL_ISA
#error "define FUSED_RESIDUAL_ISA before including bn_kernel_utils.h"
#endif

namespace fused_residual::cpu::FUSED_RESIDUAL_ISA {
namespace {

using at::vec::Vectorized;

// Element-wise passes cut the flat index range into chunks of this many elements. A
// multiple of 8 (and of every vector width), so each mask byte belongs to exactly one chunk
// and tasks never write the same byte.
constexpr int64_t kElementChunk = 16384;
static_assert(kElementChunk % 64 == 0, "chunk boundaries must be mask byte boundaries");

// Reductions work on fixed blocks of about this many elements (a piece of one NCHW row, or
// a group of channels_last rows): partials are stored per block and merged in block order,
// so results do not depend on the thread count; a block (64 KiB of float) stays in L2 for
// the second pass of bn_stats.
constexpr int64_t kReduceBlock = 16384;

// Inside a block, acc (float) accumulators are flushed into double ones every kInnerLen
// elements of a contiguous run, or every kInnerRows channels_last rows, so no float
// accumulator sums more than a few dozen terms: the rounding error of a block stays near
// float epsilon (a plain float running sum over thousands of terms would lose ~1e-6).
constexpr int64_t kInnerLen = 256;
constexpr int64_t kInnerRows = 16;

// Load / store Vectorized<acc> lanes from / to scalar_t memory (the 16-bit types are
// widened to float, one float vector's worth of values per step).
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();
  static_assert(kLanes <= 16, "mask helpers assume at most 16 lanes");

  static C10_ALWAYS_INLINE Vec load(const scalar_t* p) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float<scalar_t>(p, v);
      return v;
    }
  }

  static C10_ALWAYS_INLINE void store(scalar_t* p, const Vec& v) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(p);
    } else {
      // The 16-bit vector holds 2 * kLanes values; only the first kLanes are written.
      at::vec::convert_from_float<scalar_t>(v, v).store(p, static_cast<int>(kLanes));
    }
  }

  // store(), as a non-temporal (streaming) store when `stream` is set and p is aligned:
  // an output far larger than the caches is written once and not read back by the op, and a
  // streaming store skips the read-for-ownership a regular store makes, a third of the
  // bytes bn_apply and bn_backward_apply move. Callers end each task with stream_fence().
  static C10_ALWAYS_INLINE void store_out(scalar_t* p, const Vec& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX2)
    const auto addr = reinterpret_cast<uintptr_t>(p);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (stream && (addr & 31) == 0) {
        _mm256_stream_ps(p, v);
        return;
      }
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      if (stream && (addr & 31) == 0) {
        _mm256_stream_pd(p, v);
        return;
      }
    } else {
      if (stream && (addr & 15) == 0) {
        const __m256i packed = at::vec::convert_from_float<scalar_t>(v, v);
        _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
        return;
      }
    }
#else
    (void)stream;
#endif
    store(p, v);
  }
};

// Outputs of at least this many bytes are written with streaming stores (see store_out).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// Orders a task's streaming stores before the end of its parallel region.
C10_ALWAYS_INLINE void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Bit i set iff lane i of v is > 0 (false for NaN, +0 and -0), the ReLU mask bit.
template <typename T>
C10_ALWAYS_INLINE uint32_t positive_bits(const Vectorized<T>& v) {
  constexpr int kLanes = Vectorized<T>::size();
  constexpr uint32_t kAll = (1u << kLanes) - 1u;
  // The comparison gives all-ones lanes where v > 0; zero_mask() flags the other lanes.
  return ~static_cast<uint32_t>((v > Vectorized<T>(T(0))).zero_mask()) & kAll;
}

// out = y < 0 ? 0 : y: clamp_min keeps NaN and -0 (max(0, y) with y second), as the
// reference's where(y < 0, 0, y) does.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> relu(const Vectorized<T>& y) {
  return at::vec::clamp_min(y, Vectorized<T>(T(0)));
}

// Lane masks from mask bits: all bits set in lane i iff bit i is set. dy = g & mask is a
// select, not a multiply, so a masked-out NaN/inf gradient gives 0 like where() does.
template <typename T>
struct LaneSelect {
  using int_t = at::vec::int_same_size_t<T>;
  using IVec = Vectorized<int_t>;
  IVec weights;  // lane i holds 1 << i

  LaneSelect() {
    __at_align__ int_t w[IVec::size()];
    for (int i = 0; i < IVec::size(); ++i) {
      w[i] = static_cast<int_t>(int_t(1) << i);
    }
    weights = IVec::loadu(w);
  }

  C10_ALWAYS_INLINE Vectorized<T> operator()(const Vectorized<T>& v, uint32_t bits) const {
    const IVec hit = (IVec(static_cast<int_t>(bits)) & weights) == weights;
    return v & at::vec::cast<T>(hit);
  }
};

// Lane masks of G consecutive vectors from G * L (<= 64) mask bits: vector k takes bits
// [k * L, (k + 1) * L). The same select as LaneSelect (masked-out lanes give +0, kept lanes
// are passed through bit for bit). With AVX2, a variable shift moves each lane's bit into
// its sign bit and blendv selects: two instructions a vector, the bits broadcast once per
// group.
template <typename T, int G>
struct GroupSelect {
  static constexpr int kLanes = Vectorized<T>::size();
  static constexpr int kBits = G * kLanes;
  static_assert(kBits <= 64, "a group's mask bits must fit 64 bits");
  using int_t = at::vec::int_same_size_t<T>;
  using IVec = Vectorized<int_t>;
  static constexpr int kLaneBits = 8 * static_cast<int>(sizeof(T));
  // Broadcast words of kLaneBits bits: lane i of vector k tests bit (k * L + i) % kLaneBits
  // of word (k * L + i) / kLaneBits (the same word for all lanes of a vector).
  static constexpr int kWords = (kBits + kLaneBits - 1) / kLaneBits;
  IVec shifts[G];  // lane i of vector k holds kLaneBits - 1 - (k * L + i) % kLaneBits
  LaneSelect<T> lanes;

  GroupSelect() {
    for (int k = 0; k < G; ++k) {
      __at_align__ int_t w[IVec::size()];
      for (int i = 0; i < IVec::size(); ++i) {
        w[i] = static_cast<int_t>(kLaneBits - 1 - (k * kLanes + i) % kLaneBits);
      }
      shifts[k] = IVec::loadu(w);
    }
  }

  struct Words {
    IVec w[kWords];
    uint64_t bits;
  };

  C10_ALWAYS_INLINE Words prepare(uint64_t bits) const {
    Words r;
    for (int j = 0; j < kWords; ++j) {
      r.w[j] = IVec(static_cast<int_t>(kLaneBits == 64 ? bits : bits >> (32 * j)));
    }
    r.bits = bits;
    return r;
  }

  template <int k>
  C10_ALWAYS_INLINE Vectorized<T> apply(const Vectorized<T>& v, const Words& words) const {
    static_assert(kLanes <= kLaneBits && kLaneBits % kLanes == 0, "a vector's bits in one word");
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      const __m256i m = _mm256_sllv_epi32(words.w[k * kLanes / 32], shifts[k]);
      return _mm256_blendv_ps(_mm256_setzero_ps(), v, _mm256_castsi256_ps(m));
    } else if constexpr (std::is_same_v<T, double>) {
      const __m256i m = _mm256_sllv_epi64(words.w[0], shifts[k]);
      return _mm256_blendv_pd(_mm256_setzero_pd(), v, _mm256_castsi256_pd(m));
    } else {
      return lanes(v, static_cast<uint32_t>(words.bits >> (k * kLanes)));
    }
#else
    return lanes(v, static_cast<uint32_t>(words.bits >> (k * kLanes)));
#endif
  }
};

// G * L (<= 64) mask bits starting at element e (two reads when more than 32).
template <int kBits>
C10_ALWAYS_INLINE uint64_t read_group_bits(const uint8_t* mask, int64_t e, int64_t nbytes);

// `k` (<= 32) mask bits starting at element e, bit 0 = element e; reads stay below nbytes.
C10_ALWAYS_INLINE uint32_t read_mask_bits(const uint8_t* mask, int64_t e, int k, int64_t nbytes) {
  const int64_t byte = e >> 3;
  const int shift = static_cast<int>(e & 7);
  uint64_t word = 0;
  if (byte + 8 <= nbytes) {
    std::memcpy(&word, mask + byte, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    word = __builtin_bswap64(word);
#endif
  } else {
    for (int64_t i = 0; byte + i < nbytes && i < 8; ++i) {
      word |= static_cast<uint64_t>(mask[byte + i]) << (8 * i);
    }
  }
  return static_cast<uint32_t>((word >> shift) & ((uint64_t(1) << k) - 1u));
}

template <int kBits>
C10_ALWAYS_INLINE uint64_t read_group_bits(const uint8_t* mask, int64_t e, int64_t nbytes) {
  if constexpr (kBits <= 32) {
    return read_mask_bits(mask, e, kBits, nbytes);
  } else {
    return static_cast<uint64_t>(read_mask_bits(mask, e, 32, nbytes)) |
           (static_cast<uint64_t>(read_mask_bits(mask, e + 32, kBits - 32, nbytes)) << 32);
  }
}

C10_ALWAYS_INLINE bool read_mask_bit(const uint8_t* mask, int64_t e) {
  return (mask[e >> 3] >> (e & 7)) & 1;
}

// Appends bits LSB-first to a byte stream. A writer starts on a byte boundary and owns the
// bytes it writes; flush() writes the last partial byte with zero padding bits. Use it as
// a local of the hot function (its state then lives in registers).
class BitWriter {
 public:
  explicit BitWriter(uint8_t* out) : out_(out) {}

  C10_ALWAYS_INLINE void push(uint32_t bits, int k) {
    buf_ |= static_cast<uint64_t>(bits) << nbits_;
    nbits_ += k;
    while (nbits_ >= 8) {
      *out_++ = static_cast<uint8_t>(buf_);
      buf_ >>= 8;
      nbits_ -= 8;
    }
  }

  C10_ALWAYS_INLINE void flush() {
    if (nbits_ > 0) {
      *out_++ = static_cast<uint8_t>(buf_);
      buf_ = 0;
      nbits_ = 0;
    }
  }

 private:
  uint8_t* out_;
  uint64_t buf_ = 0;
  int nbits_ = 0;
};

// Hints the cache lines of [p, p + n) into L1. bn_stats issues it for the next block
// while its second pass works on the current block from cache, so that memory keeps
// streaming during the in-cache pass. A prefetch never faults, even past a tensor's end.
template <typename T>
C10_ALWAYS_INLINE void prefetch_span(const T* p, int64_t n) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t off = 0; off < n; off += kLine) {
    __builtin_prefetch(p + off, 0, 3);
  }
#else
  (void)p;
  (void)n;
#endif
}

// Sum of the lanes of v, in lane order.
template <typename T>
C10_ALWAYS_INLINE T sum_lanes(const Vectorized<T>& v) {
  __at_align__ T buf[Vectorized<T>::size()];
  v.store(buf);
  T s = T(0);
  for (int i = 0; i < Vectorized<T>::size(); ++i) {
    s += buf[i];
  }
  return s;
}

// values[k % c] for k in [0, c + lanes): channels_last kernels walk the flat data in whole
// vectors, and lane j of the vector at flat index e belongs to channel (e + j) % C, so the
// per-lane constants of that vector are the `lanes` entries from e % C on, for any C
// (C < lanes and rows that straddle vectors included).
template <typename T>
std::vector<T> periodic_extend(const T* values, int64_t c, int64_t lanes) {
  std::vector<T> ext(c + lanes);
  for (int64_t k = 0; k < c + lanes; ++k) {
    ext[k] = values[k % c];
  }
  return ext;
}

// Runs body(begin, end) over the fixed kElementChunk chunks of [0, numel), in parallel.
template <typename F>
void parallel_chunks(int64_t numel, const F& body) {
  const int64_t nchunks = (numel + kElementChunk - 1) / kElementChunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t begin = k * kElementChunk;
      body(begin, std::min(numel, begin + kElementChunk));
    }
  });
}

// Reduction partition of an NCHW tensor: each (n, c) row of HW values is cut into `pieces`
// pieces of piece_len (the last may be shorter); block b = row * pieces + j.
struct RowPieces {
  int64_t pieces;
  int64_t piece_len;

  explicit RowPieces(int64_t hw)
      : pieces(std::max<int64_t>(1, (hw + kReduceBlock - 1) / kReduceBlock)),
        piece_len(std::max<int64_t>(1, (hw + pieces - 1) / pieces)) {}

  int64_t start(int64_t j) const { return j * piece_len; }
  int64_t length(int64_t j, int64_t hw) const {
    return std::max<int64_t>(0, std::min(piece_len, hw - j * piece_len));
  }
};

// Reduction partition of a channels_last tensor: blocks of rows_per_block rows of C values.
struct RowBlocks {
  int64_t rows;
  int64_t rows_per_block;
  int64_t nblocks;

  RowBlocks(int64_t n_rows, int64_t c)
      : rows(n_rows),
        rows_per_block(std::max<int64_t>(1, kReduceBlock / std::max<int64_t>(1, c))),
        nblocks((n_rows + rows_per_block - 1) / rows_per_block) {}

  int64_t first(int64_t b) const { return b * rows_per_block; }
  int64_t count(int64_t b) const { return std::min(rows_per_block, rows - b * rows_per_block); }
};

// Accumulator slots of a channels_last reduction. When lcm(C, lanes) is small, a window
// of whole rows is walked as one flat run of vectors: the vector at window offset o adds
// into slots [o % period, + lanes) with period = lcm(C, lanes), and slot t belongs to
// channel t % C. So no row ends in a scalar tail, and C < lanes vectorizes too. For a large
// lcm (odd C in the hundreds or more) each row is walked on its own (period = C, slot =
// channel, rows of C % lanes scalar tail elements).
struct ChannelSlots {
  static constexpr int64_t kMaxPeriod = 2048;
  int64_t c;
  int64_t period;
  bool flat;

  ChannelSlots(int64_t channels, int64_t lanes) : c(channels) {
    const int64_t l = std::lcm(channels, lanes);
    flat = l <= kMaxPeriod;
    period = flat ? l : channels;
  }

  // Rows per inner window: at least kInnerRows rows and about kInnerLen elements.
  int64_t window_rows() const {
    return std::max<int64_t>(kInnerRows, (kInnerLen + c - 1) / c);
  }

  // values[t % C] for every slot t.
  template <typename T>
  void expand(const T* values, T* slots) const {
    for (int64_t base = 0; base < period; base += c) {
      std::copy(values, values + c, slots + base);
    }
  }

  // outer[t % C] += slots[t], widening to double.
  template <typename T>
  void fold_into(double* outer, const T* slots) const {
    for (int64_t base = 0; base < period; base += c) {
      for (int64_t k = 0; k < c; ++k) {
        outer[k] += static_cast<double>(slots[base + k]);
      }
    }
  }

  // Length of the leading part of a window of `len` elements made of whole periods (flat
  // walks only). Ops walk that part slot by slot, the vectors of slot t being `period`
  // elements apart, so a slot's accumulators stay in registers; the rest goes to walk().
  int64_t whole_periods(int64_t len) const { return flat ? len - len % period : 0; }

  // Walks the elements [e0, e1) of whole rows: vec(e, t) for a vector at element e with
  // slots [t, t + L), one(e, t) for a single element. [e0, e1) starts at a row start, or
  // (flat) a whole number of periods after one.
  template <int64_t L, typename VecFn, typename OneFn>
  C10_ALWAYS_INLINE void walk(int64_t e0, int64_t e1, const VecFn& vec, const OneFn& one) const {
    if (flat) {
      int64_t t = 0;
      int64_t e = e0;
      for (; e + L <= e1; e += L) {
        vec(e, t);
        t += L;
        t -= t == period ? period : 0;
      }
      for (; e < e1; ++e) {
        one(e, t);
        t = t + 1 == period ? 0 : t + 1;
      }
    } else {
      for (int64_t row = e0; row < e1; row += c) {
        int64_t t = 0;
        for (; t + L <= c; t += L) {
          vec(row + t, t);
        }
        for (; t < c; ++t) {
          one(row + t, t);
        }
      }
    }
  }
};

// Calls f(std::integral_constant<int, G>{}, t) for the slot vectors [t, t + G * L) of a
// flat period P (a multiple of L), in groups of up to kMax vectors: a kernel that walks one
// group at a time keeps the group's accumulators in registers (independent chains) while it
// steps through the periods of a window.
template <int G, typename F>
C10_ALWAYS_INLINE void slot_group_rest(int64_t rest, int64_t t, const F& f) {
  if constexpr (G >= 1) {
    if (rest == G) {
      f(std::integral_constant<int, G>{}, t);
      return;
    }
    slot_group_rest<G - 1>(rest, t, f);
  }
}

// The group size of the channels_last reductions: up to 8 vectors (C = 64 float: one
// group is a whole row), at most 64 mask bits.
template <int64_t L>
constexpr int kSlotGroup = static_cast<int>(std::min<int64_t>(8, 64 / L));

template <int64_t L, int kMax, typename F>
C10_ALWAYS_INLINE void for_slot_groups(int64_t period, const F& f) {
  int64_t t = 0;
  for (; t + kMax * L <= period; t += kMax * L) {
    f(std::integral_constant<int, kMax>{}, t);
  }
  slot_group_rest<kMax - 1>((period - t) / L, t, f);
}

// Parallel grain (in blocks) so that a task holds at least ~32K elements.
inline int64_t block_grain(int64_t block_elems) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, block_elems));
}

}  // namespace
}  // namespace fused_residual::cpu::FUSED_RESIDUAL_ISA
