// Device helpers shared by the CUDA kernels (no torch headers: nvcc-only).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../planes.h"

// Launches are spelled OTQ_LAUNCH(grid, block, smem, stream, kernel)(args...), dynamic
// shared memory dynamic_shared<T>(), raw shared loads load_shared_u32 and 16-byte global
// stores store_u4, so that tests/cuda_emulation can build these sources
// with a host compiler (its stand-in headers define them) and run the kernels on the CPU.
#ifndef OTQ_CUDA_EMULATION
#define OTQ_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>

template <typename T>
__device__ __forceinline__ T* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char otq_dynamic_smem[];
  return reinterpret_cast<T*>(otq_dynamic_smem);
}

// A 32-bit shared-memory address: look-ups at base + offset cost one add (a generic
// pointer keeps the window base apart and adds it per access).
using SharedAddr = uint32_t;

__device__ __forceinline__ SharedAddr shared_addr(const void* p) {
  return static_cast<SharedAddr>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ uint32_t load_shared_u32(SharedAddr base, uint32_t offset) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(base + offset) : "memory");
  return v;
}

// A 16-byte store to global memory: dst must be 16-byte aligned (the emulation checks).
__device__ __forceinline__ void store_u4(void* dst, uint4 v) { *static_cast<uint4*>(dst) = v; }
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

// Two 16-bit values (T = __half or __nv_bfloat16) in one register, lo in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  uint16_t l, h;
  memcpy(&l, &lo, 2);
  memcpy(&h, &hi, 2);
  return static_cast<uint32_t>(l) | (static_cast<uint32_t>(h) << 16);
}

#ifndef OTQ_CUDA_EMULATION
// D (16x8, f32) += A (16x16, row-major) * B (16x8, column-major) on tensor cores, T = __half
// or __nv_bfloat16, fragments as the PTX ISA lays them out for mma.m16n8k16 (lane l,
// g = l / 4, t = l % 4): a = {A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..]},
// b = {B[2t..][g], B[2t+8..][g]} (two elements per register, the lower column/row in the
// low half), d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}. sm_80 and later.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Kernels::run<T, BITS>(args) for the runtime bits in [BITS, MAX_BITS]
// (cudaErrorInvalidValue past MAX_BITS).
template <typename Kernels, typename T, int BITS, int MAX_BITS, typename Args>
int run_bits(int bits, const Args& args) {
  if constexpr (BITS > MAX_BITS) {
    return static_cast<int>(cudaErrorInvalidValue);
  } else {
    return bits == BITS ? Kernels::template run<T, BITS>(args)
                        : run_bits<Kernels, T, BITS + 1, MAX_BITS>(bits, args);
  }
}

inline int blocks_for(int64_t items, int threads, int64_t cap = 65535LL * 16) {
  const int64_t blocks = (items + threads - 1) / threads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Dynamic shared memory above the 48 KB default needs an opt-in per kernel (on the current
// device); a launch asking for more without it fails. A refused opt-in is returned and
// cleared (left pending, torch's next launch check would raise it again).
template <typename... Params>
cudaError_t allow_dynamic_smem(void (*kernel)(Params...), size_t bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (bytes <= kDefaultLimit) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

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
