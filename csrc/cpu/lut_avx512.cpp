// LUT linear with AVX-512 look-ups. A block of 512 columns is 16 spans of 32 columns, and
// lane i of a vector holds span i: each plane's words are transposed in registers (lane
// i <- word t of span i), so a shift and a mask per plane decode column j of the 16 spans
// at once, and a register permute looks the 16 codes up (codebooks of up to 64 entries;
// 7- and 8-bit ones are gathered from memory). The activations are put in the same order
// once per call: xt[b*512 + 16 j + i] = x[b*512 + 32 i + j].
#include "avx512.h"

#ifdef OTQ_AVX512

#include <array>
#include <utility>
#include <vector>

#include "avx512_lut.h"

namespace otq::cpu {

bool avx512_supported() { return __builtin_cpu_supports("avx512f"); }

#pragma GCC push_options
#pragma GCC target("avx512f")

namespace {

using avx512::kLanes, avx512::lanes, avx512::Lut;

constexpr int64_t kBlockCols = kLanes * kWordBits;
constexpr int kRowsPerBlock = 4;
constexpr int kAccumulators = 4;
constexpr int kActivationRows = 4;  // x rows per pass over a decoded block at m > 1
constexpr int kRowSums = kRowsPerBlock * kLanes;  // partial sums per x row at m > 1

using Columns = std::make_integer_sequence<int, kWordBits>;

// kPairIndex<W>[t] lane i: the index of word t of span i (word i * W + t of a block of
// plane width W) within its pair of 16-word vectors, (i * W + t) mod 32.
template <int W>
constexpr auto kPairIndex = [] {
  std::array<std::array<int32_t, kLanes>, W> index{};
  for (int t = 0; t < W; ++t)
    for (int i = 0; i < kLanes; ++i) index[t][i] = (i * W + t) % kWordBits;
  return index;
}();

// The codes of one weight row [k], 16 spans (one block) at a time.
template <int B>
class RowCodes {
 public:
  static constexpr PlaneSpec kSpec = plane_spec(B);
  using Planeseq = std::make_integer_sequence<int, kSpec.count>;

  RowCodes() = default;
  RowCodes(Planes planes, int64_t row, int64_t k) : spans_(padded_k(k) / kWordBits) {
    for (int p = 0; p < kSpec.count; ++p)
      rows_[p] = planes.ptr[p] + row * row_words(k, kSpec.width[p]);
  }

  void load(int64_t block) { load_planes(block, Planeseq{}); }

  // Lane i: the code of column 32 i + J of the loaded block (0 past the row's end).
  template <int J>
  __m512i code() const {
    return code<J>(Planeseq{});
  }

 private:
  template <int... P>
  void load_planes(int64_t block, std::integer_sequence<int, P...>) {
    (load_plane<P>(block), ...);
  }

  // words_[P][t] lane i = word t of span i of plane P (0 past the row's end).
  template <int P>
  void load_plane(int64_t block) {
    constexpr int W = kSpec.width[P];
    const int64_t valid = std::min<int64_t>(kLanes, spans_ - block * kLanes) * W;
    const uint32_t* words = rows_[P] + block * kLanes * W;
    __m512i v[W];
    for (int q = 0; q < W; ++q)
      v[q] = _mm512_maskz_loadu_epi32(lanes(0, valid - q * kLanes), words + q * kLanes);
    if constexpr (W == 1) {
      words_[P][0] = v[0];
    } else {
      // Lanes [q * 32/W, (q + 1) * 32/W) take their words from the pair v[2q], v[2q + 1].
      for (int t = 0; t < W; ++t) {
        const __m512i index = _mm512_loadu_si512(kPairIndex<W>[t].data());
        __m512i u = _mm512_permutex2var_epi32(v[0], index, v[1]);
        for (int q = 1; q < W / 2; ++q)
          u = _mm512_mask_blend_epi32(lanes(q * kWordBits / W, kWordBits / W), u,
                                      _mm512_permutex2var_epi32(v[2 * q], index, v[2 * q + 1]));
        words_[P][t] = u;
      }
    }
  }

  // Plane P's field of column J, moved to its bits of the code.
  template <int P, int J>
  __m512i field() const {
    constexpr int W = kSpec.width[P], kOffset = kSpec.offset[P], kShift = J * W % kWordBits;
    const __m512i word = words_[P][J * W / kWordBits];
    const __m512i mask = _mm512_set1_epi32(((1 << W) - 1) << kOffset);
    if constexpr (kShift >= kOffset)
      return _mm512_and_si512(_mm512_srli_epi32(word, kShift - kOffset), mask);
    else
      return _mm512_and_si512(_mm512_slli_epi32(word, kOffset - kShift), mask);
  }

  template <int J, int... P>
  __m512i code(std::integer_sequence<int, P...>) const {
    return (field<P, J>() | ...);
  }

  const uint32_t* rows_[kMaxPlanes] = {};
  int64_t spans_ = 0;
  __m512i words_[kMaxPlanes][8];
};

// sink(j, w) for j < 32 with w lane i = W[row, 32 i + j] of the loaded block (0 at
// columns past k, cols_left = k - first column of the block).
template <int B, class Sink, int... J>
inline void for_each_column(const RowCodes<B>& codes, const Lut<B>& lut, int64_t cols_left,
                            Sink& sink, std::integer_sequence<int, J...>) {
  if (cols_left >= kBlockCols) {
    (sink(J, lut(codes.template code<J>())), ...);
  } else {
    const auto kept = [cols_left](int j) {
      return lanes(0, (cols_left - j + kWordBits - 1) / kWordBits);
    };
    (sink(J, _mm512_maskz_mov_ps(kept(J), lut(codes.template code<J>()))), ...);
  }
}

inline int64_t block_count(int64_t k) { return (k + kBlockCols - 1) / kBlockCols; }

// W[row, :] . x for activations xt [blocks * 512] in the transposed order.
template <int B>
float row_dot(Planes planes, int64_t row, int64_t k, const Lut<B>& lut, const float* xt) {
  RowCodes<B> codes(planes, row, k);
  __m512 acc[kAccumulators];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (int64_t b = 0; b < block_count(k); ++b) {
    codes.load(b);
    const float* xb = xt + b * kBlockCols;
    auto fma = [&](int j, __m512 w) {
      acc[j % kAccumulators] =
          _mm512_fmadd_ps(w, _mm512_loadu_ps(xb + kLanes * j), acc[j % kAccumulators]);
    };
    for_each_column(codes, lut, k - b * kBlockCols, fma, Columns{});
  }
  return _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Arguments of one call, the activations transposed.
struct Problem {
  const float* xt;  // [m, kt]
  int64_t m, k, kt;
  Planes planes;
  const float* codebook;  // [groups, 2**bits]
  int64_t groups, n;
  const float* bias;  // [n] or null
  float* y;           // [m, n]
};

template <int B>
Lut<B> lut_of(const Problem& p, int64_t row) {
  return Lut<B>(p.codebook + (p.groups == 1 ? 0 : row << B));
}

// y[0, row] for m = 1: one look-up pass over the row, multiplied as it is decoded.
template <int B>
void linear_row(const Problem& p, int64_t row) {
  const float dot = row_dot<B>(p.planes, row, p.k, lut_of<B>(p, row), p.xt);
  p.y[row] = dot + (p.bias ? p.bias[row] : 0.f);
}

// For R activation rows i (R * kRowsPerBlock independent sums, to hide the FMA latency):
// lanes of acc[i, r, :16] += dense[r, :512] . xb[i * kt ...], acc [R, kRowsPerBlock, 16].
template <int R>
inline void dot_block(const float* dense, const float* xb, int64_t kt, float* acc) {
  __m512 sum[R][kRowsPerBlock];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kRowsPerBlock; ++r)
      sum[i][r] = _mm512_loadu_ps(acc + i * kRowSums + r * kLanes);
  for (int64_t c = 0; c < kBlockCols; c += kLanes) {
    __m512 xv[R];
    for (int i = 0; i < R; ++i) xv[i] = _mm512_loadu_ps(xb + i * kt + c);
    for (int r = 0; r < kRowsPerBlock; ++r) {
      const __m512 w = _mm512_load_ps(dense + r * kBlockCols + c);
      for (int i = 0; i < R; ++i) sum[i][r] = _mm512_fmadd_ps(w, xv[i], sum[i][r]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kRowsPerBlock; ++r)
      _mm512_storeu_ps(acc + i * kRowSums + r * kLanes, sum[i][r]);
}

// y[:, first .. first + rows) for m > 1. Block by block, the rows' weights are decoded
// into dense [kRowsPerBlock, 512] (in L1) and multiplied into every activation row's
// partial sums acc [m, kRowsPerBlock, 16]; missing rows (rows < kRowsPerBlock) repeat the last.
template <int B>
void linear_rows(const Problem& p, int64_t first, int64_t rows, float* acc) {
  const auto row_at = [&](int r) { return first + std::min<int64_t>(r, rows - 1); };
  RowCodes<B> codes[kRowsPerBlock];
  Lut<B> luts[kRowsPerBlock];
  for (int r = 0; r < kRowsPerBlock; ++r) {
    codes[r] = RowCodes<B>(p.planes, row_at(r), p.k);
    luts[r] = lut_of<B>(p, row_at(r));
  }
  alignas(64) float dense[kRowsPerBlock * kBlockCols];
  std::fill(acc, acc + p.m * kRowSums, 0.f);
  for (int64_t b = 0; b < block_count(p.k); ++b) {
    for (int r = 0; r < kRowsPerBlock; ++r) {
      codes[r].load(b);
      float* dr = dense + r * kBlockCols;
      auto store = [&](int j, __m512 w) { _mm512_store_ps(dr + kLanes * j, w); };
      for_each_column(codes[r], luts[r], p.k - b * kBlockCols, store, Columns{});
    }
    const float* xb = p.xt + b * kBlockCols;
    int64_t i = 0;
    for (; i + kActivationRows <= p.m; i += kActivationRows)
      dot_block<kActivationRows>(dense, xb + i * p.kt, p.kt, acc + i * kRowSums);
    for (; i < p.m; ++i) dot_block<1>(dense, xb + i * p.kt, p.kt, acc + i * kRowSums);
  }
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t r = 0; r < rows; ++r)
      p.y[i * p.n + first + r] =
          _mm512_reduce_add_ps(_mm512_loadu_ps(acc + i * kRowSums + r * kLanes)) +
          (p.bias ? p.bias[first + r] : 0.f);
}

template <int B>
void linear_bits(const Problem& p) {
  const int64_t row_blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
#pragma omp parallel
  {
    std::vector<float> acc(p.m > 1 ? p.m * kRowsPerBlock * kLanes : 0);
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t first = rb * kRowsPerBlock;
      const int64_t rows = std::min<int64_t>(kRowsPerBlock, p.n - first);
      if (p.m == 1)
        for (int64_t row = first; row < first + rows; ++row) linear_row<B>(p, row);
      else
        linear_rows<B>(p, first, rows, acc.data());
    }
  }
}

// xt[i, b*512 + 16 j + l] = x[i, b*512 + 32 l + j] (0 past column k); xt [m, kt].
void transpose_activations(const float* x, int64_t m, int64_t k, int64_t kt, float* xt) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < kt; ++c) {
      const int64_t b = c / kBlockCols, j = c % kBlockCols / kLanes, l = c % kLanes;
      const int64_t col = b * kBlockCols + l * kWordBits + j;
      xt[i * kt + c] = col < k ? x[i * k + col] : 0.f;
    }
}

}  // namespace

void lut_linear_avx512(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                       const float* codebook, int64_t groups, int64_t n, const float* bias,
                       float* y) {
  const int64_t kt = block_count(k) * kBlockCols;
  std::vector<float> xt(m * kt);
  transpose_activations(x, m, k, kt, xt.data());
  const Problem p{xt.data(), m, k, kt, planes, codebook, groups, n, bias, y};
  switch (bits) {
    case 2: linear_bits<2>(p); break;
    case 3: linear_bits<3>(p); break;
    case 4: linear_bits<4>(p); break;
    case 5: linear_bits<5>(p); break;
    case 6: linear_bits<6>(p); break;
    case 7: linear_bits<7>(p); break;
    default: linear_bits<8>(p); break;
  }
}

#pragma GCC pop_options

}  // namespace otq::cpu

#endif  // OTQ_AVX512
