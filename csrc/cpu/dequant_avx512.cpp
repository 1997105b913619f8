// The dense weight in natural column order with AVX-512 look-ups (dequant_simd.h over
// struct Avx512: 16 weights per look-up, codebooks of up to 64 entries in registers).
#include "simd.h"

#ifdef OTQ_AVX512

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>

#include "avx512_lut.h"
#include "cpu_ops.h"

#pragma GCC push_options
#pragma GCC target("avx512f")

#include "dequant_simd.h"

namespace otq::cpu {

void dequantize_avx512(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                       int64_t groups, float* out) {
  dequantize_simd<Avx512>(planes, n, k, bits, codebook, groups, out);
}

}  // namespace otq::cpu

#pragma GCC pop_options

#endif  // OTQ_AVX512
