// LUT GEMV on tensor cores for small M, fp16/bf16 activations, 2-4-bit codes:
// y[m, n] = x[m, k] @ W^T + bias with W[j, i] = codebook[g(j), code(j, i)].
//
// A block owns 16 weight rows (the M of mma.m16n8k16) and its 4 warps take turns over the
// 32-column groups of the block's K range; x's (at most 8) rows are the mma's N. A lane's
// A fragment holds pairs of adjacent columns of rows g and g + 8 (g = lane / 4), so it
// cuts 2-column "pair indices" straight out of the packed words (plane p contributes its
// 2 * w_p bits, at bit 2 * offset_p) and looks each up in a shared table of packed
// half2/bf162 pairs: one shared load per two weights, no per-weight decode. Pair tables
// have 2^(2 * bits) entries: per layer one copy per lane ([pair][32], conflict-free); per
// channel one table per row ([16 rows][pair]). Accumulation in fp32 (mma), the warps'
// results summed in shared memory; split-K and bias as in lut_gemv.cu.
#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileRows = 16;
constexpr int kTileBatch = 8;  // the mma's N: rows of x per launch
constexpr int kMaxMmaBits = 4;
static_assert(kTileBatch == kGemvMaxM, "one launch covers kGemvMaxM rows of x");

template <int BITS>
constexpr int kPairCount = 1 << (2 * BITS);

// Table words: per layer, one copy of every pair per lane; per channel, one table per row.
template <int BITS>
constexpr int table_words(bool per_channel) {
  return kPairCount<BITS> * (per_channel ? kTileRows : kWarpSize);
}

// Code of column `which` (0 or 1) of a pair index.
template <int BITS>
__device__ __forceinline__ int pair_code(int index, int which) {
  constexpr PlaneSpec spec = plane_spec(BITS);
  int code = 0;
#pragma unroll
  for (int p = 0; p < spec.count; ++p) {
    const int w = spec.width[p];
    const int field = (index >> (2 * spec.offset[p])) & ((1 << (2 * w)) - 1);
    code |= ((field >> (which * w)) & ((1 << w) - 1)) << spec.offset[p];
  }
  return code;
}

template <typename T, int BITS>
__device__ __forceinline__ uint32_t pair_entry(const float* __restrict__ book, int index) {
  return pack2(from_float<T>(__ldg(book + pair_code<BITS>(index, 0))),
               from_float<T>(__ldg(book + pair_code<BITS>(index, 1))));
}

// Per layer: table[pair * 32 + lane], written 4 lanes (16 bytes) at a time.
// Per channel: table[r * pairs + pair] for rows block_row + r (zeros past n).
template <typename T, int BITS>
__device__ __forceinline__ void build_pair_tables(uint32_t* table,
                                                  const float* __restrict__ codebook,
                                                  bool per_channel, int64_t block_row,
                                                  int64_t n) {
  constexpr int kPairs = kPairCount<BITS>;
  if (!per_channel) {
    for (int i = threadIdx.x; i < kPairs * kWarpSize / 4; i += kThreads) {
      const uint32_t e = pair_entry<T, BITS>(codebook, i / (kWarpSize / 4));
      reinterpret_cast<uint4*>(table)[i] = make_uint4(e, e, e, e);
    }
    return;
  }
  for (int i = threadIdx.x; i < kTileRows * kPairs; i += kThreads) {
    const int64_t row = block_row + i / kPairs;
    table[i] = row < n ? pair_entry<T, BITS>(codebook + row * (1 << BITS), i % kPairs) : 0u;
  }
}

// Pair index of columns (c, c + 1), c = 16 * h + 8 * q + 2 * t, of a group's words.
template <int BITS>
__device__ __forceinline__ int pair_index(const GroupWords<BITS>& words, int h, int q, int t) {
  constexpr PlaneSpec spec = plane_spec(BITS);
  int index = 0;
#pragma unroll
  for (int p = 0; p < spec.count; ++p) {
    const int w = spec.width[p], first_bit = w * (16 * h + 8 * q);
    const uint32_t word = words.w[p][first_bit / 32];  // constant index once unrolled
    const int field = (word >> (first_bit % 32 + 2 * t * w)) & ((1u << (2 * w)) - 1u);
    index |= field << (2 * spec.offset[p]);
  }
  return index;
}

// x[row][c], x[row][c + 1] packed; zero past k or for rows >= m.
template <typename T>
__device__ __forceinline__ uint32_t x_pair(const T* __restrict__ x, int m, int64_t k, int row,
                                           int64_t c) {
  if (row >= m) return 0u;
  const T* src = x + row * k;
  const T zero = from_float<T>(0.f);
  return pack2(c < k ? src[c] : zero, c + 1 < k ? src[c + 1] : zero);
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kThreads)
    lut_mma_kernel(const T* __restrict__ x, int m, int64_t k, PlaneArgs planes,
                   const float* __restrict__ codebook, bool per_channel, int64_t n,
                   const float* __restrict__ bias, T* __restrict__ y,
                   float* __restrict__ partial, int64_t groups_per_split) {
  uint32_t* table = dynamic_shared<uint32_t>();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, t = lane % 4;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kTileRows;
  build_pair_tables<T, BITS>(table, codebook, per_channel, block_row, n);
  __syncthreads();

  // Table word of pair p for A rows g (r = 0) and g + 8 (r = 1): p * stride + base[r].
  const int stride = per_channel ? 1 : kWarpSize;
  const int base[2] = {per_channel ? g * kPairCount<BITS> : lane,
                       per_channel ? (g + 8) * kPairCount<BITS> : lane};
  const int64_t rows[2] = {block_row + g, block_row + g + 8};
  const int64_t groups = padded_k(k) / kGroup;
  const int64_t g_begin = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t g_end = min(groups, g_begin + groups_per_split);
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t group = g_begin + warp; group < g_end; group += kWarps) {
    GroupWords<BITS> words[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (rows[r] < n)
        words[r].load(planes, rows[r], group);
      else
        words[r].clear();
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = group * kGroup + 16 * h + 2 * t;
      const uint32_t b[2] = {x_pair(x, m, k, g, c), x_pair(x, m, k, g, c + 8)};
      uint32_t a[4];
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          a[2 * q + r] = table[pair_index<BITS>(words[r], h, q, t) * stride + base[r]];
      mma_16816<T>(d, a, b);
    }
  }

  __syncthreads();  // every warp is done with the tables: reuse them for the warps' sums
  float* sums = reinterpret_cast<float*>(table);
#pragma unroll
  for (int i = 0; i < 4; ++i) sums[(warp * kWarpSize + lane) * 4 + i] = d[i];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sums[(w * kWarpSize + lane) * 4 + i];
    const int64_t row = rows[i / 2];
    const int batch = 2 * t + i % 2;
    if (row >= n || batch >= m) continue;
    if (partial != nullptr)
      partial[(static_cast<int64_t>(blockIdx.y) * m + batch) * n + row] = s;
    else
      y[batch * n + row] = from_float<T>(s + (bias != nullptr ? bias[row] : 0.f));
  }
}

template <typename T, int BITS>
int launch(const T* x, int64_t m, int64_t k, PlaneArgs planes, const float* codebook,
           bool per_channel, int64_t n, const float* bias, T* y, int split_k, float* workspace,
           cudaStream_t stream) {
  const SplitK split(k, split_k);
  const dim3 grid(static_cast<unsigned>((n + kTileRows - 1) / kTileRows),
                  static_cast<unsigned>(split.splits));
  const int sum_words = kThreads * 4;
  const int words = table_words<BITS>(per_channel);
  const size_t smem = sizeof(uint32_t) * (words > sum_words ? words : sum_words);
  for (int64_t m0 = 0; m0 < m; m0 += kTileBatch) {
    const int mc = static_cast<int>(m - m0 < kTileBatch ? m - m0 : kTileBatch);
    float* partial = split.splits > 1 ? workspace : nullptr;
    OTQ_LAUNCH(grid, kThreads, smem, stream, lut_mma_kernel<T, BITS>)(
        x + m0 * k, mc, k, planes, codebook, per_channel, n, bias, y + m0 * n, partial,
        split.groups_per_split);
    split.fix_up(workspace, mc, n, bias, y + m0 * n, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_bits(const void* x, int64_t m, int64_t k, PlaneArgs planes, int bits,
                const float* codebook, bool per_channel, int64_t n, const float* bias, void* y,
                int split_k, float* workspace, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  switch (bits) {
    case 2:
      return launch<T, 2>(xt, m, k, planes, codebook, per_channel, n, bias, yt, split_k,
                          workspace, stream);
    case 3:
      return launch<T, 3>(xt, m, k, planes, codebook, per_channel, n, bias, yt, split_k,
                          workspace, stream);
    case 4:
      return launch<T, 4>(xt, m, k, planes, codebook, per_channel, n, bias, yt, split_k,
                          workspace, stream);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int lut_linear_mma(const void* x, int dtype, int64_t m, int64_t k, const uint32_t* const* planes,
                   int bits, const float* codebook, bool per_channel, int64_t n,
                   const float* bias, void* y, int split_k, float* workspace, void* stream) {
  if (bits < kMinBits || bits > kMaxMmaBits || m <= 0 || k <= 0 || n <= 0 || split_k < 1)
    return static_cast<int>(cudaErrorInvalidValue);
  const PlaneArgs args = plane_args(planes, bits, k);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kFloat16:
      return launch_bits<__half>(x, m, k, args, bits, codebook, per_channel, n, bias, y,
                                 split_k, workspace, s);
    case kBFloat16:
      return launch_bits<__nv_bfloat16>(x, m, k, args, bits, codebook, per_channel, n, bias, y,
                                        split_k, workspace, s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace otq::cuda
