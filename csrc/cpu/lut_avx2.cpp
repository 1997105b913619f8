// The LUT linear of lut_simd.h on AVX2 + FMA (struct Avx2 in avx2_lut.h): blocks of 8
// spans (256 columns), each plane's words of the 8 spans gathered into lanes, codebooks of
// up to 16 entries in registers (vpermps per 8 entries, then a blend on bit 3), 5- to 8-bit
// ones gathered.
#include "simd.h"

#ifdef OTQ_AVX2

#include <immintrin.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "avx2_lut.h"
#include "cpu_ops.h"

namespace otq::cpu {

bool avx2_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace otq::cpu

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "lut_simd.h"

namespace otq::cpu {

void lut_linear_avx2(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                     const float* codebook, int64_t groups, int64_t n, const float* bias,
                     float* y) {
  lut_linear_simd<Avx2>(x, m, k, planes, bits, codebook, groups, n, bias, y);
}

}  // namespace otq::cpu

#pragma GCC pop_options

#endif  // OTQ_AVX2
