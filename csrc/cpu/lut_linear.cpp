// LUT GEMV/GEMM on the CPU: decode a block of weight rows once (codes -> codebook values),
// then reuse it for every activation row. Parallel over blocks of output features.
#include <algorithm>
#include <vector>

#include "simd.h"
#include "decode.h"

namespace otq::cpu {
namespace {

constexpr int64_t kRowsPerBlock = 4;

// dense[r, :k] = codebook row of weight row (first + r) looked up at its codes.
OTQ_CPU_INLINE void decode_block(Planes planes, int bits, const float* codebook, int64_t groups,
                                 int64_t first, int64_t rows, int64_t k, float* dense) {
  const int64_t levels = int64_t{1} << bits;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = first + r;
    lookup_row(planes, row, k, bits, codebook + (groups == 1 ? 0 : row * levels), dense + r * k);
  }
}

// y[0..rows) = dense[r, :] . xm for a full block of kRowsPerBlock rows.
OTQ_CPU_INLINE void dot_block(const float* dense, const float* xm, int64_t k, float* acc) {
  const float *w0 = dense, *w1 = dense + k, *w2 = dense + 2 * k, *w3 = dense + 3 * k;
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t i = 0; i < k; ++i) {
    const float v = xm[i];
    a0 += v * w0[i];
    a1 += v * w1[i];
    a2 += v * w2[i];
    a3 += v * w3[i];
  }
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

OTQ_CPU_INLINE float dot(const float* w, const float* xm, int64_t k) {
  float a = 0.f;
#pragma omp simd reduction(+ : a)
  for (int64_t i = 0; i < k; ++i) a += xm[i] * w[i];
  return a;
}

// y[:, first .. first + rows) for the weight rows of one block.
OTQ_CPU_CLONES
void linear_block(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                  const float* codebook, int64_t groups, int64_t n, const float* bias,
                  int64_t first, int64_t rows, float* dense, float* y) {
  decode_block(planes, bits, codebook, groups, first, rows, k, dense);
  float acc[kRowsPerBlock];
  for (int64_t i = 0; i < m; ++i) {
    const float* xm = x + i * k;
    if (rows == kRowsPerBlock) {
      dot_block(dense, xm, k, acc);
    } else {
      for (int64_t r = 0; r < rows; ++r) acc[r] = dot(dense + r * k, xm, k);
    }
    float* ym = y + i * n + first;
    for (int64_t r = 0; r < rows; ++r) ym[r] = acc[r] + (bias ? bias[first + r] : 0.f);
  }
}

// Whether a SIMD path with blocks of `cols` columns (lut_simd.h) pays at this K: short
// rows leave its blocks mostly padding, and below these bounds this file's loops measured
// faster (a quarter of a block at m = 1, where rows are multiplied as they are decoded;
// half of one at m > 1, where the decoded blocks are multiplied whole).
[[maybe_unused]] bool fills_blocks(int64_t k, int64_t m, int64_t cols) {
  return k > cols / (m == 1 ? 4 : 2);
}

}  // namespace

Simd lut_linear_path(int64_t m, int64_t k) {
#ifdef OTQ_AVX512
  if (avx512_supported() && simd_allowed(Simd::kAvx512) && fills_blocks(k, m, 512))
    return Simd::kAvx512;
#endif
#ifdef OTQ_AVX2
  if (avx2_supported() && simd_allowed(Simd::kAvx2) && fills_blocks(k, m, 256))
    return Simd::kAvx2;
#endif
  return Simd::kNone;
}

void lut_linear(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                const float* codebook, int64_t groups, int64_t n, const float* bias, float* y) {
  switch (lut_linear_path(m, k)) {
#ifdef OTQ_AVX512
    case Simd::kAvx512:
      return lut_linear_avx512(x, m, k, planes, bits, codebook, groups, n, bias, y);
#endif
#ifdef OTQ_AVX2
    case Simd::kAvx2:
      return lut_linear_avx2(x, m, k, planes, bits, codebook, groups, n, bias, y);
#endif
    default:
      break;
  }
  const int64_t blocks = (n + kRowsPerBlock - 1) / kRowsPerBlock;
#pragma omp parallel if (m * n * k >= kMinParallelMacs)
  {
    std::vector<float> dense(kRowsPerBlock * k);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * kRowsPerBlock;
      linear_block(x, m, k, planes, bits, codebook, groups, n, bias, first,
                   std::min(kRowsPerBlock, n - first), dense.data(), y);
    }
  }
}

}  // namespace otq::cpu
