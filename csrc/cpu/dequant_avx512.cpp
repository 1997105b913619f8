// The dense weight in natural column order with AVX-512 look-ups: per span of 32 columns,
// each plane's words are loaded once and spread to the 16 lanes of each half-span (lane l
// <- the word holding column 16 h + l, shifted by that column's bit offset), so a mask
// per plane, an OR and a register permute give 16 consecutive weights.
#include "simd.h"

#ifdef OTQ_AVX512

#include <array>
#include <utility>

#include "avx512_lut.h"

namespace otq::cpu {

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

constexpr int kLanes = Avx512::kLanes;
template <int B>
using Lut = Avx512::Lut<B>;

constexpr int64_t kRowsPerChunk = 16;

// For plane width W and half-span H: lane l's word within the span and its bit offset.
template <int W, int H>
struct Spread {
  static constexpr std::array<int32_t, kLanes> word_of(bool shift) {
    std::array<int32_t, kLanes> out{};
    for (int l = 0; l < kLanes; ++l) {
      const int bit = (kLanes * H + l) * W;
      out[l] = shift ? bit % kWordBits : bit / kWordBits;
    }
    return out;
  }
  static constexpr std::array<int32_t, kLanes> kWord = word_of(false), kShift = word_of(true);
};

// The codes of one weight row [k], a span of 32 columns at a time.
template <int B>
class SpanCodes {
 public:
  static constexpr PlaneSpec kSpec = plane_spec(B);
  using Planeseq = std::make_integer_sequence<int, kSpec.count>;

  SpanCodes(Planes planes, int64_t row, int64_t k) {
    for (int p = 0; p < kSpec.count; ++p)
      rows_[p] = planes.ptr[p] + row * row_words(k, kSpec.width[p]);
  }

  // Lanes 0 .. W_p - 1 of words_[p]: plane p's words of span s.
  void load(int64_t s) {
    for (int p = 0; p < kSpec.count; ++p)
      words_[p] = _mm512_maskz_loadu_epi32(Avx512::lanes(0, kSpec.width[p]),
                                           rows_[p] + s * kSpec.width[p]);
  }

  // Lane l: the code of column 16 H + l of the loaded span.
  template <int H>
  __m512i code() const {
    return code<H>(Planeseq{});
  }

 private:
  template <int H, int... P>
  __m512i code(std::integer_sequence<int, P...>) const {
    return (field<P, H>() | ...);
  }

  template <int P, int H>
  __m512i field() const {
    constexpr int W = kSpec.width[P];
    using S = Spread<W, H>;
    const __m512i word = _mm512_permutexvar_epi32(_mm512_loadu_si512(S::kWord.data()), words_[P]);
    const __m512i shift = _mm512_loadu_si512(S::kShift.data());
    const __m512i value =
        _mm512_and_si512(_mm512_srlv_epi32(word, shift), _mm512_set1_epi32((1 << W) - 1));
    return kSpec.offset[P] ? _mm512_slli_epi32(value, kSpec.offset[P]) : value;
  }

  const uint32_t* rows_[kMaxPlanes] = {};
  __m512i words_[kMaxPlanes];
};

template <int B>
void dequantize_rows(Planes planes, int64_t first, int64_t last, int64_t k, const float* codebook,
                     int64_t groups, float* out) {
  const int64_t spans = padded_k(k) / kWordBits;
  for (int64_t row = first; row < last; ++row) {
    const Lut<B> lut(codebook + (groups == 1 ? 0 : row << B));
    SpanCodes<B> codes(planes, row, k);
    float* dst = out + row * k;
    for (int64_t s = 0; s < spans; ++s) {
      codes.load(s);
      const int64_t col = s * kWordBits, left = k - col;
      _mm512_mask_storeu_ps(dst + col, Avx512::lanes(0, left), lut(codes.template code<0>()));
      if (left > kLanes)
        _mm512_mask_storeu_ps(dst + col + kLanes, Avx512::lanes(0, left - kLanes),
                              lut(codes.template code<1>()));
    }
  }
}

template <int B>
void dequantize_bits(Planes planes, int64_t n, int64_t k, const float* codebook, int64_t groups,
                     float* out) {
  const int64_t chunks = (n + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel for schedule(static) if (n * k >= kMinParallelWeights)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * kRowsPerChunk;
    dequantize_rows<B>(planes, first, std::min(n, first + kRowsPerChunk), k, codebook, groups, out);
  }
}

}  // namespace

void dequantize_avx512(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                       int64_t groups, float* out) {
  switch (bits) {
    case 2: dequantize_bits<2>(planes, n, k, codebook, groups, out); break;
    case 3: dequantize_bits<3>(planes, n, k, codebook, groups, out); break;
    case 4: dequantize_bits<4>(planes, n, k, codebook, groups, out); break;
    case 5: dequantize_bits<5>(planes, n, k, codebook, groups, out); break;
    case 6: dequantize_bits<6>(planes, n, k, codebook, groups, out); break;
    case 7: dequantize_bits<7>(planes, n, k, codebook, groups, out); break;
    default: dequantize_bits<8>(planes, n, k, codebook, groups, out); break;
  }
}

#pragma GCC pop_options

}  // namespace otq::cpu

#endif  // OTQ_AVX512
