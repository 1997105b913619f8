// LUT GEMV on tensor cores for small M, fp16/bf16 activations, 2-4-bit codes:
// y[m, n] = x[m, k] @ W^T + bias with W[j, i] = codebook[g(j), code(j, i)].
//
// A block owns 16 weight rows (the M of mma.m16n8k16) and its 4 warps take turns over the
// spans (two 32-column groups) of the block's K range; x's rows are the mma's N, 8 per
// n-tile, one or two n-tiles per launch (M <= 16) sharing every A fragment.
//
// K is permuted inside each span (a dot product does not care about the order of its
// terms, as long as A and B agree): lane t (= lane % 4) owns the span's columns
// 16t..16t+15 as two chunks of 8, and step s (0, 1) of the span takes every lane's chunk
// s: its pairs k = 0..3 (columns 16t + 8s + 2k, +1 of the span), pair 2h + q filling the
// k slots 2t + 8q, +1 of the step's mma h (0, 1). So a lane loads its x columns as one
// 16-byte vector per step and x row, and its
// codes as one aligned vector per plane and A row per span; each pair's codes are one
// "pair index" (2 * bits bits) looked up in a shared table of packed half2/bf162 pairs:
// one shared load per two weights, no per-weight decode. Every lane has its own copy of
// the table, so look-ups never conflict: [entry][32] words per layer, [2][entry][32] per
// channel (the lane's A rows g and g + 8; g = lane / 4). Groups outside whole spans (a
// split's first ones up to a span boundary, the whole ones after its last span, the
// partial one) run alone, lane t owning 8t..8t+7. One-row launches use spans of 4.
// Accumulation in fp32 (mma), the warps' results summed in shared memory; split-K and bias
// as in lut_gemv.cu. The tables, their build and LaneTile are in pair_tables.cuh (shared
// with lut_conv.cu).
#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"
#include "pair_tables.cuh"

namespace otq::cuda {
namespace {

// Groups per span in the main loop: 2 halves the code-word loads per weight against one
// group (each load touches 8 rows' lines) while each x load stays one line per x row. With
// one x row (all lanes read the same x), 4 halve them again for x loads of two lines.
constexpr int span_for(int m) { return m == 1 ? 4 : 2; }
// Spans whose words a warp loads ahead: 8 words per A row at 4 bits and spans of 2, else 2
// spans (at 4, ptxas spills the 2-bit kernel with two n-tiles).
template <int BITS, int SPAN>
constexpr int kAheadSpans = BITS == 4 && SPAN == 2 ? 4 : 2;
// Spans whose x columns a warp loads ahead (a divisor of kAheadSpans). x is read by every
// block and mostly comes from L2 (61% L1 hits at M = 16); Nsight Compute put half of the
// 4-bit per-channel kernel's stall cycles on L1TEX loads. Its 64 KB of tables already
// hold it to 3 blocks per SM, so 2 spans ahead cost no blocks there; elsewhere 1.
template <int BITS, bool PER_CHANNEL, int SPAN>
constexpr int kAheadXSpans = PER_CHANNEL && BITS == 4 && SPAN == 2 ? 2 : 1;

template <typename T, int BITS, bool PER_CHANNEL, int NT, int SPAN>
__global__ void __launch_bounds__(kThreads)
    lut_mma_kernel(const T* __restrict__ x, int m, int64_t k, bool vec_x, PlaneArgs planes,
                   const float* __restrict__ codebook, int64_t n,
                   const T* __restrict__ bias, T* __restrict__ y,
                   float* __restrict__ partial, int64_t groups_per_split) {
  uint32_t* table = dynamic_shared<uint32_t>();
  const int warp = threadIdx.x / kWarpSize;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kTileRows;
  build_pair_tables<T, BITS, PER_CHANNEL>(table, codebook, block_row, n);
  __syncthreads();

  const int64_t g_begin = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t g_end = min(padded_k(k) / kGroup, g_begin + groups_per_split);
  const int64_t whole_end = vec_x ? max(g_begin, min(g_end, k / kGroup)) : g_begin;  // in k
  // Whole spans from a multiple of SPAN groups (x's 128-byte lines at SPAN = 2); the
  // groups before and after them run one at a time.
  const int64_t span_begin = min((g_begin + SPAN - 1) / SPAN * SPAN, whole_end);
  const int64_t spans = (whole_end - span_begin) / SPAN, span_end = span_begin + spans * SPAN;
  float d[NT][4] = {};
  {
    const LaneTile<T, BITS, PER_CHANNEL, NT, SPAN> tile(table, x, m, k, planes, block_row, n);
    // The warp's spans warp, warp + kWarps, ... in chunks of kAhead, each span's words
    // loaded kAhead steps and its x columns kAheadX steps before use: a step is a few dozen
    // instructions, far shorter than a global load, so a warp keeps that many loads in
    // flight. The last (< kAhead) spans load in step.
    constexpr int kAhead = kAheadSpans<BITS, SPAN>, kAheadX = kAheadXSpans<BITS, PER_CHANNEL, SPAN>;
    static_assert(kAhead % kAheadX == 0, "x slots line up with the chunk's steps");
    const auto first_group = [&](int64_t span) { return span_begin + span * SPAN; };
    int64_t span = warp;
    if (span + (kAhead - 1) * kWarps < spans) {
      LaneWords<BITS, SPAN> ahead[kAhead][2];
      uint32_t x_ahead[kAheadX][SPAN][NT][4];
#pragma unroll
      for (int i = 0; i < kAhead; ++i) tile.load(ahead[i], first_group(span + i * kWarps));
#pragma unroll
      for (int i = 0; i < kAheadX; ++i)
        tile.template load_x<true>(x_ahead[i], first_group(span + i * kWarps), k);
#pragma unroll 1
      for (; span + (kAhead - 1) * kWarps < spans; span += kAhead * kWarps) {
#pragma unroll
        for (int i = 0; i < kAhead; ++i) {
          const LaneWords<BITS, SPAN> words[2] = {ahead[i][0], ahead[i][1]};
          uint32_t b[SPAN][NT][4];
#pragma unroll
          for (int s = 0; s < SPAN; ++s)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) b[s][j][c] = x_ahead[i % kAheadX][s][j][c];
          const int64_t next = span + (i + kAhead) * kWarps;
          if (next < spans) tile.load(ahead[i], first_group(next));
          const int64_t next_x = span + (i + kAheadX) * kWarps;
          if (next_x < spans)
            tile.template load_x<true>(x_ahead[i % kAheadX], first_group(next_x), k);
          tile.accumulate(d, words, b);
        }
      }
    }
#pragma unroll 1
    for (; span < spans; span += kWarps) tile.template accumulate<true>(d, first_group(span), k);
  }
  // The rest, one group per step: before span_begin and from span_end to whole_end (each
  // fewer than SPAN), and the groups past k (x masked).
  const LaneTile<T, BITS, PER_CHANNEL, NT, 1> step(table, x, m, k, planes, block_row, n);
  const int64_t lead = span_begin - g_begin;
#pragma unroll 1
  for (int64_t i = warp;; i += kWarps) {
    const int64_t group = i < lead ? g_begin + i : span_end + i - lead;
    if (group >= g_end) break;
    if (group < whole_end)
      step.template accumulate<true>(d, group, k);
    else
      step.template accumulate<false>(d, group, k);
  }

  store_block_sums<T, NT>(reinterpret_cast<float*>(table), d, m, n, block_row, bias, y,
                          partial);
}

// The kernel for a launch of `rows` x rows (1..16): one or two n-tiles, spans of 4 groups
// for one row.
template <typename T, int BITS, bool PER_CHANNEL>
auto kernel_for(int rows) {
  if (rows == 1) return lut_mma_kernel<T, BITS, PER_CHANNEL, 1, span_for(1)>;
  if (rows <= kTileBatch) return lut_mma_kernel<T, BITS, PER_CHANNEL, 1, span_for(2)>;
  return lut_mma_kernel<T, BITS, PER_CHANNEL, 2, span_for(2)>;
}

template <typename T, int BITS>
auto kernel_for(bool per_channel, int rows) {
  return per_channel ? kernel_for<T, BITS, true>(rows) : kernel_for<T, BITS, false>(rows);
}

// Tensor-core launches for dispatch_gemv: M in chunks of kMmaMaxM rows (one or two
// n-tiles), split-K fixed up.
struct MmaKernels {
  template <typename T, int BITS>
  static int run(const GemvArgs& a) {
    return launch_tile_kernel<T>(a, table_words<BITS>(a.per_channel), [&](int rows) {
      return kernel_for<T, BITS>(a.per_channel, rows);
    });
  }
};

}  // namespace

int lut_linear_mma(const void* x, int dtype, int64_t m, int64_t k, const uint32_t* const* planes,
                   int bits, const float* codebook, bool per_channel, int64_t n,
                   const void* bias, void* y, int split_k, float* workspace, void* stream) {
  return dispatch_gemv<MmaKernels, kMaxMmaBits, false>(x, dtype, m, k, planes, bits, codebook,
                                                        per_channel, n, bias, y, split_k,
                                                        workspace, stream);
}

}  // namespace otq::cuda
