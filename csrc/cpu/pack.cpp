// Bit-plane pack/unpack on the CPU (bit-exact with otq_kernels.format).
#include <vector>

#include "decode.h"

namespace otq::cpu {
namespace {

uint32_t pack_word(const int64_t* row, int64_t k, int64_t first, int width, int offset) {
  const uint32_t mask = (1u << width) - 1u;
  const int per_word = kWordBits / width;
  uint32_t word = 0;
  for (int f = 0; f < per_word && first + f < k; ++f) {
    const uint32_t field = static_cast<uint32_t>(row[first + f] >> offset) & mask;
    word |= field << (f * width);
  }
  return word;
}

}  // namespace

void pack(const int64_t* codes, int64_t n, int64_t k, int bits, Planes planes) {
  const PlaneSpec spec = plane_spec(bits);
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < n; ++row) {
    const int64_t* src = codes + row * k;
    for (int p = 0; p < spec.count; ++p) {
      const int width = spec.width[p];
      const int64_t nwords = row_words(k, width);
      uint32_t* dst = planes.ptr[p] + row * nwords;
      for (int64_t i = 0; i < nwords; ++i)
        dst[i] = pack_word(src, k, i * (kWordBits / width), width, spec.offset[p]);
    }
  }
}

void unpack(Planes planes, int64_t n, int64_t k, int bits, int64_t* codes) {
#pragma omp parallel
  {
    std::vector<uint8_t> buffer(padded_k(k));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < n; ++row) {
      decode_row(planes, row, k, bits, buffer.data());
      int64_t* dst = codes + row * k;
      for (int64_t i = 0; i < k; ++i) dst[i] = buffer[i];
    }
  }
}

}  // namespace otq::cpu
