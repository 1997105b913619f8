// The dequant path's dense weight: out[row, i] = codebook[g(row)][code(row, i)] rounded
// once to float32, float16 or bfloat16 (g(row) = row per channel, 0 per layer). Launched
// from C++, it skips the Python work of a Triton launch (argument specialization), the
// largest identified host cost of the dequant path on small layers in eager mode.
#include "common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

constexpr int kCodesPerItem = 8;  // one 16-byte store of fp16/bf16 (two of fp32)

// The codes of columns [8 * octet, 8 * octet + 8) of `row`. The 8 * w bits a plane of
// width w <= 4 holds for them sit in one word; w = 8 takes two.
template <int BITS>
__device__ __forceinline__ void decode_octet(const PlaneArgs& planes, int64_t row, int64_t octet,
                                             uint32_t (&codes)[kCodesPerItem]) {
  constexpr PlaneSpec kSpec = plane_spec(BITS);
#pragma unroll
  for (int c = 0; c < kCodesPerItem; ++c) codes[c] = 0;
#pragma unroll
  for (int p = 0; p < kSpec.count; ++p) {
    const int width = kSpec.width[p];
    const int64_t bit = octet * kCodesPerItem * width;
    const uint32_t* word = planes.ptr[p] + row * planes.row_words[p] + bit / kWordBits;
    const uint32_t lo = word[0], hi = width == 8 ? word[1] : 0u;
    const int shift = static_cast<int>(bit % kWordBits);
    const uint32_t mask = (1u << width) - 1u;
#pragma unroll
    for (int c = 0; c < kCodesPerItem; ++c) {
      const int at = shift + c * width;  // < 64
      const uint32_t field = (at < kWordBits ? lo >> at : hi >> (at - kWordBits)) & mask;
      codes[c] |= field << kSpec.offset[p];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_octet(T* dst, const T (&values)[kCodesPerItem]) {
  constexpr int kVectors = kCodesPerItem * static_cast<int>(sizeof(T)) / 16;
  uint4 vectors[kVectors];
  memcpy(vectors, values, sizeof(vectors));
#pragma unroll
  for (int v = 0; v < kVectors; ++v) store_u4(reinterpret_cast<uint4*>(dst) + v, vectors[v]);
}

// One item per 8 columns of a row (grid-stride). vector_store: k % 8 == 0 and out is
// 16-byte aligned, so every whole octet starts on a 16-byte boundary.
template <typename T, int BITS>
__global__ void dequantize_kernel(PlaneArgs planes, const float* __restrict__ codebook,
                                  bool per_channel, int64_t n, int64_t k, bool vector_store,
                                  T* __restrict__ out) {
  const int64_t octets = (k + kCodesPerItem - 1) / kCodesPerItem;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n * octets;
       t += stride) {
    const int64_t row = t / octets, octet = t - row * octets;
    uint32_t codes[kCodesPerItem];
    decode_octet<BITS>(planes, row, octet, codes);
    const float* table = codebook + (per_channel ? row << BITS : 0);
    T values[kCodesPerItem];
#pragma unroll
    for (int c = 0; c < kCodesPerItem; ++c) values[c] = from_float<T>(__ldg(table + codes[c]));
    T* dst = out + row * k + octet * kCodesPerItem;
    const int64_t count = min(k - octet * kCodesPerItem, static_cast<int64_t>(kCodesPerItem));
    if (vector_store && count == kCodesPerItem) {
      store_octet(dst, values);
    } else {
      for (int c = 0; c < count; ++c) dst[c] = values[c];
    }
  }
}

struct DequantArgs {
  PlaneArgs planes;
  const float* codebook;
  bool per_channel;
  int64_t n, k;
  void* out;
  cudaStream_t stream;
};

struct DequantKernels {
  template <typename T, int BITS>
  static int run(const DequantArgs& a) {
    const int64_t items = a.n * ((a.k + kCodesPerItem - 1) / kCodesPerItem);
    const bool vector_store =
        a.k % kCodesPerItem == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
    OTQ_LAUNCH(blocks_for(items, 256), 256, 0, a.stream, dequantize_kernel<T, BITS>)(
        a.planes, a.codebook, a.per_channel, a.n, a.k, vector_store, static_cast<T*>(a.out));
    return static_cast<int>(cudaGetLastError());
  }
};

}  // namespace

int dequantize(const uint32_t* const* planes, int bits, const float* codebook, bool per_channel,
               int64_t n, int64_t k, int dtype, void* out, void* stream) {
  if (!valid_bits(bits) || n <= 0 || k <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const DequantArgs a{plane_args(planes, bits, k), codebook, per_channel, n, k, out,
                      as_stream(stream)};
  switch (dtype) {
    case kFloat32: return run_bits<DequantKernels, float, kMinBits, kMaxBits>(bits, a);
    case kFloat16: return run_bits<DequantKernels, __half, kMinBits, kMaxBits>(bits, a);
    case kBFloat16:
      return run_bits<DequantKernels, __nv_bfloat16, kMinBits, kMaxBits>(bits, a);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace otq::cuda
