// Pair look-up tables for the tensor-core LUT kernels (lut_mma.cu, lut_conv.cu,
// lut_frag.cu): a block of 4 warps owns 16 weight rows (the M of mma.m16n8k16); the codes
// of two adjacent columns of a row form one "pair index" looked up in a shared table of
// packed half2/bf162 pairs, one copy per lane so that look-ups never conflict (LaneMma),
// or for 2-bit codes in the lane's registers (RegisterLutMma). Also mma_step (one 16 x 32
// step of mmas), LaneTile (a lane's view of its block in the canonical layout), x_lane and
// the linear kernels' epilogue (store_block_sums).
#pragma once

#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"

namespace otq::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileRows = 16;
constexpr int kTileBatch = 8;  // the mma's N: rows of x per n-tile
constexpr int kMaxTiles = kMmaMaxM / kTileBatch;  // n-tiles per launch, sharing each A
constexpr int kMaxMmaBits = 4;
constexpr int kLaneColumns = kGroup / 4;  // a lane's columns of a group: 4 pairs

// A pair index packs, for each plane p (width w_p, code bits from offset o_p), the plane's
// 2 * w_p bits of the pair (first column low) at bit 2 * o_p: 4 bits: a byte of the lane's
// word; 2 bits: a nibble; 3 bits: the 2-bit plane's nibble, the 1-bit plane's two bits
// above it. So a table has 4^bits entries.
template <int BITS>
constexpr int kEntries = 1 << (2 * BITS);

template <int BITS>
constexpr int kPlanes = plane_spec(BITS).count;

// Table words: one copy of every entry per lane, per layer or (per channel) for each of
// the lane's two A rows: [r][entry][lane], lane-major so that any 32 look-ups hit 32 banks.
template <int BITS>
OTQ_HD constexpr int table_words(bool per_channel) {
  return kEntries<BITS> * kWarpSize * (per_channel ? 2 : 1);
}

struct CodePair {
  int first, second;  // the codes of the pair's columns
};

template <int BITS>
OTQ_HD constexpr CodePair entry_codes(int entry) {
  constexpr PlaneSpec spec = plane_spec(BITS);
  CodePair codes{0, 0};
  for (int p = 0; p < spec.count; ++p) {
    const int width = spec.width[p], mask = (1 << width) - 1;
    const int field = entry >> (2 * spec.offset[p]);
    codes.first |= (field & mask) << spec.offset[p];
    codes.second |= (field >> width & mask) << spec.offset[p];
  }
  return codes;
}

template <typename T>
__device__ __forceinline__ uint32_t pair_entry(const float* __restrict__ book, CodePair codes) {
  return pack2(from_float<T>(book[codes.first]), from_float<T>(book[codes.second]));
}

// table[(r * entries + entry) * 32 + lane] (r = 0 only per layer), written 16 bytes at a
// time: the 4 lanes 4g..4g+3 share A rows g + 8r, i.e. uint4 (r * entries + entry) * 8 + g
// holds lanes 4g..4g+3. Thread x writes quad g = x % 8 of the entries x / 8 + 16i, so its
// codebook row (block_row + g + 8r per channel, clamped to n - 1) is fixed and codebook
// reads and stores sit at immediate offsets from per-thread bases. All reads of a row
// precede its stores.
template <typename T, int BITS, bool PER_CHANNEL>
__device__ __forceinline__ void build_pair_tables(uint32_t* table,
                                                  const float* __restrict__ codebook,
                                                  int64_t block_row, int64_t n) {
  constexpr int kQuads = kWarpSize / 4;
  constexpr int kStride = kThreads / kQuads;  // entries that one pass of the block writes
  constexpr int kPerThread = kEntries<BITS> / kStride;
  static_assert(kPerThread * kStride == kEntries<BITS>, "whole passes over the entries");
  const int g = threadIdx.x % kQuads, first = threadIdx.x / kQuads;
  uint4* out = reinterpret_cast<uint4*>(table) + first * kQuads + g;
#pragma unroll
  for (int r = 0; r < (PER_CHANNEL ? 2 : 1); ++r) {
    const int64_t row = min(block_row + g + 8 * r, n - 1);  // as LaneTile clamps A rows
    const float* book = PER_CHANNEL ? codebook + row * (1 << BITS) : codebook;
    uint32_t entry[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      entry[i] = pair_entry<T>(book, entry_codes<BITS>(first + kStride * i));
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      out[(r * kEntries<BITS> + kStride * i) * kQuads] =
          make_uint4(entry[i], entry[i], entry[i], entry[i]);
  }
}

// A lane's 8 x columns c..c+7 of one x row as 4 packed pairs. WHOLE: c + 8 <= k and x_row + c
// 16-byte aligned, one vector load; else masked pairs, zero past k.
template <typename T, bool WHOLE>
__device__ __forceinline__ void x_lane(uint32_t (&pairs)[4], const T* __restrict__ x_row,
                                       int64_t k, int64_t c) {
  if (WHOLE) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(x_row + c));
    pairs[0] = v.x, pairs[1] = v.y, pairs[2] = v.z, pairs[3] = v.w;
    return;
  }
  const T zero = from_float<T>(0.f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t col = c + 2 * i;
    pairs[i] = pack2(col < k ? x_row[col] : zero, col + 1 < k ? x_row[col + 1] : zero);
  }
}

// Pair index of a lane's pair `pair` (columns 2 * pair, +1 of a chunk of 8), from the
// chunk's bits of each plane shifted so that the chunk's columns start at bit 0.
template <int BITS>
__device__ __forceinline__ uint32_t pair_index(const uint32_t (&chunk_bits)[kPlanes<BITS>],
                                               int pair) {
  constexpr PlaneSpec kSpec = plane_spec(BITS);
  static_assert(BITS >= 2 && BITS <= kMaxMmaBits, "pair tables hold 2-4-bit codes");
  uint32_t index = 0;
#pragma unroll
  for (int p = 0; p < kPlanes<BITS>; ++p) {
    const int bits = 2 * kSpec.width[p];
    index |= (chunk_bits[p] >> (bits * pair) & ((1u << bits) - 1u)) << (2 * kSpec.offset[p]);
  }
  return index;
}

// Bits of a plane of width w that a lane owns in a span of SPAN groups (8 columns per
// group), and the words they take (at least one: below 32 bits they share a word).
template <int SPAN>
OTQ_HD constexpr int lane_bits(int width) { return kLaneColumns * SPAN * width; }
template <int SPAN>
OTQ_HD constexpr int lane_words(int width) {
  return lane_bits<SPAN>(width) < 32 ? 1 : lane_bits<SPAN>(width) / 32;
}

// The words of a span that hold one A row's lane columns: per plane lane_words (<= SPAN)
// words, unshifted.
template <int BITS, int SPAN>
struct LaneWords {
  uint32_t w[kPlanes<BITS>][SPAN];
};

// `count` (1, 2 or 4) consecutive words from p, aligned to count words.
__device__ __forceinline__ void load_words(uint32_t* out, const uint32_t* p, int count) {
  if (count == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if (count == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    out[0] = v.x, out[1] = v.y;
  } else {
    out[0] = __ldg(p);
  }
}

// d[j] += one step: 16 rows x 32 columns (two mmas per n-tile, each A fragment looked up
// once through lut.lookup(r, pair index)). chunk_bits[r][p]: plane p's bits of the lane's 8
// columns of A row r, from bit 0 (bits above them are ignored); b[j]: the same columns of
// n-tile j's x, 4 packed pairs. Lane pair 2h + q fills the k slots 2t + 8q, +1 of mma h
// (t = lane % 4).
template <typename T, int BITS, int NT, typename Lut>
__device__ __forceinline__ void mma_step(const Lut& lut, float (&d)[NT][4],
                                         const uint32_t (&chunk_bits)[2][kPlanes<BITS>],
                                         const uint32_t (&b)[NT][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t a[4];
#pragma unroll
    for (int q = 0; q < 2; ++q)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        a[2 * q + r] = lut.lookup(r, pair_index<BITS>(chunk_bits[r], 2 * h + q));
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint32_t pairs[2] = {b[j][2 * h], b[j][2 * h + 1]};
      mma_16816<T>(d[j], a, pairs);
    }
  }
}

// A lane's pair tables and mma steps: A rows g and g + 8 (r = 0, 1) of its block, g =
// lane / 4; in n-tile j, B column g is row 8 * j + g of x.
template <typename T, int BITS, bool PER_CHANNEL, int NT>
struct LaneMma {
  SharedAddr lane_table[2];  // entry e of A row r: the word at lane_table[r] + e * 128

  LaneMma() = default;
  __device__ __forceinline__ explicit LaneMma(const uint32_t* table_) {
    const int lane = threadIdx.x % kWarpSize;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      lane_table[r] =
          shared_addr(table_ + (PER_CHANNEL ? r * kEntries<BITS> * kWarpSize : 0) + lane);
  }

  // The table word of `entry` for A row r (one shift-add for the address).
  __device__ __forceinline__ uint32_t lookup(int r, uint32_t entry) const {
    return load_shared_u32(lane_table[r], entry * (4 * kWarpSize));
  }

  __device__ __forceinline__ void step(float (&d)[NT][4],
                                       const uint32_t (&chunk_bits)[2][kPlanes<BITS>],
                                       const uint32_t (&b)[NT][4]) const {
    mma_step<T, BITS, NT>(*this, d, chunk_bits, b);
  }
};

// LaneMma for 2-bit codes without shared tables: each lane keeps its A rows' 4 codebook
// entries in registers (2 words per row, entry c in bytes 2c, 2c + 1) and looks a pair up
// with one byte permute (PRMT). The shared-memory pipe, which Nsight Compute had as the
// busiest unit of lut_mma, then carries no look-ups at all.
template <typename T, bool PER_CHANNEL, int NT>
struct RegisterLutMma {
  uint32_t book[2][2];

  RegisterLutMma() = default;
  __device__ __forceinline__ RegisterLutMma(const float* __restrict__ codebook,
                                            int64_t block_row, int64_t n) {
    const int g = threadIdx.x % kWarpSize / 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float* e = codebook + (PER_CHANNEL ? min(block_row + g + 8 * r, n - 1) * 4 : 0);
#pragma unroll
      for (int w = 0; w < 2; ++w)
        book[r][w] = pack2(from_float<T>(__ldg(e + 2 * w)), from_float<T>(__ldg(e + 2 * w + 1)));
    }
  }

  // The byte selectors of 2 pairs from their 4 codes (bits 0-7 of `codes`, 2 bits each):
  // code c becomes byte c * 0x22 + 0x10 (nibbles 2c, 2c + 1: entry c's two bytes), so pair
  // 0's selector is the low 16 bits and pair 1's the high 16.
  __device__ __forceinline__ static uint32_t selectors(uint32_t codes) {
    codes = (codes | codes << 12) & 0x000F000Fu;  // codes 0-1 in bits 0-3, 2-3 in 16-19
    codes = (codes | codes << 6) & 0x03030303u;   // code i in byte i
    return codes * 0x22u + 0x10101010u;
  }

  // d[j] += one step as mma_step, the 4 pairs of each A row looked up together.
  __device__ __forceinline__ void step(float (&d)[NT][4],
                                       const uint32_t (&chunk_bits)[2][kPlanes<2>],
                                       const uint32_t (&b)[NT][4]) const {
    uint32_t pair[2][4];  // [r][lane pair]
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const uint32_t sel = selectors(chunk_bits[r][0] >> (8 * half) & 0xFFu);
        pair[r][2 * half] = __byte_perm(book[r][0], book[r][1], sel);
        pair[r][2 * half + 1] = __byte_perm(book[r][0], book[r][1], sel >> 16);
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a[4] = {pair[0][2 * h], pair[1][2 * h], pair[0][2 * h + 1],
                             pair[1][2 * h + 1]};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t pairs[2] = {b[j][2 * h], b[j][2 * h + 1]};
        mma_16816<T>(d[j], a, pairs);
      }
    }
  }
};

// One lane's view of its block in the canonical code layout: LaneMma's A rows and x rows
// (rows past n and x rows past m are clamped to the last one: they only feed D
// rows/columns that are never written, so no lane needs a branch), and where its code
// bits lie.
//
// K runs in spans of SPAN groups (32 * SPAN columns, from group g0): lane t owns the span's
// columns 8 * (SPAN * t + s) .. +7 for s < SPAN, chunk s of its 8 * SPAN contiguous
// columns, and step s of the span (two mmas, as one group before) takes every lane's
// chunk s. So a lane's code bits of a span are one aligned vector per plane and A row,
// and its x columns one 16-byte vector per step and x row; with SPAN = 2 the 4 lanes of
// an x row read 64 adjacent columns in a step, one 128-byte line when g0 is even.
template <typename T, int BITS, bool PER_CHANNEL, int NT, int SPAN>
struct LaneTile : LaneMma<T, BITS, PER_CHANNEL, NT> {
  const uint32_t* plane_word[2][kPlanes<BITS>];  // the lane's first word of span g0 = 0
  uint32_t shift[kPlanes<BITS>];  // where the lane's bits start in it (0 from 32 bits on)
  const T* x_row[NT];
  int t;

  __device__ __forceinline__ LaneTile(const uint32_t* table_, const T* x, int m, int64_t k,
                                      const PlaneArgs& planes, int64_t block_row, int64_t n)
      : LaneMma<T, BITS, PER_CHANNEL, NT>(table_) {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
    const int lane = threadIdx.x % kWarpSize, g = lane / 4;
    t = lane % 4;
#pragma unroll
    for (int p = 0; p < kPlanes<BITS>; ++p) shift[p] = t * lane_bits<SPAN>(kSpec.width[p]) % 32;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = min(block_row + g + 8 * r, n - 1);
#pragma unroll
      for (int p = 0; p < kPlanes<BITS>; ++p)
        plane_word[r][p] = planes.ptr[p] + row * planes.row_words[p] +
                           t * lane_bits<SPAN>(kSpec.width[p]) / 32;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
      x_row[j] = x + static_cast<int64_t>(8 * j + g < m ? 8 * j + g : m - 1) * k;
  }

  // The words of the span from group g0 for the lane's A rows g and g + 8.
  __device__ __forceinline__ void load(LaneWords<BITS, SPAN> (&words)[2], int64_t g0) const {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int p = 0; p < kPlanes<BITS>; ++p)
        load_words(words[r].w[p], plane_word[r][p] + g0 * kSpec.width[p],
                   lane_words<SPAN>(kSpec.width[p]));
  }

  // The lane's x columns of the span from g0 in each n-tile j: b[s][j] = 4 packed pairs of
  // step s.
  template <bool WHOLE>
  __device__ __forceinline__ void load_x(uint32_t (&b)[SPAN][NT][4], int64_t g0,
                                         int64_t k) const {
#pragma unroll
    for (int s = 0; s < SPAN; ++s)
#pragma unroll
      for (int j = 0; j < NT; ++j)
        x_lane<T, WHOLE>(b[s][j], x_row[j], k, g0 * kGroup + kLaneColumns * (SPAN * t + s));
  }

  // d[j] += the 16 rows x 32 * SPAN columns of the span from g0 times the matching columns
  // of n-tile j's x (2 * SPAN * NT mmas, each A fragment looked up once).
  template <bool WHOLE>
  __device__ __forceinline__ void accumulate(float (&d)[NT][4], int64_t g0, int64_t k) const {
    LaneWords<BITS, SPAN> words[2];
    load(words, g0);
    uint32_t b[SPAN][NT][4];
    load_x<WHOLE>(b, g0, k);
    accumulate(d, words, b);
  }

  // The same with the span's words and x columns already loaded.
  __device__ __forceinline__ void accumulate(float (&d)[NT][4],
                                             const LaneWords<BITS, SPAN> (&words)[2],
                                             const uint32_t (&b)[SPAN][NT][4]) const {
    constexpr PlaneSpec kSpec = plane_spec(BITS);
#pragma unroll
    for (int s = 0; s < SPAN; ++s) {
      uint32_t chunk_bits[2][kPlanes<BITS>];
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int p = 0; p < kPlanes<BITS>; ++p) {
          const int bit = kLaneColumns * s * kSpec.width[p];  // chunk s's, in the lane's bits
          chunk_bits[r][p] = lane_bits<SPAN>(kSpec.width[p]) >= 32
                               ? words[r].w[p][bit / 32] >> bit % 32
                               : words[r].w[p][0] >> shift[p] >> bit;
        }
      this->step(d, chunk_bits, b[s]);
    }
  }
};

// The end of a linear tile kernel (lut_mma.cu, lut_frag.cu): sums the 4 warps' D tiles
// d (each warp's share of K) through shared memory (`sums`: the tables, every warp done
// with them; 4 * kThreads * NT floats) and writes A row block_row + r, x row b of the
// result to y [m, n] (+ bias) or, with a split, to partial [splits, m, n] at split
// blockIdx.y.
template <typename T, int NT>
__device__ __forceinline__ void store_block_sums(float* sums, const float (&d)[NT][4], int m,
                                                 int64_t n, int64_t block_row,
                                                 const T* __restrict__ bias, T* __restrict__ y,
                                                 float* __restrict__ partial) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) sums[(warp * kWarpSize + lane) * 4 * NT + i] = d[i / 4][i % 4];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sums[(w * kWarpSize + lane) * 4 * NT + i];
    const int64_t row = block_row + lane / 4 + 8 * (i % 4 / 2);
    const int batch = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    if (row >= n || batch >= m) continue;
    if (partial != nullptr)
      partial[(static_cast<int64_t>(blockIdx.y) * m + batch) * n + row] = s;
    else
      y[batch * n + row] = from_float<T>(s + (bias != nullptr ? to_float(bias[row]) : 0.f));
  }
}

// The launches of a linear tile kernel (lut_mma.cu, lut_frag.cu) for dispatch_gemv: M in
// chunks of kMmaMaxM rows, kernel_of(rows) the kernel for a chunk (one or two n-tiles),
// blocks of rows_per_block weight rows, shared memory for table_words words of tables or
// the epilogue's sums, K split in units of split_unit groups (the kernel is passed
// groups_per_split / split_unit), fixed up.
template <typename T, typename KernelOf>
int launch_tile_kernel(const GemvArgs& a, int table_words, KernelOf kernel_of,
                       int split_unit = 1, int rows_per_block = kTileRows) {
  const int sum_words = kThreads * 4 * kMaxTiles;
  const size_t smem = sizeof(uint32_t) * (table_words > sum_words ? table_words : sum_words);
  const T* x = a.x_as<T>();
  const bool vec_x = a.k % kLaneColumns == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  return launch_in_m_chunks<T>(
      a, rows_per_block, kMmaMaxM,
      [&](dim3 grid, int64_t groups_per_split, int64_t m0, int rows, float* partial) {
        const auto kernel = kernel_of(rows);
        const cudaError_t err = allow_dynamic_smem(kernel, smem);
        if (err != cudaSuccess) return static_cast<int>(err);
        OTQ_LAUNCH(grid, kThreads, smem, a.stream, kernel)(
            x + m0 * a.k, rows, a.k, vec_x, a.planes, a.codebook, a.n, a.bias_as<T>(),
            a.y_as<T>() + m0 * a.n, partial, groups_per_split / split_unit);
        return 0;
      },
      split_unit);
}

// Spans of the fragment-order code layout (launchers.h, lut_linear_frag) over K columns.
OTQ_HD constexpr int64_t frag_spans(int64_t k) {
  return (k + kFragSpanColumns - 1) / kFragSpanColumns;
}

}  // namespace otq::cuda
