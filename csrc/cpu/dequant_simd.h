// The dense weight in natural column order with register look-ups, written once over a
// SIMD traits type S (AVX-512 in dequant_avx512.cpp, AVX2 in dequant_avx2.cpp). Per span
// of 32 columns, each plane's words are loaded once and spread to the lanes of each of
// the span's 32 / kLanes parts (lane l of part h <- the word holding column kLanes h + l,
// shifted by that column's bit offset), so a mask per plane, an OR and a register look-up
// give kLanes consecutive weights.
//
// Include it after <immintrin.h> and the standard headers, inside the including file's
// `#pragma GCC target` region and only there: everything here has internal linkage, as in
// lut_simd.h.
#pragma once

#include <algorithm>
#include <array>
#include <utility>

#include "cpu_ops.h"

namespace otq::cpu {
namespace {  // NOLINT: one copy per including file and instruction set, by design

constexpr int64_t kExpandRowsPerChunk = 16;

// For plane width W and part H of a span: lane l's word within the span and its bit offset.
template <class S, int W, int H>
struct Spread {
  static constexpr std::array<int32_t, S::kLanes> word_of(bool shift) {
    std::array<int32_t, S::kLanes> out{};
    for (int l = 0; l < S::kLanes; ++l) {
      const int bit = (S::kLanes * H + l) * W;
      out[l] = shift ? bit % kWordBits : bit / kWordBits;
    }
    return out;
  }
  static constexpr std::array<int32_t, S::kLanes> kWord = word_of(false),
                                                  kShift = word_of(true);
};

// The codes of one weight row [k], a span of 32 columns at a time.
template <class S, int B>
class SpanCodes {
 public:
  using I = typename S::I;
  static constexpr PlaneSpec kSpec = plane_spec(B);

  SpanCodes(Planes planes, int64_t row, int64_t k) {
    for (int p = 0; p < kSpec.count; ++p)
      rows_[p] = planes.ptr[p] + row * row_words(k, kSpec.width[p]);
  }

  // Lanes 0 .. W_p - 1 of words_[p]: plane p's words of span s (W_p <= 8 <= kLanes).
  void load(int64_t s) {
    for (int p = 0; p < kSpec.count; ++p)
      words_[p] = S::load_words(rows_[p] + s * kSpec.width[p], kSpec.width[p]);
  }

  // Lane l: the code of column kLanes H + l of the loaded span.
  template <int H>
  I code() const {
    return code<H>(std::make_integer_sequence<int, kSpec.count>{});
  }

 private:
  template <int H, int P0, int... P>
  I code(std::integer_sequence<int, P0, P...>) const {
    I out = field<P0, H>();
    ((out = S::or_(out, field<P, H>())), ...);
    return out;
  }

  template <int P, int H>
  I field() const {
    constexpr int W = kSpec.width[P];
    using Sp = Spread<S, W, H>;
    const I word = S::permute(words_[P], S::loadu_i(Sp::kWord.data()));
    const I value = S::and_(S::srlv(word, S::loadu_i(Sp::kShift.data())), S::set1((1 << W) - 1));
    if constexpr (kSpec.offset[P] != 0) return S::template slli<kSpec.offset[P]>(value);
    return value;
  }

  const uint32_t* rows_[kMaxPlanes] = {};
  I words_[kMaxPlanes];
};

template <class S, int B, int... H>
void expand_span(const SpanCodes<S, B>& codes, const typename S::template Lut<B>& lut,
                 float* dst, int64_t left, std::integer_sequence<int, H...>) {
  ((left > H * S::kLanes
        ? S::store_first(dst + H * S::kLanes, left - H * S::kLanes,
                         lut(codes.template code<H>()))
        : void()),
   ...);
}

template <class S, int B>
void expand_rows(Planes planes, int64_t first, int64_t last, int64_t k, const float* codebook,
                 int64_t groups, float* out) {
  using Parts = std::make_integer_sequence<int, kWordBits / S::kLanes>;
  const int64_t spans = padded_k(k) / kWordBits;
  for (int64_t row = first; row < last; ++row) {
    const typename S::template Lut<B> lut(codebook + (groups == 1 ? 0 : row << B));
    SpanCodes<S, B> codes(planes, row, k);
    float* dst = out + row * k;
    for (int64_t s = 0; s < spans; ++s) {
      codes.load(s);
      expand_span(codes, lut, dst + s * kWordBits, k - s * kWordBits, Parts{});
    }
  }
}

template <class S, int B>
void expand_bits(Planes planes, int64_t n, int64_t k, const float* codebook, int64_t groups,
                 float* out) {
  const int64_t chunks = (n + kExpandRowsPerChunk - 1) / kExpandRowsPerChunk;
#pragma omp parallel for schedule(static) if (n * k >= kMinParallelWeights)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * kExpandRowsPerChunk;
    expand_rows<S, B>(planes, first, std::min(n, first + kExpandRowsPerChunk), k, codebook,
                      groups, out);
  }
}

// dequantize's contract (cpu_ops.h) on S.
template <class S>
void dequantize_simd(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                     int64_t groups, float* out) {
  switch (bits) {
    case 2: return expand_bits<S, 2>(planes, n, k, codebook, groups, out);
    case 3: return expand_bits<S, 3>(planes, n, k, codebook, groups, out);
    case 4: return expand_bits<S, 4>(planes, n, k, codebook, groups, out);
    case 5: return expand_bits<S, 5>(planes, n, k, codebook, groups, out);
    case 6: return expand_bits<S, 6>(planes, n, k, codebook, groups, out);
    case 7: return expand_bits<S, 7>(planes, n, k, codebook, groups, out);
    default: return expand_bits<S, 8>(planes, n, k, codebook, groups, out);
  }
}

}  // namespace
}  // namespace otq::cpu
