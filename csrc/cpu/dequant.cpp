// The dequant path's dense weight on the CPU (bit-exact with QuantizedTensor.dequantize).
#include <algorithm>

#include "simd.h"
#include "decode.h"

namespace otq::cpu {
namespace {

constexpr int64_t kRowsPerChunk = 16;

OTQ_CPU_CLONES
void dequantize_rows(Planes planes, int64_t first, int64_t last, int64_t k, int bits,
                     const float* codebook, int64_t groups, float* out) {
  const int64_t levels = int64_t{1} << bits;
  for (int64_t row = first; row < last; ++row)
    lookup_row(planes, row, k, bits, codebook + (groups == 1 ? 0 : row * levels), out + row * k);
}

}  // namespace

Simd dequantize_path() {
#ifdef OTQ_AVX512
  if (avx512_supported() && simd_allowed(Simd::kAvx512)) return Simd::kAvx512;
#endif
#ifdef OTQ_AVX2
  if (avx2_supported() && simd_allowed(Simd::kAvx2)) return Simd::kAvx2;
#endif
  return Simd::kNone;
}

void dequantize(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                int64_t groups, float* out) {
  switch (dequantize_path()) {
#ifdef OTQ_AVX512
    case Simd::kAvx512:
      return dequantize_avx512(planes, n, k, bits, codebook, groups, out);
#endif
#ifdef OTQ_AVX2
    case Simd::kAvx2:
      return dequantize_avx2(planes, n, k, bits, codebook, groups, out);
#endif
    default:
      break;
  }
  const int64_t chunks = (n + kRowsPerChunk - 1) / kRowsPerChunk;
#pragma omp parallel for schedule(static) if (n * k >= kMinParallelWeights)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t first = c * kRowsPerChunk, last = std::min(n, first + kRowsPerChunk);
    dequantize_rows(planes, first, last, k, bits, codebook, groups, out);
  }
}

}  // namespace otq::cpu
