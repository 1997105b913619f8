// Host stand-ins for CUB's radix sorts of (key, value) pairs (CPU emulation). They keep
// CUB's contract where the calling code could get it wrong: a null temp pointer only sets
// the bytes needed, too few bytes is an error, the temp storage is scribbled over before
// and after the sort (so inputs or outputs that overlap it come out corrupted), keys order
// by their radix bits [begin_bit, end_bit) as CUB orders them (floats: -0.0 equal to +0.0),
// and the sort is stable.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../../cuda_runtime.h"

namespace cub::emu {

template <typename K>
uint64_t radix_key(K key, int begin_bit, int end_bit) {
  uint64_t bits = 0;
  std::memcpy(&bits, &key, sizeof(K));
  const uint64_t sign = uint64_t{1} << (8 * sizeof(K) - 1);
  if constexpr (std::is_floating_point_v<K>) {
    if (bits == sign) bits = 0;  // -0.0 sorts as +0.0
    bits = (bits & sign) ? ~bits & (sign | (sign - 1)) : bits | sign;
  } else if constexpr (std::is_signed_v<K>) {
    bits ^= sign;
  }
  const int width = end_bit - begin_bit;
  return (bits >> begin_bit) & (width >= 64 ? ~uint64_t{0} : (uint64_t{1} << width) - 1);
}

inline size_t temp_bytes(int64_t items) { return 1024 + static_cast<size_t>(items) * 8; }

inline void scribble(void* temp, int64_t items) { std::memset(temp, 0xa5, temp_bytes(items)); }

template <typename K, typename V>
void sort_segment(const K* keys_in, K* keys_out, const V* values_in, V* values_out,
                  int64_t begin, int64_t end, int begin_bit, int end_bit) {
  std::vector<int64_t> order(end - begin);
  std::iota(order.begin(), order.end(), begin);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return radix_key(keys_in[a], begin_bit, end_bit) < radix_key(keys_in[b], begin_bit, end_bit);
  });
  std::vector<K> keys(order.size());
  std::vector<V> values(order.size());
  for (size_t i = 0; i < order.size(); ++i) {
    keys[i] = keys_in[order[i]];
    values[i] = values_in[order[i]];
  }
  std::copy(keys.begin(), keys.end(), keys_out + begin);
  std::copy(values.begin(), values.end(), values_out + begin);
}

// Returns true when the call only asked for the size (or the size is short: *error set).
inline bool size_query(void* temp, size_t& bytes, int64_t items, cudaError_t* error) {
  const size_t needed = temp_bytes(items);
  *error = cudaSuccess;
  if (temp == nullptr) {
    bytes = needed;
    return true;
  }
  if (bytes < needed) {
    *error = cudaErrorInvalidValue;
    return true;
  }
  scribble(temp, items);
  return false;
}

}  // namespace cub::emu
