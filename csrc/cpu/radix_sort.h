// Stable LSD radix sort (11-bit digits) of items by an unsigned key, and the
// order-preserving map between floats and unsigned keys (-0.0 and +0.0 share a key).
// Items carry their index: sorting items made in index order by the key of their value
// gives the order of torch.sort(..., stable=True).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace otq::cpu {

inline uint32_t ordered_key(float v) {
  uint32_t u;
  v = v == 0.0f ? 0.0f : v;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline uint64_t ordered_key(double v) {
  uint64_t u;
  v = v == 0.0 ? 0.0 : v;
  std::memcpy(&u, &v, sizeof(u));
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

template <typename U>
inline auto key_value(U key) {
  using F = std::conditional_t<sizeof(U) == 4, float, double>;
  constexpr U kSign = U{1} << (sizeof(U) * 8 - 1);
  const U u = (key & kSign) ? (key ^ kSign) : ~key;
  F v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// A float32 value's key in the high half and its index in the low half: one 8-byte item.
struct FloatItem {
  uint64_t bits;
  using Key = uint32_t;
  FloatItem() = default;
  FloatItem(float v, uint32_t index) : bits((uint64_t{ordered_key(v)} << 32) | index) {}
  Key key() const { return static_cast<uint32_t>(bits >> 32); }
  uint32_t index() const { return static_cast<uint32_t>(bits); }
};

struct DoubleItem {
  uint64_t k;
  uint32_t i;
  using Key = uint64_t;
  DoubleItem() = default;
  DoubleItem(double v, uint32_t index) : k(ordered_key(v)), i(index) {}
  Key key() const { return k; }
  uint32_t index() const { return i; }
};

// Sorts items[0, n) stably by key(), using tmp (same size) as scratch.
template <typename Item>
void radix_sort(Item* items, Item* tmp, size_t n) {
  using Key = typename Item::Key;
  constexpr int kDigit = 11, kBuckets = 1 << kDigit;
  constexpr int kPasses = (8 * sizeof(Key) + kDigit - 1) / kDigit;
  std::vector<uint32_t> hist(kPasses * kBuckets, 0);
  for (size_t i = 0; i < n; ++i) {
    const Key key = items[i].key();
    for (int p = 0; p < kPasses; ++p) ++hist[p * kBuckets + ((key >> (kDigit * p)) & (kBuckets - 1))];
  }
  Item* src = items;
  Item* dst = tmp;
  for (int p = 0; p < kPasses; ++p) {
    uint32_t* h = hist.data() + p * kBuckets;
    const int shift = kDigit * p;
    if (h[(src[0].key() >> shift) & (kBuckets - 1)] == n) continue;  // one digit value: no-op
    uint32_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) sum += std::exchange(h[d], sum);
    for (size_t i = 0; i < n; ++i) dst[h[(src[i].key() >> shift) & (kBuckets - 1)]++] = src[i];
    std::swap(src, dst);
  }
  if (src != items) std::memcpy(static_cast<void*>(items), src, n * sizeof(Item));
}

}  // namespace otq::cpu
