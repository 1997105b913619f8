// mma_16816<T> for the CPU emulation: the warp-collective tensor-core product of
// csrc/cuda/common.cuh, computed from every lane's fragments with the PTX ISA's
// mma.m16n8k16 layout (lane l, g = l / 4, t = l % 4; see common.cuh). Products and sums in
// float: close to, not bit-identical with, the tensor cores.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "otq_emu_runtime.h"

namespace otq_emu {

struct MmaFragments {
  uint32_t a[4], b[2];
};

template <typename T>
float half_of(uint32_t reg, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? reg >> 16 : reg & 0xffffu);
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// A[row][col] of the 16x16 A, B[row][col] of the 16x8 B, from all lanes' fragments.
template <typename T>
float a_at(const MmaFragments* all, int row, int col) {
  const int lane = (row % 8) * 4 + (col % 8) / 2, reg = row / 8 + 2 * (col / 8);
  return half_of<T>(all[lane].a[reg], col % 2);
}

template <typename T>
float b_at(const MmaFragments* all, int row, int col) {
  const int lane = col * 4 + (row % 8) / 2, reg = row / 8;
  return half_of<T>(all[lane].b[reg], row % 2);
}

}  // namespace otq_emu

template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace otq_emu;
  Rendezvous& warp = full_warp("mma_16816 needs all 32 lanes");
  MmaFragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
  warp.all_gather(lane(), &mine, sizeof(mine), all);
  const int g = lane() / 4, t = lane() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int kk = 0; kk < 16; ++kk) sum += a_at<T>(all, row, kk) * b_at<T>(all, kk, col);
    d[i] = sum;
  }
}
