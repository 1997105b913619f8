// AVX2 + FMA operations of lut_simd.h and dequant_simd.h (struct Avx2): 8 lanes of 32
// bits, a codebook of up to 16 entries held in registers and indexed by 8 codes at once.
// Include only where OTQ_AVX2 is defined, after the standard headers.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "cpu_ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace otq::cpu {

struct Avx2 {
  static constexpr int kLanes = 8;
  static constexpr int kActivationRows = 2;  // x rows per pass at m > 1 (16 registers)
  using F = __m256;
  using I = __m256i;
  using Mask = __m256i;  // all ones in the lanes it holds

  static I iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

  // Lanes [first, first + count) (count clamped to the lanes left).
  static Mask lanes(int64_t first, int64_t count) {
    count = std::clamp<int64_t>(count, 0, kLanes);
    const int begin = static_cast<int>(first), end = static_cast<int>(first + count);
    return _mm256_andnot_si256(_mm256_cmpgt_epi32(set1(begin), iota()),
                               _mm256_cmpgt_epi32(set1(end), iota()));
  }

  static I set1(int v) { return _mm256_set1_epi32(v); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  template <int N>
  static I srli(I v) {
    return _mm256_srli_epi32(v, N);
  }
  template <int N>
  static I slli(I v) {
    return _mm256_slli_epi32(v, N);
  }
  static F zero() { return _mm256_setzero_ps(); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static void storeu(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, F v) { _mm256_store_ps(p, v); }
  static F maskz(Mask m, F v) { return _mm256_and_ps(_mm256_castsi256_ps(m), v); }

  // The expansion's operations (dequant_simd.h).
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I srlv(I v, I shift) { return _mm256_srlv_epi32(v, shift); }
  static I loadu_i(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const I*>(p)); }
  static I permute(I v, I index) { return _mm256_permutevar8x32_epi32(v, index); }  // v[index]
  static I load_words(const uint32_t* p, int64_t count) {  // the first count, 0 beyond
    return _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lanes(0, count));
  }
  static void store_first(float* p, int64_t count, F v) {  // lanes [0, count)
    if (count >= kLanes)
      _mm256_storeu_ps(p, v);
    else
      _mm256_maskstore_ps(p, lanes(0, count), v);
  }

  static float reduce_add(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }

  // out[t] lane i = words[i * W + t] for the spans i < valid (0 beyond; not read).
  template <int W>
  static void span_words(const uint32_t* words, int64_t valid, I* out) {
    const Mask live = lanes(0, valid);
    const auto* base = reinterpret_cast<const int*>(words);
    if constexpr (W == 1) {
      out[0] = _mm256_maskload_epi32(base, live);
    } else {
      const I first = _mm256_mullo_epi32(iota(), set1(W));
      for (int t = 0; t < W; ++t)
        out[t] = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), base,
                                             _mm256_add_epi32(first, set1(t)), live, 4);
    }
  }

  // One group's codebook [2**B]: up to 16 entries in registers (a permute per 8 entries,
  // then a blend on bit 3), else gathered from memory (measured faster from 32 entries:
  // 4 permutes and 3 blends took 1.4-1.9x the gather's time at M = 1).
  template <int B>
  struct Lut {
    static constexpr int kRegs = B <= 3 ? 1 : B == 4 ? 2 : 0;
    F reg[kRegs > 0 ? kRegs : 1];
    const float* mem = nullptr;

    Lut() = default;
    explicit Lut(const float* book) : mem(book) {
      for (int q = 0; q < kRegs; ++q)
        reg[q] = _mm256_maskload_ps(book + kLanes * q, lanes(0, (1 << B) - kLanes * q));
    }

    F operator()(I code) const {
      if constexpr (B <= 3) {
        return _mm256_permutevar8x32_ps(reg[0], code);
      } else if constexpr (B == 4) {
        const F bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(code, 28));
        return _mm256_blendv_ps(_mm256_permutevar8x32_ps(reg[0], code),
                                _mm256_permutevar8x32_ps(reg[1], code), bit3);
      } else {
        return _mm256_i32gather_ps(mem, code, 4);
      }
    }
  };
};

}  // namespace otq::cpu

#pragma GCC pop_options
