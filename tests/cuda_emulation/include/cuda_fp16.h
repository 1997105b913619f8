// Stand-in for <cuda_fp16.h> (CPU emulation): storage types and round-to-nearest-even
// conversions, through the compiler's _Float16.
#pragma once

#include <cstdint>
#include <cstring>

#include "otq_emu_types.h"

struct __half { uint16_t bits; };
struct alignas(4) __half2 { __half x, y; };

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}

inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
