// C entry points over the CPU kernels (csrc/cpu) for tests/backends/test_cpu_isa.py, which
// builds them for one instruction set at a time (-march=..., OTQ_NO_CPU_CLONES).
#include <cstdint>

#include "cpu/cpu_ops.h"

namespace {

otq::cpu::Planes planes_of(const uintptr_t* ptrs, int count) {
  otq::cpu::Planes planes{{nullptr, nullptr, nullptr, nullptr}};
  for (int i = 0; i < count; ++i) planes.ptr[i] = reinterpret_cast<uint32_t*>(ptrs[i]);
  return planes;
}

}  // namespace

extern "C" {

void otq_isa_dequantize(const uintptr_t* planes, int count, int64_t n, int64_t k, int bits,
                        const float* codebook, int64_t groups, float* out) {
  otq::cpu::dequantize(planes_of(planes, count), n, k, bits, codebook, groups, out);
}

void otq_isa_lut_linear(const float* x, int64_t m, int64_t k, const uintptr_t* planes, int count,
                        int bits, const float* codebook, int64_t groups, int64_t n,
                        const float* bias, float* y) {
  otq::cpu::lut_linear(x, m, k, planes_of(planes, count), bits, codebook, groups, n, bias, y);
}

}  // extern "C"
