// AVX-512 look-ups shared by lut_avx512.cpp and dequant_avx512.cpp: a codebook held in
// registers, indexed by 16 codes at once. Include only where OTQ_AVX512 is defined.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace otq::cpu::avx512 {

constexpr int kLanes = 16;

// Lanes [first, first + count) of a 16-lane mask.
inline __mmask16 lanes(int64_t first, int64_t count) {
  count = std::clamp<int64_t>(count, 0, kLanes);
  return static_cast<__mmask16>(((1u << count) - 1u) << first);
}

// One group's codebook [2**B], held for look-ups: up to 64 entries in registers (a
// two-register permute per 32 entries, then a blend on bit 5), else gathered from memory
// (a gather is as fast as the 4 permutes and 3 blends of 128 entries, measured).
template <int B>
struct Lut {
  static constexpr int kRegs = B <= 4 ? 1 : B <= 6 ? (1 << B) / kLanes : 0;
  __m512 reg[kRegs > 0 ? kRegs : 1];
  const float* mem = nullptr;

  Lut() = default;
  explicit Lut(const float* book) : mem(book) {
    for (int q = 0; q < kRegs; ++q)
      reg[q] = _mm512_maskz_loadu_ps(lanes(0, (1 << B) - kLanes * q), book + kLanes * q);
  }

  __m512 operator()(__m512i code) const {
    if constexpr (B <= 4) {
      return _mm512_permutexvar_ps(code, reg[0]);
    } else if constexpr (B <= 6) {
      __m512 part[kRegs / 2];
      for (int q = 0; q < kRegs / 2; ++q)
        part[q] = _mm512_permutex2var_ps(reg[2 * q], code, reg[2 * q + 1]);
      for (int bit = 5, step = 1; bit < B; ++bit, step *= 2) {
        const __mmask16 high = _mm512_test_epi32_mask(code, _mm512_set1_epi32(1 << bit));
        for (int q = 0; q + step < kRegs / 2; q += 2 * step)
          part[q] = _mm512_mask_blend_ps(high, part[q], part[q + step]);
      }
      return part[0];
    } else {
      return _mm512_i32gather_ps(code, mem, 4);
    }
  }
};

}  // namespace otq::cpu::avx512

#pragma GCC pop_options
