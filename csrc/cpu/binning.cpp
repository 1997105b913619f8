// Equal-mass ("ot") binning per row on the CPU; same codes as quantizers.ot_rows.
// Stable radix sort of (value, index), chunk means in double, codes by rank (or by the
// nearest centroid).
#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu_ops.h"
#include "radix_sort.h"

namespace otq::cpu {
namespace {

// Number of elements of t[0, m) below v (t ascending), branch-free.
int64_t count_below(const double* t, int64_t m, double v) {
  if (m == 0) return 0;
  const double* base = t;
  while (m > 1) {
    const int64_t half = m / 2;
    base += static_cast<int64_t>(base[half] < v) * half;
    m -= half;
  }
  return (base - t) + (*base < v);
}

template <typename T>
class RowFitter {
  using Item = std::conditional_t<std::is_same_v<T, float>, FloatItem, DoubleItem>;

 public:
  void fit(const T* x, int64_t n, int bits, bool nearest, int64_t* codes, float* centroids) {
    const int64_t levels = int64_t{1} << bits, c = std::min(levels, n);
    sort_row(x, n);
    chunk_means(n, c);
    if (nearest)
      nearest_codes(x, n, codes);
    else
      rank_codes(n, c, codes);
    for (int64_t j = 0; j < levels; ++j) centroids[j] = static_cast<float>(means_[std::min(j, c - 1)]);
  }

 private:
  std::vector<Item> items_, tmp_;
  std::vector<double> means_, mids_;

  void sort_row(const T* x, int64_t n) {
    if (items_.size() < static_cast<size_t>(n)) items_.resize(n), tmp_.resize(n);
    for (int64_t i = 0; i < n; ++i) items_[i] = Item(x[i], static_cast<uint32_t>(i));
    radix_sort(items_.data(), tmp_.data(), n);
  }

  void chunk_means(int64_t n, int64_t c) {
    means_.assign(c, 0.0);
    for (int64_t j = 0; j < c; ++j) {
      const int64_t lo = chunk_begin(n, c, j), hi = chunk_begin(n, c, j + 1);
      double sum = 0.0;
      for (int64_t i = lo; i < hi; ++i) sum += static_cast<double>(key_value(items_[i].key()));
      means_[j] = sum / static_cast<double>(hi - lo);
    }
  }

  void rank_codes(int64_t n, int64_t c, int64_t* codes) const {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t hi = chunk_begin(n, c, j + 1);
      for (int64_t i = chunk_begin(n, c, j); i < hi; ++i) codes[items_[i].index()] = j;
    }
  }

  // Index of the nearest centroid, lowest on ties: the number of midpoints below x.
  void nearest_codes(const T* x, int64_t n, int64_t* codes) {
    mids_.resize(means_.size() - 1);
    for (size_t j = 0; j < mids_.size(); ++j) mids_[j] = (means_[j] + means_[j + 1]) / 2.0;
    for (int64_t i = 0; i < n; ++i)
      codes[i] = count_below(mids_.data(), mids_.size(), static_cast<double>(x[i]));
  }
};

template <typename T>
void fit_rows_impl(const T* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
                   float* centroids) {
  const int64_t levels = int64_t{1} << bits;
#pragma omp parallel
  {
    RowFitter<T> fitter;  // buffers grow on first use: idle threads allocate nothing
#pragma omp for schedule(dynamic, 4)
    for (int64_t row = 0; row < r; ++row)
      fitter.fit(x + row * n, n, bits, nearest, codes + row * n, centroids + row * levels);
  }
}

}  // namespace

void fit_rows(const float* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
              float* centroids) {
  fit_rows_impl(x, r, n, bits, nearest, codes, centroids);
}

void fit_rows(const double* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
              float* centroids) {
  fit_rows_impl(x, r, n, bits, nearest, codes, centroids);
}

}  // namespace otq::cpu
