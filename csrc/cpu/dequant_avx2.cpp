// The dense weight in natural column order with AVX2 look-ups (dequant_simd.h over
// struct Avx2: 8 weights per look-up, codebooks of up to 16 entries in registers).
#include "simd.h"

#ifdef OTQ_AVX2

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "avx2_lut.h"
#include "cpu_ops.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "dequant_simd.h"

namespace otq::cpu {

void dequantize_avx2(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                     int64_t groups, float* out) {
  dequantize_simd<Avx2>(planes, n, k, bits, codebook, groups, out);
}

}  // namespace otq::cpu

#pragma GCC pop_options

#endif  // OTQ_AVX2
