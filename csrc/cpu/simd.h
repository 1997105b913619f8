// The CPU kernels' explicit-SIMD paths, which lut_linear and dequantize take when the CPU
// has the instructions (checked at run time). Built with GCC on x86-64 (a per-function
// target, no -march needed); OTQ_NO_AVX512 / OTQ_NO_AVX2 leave them out.
#pragma once

#include <cstdlib>
#include <cstring>

#include "cpu_ops.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#if !defined(OTQ_NO_AVX512)
#define OTQ_AVX512 1
#endif
#if !defined(OTQ_NO_AVX2)
#define OTQ_AVX2 1
#endif
#endif

namespace otq::cpu {

// The explicit-SIMD paths, widest first; a cap allows itself and every narrower path.
enum class Simd { kAvx512, kAvx2, kNone, kInvalid };

// Env OTQ_CPU_SIMD: the widest path the kernels may take ("avx512", the default when
// unset, "avx2" or "none"); kInvalid for any other value (the bindings refuse it).
inline Simd simd_cap() {
  const char* cap = std::getenv("OTQ_CPU_SIMD");
  if (cap == nullptr || std::strcmp(cap, "avx512") == 0) return Simd::kAvx512;
  if (std::strcmp(cap, "avx2") == 0) return Simd::kAvx2;
  return std::strcmp(cap, "none") == 0 ? Simd::kNone : Simd::kInvalid;
}

// Whether OTQ_CPU_SIMD allows `path`.
inline bool simd_allowed(Simd path) { return simd_cap() <= path; }

// The path lut_linear takes for m rows of x with k columns, and the one dequantize takes:
// the widest one built in, that this CPU runs and OTQ_CPU_SIMD allows (for lut_linear,
// also one whose column blocks k fills); kNone for the portable loops.
Simd lut_linear_path(int64_t m, int64_t k);
Simd dequantize_path();

#ifdef OTQ_AVX512
// Whether this CPU (and OS) runs AVX-512F code.
bool avx512_supported();

// lut_linear's contract (cpu_ops.h), with the codebook looked up in registers
// (lut_simd.h on AVX-512: lut_avx512.cpp).
void lut_linear_avx512(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                       const float* codebook, int64_t groups, int64_t n, const float* bias,
                       float* y);

// dequantize's contract (cpu_ops.h), likewise (dequant_simd.h: dequant_avx512.cpp).
void dequantize_avx512(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                       int64_t groups, float* out);
#endif

#ifdef OTQ_AVX2
// Whether this CPU (and OS) runs AVX2 and FMA code.
bool avx2_supported();

// lut_linear's contract on AVX2 (lut_simd.h: lut_avx2.cpp).
void lut_linear_avx2(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                     const float* codebook, int64_t groups, int64_t n, const float* bias,
                     float* y);

// dequantize's contract on AVX2 (dequant_simd.h: dequant_avx2.cpp).
void dequantize_avx2(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                     int64_t groups, float* out);
#endif

}  // namespace otq::cpu
