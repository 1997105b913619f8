// Stand-in for cub::DeviceRadixSort::SortPairs (CPU emulation; see radix_sort_pairs.h).
#pragma once

#include "radix_sort_pairs.h"

namespace cub {

struct DeviceRadixSort {
  template <typename K, typename V, typename NumItems>
  static cudaError_t SortPairs(void* temp, size_t& bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, NumItems items,
                               int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t = nullptr) {
    cudaError_t error;
    if (emu::size_query(temp, bytes, static_cast<int64_t>(items), &error)) return error;
    emu::sort_segment(keys_in, keys_out, values_in, values_out, 0, static_cast<int64_t>(items),
                      begin_bit, end_bit);
    emu::scribble(temp, static_cast<int64_t>(items));
    return cudaSuccess;
  }
};

}  // namespace cub
