// Equal-mass ("ot") binning per row on the GPU (same codes as quantizers.ot_rows):
//   1. CUB stable radix sort of (value, index-in-row) pairs: DeviceSegmentedRadixSort over
//      rows, or DeviceRadixSort for one long row (the "tensor" granularity);
//   2. one block per (chunk, row) sums its chunk in double -> centroid (unused levels
//      padded with the last one);
//   3. codes: the chunk of each sorted position scattered back to its index ("rank"), or
//      the number of centroid midpoints below each value ("nearest").
// Rows are processed in batches of at most kBatchItems values, so the workspace stays
// bounded and CUB's int item counts never overflow.
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "common.cuh"
#include "launchers.h"

namespace otq::cuda {
namespace {

constexpr int64_t kBatchItems = int64_t{1} << 26;
constexpr int64_t kMaxBatchRows = 65535;  // gridDim.y of chunk_means_kernel
constexpr int kReduceThreads = 256;
constexpr int kMaxLevels = 1 << kMaxBits;
constexpr size_t kAlign = 256;

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

int64_t batch_rows(int64_t r, int64_t n) {
  int64_t rows = kBatchItems / n;
  rows = rows > kMaxBatchRows ? kMaxBatchRows : rows;
  return rows < 1 ? 1 : (rows > r ? r : rows);
}

// The workspace, carved into aligned pieces for one batch of `rows` rows of n values.
struct Workspace {
  float* keys_out;
  int32_t* index_in;
  int32_t* index_out;
  int64_t* offsets;  // rows + 1 row starts
  double* means;     // [rows, kMaxLevels]
  void* cub_temp;
  size_t cub_bytes;
  bool single_row;  // batches of one row: device-wide sort instead of segmented

  static size_t fixed_bytes(int64_t rows, int64_t n) {
    const int64_t items = rows * n;
    return aligned(items * sizeof(float)) + 2 * aligned(items * sizeof(int32_t)) +
           aligned((rows + 1) * sizeof(int64_t)) + aligned(rows * kMaxLevels * sizeof(double));
  }

  static Workspace carve(void* base, int64_t rows, int64_t n, size_t cub_bytes) {
    char* p = static_cast<char*>(base);
    const int64_t items = rows * n;
    Workspace ws{};
    ws.keys_out = reinterpret_cast<float*>(p), p += aligned(items * sizeof(float));
    ws.index_in = reinterpret_cast<int32_t*>(p), p += aligned(items * sizeof(int32_t));
    ws.index_out = reinterpret_cast<int32_t*>(p), p += aligned(items * sizeof(int32_t));
    ws.offsets = reinterpret_cast<int64_t*>(p), p += aligned((rows + 1) * sizeof(int64_t));
    ws.means = reinterpret_cast<double*>(p), p += aligned(rows * kMaxLevels * sizeof(double));
    ws.cub_temp = p;
    ws.cub_bytes = cub_bytes;
    ws.single_row = rows == 1;
    return ws;
  }
};

__global__ void iota_kernel(int32_t* index, int64_t* offsets, int64_t rows, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * n; i += stride)
    index[i] = static_cast<int32_t>(i % n);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i <= rows; i += stride)
    offsets[i] = i * n;
}

// float <-> double with subnormals kept: --use_fast_math (setup.py) compiles the plain casts
// as cvt.ftz, which flushes float32 subnormals to zero; the reference (and the host) keeps
// them, in the codes and centroids alike.
__device__ __forceinline__ double widen(float x) {
#ifdef OTQ_CUDA_EMULATION
  return static_cast<double>(x);
#else
  double y;
  asm("cvt.f64.f32 %0, %1;" : "=d"(y) : "f"(x));
  return y;
#endif
}

__device__ __forceinline__ float narrow(double x) {
#ifdef OTQ_CUDA_EMULATION
  return static_cast<float>(x);
#else
  float y;
  asm("cvt.rn.f32.f64 %0, %1;" : "=f"(y) : "d"(x));
  return y;
#endif
}

// Block (chunk j, row r): mean of sorted[r, chunk j] in double; pads levels c..2^b-1.
__global__ void __launch_bounds__(kReduceThreads)
    chunk_means_kernel(const float* __restrict__ sorted, int64_t n, int64_t c, int levels,
                       double* __restrict__ means, float* __restrict__ centroids) {
  using Reduce = cub::BlockReduce<double, kReduceThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t j = blockIdx.x, row = blockIdx.y;
  const int64_t lo = chunk_begin(n, c, j), hi = chunk_begin(n, c, j + 1);
  const float* src = sorted + row * n;
  double sum = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kReduceThreads) sum += widen(src[i]);
  sum = Reduce(temp).Sum(sum);
  if (threadIdx.x != 0) return;
  const double mean = sum / static_cast<double>(hi - lo);
  means[row * kMaxLevels + j] = mean;
  const int last = j == c - 1 ? levels : static_cast<int>(j) + 1;
  for (int level = static_cast<int>(j); level < last; ++level)
    centroids[row * levels + level] = narrow(mean);
}

__device__ __forceinline__ int64_t chunk_of_rank(int64_t rank, int64_t n, int64_t c) {
  const int64_t q = n / c, r = n % c, big = r * (q + 1);
  return rank < big ? rank / (q + 1) : r + (rank - big) / q;
}

__global__ void rank_codes_kernel(const int32_t* __restrict__ index, int64_t rows, int64_t n,
                                  int64_t c, int64_t* __restrict__ codes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows * n; t += stride) {
    const int64_t row = t / n, rank = t - row * n;
    codes[row * n + index[t]] = chunk_of_rank(rank, n, c);
  }
}

// codes = number of midpoints (means[j] + means[j+1]) / 2 strictly below x: nearest, lowest on ties.
__global__ void nearest_codes_kernel(const float* __restrict__ x, int64_t rows, int64_t n,
                                     int64_t c, const double* __restrict__ means,
                                     int64_t* __restrict__ codes) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows * n; t += stride) {
    const double* m = means + (t / n) * kMaxLevels;
    const double v = widen(x[t]);
    int64_t lo = 0, hi = c - 1;  // answer in [lo, hi]
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if ((m[mid] + m[mid + 1]) / 2.0 < v)
        lo = mid + 1;
      else
        hi = mid;
    }
    codes[t] = lo;
  }
}

// One row per batch sorts device-wide; otherwise rows are segments (even a short last batch,
// so the temp storage sized by cub_bytes for the full batch applies).
cudaError_t sort_pairs(const Workspace& ws, const float* keys, int64_t rows, int64_t n,
                       cudaStream_t stream) {
  size_t bytes = ws.cub_bytes;
  if (ws.single_row)
    return cub::DeviceRadixSort::SortPairs(ws.cub_temp, bytes, keys, ws.keys_out, ws.index_in,
                                           ws.index_out, n, 0, 32, stream);
  return cub::DeviceSegmentedRadixSort::SortPairs(
      ws.cub_temp, bytes, keys, ws.keys_out, ws.index_in, ws.index_out, static_cast<int>(rows * n),
      static_cast<int>(rows), ws.offsets, ws.offsets + 1, 0, 32, stream);
}

size_t cub_bytes(int64_t rows, int64_t n) {
  size_t bytes = 0;
  const float* keys = nullptr;
  float* keys_out = nullptr;
  const int32_t* index = nullptr;
  int32_t* index_out = nullptr;
  const int64_t* offsets = nullptr;
  if (rows == 1)
    cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, keys_out, index, index_out, n, 0, 32);
  else
    cub::DeviceSegmentedRadixSort::SortPairs(nullptr, bytes, keys, keys_out, index, index_out,
                                             static_cast<int>(rows * n), static_cast<int>(rows),
                                             offsets, offsets + 1, 0, 32);
  return bytes;
}

cudaError_t fit_batch(const float* x, int64_t rows, int64_t n, int bits, bool nearest,
                      int64_t* codes, float* centroids, const Workspace& ws, cudaStream_t stream) {
  const int levels = 1 << bits;
  const int64_t c = n < levels ? n : levels;
  const int items_blocks = blocks_for(rows * n, 256);
  OTQ_LAUNCH(items_blocks, 256, 0, stream, iota_kernel)(ws.index_in, ws.offsets, rows, n);
  cudaError_t err = sort_pairs(ws, x, rows, n, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(c), static_cast<unsigned>(rows));
  OTQ_LAUNCH(grid, kReduceThreads, 0, stream, chunk_means_kernel)(ws.keys_out, n, c, levels,
                                                                   ws.means, centroids);
  if (nearest)
    OTQ_LAUNCH(items_blocks, 256, 0, stream, nearest_codes_kernel)(x, rows, n, c, ws.means, codes);
  else
    OTQ_LAUNCH(items_blocks, 256, 0, stream, rank_codes_kernel)(ws.index_out, rows, n, c, codes);
  return cudaGetLastError();
}

}  // namespace

size_t fit_rows_workspace_bytes(int64_t r, int64_t n, int bits) {
  (void)bits;
  const int64_t rows = batch_rows(r, n);
  return Workspace::fixed_bytes(rows, n) + aligned(cub_bytes(rows, n));
}

int fit_rows(const float* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
             float* centroids, void* workspace, size_t workspace_bytes, void* stream) {
  if (!valid_bits(bits) || r <= 0 || n <= 0 || n > INT32_MAX ||
      workspace_bytes < fit_rows_workspace_bytes(r, n, bits))
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t rows = batch_rows(r, n);
  const Workspace ws = Workspace::carve(workspace, rows, n, cub_bytes(rows, n));
  const int levels = 1 << bits;
  for (int64_t r0 = 0; r0 < r; r0 += rows) {
    const int64_t batch = r - r0 < rows ? r - r0 : rows;
    const cudaError_t err = fit_batch(x + r0 * n, batch, n, bits, nearest, codes + r0 * n,
                                      centroids + r0 * levels, ws, as_stream(stream));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace otq::cuda
