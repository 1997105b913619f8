// The LUT linear of lut_simd.h on AVX-512 (struct Avx512 in avx512_lut.h): blocks of 16
// spans (512 columns), codebooks of up to 64 entries in registers (vpermps / vpermi2ps),
// 7- and 8-bit ones gathered.
#include "simd.h"

#ifdef OTQ_AVX512

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include "avx512_lut.h"
#include "cpu_ops.h"

namespace otq::cpu {

bool avx512_supported() { return __builtin_cpu_supports("avx512f"); }

}  // namespace otq::cpu

#pragma GCC push_options
#pragma GCC target("avx512f")

#include "lut_simd.h"

namespace otq::cpu {

void lut_linear_avx512(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                       const float* codebook, int64_t groups, int64_t n, const float* bias,
                       float* y) {
  lut_linear_simd<Avx512>(x, m, k, planes, bits, codebook, groups, n, bias, y);
}

}  // namespace otq::cpu

#pragma GCC pop_options

#endif  // OTQ_AVX512
