// lut_mma.cu's product (tensor cores, pair look-ups, 2-4-bit codes, M <= 16 per launch) on
// codes in fragment order (launchers.h, lut_linear_frag): a runtime layout in which the
// codes a warp needs for one span (16 weight rows x 128 columns) are one contiguous run, so
// every code load of a warp is 512 (or 256) contiguous bytes: 4 full lines, where the
// canonical layout gives 8 lines, one per A row pair, at 64 bytes each (16 bytes each at
// the 3-bit kernel's 1-bit plane).
//
// A block owns MT row blocks of 16 weight rows (MT = 1, or 2: 32-row blocks, where each x
// fragment a warp loads serves both row blocks' mmas) and its 4 warps take turns over the
// spans of its K range, as in lut_mma.cu. Step s (0..3) of a span takes the span's
// columns 32s..32s+31, lane t (= lane % 4) their 8 columns from 8t, so the 4 lanes of an
// x row read 64 contiguous bytes per step. K is padded to whole spans with code 0, its x
// masked to zero. 2-bit codes look their pairs up in registers (RegisterLutMma), not in
// shared tables.
#include <type_traits>

#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"
#include "pair_tables.cuh"

namespace otq::cuda {
namespace {

constexpr int kSpanGroups = kFragSpanColumns / kGroup;  // steps per span
static_assert(kSpanGroups == 4, "a lane's 8 columns per step, 4 lanes per x row");

// Words of a plane of width w that a lane holds per span: 2 A rows x 4 steps x 8 codes.
OTQ_HD constexpr int frag_words(int width) { return 2 * width; }
// The lane's words in one 16-byte (or for w = 1, 8-byte) load; a span's loads are
// part-major, so each is 32 lanes x that many contiguous bytes.
OTQ_HD constexpr int frag_part_words(int width) { return width == 1 ? 2 : 4; }

// A lane's code words of one span, per plane (frag_words(w) of them; the widest first).
template <int BITS>
struct FragWords {
  uint32_t w[kPlanes<BITS>][frag_words(plane_spec(BITS).width[0])];
};

// 8-bit codes (per layer only): a table of single entries, [256][32] words (the entry in
// the low half), one copy per lane so that look-ups never conflict; two look-ups and one
// byte permute per A register. Per-channel 8-bit tables (256 entries per row) do not fit.
template <typename T, int NT>
struct ByteLutMma {
  SharedAddr lane_table;  // entry c of the lane's copy: the word at lane_table + c * 128

  ByteLutMma() = default;
  // Fills the table (the caller synchronizes) from the layer's codebook.
  __device__ __forceinline__ ByteLutMma(uint32_t* table, const float* __restrict__ codebook) {
    uint4* out = reinterpret_cast<uint4*>(table);  // uint4 i: lanes 4(i % 8).. of entry i / 8
    for (int i = threadIdx.x; i < 256 * kWarpSize / 4; i += kThreads) {
      const uint32_t e = pack2(from_float<T>(__ldg(codebook + i / 8)), from_float<T>(0.f));
      out[i] = make_uint4(e, e, e, e);
    }
    lane_table = shared_addr(table + threadIdx.x % kWarpSize);
  }

  // The entry of byte i of `codes`: the byte zero-extended by one PRMT, its address one
  // multiply-add.
  __device__ __forceinline__ uint32_t entry(uint32_t codes, int i) const {
    return load_shared_u32(lane_table, __byte_perm(codes, 0u, 0x4440u | i) * 128u);
  }

  // Entries of bytes 2q and 2q + 1 of `codes` as a pair, the first in the low half.
  __device__ __forceinline__ uint32_t pair(uint32_t codes, int q) const {
    return __byte_perm(entry(codes, 2 * q), entry(codes, 2 * q + 1), 0x5410);
  }

  // d[j] += one step (16 rows x 32 columns): codes[r][h] holds the lane's columns 4h..4h+3
  // of A row r, one byte each; lane pair 2h + q (bytes 2q, 2q + 1 of codes[r][h]) fills
  // the k slots 2t + 8q, +1 of mma h, as in mma_step.
  __device__ __forceinline__ void step(float (&d)[NT][4], const uint32_t (&codes)[2][2],
                                       const uint32_t (&b)[NT][4]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a[4] = {pair(codes[0][h], 0), pair(codes[1][h], 0), pair(codes[0][h], 1),
                             pair(codes[1][h], 1)};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t pairs[2] = {b[j][2 * h], b[j][2 * h + 1]};
        mma_16816<T>(d[j], a, pairs);
      }
    }
  }
};

// 2-bit codes look their pairs up in registers (RegisterLutMma), wider ones in the shared
// pair tables.
template <int BITS>
constexpr bool kRegisterLut = BITS == 2;

template <typename T, int BITS, bool PER_CHANNEL, int NT>
using FragMma = std::conditional_t<
    kRegisterLut<BITS>, RegisterLutMma<T, PER_CHANNEL, NT>,
    std::conditional_t<BITS == 8, ByteLutMma<T, NT>, LaneMma<T, BITS, PER_CHANNEL, NT>>>;

// The look-ups of the row block from block_row: the shared pair tables (built here; the
// caller synchronizes) or the lane's registers.
template <typename T, int BITS, bool PER_CHANNEL, int NT>
__device__ __forceinline__ FragMma<T, BITS, PER_CHANNEL, NT> make_mma(
    uint32_t* table, const float* __restrict__ codebook, int64_t block_row, int64_t n) {
  if constexpr (kRegisterLut<BITS>) {
    return RegisterLutMma<T, PER_CHANNEL, NT>(codebook, block_row, n);
  } else if constexpr (BITS == 8) {
    return ByteLutMma<T, NT>(table, codebook);
  } else {
    build_pair_tables<T, BITS, PER_CHANNEL>(table, codebook, block_row, n);
    return LaneMma<T, BITS, PER_CHANNEL, NT>(table);
  }
}

// Shared table words of a block of MT row blocks: per-channel tables for each (the 32-row
// blocks take 2-bit codes, in registers, or 3-bit ones, 16 KB each), one per-layer table.
template <int BITS>
constexpr int frag_table_words(bool per_channel, int mt) {
  return kRegisterLut<BITS> ? 0
         : BITS == 8        ? 256 * kWarpSize
                            : table_words<BITS>(per_channel) * (per_channel ? mt : 1);
}

// Whether 32-row blocks (MT = 2) take these codes: their per-channel 4-bit tables (128 KB)
// would leave one block per SM.
OTQ_HD constexpr bool frag_wide_fits(int bits, bool per_channel) {
  return !per_channel || bits <= 3;
}

// The look-ups of each of the block's MT row blocks (one per-layer table serves all).
template <typename T, int BITS, bool PER_CHANNEL, int NT, int MT>
struct BlockMmas {
  FragMma<T, BITS, PER_CHANNEL, NT> tile[MT];

  __device__ __forceinline__ BlockMmas(uint32_t* table, const float* __restrict__ codebook,
                                       int64_t block_row, int64_t n)
      : tile{make_mma<T, BITS, PER_CHANNEL, NT>(table, codebook, block_row, n)} {
#pragma unroll
    for (int i = 1; i < MT; ++i) {
      if constexpr (PER_CHANNEL)
        tile[i] = make_mma<T, BITS, PER_CHANNEL, NT>(table + i * table_words<BITS>(true),
                                                     codebook, block_row + i * kTileRows, n);
      else
        tile[i] = tile[0];
    }
  }
};

// One lane's view of its block in fragment order: where its words of each row block lie
// (a row block past the layout's last reads the last, for D rows never stored), its x rows.
template <typename T, int BITS, int NT, int MT, typename Mmas>
struct FragLane {
  Mmas mmas;
  const uint32_t* word[MT][kPlanes<BITS>];  // the lane's first word of span 0
  const T* x_row[NT];
  int t;

  __device__ __forceinline__ FragLane(const Mmas& mmas_, const T* x, int m, int64_t k,
                                      const PlaneArgs& planes, int64_t spans,
                                      int64_t row_blocks)
      : mmas(mmas_) {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
    const int lane = threadIdx.x % kWarpSize, g = lane / 4;
    t = lane % 4;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int64_t block = min(static_cast<int64_t>(blockIdx.x) * MT + i, row_blocks - 1);
#pragma unroll
      for (int p = 0; p < kPlanes<BITS>; ++p) {
        const int width = kSpec.width[p];
        word[i][p] = planes.ptr[p] + block * spans * kWarpSize * frag_words(width) +
                     lane * frag_part_words(width);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
      x_row[j] = x + static_cast<int64_t>(8 * j + g < m ? 8 * j + g : m - 1) * k;
  }

  __device__ __forceinline__ void load(FragWords<BITS> (&words)[MT], int64_t span) const {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
#pragma unroll
    for (int r = 0; r < MT; ++r)
#pragma unroll
      for (int p = 0; p < kPlanes<BITS>; ++p) {
        const int width = kSpec.width[p], part = frag_part_words(width);
        const uint32_t* src = word[r][p] + span * kWarpSize * frag_words(width);
#pragma unroll
        for (int i = 0; i < frag_words(width) / part; ++i)
          load_words(words[r].w[p] + i * part, src + i * kWarpSize * part, part);
      }
  }

  // b[s][j]: the lane's 8 x columns of step s of `span` in n-tile j. WHOLE: the span lies
  // inside k and x's rows are 16-byte aligned (vector loads); else masked pairs.
  template <bool WHOLE>
  __device__ __forceinline__ void load_x(uint32_t (&b)[kSpanGroups][NT][4], int64_t span,
                                         int64_t k) const {
#pragma unroll
    for (int s = 0; s < kSpanGroups; ++s)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        x_lane<T, WHOLE>(b[s][j], x_row[j], k,
                         span * kFragSpanColumns + s * kGroup + kLaneColumns * t);
  }

  // d[i][j] += the span's rows of row block i x 128 columns times n-tile j's x (8 * NT * MT
  // mmas; each step's x fragments serve every row block).
  __device__ __forceinline__ void accumulate(float (&d)[MT][NT][4],
                                             const FragWords<BITS> (&words)[MT],
                                             const uint32_t (&b)[kSpanGroups][NT][4]) const {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
#pragma unroll
    for (int s = 0; s < kSpanGroups; ++s)
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const FragWords<BITS>& w = words[i];
        if constexpr (BITS == 8) {  // a row's 8 codes of the step: 2 words
          const uint32_t codes[2][2] = {{w.w[0][2 * s], w.w[0][2 * s + 1]},
                                        {w.w[0][8 + 2 * s], w.w[0][9 + 2 * s]}};
          mmas.tile[i].step(d[i], codes, b[s]);
        } else {
          uint32_t chunk_bits[2][kPlanes<BITS>];
#pragma unroll
          for (int r = 0; r < 2; ++r)
#pragma unroll
            for (int p = 0; p < kPlanes<BITS>; ++p) {
              const int bit = (r * kSpanGroups + s) * kLaneColumns * kSpec.width[p];
              chunk_bits[r][p] = w.w[p][bit / 32] >> bit % 32;
            }
          mmas.tile[i].step(d[i], chunk_bits, b[s]);
        }
      }
  }
};

// Spans whose words a warp loads ahead: 2-4 KB in flight per warp (MT row blocks' words
// per span).
template <int BITS, int MT>
constexpr int kFragAhead = (BITS >= 4 ? 2 : 4) / MT;

template <typename T, int BITS, bool PER_CHANNEL, int NT, int MT>
__global__ void __launch_bounds__(kThreads)
    lut_frag_kernel(const T* __restrict__ x, int m, int64_t k, bool vec_x, PlaneArgs planes,
                    const float* __restrict__ codebook, int64_t n,
                    const T* __restrict__ bias, T* __restrict__ y,
                    float* __restrict__ partial, int64_t spans_per_split) {
  uint32_t* table = dynamic_shared<uint32_t>();
  const int warp = threadIdx.x / kWarpSize;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kTileRows * MT;
  using Mmas = BlockMmas<T, BITS, PER_CHANNEL, NT, MT>;
  const Mmas mmas(table, codebook, block_row, n);
  if constexpr (!kRegisterLut<BITS>) __syncthreads();

  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * spans_per_split;
  const int64_t s_end = min(frag_spans(k), s_begin + spans_per_split);
  // Spans before v_end lie inside k with x 16-byte aligned: vector x loads.
  const int64_t v_end = max(s_begin, min(s_end, vec_x ? k / kFragSpanColumns : 0));
  float d[MT][NT][4] = {};
  {
    const FragLane<T, BITS, NT, MT, Mmas> lane(mmas, x, m, k, planes, frag_spans(k),
                                               (n + kTileRows - 1) / kTileRows);
    // The warp's spans s_begin + warp, + kWarps, ... before v_end in chunks of kAhead, each
    // span's words loaded kAhead steps and its x columns one step before use; the last
    // (< kAhead) of them in step.
    constexpr int kAhead = kFragAhead<BITS, MT>;
    static_assert(kAhead >= 1, "the chunk loop advances by kAhead spans");
    int64_t span = s_begin + warp;
    if (span + (kAhead - 1) * kWarps < v_end) {
      FragWords<BITS> ahead[kAhead][MT];
      uint32_t x_ahead[kSpanGroups][NT][4];
#pragma unroll
      for (int i = 0; i < kAhead; ++i) lane.load(ahead[i], span + i * kWarps);
      lane.template load_x<true>(x_ahead, span, k);
#pragma unroll 1
      for (; span + (kAhead - 1) * kWarps < v_end; span += kAhead * kWarps) {
#pragma unroll
        for (int i = 0; i < kAhead; ++i) {
          const int64_t now = span + i * kWarps;
          FragWords<BITS> words[MT];
#pragma unroll
          for (int r = 0; r < MT; ++r) words[r] = ahead[i][r];
          uint32_t b[kSpanGroups][NT][4];
#pragma unroll
          for (int s = 0; s < kSpanGroups; ++s)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
              for (int c = 0; c < 4; ++c) b[s][j][c] = x_ahead[s][j][c];
          if (now + kAhead * kWarps < v_end) lane.load(ahead[i], now + kAhead * kWarps);
          if (now + kWarps < v_end) lane.template load_x<true>(x_ahead, now + kWarps, k);
          lane.accumulate(d, words, b);
        }
      }
    }
#pragma unroll 1
    for (; span < s_end; span += kWarps) {
      FragWords<BITS> words[MT];
      lane.load(words, span);
      uint32_t b[kSpanGroups][NT][4];
      if (span < v_end)
        lane.template load_x<true>(b, span, k);
      else
        lane.template load_x<false>(b, span, k);
      lane.accumulate(d, words, b);
    }
  }
#pragma unroll
  for (int i = 0; i < MT; ++i)
    store_block_sums<T, NT>(reinterpret_cast<float*>(table), d[i], m, n,
                            block_row + i * kTileRows, bias, y, partial);
}

template <typename T, int BITS, bool PER_CHANNEL, int MT>
auto kernel_for(int rows) {
  return rows <= kTileBatch ? lut_frag_kernel<T, BITS, PER_CHANNEL, 1, MT>
                            : lut_frag_kernel<T, BITS, PER_CHANNEL, 2, MT>;
}

// The kernel for the codebook kind and row blocks per block: MT = 2 when WIDE (8-bit
// codes: per layer only; WIDE only where frag_wide_fits: FragKernels::launch checks both,
// and without that check a WIDE launch of codes that do not fit gets no kernel at all).
template <typename T, int BITS, bool PER_CHANNEL, bool WIDE>
auto wide_kernel(int rows) {
  if constexpr (!WIDE || frag_wide_fits(BITS, PER_CHANNEL)) {
    return kernel_for<T, BITS, PER_CHANNEL, WIDE ? 2 : 1>(rows);
  } else {
    return static_cast<decltype(kernel_for<T, BITS, PER_CHANNEL, 1>(rows))>(nullptr);
  }
}

template <typename T, int BITS, bool WIDE>
auto per_channel_kernel(bool per_channel, int rows) {
  if constexpr (BITS == 8) {
    return wide_kernel<T, BITS, false, WIDE>(rows);
  } else {
    return per_channel ? wide_kernel<T, BITS, true, WIDE>(rows)
                       : wide_kernel<T, BITS, false, WIDE>(rows);
  }
}

// Launches for dispatch_gemv (bits 2-4 and, per layer, 8): M in chunks of kMmaMaxM rows
// (one or two n-tiles), blocks of kTileRows * MT weight rows (MT = 2 when WIDE), K split on
// span boundaries, fixed up.
template <bool WIDE>
struct FragKernels {
  template <typename T, int BITS>
  static int run(const GemvArgs& a) {
    if constexpr (BITS > kMaxMmaBits && BITS < 8) {
      return static_cast<int>(cudaErrorInvalidValue);
    } else {
      if (BITS == 8 && a.per_channel) return static_cast<int>(cudaErrorInvalidValue);
      return launch<T, BITS>(a);
    }
  }

  template <typename T, int BITS>
  static int launch(const GemvArgs& a) {
    constexpr int kMt = WIDE ? 2 : 1;
    if (WIDE && !frag_wide_fits(BITS, a.per_channel))  // the grid below is sized for 2
      return static_cast<int>(cudaErrorInvalidValue);
    return launch_tile_kernel<T>(
        a, frag_table_words<BITS>(a.per_channel, kMt),
        [&](int rows) { return per_channel_kernel<T, BITS, WIDE>(a.per_channel, rows); },
        kSpanGroups, kTileRows * kMt);
  }
};

}  // namespace

int lut_linear_frag(const void* x, int dtype, int64_t m, int64_t k,
                    const uint32_t* const* planes, int bits, const float* codebook,
                    bool per_channel, int64_t n, const void* bias, void* y, int split_k,
                    float* workspace, int block_rows, void* stream) {
  if (block_rows == 2 * kTileRows)
    return dispatch_gemv<FragKernels<true>, 8, false>(x, dtype, m, k, planes, bits, codebook,
                                                       per_channel, n, bias, y, split_k,
                                                       workspace, stream);
  if (block_rows != kTileRows) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_gemv<FragKernels<false>, 8, false>(x, dtype, m, k, planes, bits, codebook,
                                                      per_channel, n, bias, y, split_k,
                                                      workspace, stream);
}

}  // namespace otq::cuda
