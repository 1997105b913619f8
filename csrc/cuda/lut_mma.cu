// LUT GEMV on tensor cores for small M, fp16/bf16 activations, 2-4-bit codes:
// y[m, n] = x[m, k] @ W^T + bias with W[j, i] = codebook[g(j), code(j, i)].
//
// A block owns 16 weight rows (the M of mma.m16n8k16) and its 4 warps take turns over the
// 32-column groups of the block's K range; x's rows are the mma's N, 8 per n-tile, one or
// two n-tiles per launch (M <= 16) sharing every A fragment. A lane's A fragment holds
// pairs of adjacent columns of rows g and g + 8 (g = lane / 4), so it cuts 2-column
// "pair indices" straight out of the packed words (plane p contributes its
// 2 * w_p bits, at bit 2 * offset_p) and looks each up in a shared table of packed
// half2/bf162 pairs: one shared load per two weights, no per-weight decode. Tables have
// 256 entries (4 bits: the pair index; 2 and 3 bits: a byte that holds the pair, see
// kEntries), one copy per lane so that look-ups never conflict: [entry][32] per layer
// (32 KB), [2][entry][32] per channel (the lane's rows g and g + 8; 64 KB).
// Accumulation in fp32 (mma), the warps' results summed in shared memory; split-K and bias
// as in lut_gemv.cu.
#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kTileRows = 16;
constexpr int kTileBatch = 8;  // the mma's N: rows of x per n-tile
constexpr int kMaxTiles = kMmaMaxM / kTileBatch;  // n-tiles per launch, sharing each A
constexpr int kMaxMmaBits = 4;

// Every table has 256 entries (one byte of index): 4 bits: the pair index (both codes);
// 2 and 3 bits: a byte that holds the pair among other bits, so that the index is one
// PRMT as at 4 bits. 2 bits: a byte of codes (two pairs; lanes with odd t take the high
// one). 3 bits: a byte of the lane's merged word (merged_pairs). entry_codes says which
// pair each entry stands for.
constexpr int kEntries = 256;

template <int BITS>
constexpr bool kByteTable = BITS == 2 || BITS == 3;

// Table words: one copy of every entry per lane, per layer or (per channel) for each of
// the lane's two A rows: [r][entry][lane], lane-major so that any 32 look-ups hit 32 banks.
OTQ_HD constexpr int table_words(bool per_channel) {
  return kEntries * kWarpSize * (per_channel ? 2 : 1);
}

// The two codes (columns c, c + 1) that table entry low + 16 * high (its nibbles) stands
// for in lanes with even (odd = false) or odd t.
struct CodePair {
  int first, second;
};

template <int BITS>
OTQ_HD constexpr CodePair entry_codes(int low, int high, bool odd) {
  if (BITS == 4) return {low, high};  // the pair index, both codes' 4 bits
  const int nibble = odd ? high : low;  // 2 bits: a byte of 4 codes, the lane's half of it
  if (BITS == 2) return {nibble & 3, nibble >> 2};
  // 3 bits (merged_pairs): the plane-0 nibble as at 2 bits, the plane-1 pair at bit 4 of
  // the byte (even t) or bit 2 (odd t).
  const int plane1 = odd ? low >> 2 : high & 3;
  return {(nibble & 3) | (plane1 & 1) << 2, (nibble >> 2) | (plane1 >> 1) << 2};
}

template <typename T>
__device__ __forceinline__ uint32_t pair_entry(const float* __restrict__ book, CodePair codes) {
  return pack2(from_float<T>(book[codes.first]), from_float<T>(book[codes.second]));
}

// table[(r * entries + entry) * 32 + lane] (r = 0 only per layer), written 16 bytes at a
// time: the 4 lanes 4g..4g+3 share A rows g + 8r, i.e. uint4 (r * entries + entry) * 8 + g
// holds lanes 4g..4g+3. Thread x writes quad g = x % 8 of the entries with low nibble
// x / 8, so its codebook row (block_row + g + 8r per channel, clamped to n - 1) is fixed
// and, with the high nibble unrolled, codebook reads and stores sit at immediate offsets
// from per-thread bases: no per-entry index arithmetic. All reads precede the stores.
template <typename T, int BITS, bool PER_CHANNEL>
__device__ __forceinline__ void build_pair_tables(uint32_t* table,
                                                  const float* __restrict__ codebook,
                                                  int64_t block_row, int64_t n) {
  constexpr int kQuads = kWarpSize / 4;
  constexpr int kHighs = kEntries / (kThreads / kQuads);  // entries per thread and row
  static_assert(kHighs == 16, "a thread's entries share their low nibble");
  const int g = threadIdx.x % kQuads, low = threadIdx.x / kQuads;
  uint4* out = reinterpret_cast<uint4*>(table) + low * kQuads + g;
#pragma unroll
  for (int r = 0; r < (PER_CHANNEL ? 2 : 1); ++r) {
    const int64_t row = min(block_row + g + 8 * r, n - 1);  // as LaneTile clamps A rows
    const float* book = PER_CHANNEL ? codebook + row * (1 << BITS) : codebook;
    uint32_t lo[kHighs], hi[kHighs];  // the entries of lanes with even and odd t
#pragma unroll
    for (int high = 0; high < kHighs; ++high) {
      lo[high] = pair_entry<T>(book, entry_codes<BITS>(low, high, false));
      hi[high] = kByteTable<BITS> ? pair_entry<T>(book, entry_codes<BITS>(low, high, true))
                                  : lo[high];
    }
#pragma unroll
    for (int high = 0; high < kHighs; ++high) {
      const uint4 quad = make_uint4(lo[high], hi[high], lo[high], hi[high]);
      out[(r * kEntries + 16 * high) * kQuads] = quad;
    }
  }
}

// PRMT selector of a lane's table byte: at 4 bits the pair is byte t of word 2h + q; at
// 2 bits byte 2q + t / 2 of word h holds it (selector + 2q); at 3 bits the selector
// gathers the plane-0 bytes 2q + t / 2 of words h = 0, 1 into bytes 2h + q (merged_pairs).
template <int BITS>
__device__ __forceinline__ uint32_t byte_selector(int t) {
  if (BITS == 3) return 0x6420u + 0x1111u * static_cast<uint32_t>(t / 2);
  return 0x4440u | static_cast<uint32_t>(BITS == 4 ? t : t / 2);
}

// 3 bits: a lane's plane-0 nibble of each pair sits at bit 4 * (t % 2) of its byte and the
// plane-1 bit pair at bit 2t of byte 2h + q; rotating the plane-1 word left by this moves
// the pair beside the nibble, to bit 4 (even t) or 2 (odd t), as entry_codes reads it.
__device__ __forceinline__ uint32_t plane1_rotation(int t) {
  return t == 0 ? 4u : t == 3 ? 28u : 0u;
}

// The bits of the nibble: low halves of each byte for even t, high for odd.
__device__ __forceinline__ uint32_t nibble_mask(int t) {
  return t % 2 ? 0xf0f0f0f0u : 0x0f0f0f0fu;
}

static_assert(plane_spec(3).width[0] == 2 && plane_spec(3).width[1] == 1,
              "merged_pairs assumes 3-bit codes as a 2-bit plane (low bits) and a 1-bit plane");

// x_row[c], x_row[c + 1] packed (c even). WHOLE: c + 1 < k and x_row 4-byte aligned, one
// 32-bit load; else two masked loads, zero past k.
template <typename T, bool WHOLE>
__device__ __forceinline__ uint32_t x_pair(const T* __restrict__ x_row, int64_t k, int64_t c) {
  if (WHOLE) return __ldg(reinterpret_cast<const uint32_t*>(x_row + c));
  const T zero = from_float<T>(0.f);
  return pack2(c < k ? x_row[c] : zero, c + 1 < k ? x_row[c + 1] : zero);
}

// One lane's view of its block: A rows g and g + 8 (r = 0, 1); in n-tile j, B column g is
// row 8 * j + g of x. Rows past n and x rows past m are clamped to the last one: they only
// feed D rows/columns that are never written, so no lane needs a branch.
template <typename T, int BITS, bool PER_CHANNEL, int NT>
struct LaneTile {
  SharedAddr lane_table[2];  // pair p of A row r: the word at lane_table[r] + p * 128
  typename GroupWords<BITS>::Rows rows[2];
  const T* x_row[NT];
  int t;
  uint32_t selector;  // byte_selector
  uint32_t rotation, nibbles;  // 3 bits: plane1_rotation, nibble_mask

  __device__ __forceinline__ LaneTile(const uint32_t* table_, const T* x, int m, int64_t k,
                                      const PlaneArgs& planes, int64_t block_row, int64_t n) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4;
    t = lane % 4;
    selector = byte_selector<BITS>(t);
    rotation = plane1_rotation(t);
    nibbles = nibble_mask(t);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      lane_table[r] =
          shared_addr(table_ + (PER_CHANNEL ? r * kEntries * kWarpSize : 0) + lane);
      rows[r] = GroupWords<BITS>::rows_of(planes, min(block_row + g + 8 * r, n - 1));
    }
#pragma unroll
    for (int j = 0; j < NT; ++j)
      x_row[j] = x + static_cast<int64_t>(8 * j + g < m ? 8 * j + g : m - 1) * k;
  }

  // 3 bits: one word whose byte 2h + q is the table byte of pair (h, q): the plane-0 nibbles
  // gathered by one PRMT, the plane-1 pairs rotated beside them, merged by one LOP3.
  __device__ __forceinline__ uint32_t merged_pairs(const GroupWords<BITS>& words) const {
    if constexpr (BITS == 3) {
      const uint32_t low = __byte_perm(words.w[0][0], words.w[0][1], selector);
      const uint32_t high = __funnelshift_l(words.w[1][0], words.w[1][0], rotation);
      return (low & nibbles) | (high & ~nibbles);
    }
    return 0u;
  }

  // Table index of columns (c, c + 1), c = 16 * h + 8 * q + 2 * t, of a group's words:
  // their pair index (4 bits) or the byte that holds it (kByteTable); `merged` =
  // merged_pairs(words).
  __device__ __forceinline__ int table_index(const GroupWords<BITS>& words, uint32_t merged,
                                             int h, int q) const {
    static_assert(BITS >= 2 && BITS <= kMaxMmaBits, "lut_mma runs 2-4-bit codes");
    uint32_t byte;
    if constexpr (BITS == 4)
      byte = __byte_perm(words.w[0][2 * h + q], 0u, selector);
    else if constexpr (BITS == 2)
      byte = __byte_perm(words.w[0][h], 0u, selector + 2 * q);
    else
      byte = __byte_perm(merged, 0u, 0x4440u | (2 * h + q));
    return static_cast<int>(byte);
  }

  // The table word of `pair` for A row r (one shift-add for the address).
  __device__ __forceinline__ uint32_t entry(int r, int pair) const {
    return load_shared_u32(lane_table[r], static_cast<uint32_t>(pair) * (4 * kWarpSize));
  }

  // The words of `group` for the lane's A rows g and g + 8.
  __device__ __forceinline__ void load(GroupWords<BITS> (&words)[2], int64_t group) const {
#pragma unroll
    for (int r = 0; r < 2; ++r) words[r].load(rows[r], group);
  }

  // d[j] += the 16 rows x 32 columns of `group` times the matching columns of n-tile j's x
  // (2 * NT mmas, each A fragment looked up once).
  template <bool WHOLE>
  __device__ __forceinline__ void accumulate(float (&d)[NT][4], int64_t group, int64_t k) const {
    GroupWords<BITS> words[2];
    load(words, group);
    accumulate<WHOLE>(d, words, group, k);
  }

  // The same with the group's words already loaded.
  template <bool WHOLE>
  __device__ __forceinline__ void accumulate(float (&d)[NT][4], const GroupWords<BITS> (&words)[2],
                                             int64_t group, int64_t k) const {
    uint32_t merged[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) merged[r] = merged_pairs(words[r]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = group * kGroup + 16 * h + 2 * t;
      uint32_t a[4];
#pragma unroll
      for (int q = 0; q < 2; ++q)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          a[2 * q + r] = entry(r, table_index(words[r], merged[r], h, q));
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint32_t b[2] = {x_pair<T, WHOLE>(x_row[j], k, c),
                               x_pair<T, WHOLE>(x_row[j], k, c + 8)};
        mma_16816<T>(d[j], a, b);
      }
    }
  }
};

// Groups whose words a warp loads ahead. Per channel the 64 KB of tables allow 3 blocks
// (12 warps) per SM, so each warp needs more loads in flight than per layer (32 KB).
template <bool PER_CHANNEL>
constexpr int kAheadGroups = PER_CHANNEL ? 8 : 4;

template <typename T, int BITS, bool PER_CHANNEL, int NT>
__global__ void __launch_bounds__(kThreads)
    lut_mma_kernel(const T* __restrict__ x, int m, int64_t k, bool vec_x, PlaneArgs planes,
                   const float* __restrict__ codebook, int64_t n,
                   const T* __restrict__ bias, T* __restrict__ y,
                   float* __restrict__ partial, int64_t groups_per_split) {
  uint32_t* table = dynamic_shared<uint32_t>();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kTileRows;
  build_pair_tables<T, BITS, PER_CHANNEL>(table, codebook, block_row, n);
  __syncthreads();

  const LaneTile<T, BITS, PER_CHANNEL, NT> tile(table, x, m, k, planes, block_row, n);
  const int64_t g_begin = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t g_end = min(padded_k(k) / kGroup, g_begin + groups_per_split);
  const int64_t whole_end = vec_x ? min(g_end, k / kGroup) : g_begin;  // groups inside k
  float d[NT][4] = {};
  int64_t group = g_begin + warp;
  // Whole groups in chunks of kAhead, each group's words loaded kAhead steps before use:
  // a step is a few dozen instructions, far shorter than a global load, so a warp keeps
  // kAhead loads in flight. The last (< kAhead) whole groups and the partial one load in
  // step.
  constexpr int kAhead = kAheadGroups<PER_CHANNEL>;
  if (group + (kAhead - 1) * kWarps < whole_end) {
    GroupWords<BITS> ahead[kAhead][2];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) tile.load(ahead[i], group + i * kWarps);
#pragma unroll 1
    for (; group + (kAhead - 1) * kWarps < whole_end; group += kAhead * kWarps) {
#pragma unroll
      for (int i = 0; i < kAhead; ++i) {
        const GroupWords<BITS> words[2] = {ahead[i][0], ahead[i][1]};
        const int64_t next = group + (i + kAhead) * kWarps;
        if (next < whole_end) tile.load(ahead[i], next);
        tile.template accumulate<true>(d, words, group + i * kWarps, k);
      }
    }
  }
#pragma unroll 1
  for (; group < whole_end; group += kWarps) tile.template accumulate<true>(d, group, k);
  for (; group < g_end; group += kWarps) tile.template accumulate<false>(d, group, k);

  __syncthreads();  // every warp is done with the tables: reuse them for the warps' sums
  float* sums = reinterpret_cast<float*>(table);  // [warp][lane][4 * NT]
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

template <typename T, int BITS>
auto kernel_for(bool per_channel, bool two_tiles) {
  if (per_channel)
    return two_tiles ? lut_mma_kernel<T, BITS, true, 2> : lut_mma_kernel<T, BITS, true, 1>;
  return two_tiles ? lut_mma_kernel<T, BITS, false, 2> : lut_mma_kernel<T, BITS, false, 1>;
}

// Tensor-core launches for dispatch_gemv: M in chunks of kMmaMaxM rows (one or two
// n-tiles), split-K fixed up.
struct MmaKernels {
  template <typename T, int BITS>
  static int run(const GemvArgs& a) {
    const int sum_words = kThreads * 4 * kMaxTiles;
    const int words = table_words(a.per_channel);
    const size_t smem = sizeof(uint32_t) * (words > sum_words ? words : sum_words);
    const T* x = a.x_as<T>();
    const bool vec_x = a.k % 2 == 0 && reinterpret_cast<uintptr_t>(x) % 4 == 0;
    return launch_in_m_chunks<T>(
        a, kTileRows, kMmaMaxM,
        [&](dim3 grid, int64_t groups_per_split, int64_t m0, int rows, float* partial) {
          const auto kernel = kernel_for<T, BITS>(a.per_channel, rows > kTileBatch);
          const cudaError_t err = allow_dynamic_smem(kernel, smem);
          if (err != cudaSuccess) return static_cast<int>(err);
          OTQ_LAUNCH(grid, kThreads, smem, a.stream, kernel)(
              x + m0 * a.k, rows, a.k, vec_x, a.planes, a.codebook, a.n, a.bias_as<T>(),
              a.y_as<T>() + m0 * a.n, partial, groups_per_split);
          return 0;
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
