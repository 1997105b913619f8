// Stand-in for <cuda_runtime.h> that lets a host C++ compiler build csrc/cuda/*.cu and run
// the kernels on the CPU (tests/cuda_emulation). Only what those sources use is here.
#pragma once

#include <math.h>  // fmaf and friends, as CUDA device code has them

#include <cstdint>
#include <cstring>

#include "otq_emu_runtime.h"
#include "otq_emu_types.h"

#define OTQ_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a static is that block's copy

#define threadIdx (::otq_emu::tls.thread_idx)
#define blockIdx (::otq_emu::tls.block_idx)
#define blockDim (::otq_emu::tls.block_dim)
#define gridDim (::otq_emu::tls.grid_dim)

#define OTQ_LAUNCH(grid, block, smem, stream, ...) \
  ::otq_emu::launch(grid, block, smem, stream, __VA_ARGS__)

template <typename T>
T* dynamic_shared() {
  return otq_emu::dynamic_shared<T>();
}

// Shared addresses are plain pointers here; the load checks alignment as the GPU does.
using SharedAddr = const unsigned char*;

inline SharedAddr shared_addr(const void* p) { return static_cast<SharedAddr>(p); }

inline uint32_t load_shared_u32(SharedAddr base, uint32_t offset) {
  const unsigned char* p = base + offset;
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) otq_emu::fail("misaligned shared load");
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A misaligned 16-byte store faults on the GPU: the emulation aborts instead.
inline void store_u4(void* dst, uint4 v) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) otq_emu::fail("misaligned vector store");
  std::memcpy(dst, &v, sizeof(v));
}

// PRMT: result byte i is byte (selector >> 4i) & 7 of the 8 bytes y:x.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned selector) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i)
    out |= static_cast<unsigned>((bytes >> (8 * ((selector >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return out;
}

// SHF.L: the high word of (hi:lo) << (shift % 32).
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  const uint64_t both = (static_cast<uint64_t>(hi) << 32) | lo;
  return static_cast<unsigned>((both << (shift & 31u)) >> 32);
}

// IMAD.HI: the high word of the 64-bit product.
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

// __ldg of a misaligned vector faults on the GPU: the emulation aborts instead.
template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) otq_emu::fail("misaligned __ldg");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

inline void __syncthreads() { otq_emu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  return otq_emu::shfl_xor(mask, v, offset);
}

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > otq_emu::kMaxOptInSmem)
    return otq_emu::last_error() = cudaErrorInvalidValue;  // (as the runtime: also pending)
  otq_emu::dynamic_smem_limit(reinterpret_cast<const void*>(kernel)) = static_cast<size_t>(value);
  return cudaSuccess;
}

// The host build runs every kernel: there is always an image.
template <typename... Params>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, void (*)(Params...)) {
  attributes->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = otq_emu::last_error();
  otq_emu::last_error() = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return otq_emu::last_fault();
  }
  return "unknown error";
}

#include "otq_emu_mma.h"  // after the runtime: the tensor-core product uses it
