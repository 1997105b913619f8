// Bit-plane pack/unpack on the GPU (the canonical layout of otq_kernels.format).
#include "common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

// One thread per word of one plane: OR the width-bit fields of its 32/width codes.
__global__ void pack_plane_kernel(const int64_t* __restrict__ codes, int64_t n, int64_t k,
                                  int width, int offset, int64_t words_per_row,
                                  uint32_t* __restrict__ plane) {
  const uint32_t mask = (1u << width) - 1u;
  const int per_word = kWordBits / width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n * words_per_row; t += stride) {
    const int64_t row = t / words_per_row, first = (t - row * words_per_row) * per_word;
    const int64_t* src = codes + row * k;
    uint32_t word = 0;
    for (int f = 0; f < per_word && first + f < k; ++f)
      word |= (static_cast<uint32_t>(src[first + f] >> offset) & mask) << (f * width);
    plane[t] = word;
  }
}

// One thread per code: gather its field from every plane.
__global__ void unpack_kernel(PlaneArgs planes, int bits, int64_t n, int64_t k,
                              int64_t* __restrict__ codes) {
  const PlaneSpec spec = plane_spec(bits);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < n * k; t += stride) {
    const int64_t row = t / k, i = t - row * k;
    int64_t code = 0;
    for (int p = 0; p < spec.count; ++p) {
      const int width = spec.width[p];
      const int64_t bit = i * width;
      const uint32_t word = planes.ptr[p][row * planes.row_words[p] + bit / kWordBits];
      code |= static_cast<int64_t>((word >> (bit % kWordBits)) & ((1u << width) - 1u)) << spec.offset[p];
    }
    codes[t] = code;
  }
}

}  // namespace

int kernel_image_status() {
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, unpack_kernel);
  if (status != cudaSuccess) cudaGetLastError();  // not an error of the next launch
  return static_cast<int>(status);
}

int pack(const int64_t* codes, int64_t n, int64_t k, int bits, uint32_t* const* planes,
         void* stream) {
  if (!valid_bits(bits) || n <= 0 || k <= 0) return static_cast<int>(cudaErrorInvalidValue);
  const PlaneSpec spec = plane_spec(bits);
  for (int p = 0; p < spec.count; ++p) {
    const int64_t words = row_words(k, spec.width[p]);
    OTQ_LAUNCH(blocks_for(n * words, 256), 256, 0, as_stream(stream), pack_plane_kernel)(
        codes, n, k, spec.width[p], spec.offset[p], words, planes[p]);
  }
  return static_cast<int>(cudaGetLastError());
}

int unpack(const uint32_t* const* planes, int64_t n, int64_t k, int bits, int64_t* codes,
           void* stream) {
  if (!valid_bits(bits) || n <= 0 || k <= 0) return static_cast<int>(cudaErrorInvalidValue);
  OTQ_LAUNCH(blocks_for(n * k, 256), 256, 0, as_stream(stream), unpack_kernel)(
      plane_args(planes, bits, k), bits, n, k, codes);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace otq::cuda
