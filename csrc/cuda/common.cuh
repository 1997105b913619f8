// Device helpers shared by the CUDA kernels (no torch headers: nvcc-only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../planes.h"

// Launches are spelled OTQ_LAUNCH(grid, block, smem, stream, kernel)(args...) and dynamic
// shared memory dynamic_shared<T>(), so that tests/cuda_emulation can build these sources
// with a host compiler (its stand-in headers define both) and run the kernels on the CPU.
#ifndef OTQ_CUDA_EMULATION
#define OTQ_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char otq_dynamic_smem[];
  return reinterpret_cast<T*>(otq_dynamic_smem);
}
#endif

namespace otq::cuda {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

inline int blocks_for(int64_t items, int threads, int64_t cap = 65535LL * 16) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Plane base pointers and their words per row, passed to kernels by value.
struct PlaneArgs {
  const uint32_t* ptr[kMaxPlanes];
  int64_t row_words[kMaxPlanes];
};

inline PlaneArgs plane_args(const uint32_t* const* planes, int bits, int64_t k) {
  const PlaneSpec spec = plane_spec(bits);
  PlaneArgs args{};
  for (int p = 0; p < spec.count; ++p) {
    args.ptr[p] = planes[p];
    args.row_words[p] = row_words(k, spec.width[p]);
  }
  return args;
}

}  // namespace otq::cuda
