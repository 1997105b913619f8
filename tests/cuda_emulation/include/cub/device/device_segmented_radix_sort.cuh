// Stand-in for cub::DeviceSegmentedRadixSort::SortPairs (CPU emulation; see
// radix_sort_pairs.h). Segment s is [begin_offsets[s], end_offsets[s]).
#pragma once

#include "radix_sort_pairs.h"

namespace cub {

struct DeviceSegmentedRadixSort {
  template <typename K, typename V, typename Offsets>
  static cudaError_t SortPairs(void* temp, size_t& bytes, const K* keys_in, K* keys_out,
                               const V* values_in, V* values_out, int items, int segments,
                               Offsets begin_offsets, Offsets end_offsets, int begin_bit = 0,
                               int end_bit = sizeof(K) * 8, cudaStream_t = nullptr) {
    cudaError_t error;
    if (emu::size_query(temp, bytes, items, &error)) return error;
    for (int s = 0; s < segments; ++s)
      emu::sort_segment(keys_in, keys_out, values_in, values_out,
                        static_cast<int64_t>(begin_offsets[s]), static_cast<int64_t>(end_offsets[s]),
                        begin_bit, end_bit);
    emu::scribble(temp, static_cast<int64_t>(items));
    return cudaSuccess;
  }
};

}  // namespace cub
