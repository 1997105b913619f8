// AVX-512 operations of lut_simd.h and dequant_simd.h (struct Avx512): 16 lanes of
// 32 bits, a codebook held in registers and indexed by 16 codes at once. Include only where
// OTQ_AVX512 is defined, after the standard headers.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>

#include "cpu_ops.h"

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace otq::cpu {

struct Avx512 {
  static constexpr int kLanes = 16;
  static constexpr int kActivationRows = 4;  // x rows per pass at m > 1 (32 registers)
  using F = __m512;
  using I = __m512i;
  using Mask = __mmask16;

  // Lanes [first, first + count) (count clamped to the lanes left).
  static Mask lanes(int64_t first, int64_t count) {
    count = std::clamp<int64_t>(count, 0, kLanes);
    return static_cast<Mask>(((1u << count) - 1u) << first);
  }

  static I set1(int v) { return _mm512_set1_epi32(v); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  template <int N>
  static I srli(I v) {
    return _mm512_srli_epi32(v, N);
  }
  template <int N>
  static I slli(I v) {
    return _mm512_slli_epi32(v, N);
  }
  static F zero() { return _mm512_setzero_ps(); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static void storeu(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, F v) { _mm512_store_ps(p, v); }
  static float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
  static F maskz(Mask m, F v) { return _mm512_maskz_mov_ps(m, v); }

  // The expansion's operations (dequant_simd.h).
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I srlv(I v, I shift) { return _mm512_srlv_epi32(v, shift); }
  static I loadu_i(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I permute(I v, I index) { return _mm512_permutexvar_epi32(index, v); }  // v[index]
  static I load_words(const uint32_t* p, int64_t count) {  // the first count, 0 beyond
    return _mm512_maskz_loadu_epi32(lanes(0, count), p);
  }
  static void store_first(float* p, int64_t count, F v) {  // lanes [0, count)
    _mm512_mask_storeu_ps(p, lanes(0, count), v);
  }

  // out[t] lane i = words[i * W + t] for the spans i < valid (0 beyond): W vectors of 16
  // words, regrouped by two-source permutes (lanes [q * 32/W, (q + 1) * 32/W) take their
  // words from the pair v[2q], v[2q + 1]).
  template <int W>
  static void span_words(const uint32_t* words, int64_t valid, I* out) {
    I v[W];
    for (int q = 0; q < W; ++q)
      v[q] = _mm512_maskz_loadu_epi32(lanes(0, valid * W - q * kLanes), words + q * kLanes);
    if constexpr (W == 1) {
      out[0] = v[0];
    } else {
      for (int t = 0; t < W; ++t) {
        const I index = _mm512_loadu_si512(kPairIndex<W>[t].data());
        I u = _mm512_permutex2var_epi32(v[0], index, v[1]);
        for (int q = 1; q < W / 2; ++q)
          u = _mm512_mask_blend_epi32(lanes(q * kWordBits / W, kWordBits / W), u,
                                      _mm512_permutex2var_epi32(v[2 * q], index, v[2 * q + 1]));
        out[t] = u;
      }
    }
  }

  // kPairIndex<W>[t] lane i: where word i * W + t lies in its pair of vectors.
  template <int W>
  static constexpr auto kPairIndex = [] {
    std::array<std::array<int32_t, kLanes>, W> index{};
    for (int t = 0; t < W; ++t)
      for (int i = 0; i < kLanes; ++i) index[t][i] = (i * W + t) % kWordBits;
    return index;
  }();

  // One group's codebook [2**B], held for look-ups: up to 64 entries in registers (a
  // two-register permute per 32 entries, then a blend on bit 5), else gathered from
  // memory (a gather is as fast as the 4 permutes and 3 blends of 128 entries, measured).
  template <int B>
  struct Lut {
    static constexpr int kRegs = B <= 4 ? 1 : B <= 6 ? (1 << B) / kLanes : 0;
    F reg[kRegs > 0 ? kRegs : 1];
    const float* mem = nullptr;

    Lut() = default;
    explicit Lut(const float* book) : mem(book) {
      for (int q = 0; q < kRegs; ++q)
        reg[q] = _mm512_maskz_loadu_ps(lanes(0, (1 << B) - kLanes * q), book + kLanes * q);
    }

    F operator()(I code) const {
      if constexpr (B <= 4) {
        return _mm512_permutexvar_ps(code, reg[0]);
      } else if constexpr (B == 5) {
        return _mm512_permutex2var_ps(reg[0], code, reg[1]);
      } else if constexpr (B == 6) {
        const F low = _mm512_permutex2var_ps(reg[0], code, reg[1]);
        const F high = _mm512_permutex2var_ps(reg[2], code, reg[3]);
        return _mm512_mask_blend_ps(_mm512_test_epi32_mask(code, set1(32)), low, high);
      } else {
        return _mm512_i32gather_ps(code, mem, 4);
      }
    }
  };
};

}  // namespace otq::cpu

#pragma GCC pop_options
