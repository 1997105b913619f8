// Pieces shared by the LUT GEMV kernels (lut_gemv.cu, lut_mma.cu): the packed words of a
// 32-column group of one weight row, and split-K over gridDim.y with a fix-up kernel.
#pragma once

#include "common.cuh"
#include "launchers.h"

namespace otq::cuda {

constexpr int kGroup = 32;  // columns per group: one word of 1-bit codes
constexpr int kMaxWidth = 8;
constexpr int64_t kMaxGridY = 65535;

// The words of one 32-weight group of one row, per plane (plane p uses width_p words).
template <int BITS>
struct GroupWords {
  uint32_t w[kMaxPlanes][kMaxWidth];

  // Where each plane's words of weight row `row` start.
  struct Rows {
    const uint32_t* ptr[kMaxPlanes];
  };

  __device__ __forceinline__ static Rows rows_of(const PlaneArgs& planes, int64_t row) {
    Rows rows{};
#pragma unroll
    for (int p = 0; p < plane_spec(BITS).count; ++p)
      rows.ptr[p] = planes.ptr[p] + row * planes.row_words[p];
    return rows;
  }

  __device__ __forceinline__ void load(const Rows& rows, int64_t group) {
    constexpr PlaneSpec spec = plane_spec(BITS);
#pragma unroll
    for (int p = 0; p < spec.count; ++p) {
      const int width = spec.width[p];
      const uint32_t* src = rows.ptr[p] + group * width;
      if (width >= 4) {
#pragma unroll
        for (int v = 0; v < width / 4; ++v) {
          const uint4 q = __ldg(reinterpret_cast<const uint4*>(src) + v);
          w[p][4 * v] = q.x, w[p][4 * v + 1] = q.y, w[p][4 * v + 2] = q.z, w[p][4 * v + 3] = q.w;
        }
      } else if (width == 2) {
        const uint2 q = __ldg(reinterpret_cast<const uint2*>(src));
        w[p][0] = q.x, w[p][1] = q.y;
      } else {
        w[p][0] = __ldg(src);
      }
    }
  }

  // Code of weight j (0..31) of the group shifted left by SHIFT; j must be a compile-time
  // constant after unrolling. Each plane's field is masked in place; one moving right goes
  // by a multiply-high, which ptxas fuses with the running sum's add (LEA.HI / IMAD.HI):
  // two instructions per plane (three for a field that moves left).
  template <int SHIFT>
  __device__ __forceinline__ uint32_t code(int j) const {
    constexpr PlaneSpec spec = plane_spec(BITS);
    uint32_t c = 0;
#pragma unroll
    for (int p = 0; p < spec.count; ++p) {
      const int width = spec.width[p], bit = j * width, pos = bit % 32;
      const int to = spec.offset[p] + SHIFT;  // where the field's lowest bit goes
      const uint32_t field = w[p][bit / 32] & (((1u << width) - 1u) << pos);
      if (pos > to)
        c += __umulhi(field, 1u << (32 - (pos - to)));
      else
        c += field << (to - pos);
    }
    return c;
  }
};

// y[i] = sum over splits of partial[s, i] + bias[i % n]; partial is [splits, m, n].
template <typename T>
__global__ void splitk_fixup_kernel(const float* __restrict__ partial, int splits, int64_t mn,
                                    int64_t n, const T* __restrict__ bias, T* __restrict__ y) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < mn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += partial[sp * mn + i];
    y[i] = from_float<T>(s + (bias != nullptr ? to_float(bias[i % n]) : 0.f));
  }
}

// Split of a row's K groups over gridDim.y, in whole units of `unit` groups. A forced
// split_k above 65535 (gridDim.y's limit) gets fewer, longer splits: a workspace sized for
// split_k splits still suffices.
struct SplitK {
  int64_t groups_per_split, splits;

  SplitK(int64_t k, int split_k, int unit = 1) {
    const int64_t groups = padded_k(k) / kGroup;
    const int64_t min_per_split = (groups + kMaxGridY - 1) / kMaxGridY;
    groups_per_split = (groups + split_k - 1) / split_k;
    if (groups_per_split < min_per_split) groups_per_split = min_per_split;
    groups_per_split = (groups_per_split + unit - 1) / unit * unit;
    splits = (groups + groups_per_split - 1) / groups_per_split;  // no empty splits
  }

  // y [m, n] = the sum of the splits' fp32 partials [splits, m, n] + bias (when splits > 1).
  template <typename T>
  void fix_up(const float* partial, int m, int64_t n, const T* bias, T* y,
              cudaStream_t stream) const {
    if (splits < 2) return;
    OTQ_LAUNCH(blocks_for(m * n, 256), 256, 0, stream, splitk_fixup_kernel<T>)(
        partial, static_cast<int>(splits), m * n, n, bias, y);
  }
};

// The arguments of a LUT GEMV launch (launchers.h, lut_linear), x and y untyped.
struct GemvArgs {
  const void* x;
  int64_t m, k;
  PlaneArgs planes;
  const float* codebook;
  bool per_channel;
  int64_t n;
  const void* bias;  // x's dtype, like y
  void* y;
  int split_k;
  float* workspace;
  cudaStream_t stream;

  template <typename T>
  const T* x_as() const { return static_cast<const T*>(x); }
  template <typename T>
  const T* bias_as() const { return static_cast<const T*>(bias); }
  template <typename T>
  T* y_as() const { return static_cast<T*>(y); }
};

// The launches of a GEMV for dispatch_gemv: grid (row blocks of rows_per_block, splits);
// x's rows in chunks of at most max_m, each launch(grid, groups_per_split, m0, rows,
// partial) followed by the split-K fix-up into y (partial: the workspace, or null
// without a split; splits of whole units of split_unit groups). launch returns a CUDA
// error code, 0 for none.
template <typename T, typename Launch>
int launch_in_m_chunks(const GemvArgs& a, int rows_per_block, int max_m, Launch launch,
                       int split_unit = 1) {
  const SplitK split(a.k, a.split_k, split_unit);
  const dim3 grid(static_cast<unsigned>((a.n + rows_per_block - 1) / rows_per_block),
                  static_cast<unsigned>(split.splits));
  float* partial = split.splits > 1 ? a.workspace : nullptr;
  for (int64_t m0 = 0; m0 < a.m; m0 += max_m) {
    const int rows = static_cast<int>(a.m - m0 < max_m ? a.m - m0 : max_m);
    const int err = launch(grid, split.groups_per_split, m0, rows, partial);
    if (err != 0) return err;
    split.fix_up(a.workspace, rows, a.n, a.bias_as<T>(), a.y_as<T>() + m0 * a.n, a.stream);
  }
  return static_cast<int>(cudaGetLastError());
}

// A GEMV launcher's entry point: checks sizes and bits (2..MAX_BITS), then calls
// Kernels::run<T, BITS> for dtype (float32 only when FLOAT32) and bits; otherwise
// cudaErrorInvalidValue.
template <typename Kernels, int MAX_BITS, bool FLOAT32>
int dispatch_gemv(const void* x, int dtype, int64_t m, int64_t k,
                  const uint32_t* const* planes, int bits, const float* codebook,
                  bool per_channel, int64_t n, const void* bias, void* y, int split_k,
                  float* workspace, void* stream) {
  if (bits < kMinBits || bits > MAX_BITS || m <= 0 || k <= 0 || n <= 0 || split_k < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  const GemvArgs args{x, m, k, plane_args(planes, bits, k), codebook, per_channel, n, bias, y,
                      split_k, workspace, as_stream(stream)};
  switch (dtype) {
    case kFloat32:
      if constexpr (FLOAT32) return run_bits<Kernels, float, kMinBits, MAX_BITS>(bits, args);
      break;
    case kFloat16:
      return run_bits<Kernels, __half, kMinBits, MAX_BITS>(bits, args);
    case kBFloat16:
      return run_bits<Kernels, __nv_bfloat16, kMinBits, MAX_BITS>(bits, args);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace otq::cuda
