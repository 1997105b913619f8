// LUT GEMV for small M: y[m, n] = x[m, k] @ W^T + bias, W[j, i] = codebook[g(j), code(j, i)].
//
// A block is 4 warps; a warp owns 4 weight rows and walks its K range one 32-weight group
// per lane per step: it loads the group's words of every plane (128-bit loads for 8- and
// 4-bit planes; one step ahead in the one-row kernels at 2-6 bits), turns the fields into
// table offsets, looks the weights up in shared memory and accumulates in fp32 against up
// to MAX_M activation rows (8-wide vector loads). MAX_M is 1 for a single activation row
// (fewer registers: more warps per SM) and kGemvMaxM otherwise.
// Shared tables: one per layer, duplicated per lane ([2^b][32], conflict-free); or one
// per weight row ([16 rows][2^b], conflict-free for b <= 5). Split-K over blockIdx.y
// writes fp32 partials that a fix-up kernel sums (deterministic, bias fused there).
#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kSub = 8;     // weights per activation vector load

__device__ __forceinline__ void load8_vec(const float* p, float (&o)[kSub]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}

__device__ __forceinline__ void load8_vec(const __half* p, float (&o)[kSub]) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&q);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8_vec(const __nv_bfloat16* p, float (&o)[kSub]) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&q);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    o[2 * i] = f.x, o[2 * i + 1] = f.y;
  }
}

// x_row[k0, k0 + 8) as floats; zeros past k (the padded tail of the codes). vec: the
// 8 values lie inside k and are 16-byte aligned (one vector load).
template <typename T>
__device__ __forceinline__ void load_x8(const T* __restrict__ x_row, int64_t k0, int64_t k,
                                        bool vec, float (&o)[kSub]) {
  if (vec) {
    load8_vec(x_row + k0, o);
  } else {
#pragma unroll
    for (int i = 0; i < kSub; ++i) o[i] = k0 + i < k ? to_float(x_row[k0 + i]) : 0.f;
  }
}

// Shared tables: per layer lut[c * 32 + lane], per row lut[r * 2^b + c] (r = row in block).
// Entry c of a lane's table lies (c << kEntryShift) bytes past the lane's entry 0, so a
// look-up address is one mask and one shift-and-add (LEA.HI / IMAD.HI) per plane.
template <bool PER_CHANNEL>
constexpr int kEntryShift = PER_CHANNEL ? 2 : 7;

template <int BITS, bool PER_CHANNEL>
__device__ __forceinline__ void load_luts(float* lut, const float* __restrict__ codebook,
                                          int64_t block_row, int64_t n) {
  constexpr int kLevels = 1 << BITS;
  if constexpr (!PER_CHANNEL) {
    for (int i = threadIdx.x; i < kLevels * kWarpSize; i += kThreads)
      lut[i] = __ldg(codebook + i / kWarpSize);
  } else {
    for (int i = threadIdx.x; i < kRowsPerBlock * kLevels; i += kThreads) {
      const int64_t row = block_row + i / kLevels;
      lut[i] = row < n ? __ldg(codebook + row * kLevels + i % kLevels) : 0.f;
    }
  }
}

template <typename T, int BITS, bool PER_CHANNEL, int MAX_M>
__global__ void __launch_bounds__(kThreads)
    lut_gemv_kernel(const T* __restrict__ x, int m, int64_t k, bool vec_x, PlaneArgs planes,
                    const float* __restrict__ codebook, int64_t n,
                    const T* __restrict__ bias, T* __restrict__ y,
                    float* __restrict__ partial, int64_t groups_per_split) {
  constexpr int kLevels = 1 << BITS, kShift = kEntryShift<PER_CHANNEL>;
  float* lut = dynamic_shared<float>();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  load_luts<BITS, PER_CHANNEL>(lut, codebook, block_row, n);
  __syncthreads();

  const int64_t first_row = block_row + warp * kRowsPerWarp;
  const char* table[kRowsPerWarp];
  // Rows past n read row n - 1 (never stored), so every lane loads unconditionally.
  typename GroupWords<BITS>::Rows rows[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    table[r] = reinterpret_cast<const char*>(
        lut + (PER_CHANNEL ? (warp * kRowsPerWarp + r) * kLevels : lane));
    rows[r] = GroupWords<BITS>::rows_of(planes, min(first_row + r, n - 1));
  }

  const int64_t groups = padded_k(k) / kGroup;
  const int64_t g_begin = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t g_end = min(groups, g_begin + groups_per_split);
  // With one activation row, the next step's words load while this step computes. With
  // more rows, or 7-8-bit words (7-8 more registers per weight row), the extra registers
  // cost occupancy: ptxas went from 128 to 137-168 (3 blocks per SM instead of 4), and the
  // 8-bit per-channel kernel was 8-13% slower on the H200.
  constexpr bool kLoadAhead = MAX_M == 1 && BITS <= 6;
  float acc[kRowsPerWarp][MAX_M] = {};
  GroupWords<BITS> words[kRowsPerWarp], ahead[kRowsPerWarp];
  int64_t g = g_begin + lane;
  if (kLoadAhead && g < g_end) {
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) words[r].load(rows[r], g);
  }
  for (; g < g_end; g += kWarpSize) {
    const int64_t g_load = kLoadAhead ? g + kWarpSize : g;
    if (g_load < g_end) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) (kLoadAhead ? ahead : words)[r].load(rows[r], g_load);
    }
    const bool vec_group = vec_x && (g + 1) * kGroup <= k;
#pragma unroll
    for (int j0 = 0; j0 < kGroup; j0 += kSub) {
      float w[kRowsPerWarp][kSub];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
        for (int j = 0; j < kSub; ++j)
          w[r][j] = *reinterpret_cast<const float*>(
              table[r] + words[r].template code<kShift>(j0 + j));
#pragma unroll
      for (int mm = 0; mm < MAX_M; ++mm) {
        if (mm >= m) break;
        float xv[kSub];
        load_x8(x + mm * k, g * kGroup + j0, k, vec_group, xv);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
          for (int j = 0; j < kSub; ++j) acc[r][mm] = fmaf(w[r][j], xv[j], acc[r][mm]);
      }
    }
    if constexpr (kLoadAhead) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) words[r] = ahead[r];
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = first_row + r;
#pragma unroll
    for (int mm = 0; mm < MAX_M; ++mm) {
      if (mm >= m) break;  // m is uniform: every lane takes part in warp_sum
      const float s = warp_sum(acc[r][mm]);
      if (lane != 0 || row >= n) continue;
      if (partial != nullptr)
        partial[(static_cast<int64_t>(blockIdx.y) * m + mm) * n + row] = s;
      else
        y[mm * n + row] = from_float<T>(s + (bias != nullptr ? to_float(bias[row]) : 0.f));
    }
  }
}

template <typename T, int BITS, int MAX_M>
constexpr auto kernel_for(bool per_channel) {
  return per_channel ? lut_gemv_kernel<T, BITS, true, MAX_M>
                     : lut_gemv_kernel<T, BITS, false, MAX_M>;
}

// GEMV launches for dispatch_gemv: M in chunks of kGemvMaxM rows (a lone row by the
// MAX_M = 1 kernels), split-K fixed up.
struct GemvKernels {
  template <typename T, int BITS>
  static int run(const GemvArgs& a) {
    const size_t smem =
        sizeof(float) * (1 << BITS) * (a.per_channel ? kRowsPerBlock : kWarpSize);
    const T* x = a.x_as<T>();
    const bool vec_x = a.k % (16 / sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    return launch_in_m_chunks<T>(
        a, kRowsPerBlock, kGemvMaxM,
        [&](dim3 grid, int64_t groups_per_split, int64_t m0, int rows, float* partial) {
          const auto kernel = rows == 1 ? kernel_for<T, BITS, 1>(a.per_channel)
                                        : kernel_for<T, BITS, kGemvMaxM>(a.per_channel);
          OTQ_LAUNCH(grid, kThreads, smem, a.stream, kernel)(
              x + m0 * a.k, rows, a.k, vec_x, a.planes, a.codebook, a.n, a.bias_as<T>(),
              a.y_as<T>() + m0 * a.n, partial, groups_per_split);
          return 0;
        });
  }
};

}  // namespace

int lut_linear(const void* x, int dtype, int64_t m, int64_t k, const uint32_t* const* planes,
               int bits, const float* codebook, bool per_channel, int64_t n, const void* bias,
               void* y, int split_k, float* workspace, void* stream) {
  return dispatch_gemv<GemvKernels, kMaxBits, true>(x, dtype, m, k, planes, bits, codebook,
                                                     per_channel, n, bias, y, split_k,
                                                     workspace, stream);
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace otq::cuda
