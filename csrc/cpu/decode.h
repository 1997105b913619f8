// Row decoding shared by the CPU kernels: bit planes -> codes -> codebook values. Inline,
// so that each instruction-set clone of a caller (OTQ_CPU_CLONES) vectorizes it too.
#pragma once

#include <cstdint>

#include "cpu_ops.h"

// GCC >= 12 on x86-64 builds the marked functions for AVX-512, AVX2+FMA and the baseline
// and picks one at load time (ifunc); elsewhere they are built for the baseline only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && \
    !defined(OTQ_NO_CPU_CLONES)
#define OTQ_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OTQ_CPU_CLONES
#endif

// Forced inlining keeps the hot loops inside the caller's clone (a function that is not
// inlined is built for the baseline instruction set only).
#if defined(__GNUC__)
#define OTQ_CPU_INLINE inline __attribute__((always_inline))
#else
#define OTQ_CPU_INLINE inline
#endif

namespace otq::cpu {

// out[i * 32/W + f] (|)= field f of words[i], shifted to bit `offset` of the code.
template <int W, bool kFirst>
inline void decode_plane(const uint32_t* words, int64_t nwords, int offset, uint8_t* out) {
  constexpr int kPer = kWordBits / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  for (int64_t i = 0; i < nwords; ++i) {
    const uint32_t word = words[i];
    uint8_t* dst = out + i * kPer;
    for (int f = 0; f < kPer; ++f) {
      const auto field = static_cast<uint8_t>(((word >> (f * W)) & kMask) << offset);
      dst[f] = kFirst ? field : static_cast<uint8_t>(dst[f] | field);
    }
  }
}

template <bool kFirst>
inline void decode_plane(int width, const uint32_t* words, int64_t nwords, int offset,
                         uint8_t* out) {
  switch (width) {
    case 8: decode_plane<8, kFirst>(words, nwords, offset, out); break;
    case 4: decode_plane<4, kFirst>(words, nwords, offset, out); break;
    case 2: decode_plane<2, kFirst>(words, nwords, offset, out); break;
    default: decode_plane<1, kFirst>(words, nwords, offset, out); break;
  }
}

// Codes of one row into out[padded_k(k)] (padding codes are 0).
inline void decode_row(Planes planes, int64_t row, int64_t k, int bits, uint8_t* out) {
  const PlaneSpec spec = plane_spec(bits);
  for (int p = 0; p < spec.count; ++p) {
    const int64_t nwords = row_words(k, spec.width[p]);
    const uint32_t* words = planes.ptr[p] + row * nwords;
    if (p == 0) {
      decode_plane<true>(spec.width[p], words, nwords, spec.offset[p], out);
    } else {
      decode_plane<false>(spec.width[p], words, nwords, spec.offset[p], out);
    }
  }
}

// out[32 s + j] = lut[code of column 32 s + j] for the `spans` spans of 32 columns whose
// words start at rows[p] (plane p); bits known at compile time, so each span's codes are
// assembled in registers.
template <int B>
OTQ_CPU_INLINE void lookup_spans(const uint32_t* const* rows, int64_t spans, const float* lut,
                         float* out) {
  constexpr PlaneSpec kSpec = plane_spec(B);
  for (int64_t s = 0; s < spans; ++s) {
    uint32_t code[kWordBits] = {};
    for (int p = 0; p < kSpec.count; ++p) {
      const int w = kSpec.width[p];
      const uint32_t* words = rows[p] + s * w;
      for (int j = 0; j < kWordBits; ++j)
        code[j] |= ((words[j * w / kWordBits] >> (j * w % kWordBits)) & ((1u << w) - 1u))
                   << kSpec.offset[p];
    }
    for (int j = 0; j < kWordBits; ++j) out[s * kWordBits + j] = lut[code[j]];
  }
}

// out[:k] = lut[code] for one row of a B-bit code matrix.
template <int B>
OTQ_CPU_INLINE void lookup_row(Planes planes, int64_t row, int64_t k, const float* lut, float* out) {
  constexpr PlaneSpec kSpec = plane_spec(B);
  const uint32_t* rows[kMaxPlanes] = {};
  for (int p = 0; p < kSpec.count; ++p) rows[p] = planes.ptr[p] + row * row_words(k, kSpec.width[p]);
  const int64_t full = k / kWordBits, rest = k % kWordBits;
  lookup_spans<B>(rows, full, lut, out);
  if (rest) {
    float tail[kWordBits];
    for (int p = 0; p < kSpec.count; ++p) rows[p] += full * kSpec.width[p];
    lookup_spans<B>(rows, 1, lut, tail);
    for (int64_t j = 0; j < rest; ++j) out[full * kWordBits + j] = tail[j];
  }
}

// lookup_row for a bit width known at run time.
OTQ_CPU_INLINE void lookup_row(Planes planes, int64_t row, int64_t k, int bits, const float* lut,
                               float* out) {
  switch (bits) {
    case 2: lookup_row<2>(planes, row, k, lut, out); break;
    case 3: lookup_row<3>(planes, row, k, lut, out); break;
    case 4: lookup_row<4>(planes, row, k, lut, out); break;
    case 5: lookup_row<5>(planes, row, k, lut, out); break;
    case 6: lookup_row<6>(planes, row, k, lut, out); break;
    case 7: lookup_row<7>(planes, row, k, lut, out); break;
    default: lookup_row<8>(planes, row, k, lut, out); break;
  }
}

}  // namespace otq::cpu
