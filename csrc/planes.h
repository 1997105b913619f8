// The canonical bit-plane layout (DESIGN §2), shared by the CPU and CUDA sources.
// A b-bit code is split into planes of power-of-two widths, widest first (7 -> 4,2,1);
// the widest plane holds the low bits. Plane p of a row is K_pad * w_p / 32 words and
// element k sits in word k*w/32 at bit (k*w) % 32.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define OTQ_HD __host__ __device__ __forceinline__
#else
#define OTQ_HD inline
#endif

namespace otq {

constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;
constexpr int kMaxPlanes = 4;
constexpr int kWordBits = 32;

struct PlaneSpec {
  int count;
  int width[kMaxPlanes];
  int offset[kMaxPlanes];
};

OTQ_HD constexpr PlaneSpec plane_spec(int bits) {
  PlaneSpec spec{0, {0, 0, 0, 0}, {0, 0, 0, 0}};
  int offset = 0;
  for (int w = 8; w >= 1; w >>= 1) {
    if (bits & w) {
      spec.width[spec.count] = w;
      spec.offset[spec.count] = offset;
      offset += w;
      ++spec.count;
    }
  }
  return spec;
}

OTQ_HD constexpr int64_t padded_k(int64_t k) { return (k + kWordBits - 1) / kWordBits * kWordBits; }

// Words per row of a plane of width w.
OTQ_HD constexpr int64_t row_words(int64_t k, int width) { return padded_k(k) * width / kWordBits; }

OTQ_HD constexpr bool valid_bits(int bits) { return bits >= kMinBits && bits <= kMaxBits; }

// Equal-mass chunks of n ranks into c chunks: the first n % c are one longer.
OTQ_HD constexpr int64_t chunk_begin(int64_t n, int64_t c, int64_t chunk) {
  const int64_t q = n / c, r = n % c;
  return chunk * q + (chunk < r ? chunk : r);
}

}  // namespace otq
