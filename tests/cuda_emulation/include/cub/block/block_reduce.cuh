// Stand-in for cub::BlockReduce (CPU emulation): Sum over a 1-D block of exactly N threads,
// the total valid in thread 0 (as in CUB).
#pragma once

#include "../../cuda_runtime.h"

namespace cub {

template <typename T, int N>
class BlockReduce {
 public:
  struct TempStorage {
    T partial[N];
  };

  explicit BlockReduce(TempStorage& storage) : storage_(storage) {}

  T Sum(T v) {
    if (blockDim.x != N || blockDim.y != 1 || blockDim.z != 1)
      otq_emu::fail("BlockReduce<T, N> launched with a block of other than N threads");
    storage_.partial[threadIdx.x] = v;
    __syncthreads();
    T total = storage_.partial[0];
    if (threadIdx.x == 0)
      for (int i = 1; i < N; ++i) total += storage_.partial[i];
    __syncthreads();
    return threadIdx.x == 0 ? total : v;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
