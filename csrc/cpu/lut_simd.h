// LUT linear with register look-ups, written once over a SIMD traits type S (AVX-512 in
// lut_avx512.cpp, AVX2 in lut_avx2.cpp). A block of S::kLanes * 32 columns is kLanes
// spans of 32 columns, and lane i of a vector holds span i: each plane's words are
// transposed so that lane i holds span i's (S::span_words), a shift and a mask per plane
// then decode column j of all the spans at once, and S::Lut looks the codes up. The
// activations are put in the same order once per call:
// xt[b*C + kLanes j + i] = x[b*C + 32 i + j], C = kLanes * 32.
//
// Include it after <immintrin.h> and the standard headers, inside the including file's
// `#pragma GCC target` region and only there: everything here has internal linkage, so
// each instruction set's copy stays its own.
#pragma once

#include <algorithm>
#include <utility>
#include <vector>

#include "cpu_ops.h"

namespace otq::cpu {
namespace {  // NOLINT: one copy per including file and instruction set, by design

using Columns = std::make_integer_sequence<int, kWordBits>;

constexpr int kRowsPerBlock = 4;  // weight rows decoded together at m > 1
constexpr int kAccumulators = 4;  // independent sums of a row at m = 1

template <class S>
constexpr int64_t kBlockCols = S::kLanes * kWordBits;

template <class S>
int64_t block_count(int64_t k) {
  return (k + kBlockCols<S> - 1) / kBlockCols<S>;
}

// The codes of one weight row [k], kLanes spans (one block) at a time.
template <class S, int B>
class RowCodes {
 public:
  using I = typename S::I;
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
  I code() const {
    return code<J>(Planeseq{});
  }

 private:
  template <int... P>
  void load_planes(int64_t block, std::integer_sequence<int, P...>) {
    (load_plane<P>(block), ...);
  }

  template <int P>
  void load_plane(int64_t block) {
    constexpr int W = kSpec.width[P];
    const int64_t valid = std::min<int64_t>(S::kLanes, spans_ - block * S::kLanes);
    S::template span_words<W>(rows_[P] + block * S::kLanes * W, valid, words_[P]);
  }

  // Plane P's field of column J, moved to its bits of the code.
  template <int P, int J>
  I field() const {
    constexpr int W = kSpec.width[P], kOffset = kSpec.offset[P], kShift = J * W % kWordBits;
    const I word = words_[P][J * W / kWordBits];
    const I mask = S::set1(((1 << W) - 1) << kOffset);
    if constexpr (kShift >= kOffset)
      return S::and_(S::template srli<kShift - kOffset>(word), mask);
    else
      return S::and_(S::template slli<kOffset - kShift>(word), mask);
  }

  template <int J, int... P>
  I code(std::integer_sequence<int, P...>) const {
    return (field<P, J>() | ...);
  }

  const uint32_t* rows_[kMaxPlanes] = {};
  int64_t spans_ = 0;
  I words_[kMaxPlanes][8];
};

// sink(j, w) for j < 32 with w lane i = W[row, 32 i + j] of the loaded block (0 at
// columns past k; cols_left = k - the block's first column).
template <class S, int B, class Sink, int... J>
inline void for_each_column(const RowCodes<S, B>& codes, const typename S::template Lut<B>& lut,
                            int64_t cols_left, Sink& sink, std::integer_sequence<int, J...>) {
  if (cols_left >= kBlockCols<S>) {
    (sink(J, lut(codes.template code<J>())), ...);
  } else {
    const auto kept = [cols_left](int j) {
      return S::lanes(0, (cols_left - j + kWordBits - 1) / kWordBits);
    };
    (sink(J, S::maskz(kept(J), lut(codes.template code<J>()))), ...);
  }
}

// W[row, :] . x for activations xt [blocks * C] in the transposed order.
template <class S, int B>
float row_dot(Planes planes, int64_t row, int64_t k, const typename S::template Lut<B>& lut,
              const float* xt) {
  using F = typename S::F;
  RowCodes<S, B> codes(planes, row, k);
  F acc[kAccumulators];
  for (auto& a : acc) a = S::zero();
  for (int64_t b = 0; b < block_count<S>(k); ++b) {
    codes.load(b);
    const float* xb = xt + b * kBlockCols<S>;
    auto fma = [&](int j, F w) {
      acc[j % kAccumulators] = S::fmadd(w, S::loadu(xb + S::kLanes * j), acc[j % kAccumulators]);
    };
    for_each_column<S>(codes, lut, k - b * kBlockCols<S>, fma, Columns{});
  }
  return S::reduce_add(S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3])));
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

template <class S, int B>
typename S::template Lut<B> lut_of(const Problem& p, int64_t row) {
  return typename S::template Lut<B>(p.codebook + (p.groups == 1 ? 0 : row << B));
}

// y[0, row] for m = 1: one look-up pass over the row, multiplied as it is decoded.
template <class S, int B>
void linear_row(const Problem& p, int64_t row) {
  const float dot = row_dot<S, B>(p.planes, row, p.k, lut_of<S, B>(p, row), p.xt);
  p.y[row] = dot + (p.bias ? p.bias[row] : 0.f);
}

// Partial sums per x row at m > 1: kLanes per weight row of a block.
template <class S>
constexpr int kRowSums = kRowsPerBlock * S::kLanes;

// For R activation rows i (R * kRowsPerBlock independent sums, to hide the FMA latency):
// lanes of acc[i, r, :] += dense[r, :C] . xb[i * kt ...], acc [R, kRowsPerBlock, kLanes].
template <class S, int R>
inline void dot_block(const float* dense, const float* xb, int64_t kt, float* acc) {
  using F = typename S::F;
  F sum[R][kRowsPerBlock];
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kRowsPerBlock; ++r)
      sum[i][r] = S::loadu(acc + i * kRowSums<S> + r * S::kLanes);
  for (int64_t c = 0; c < kBlockCols<S>; c += S::kLanes) {
    F xv[R];
    for (int i = 0; i < R; ++i) xv[i] = S::loadu(xb + i * kt + c);
    for (int r = 0; r < kRowsPerBlock; ++r) {
      const F w = S::load(dense + r * kBlockCols<S> + c);
      for (int i = 0; i < R; ++i) sum[i][r] = S::fmadd(w, xv[i], sum[i][r]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int r = 0; r < kRowsPerBlock; ++r)
      S::storeu(acc + i * kRowSums<S> + r * S::kLanes, sum[i][r]);
}

// y[:, first .. first + rows) for m > 1. Block by block, the rows' weights are decoded
// into dense [kRowsPerBlock, C] (in L1) and multiplied into every activation row's
// partial sums acc [m, kRowsPerBlock, kLanes]; missing rows (rows < kRowsPerBlock)
// repeat the last.
template <class S, int B>
void linear_rows(const Problem& p, int64_t first, int64_t rows, float* acc) {
  using F = typename S::F;
  const auto row_at = [&](int r) { return first + std::min<int64_t>(r, rows - 1); };
  RowCodes<S, B> codes[kRowsPerBlock];
  typename S::template Lut<B> luts[kRowsPerBlock];
  for (int r = 0; r < kRowsPerBlock; ++r) {
    codes[r] = RowCodes<S, B>(p.planes, row_at(r), p.k);
    luts[r] = lut_of<S, B>(p, row_at(r));
  }
  alignas(64) float dense[kRowsPerBlock * kBlockCols<S>];
  std::fill(acc, acc + p.m * kRowSums<S>, 0.f);
  for (int64_t b = 0; b < block_count<S>(p.k); ++b) {
    for (int r = 0; r < kRowsPerBlock; ++r) {
      codes[r].load(b);
      float* dr = dense + r * kBlockCols<S>;
      auto store = [&](int j, F w) { S::store(dr + S::kLanes * j, w); };
      for_each_column<S>(codes[r], luts[r], p.k - b * kBlockCols<S>, store, Columns{});
    }
    const float* xb = p.xt + b * kBlockCols<S>;
    int64_t i = 0;
    for (; i + S::kActivationRows <= p.m; i += S::kActivationRows)
      dot_block<S, S::kActivationRows>(dense, xb + i * p.kt, p.kt, acc + i * kRowSums<S>);
    for (; i < p.m; ++i) dot_block<S, 1>(dense, xb + i * p.kt, p.kt, acc + i * kRowSums<S>);
  }
  for (int64_t i = 0; i < p.m; ++i)
    for (int64_t r = 0; r < rows; ++r)
      p.y[i * p.n + first + r] = S::reduce_add(S::loadu(acc + i * kRowSums<S> + r * S::kLanes)) +
                                 (p.bias ? p.bias[first + r] : 0.f);
}

template <class S, int B>
void linear_bits(const Problem& p) {
  const int64_t row_blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock;
#pragma omp parallel if (p.m * p.n * p.k >= kMinParallelMacs)
  {
    std::vector<float> acc(p.m > 1 ? p.m * kRowSums<S> : 0);
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      const int64_t first = rb * kRowsPerBlock;
      const int64_t rows = std::min<int64_t>(kRowsPerBlock, p.n - first);
      if (p.m == 1)
        for (int64_t row = first; row < first + rows; ++row) linear_row<S, B>(p, row);
      else
        linear_rows<S, B>(p, first, rows, acc.data());
    }
  }
}

// xt[i, b*C + kLanes j + l] = x[i, b*C + 32 l + j] (0 past column k); xt [m, kt].
template <class S>
void transpose_activations(const float* x, int64_t m, int64_t k, int64_t kt, float* xt) {
  constexpr int64_t kCols = kBlockCols<S>;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < kt; ++c) {
      const int64_t b = c / kCols, j = c % kCols / S::kLanes, l = c % S::kLanes;
      const int64_t col = b * kCols + l * kWordBits + j;
      xt[i * kt + c] = col < k ? x[i * k + col] : 0.f;
    }
}

// lut_linear's contract (cpu_ops.h) on the instruction set of S.
template <class S>
void lut_linear_simd(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                     const float* codebook, int64_t groups, int64_t n, const float* bias,
                     float* y) {
  const int64_t kt = block_count<S>(k) * kBlockCols<S>;
  std::vector<float> xt(m * kt);
  transpose_activations<S>(x, m, k, kt, xt.data());
  const Problem p{xt.data(), m, k, kt, planes, codebook, groups, n, bias, y};
  switch (bits) {
    case 2: linear_bits<S, 2>(p); break;
    case 3: linear_bits<S, 3>(p); break;
    case 4: linear_bits<S, 4>(p); break;
    case 5: linear_bits<S, 5>(p); break;
    case 6: linear_bits<S, 6>(p); break;
    case 7: linear_bits<S, 7>(p); break;
    default: linear_bits<S, 8>(p); break;
  }
}

}  // namespace
}  // namespace otq::cpu
