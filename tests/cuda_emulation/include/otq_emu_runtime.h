// The CPU side of the CUDA emulation: runs a kernel's grid with one std::thread per CUDA
// thread of a block, blocks one after another (so `static` shared memory is per block).
// __syncthreads and warp shuffles are rendezvous of the block's (warp's) live threads; a
// thread that returns from the kernel leaves them, as exited threads do on the GPU.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "otq_emu_types.h"

namespace otq_emu {

// The most dynamic shared memory a block may opt in to on every GPU the extension builds
// for (sm_80 and up): sm_86/sm_89's 99 KB (sm_80: 163 KB, sm_90: 227 KB).
constexpr size_t kMaxOptInSmem = 99 * 1024;

// A fault in a kernel thread (what would be an illegal-address or misaligned-address trap
// on the GPU): the thread stops, the launch fails and cudaGetLastError reports it.
struct Fault {
  const char* what;
};

[[noreturn]] inline void fail(const char* what) { throw Fault{what}; }

// Threads meet at sync(); leave() drops one for the rest of the block; end_block() waits
// until every thread of the block has left, then re-arms for the next block.
class Rendezvous {
 public:
  explicit Rendezvous(int threads) : total_(threads), live_(threads) {}

  void sync() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ == live_) {
      release();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

  // Every live thread passes its slot and value: returns the value the thread in slot
  // `partner` passed.
  uint64_t exchange(int slot, uint64_t v, int partner) {
    slots_[slot] = v;
    sync();
    const uint64_t r = slots_[partner];
    sync();
    return r;
  }

  // Every live thread passes `bytes` (<= kGatherBytes) bytes: out gets every slot's, in
  // slot order.
  static constexpr size_t kGatherBytes = 64;
  void all_gather(int slot, const void* data, size_t bytes, void* out) {
    if (bytes > kGatherBytes) fail("all_gather of more than 64 bytes per thread");
    std::memcpy(gather_.data() + slot * kGatherBytes, data, bytes);
    sync();
    for (size_t i = 0; i < slots_.size(); ++i)
      std::memcpy(static_cast<char*>(out) + i * bytes, gather_.data() + i * kGatherBytes, bytes);
    sync();
  }

  void resize_slots(int n) {
    slots_.assign(n, 0);
    gather_.assign(n * kGatherBytes, 0);
  }

  void leave() {
    std::unique_lock<std::mutex> lock(mu_);
    --live_;
    if (arrived_ > 0 && arrived_ == live_) release();
  }

  // on_last runs in the last thread to finish, before any thread starts the next block.
  void end_block(const std::function<void()>& on_last = {}) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t block = block_;
    if (++finished_ == total_) {
      if (on_last) on_last();
      finished_ = 0;
      live_ = total_;
      ++block_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return block_ != block; });
    }
  }

  int live() {
    std::unique_lock<std::mutex> lock(mu_);
    return live_;
  }

 private:
  void release() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  const int total_;
  int live_;
  int arrived_ = 0;
  int finished_ = 0;
  uint64_t gen_ = 0, block_ = 0;
  std::vector<uint64_t> slots_;
  std::vector<unsigned char> gather_;
};

struct BlockState {
  explicit BlockState(int threads, size_t smem_bytes)
      : block(threads), smem((smem_bytes + 15) / 16) {
    poison();
    for (int w = 0; w * 32 < threads; ++w) {
      const int lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
      warps.push_back(std::make_unique<Rendezvous>(lanes));
      warps.back()->resize_slots(lanes);
    }
  }
  // Shared memory starts every block as all-ones bytes (NaN floats, -1 ints), as a
  // stand-in for the garbage a GPU leaves there.
  void poison() {
    if (!smem.empty()) std::memset(smem.data(), 0xff, smem.size() * sizeof(uint4));
  }

  Rendezvous block;
  std::vector<std::unique_ptr<Rendezvous>> warps;
  std::vector<uint4> smem;  // dynamic shared memory, 16-byte aligned
};

struct ThreadState {
  uint3 thread_idx{}, block_idx{};
  dim3 block_dim, grid_dim;
  int flat = 0;
  BlockState* state = nullptr;
};

inline thread_local ThreadState tls;

inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}

inline const char*& last_fault() {
  static const char* what = nullptr;
  return what;
}

inline void record_fault(const Fault& fault) {
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (last_error() == cudaSuccess) {
    last_error() = cudaErrorLaunchFailure;
    last_fault() = fault.what;
  }
}

inline void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.y > 65535 || grid.z > 65535) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > kMaxOptInSmem) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  BlockState state(threads, smem);
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tls.flat = t;
      tls.thread_idx = {static_cast<unsigned>(t % block.x),
                        static_cast<unsigned>(t / block.x % block.y),
                        static_cast<unsigned>(t / (block.x * block.y))};
      tls.block_dim = block;
      tls.grid_dim = grid;
      tls.state = &state;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            tls.block_idx = {x, y, z};
            try {
              body();
            } catch (const Fault& fault) {
              record_fault(fault);
            }
            state.warps[t / 32]->leave();
            state.block.leave();
            state.block.end_block([&] { state.poison(); });
            state.warps[t / 32]->end_block();
          }
    });
  }
  for (auto& thread : pool) thread.join();
}

// Dynamic shared memory a kernel may ask for: 48 KB unless cudaFuncSetAttribute raised it.
inline size_t& dynamic_smem_limit(const void* kernel) {
  static std::mutex mu;
  static std::map<const void*, size_t> limits;
  std::lock_guard<std::mutex> lock(mu);
  return limits.try_emplace(kernel, size_t{48 * 1024}).first->second;
}

// OTQ_LAUNCH(grid, block, smem, stream, kernel)(args...) in emulation.
template <typename... Params>
struct Launch {
  dim3 grid, block;
  size_t smem;
  void (*kernel)(Params...);

  template <typename... Args>
  void operator()(Args&&... args) const {
    if (smem > dynamic_smem_limit(reinterpret_cast<const void*>(kernel))) {
      last_error() = cudaErrorInvalidValue;  // as the GPU: opt in above 48 KB first
      return;
    }
    auto call = [k = kernel, tuple = std::make_tuple(static_cast<Params>(args)...)] {
      std::apply(k, tuple);
    };
    run_grid(grid, block, smem, call);
  }
};

template <typename... Params>
Launch<Params...> launch(dim3 grid, dim3 block, size_t smem, cudaStream_t,
                         void (*kernel)(Params...)) {
  return {grid, block, smem, kernel};
}

inline void syncthreads() { tls.state->block.sync(); }

// The calling thread's warp, which must be whole (32 live lanes), and its lane.
inline Rendezvous& full_warp(const char* what) {
  Rendezvous& warp = *tls.state->warps[tls.flat / 32];
  if (warp.live() != 32) fail(what);
  return warp;
}

inline int lane() { return tls.flat % 32; }


template <typename T>
T shfl_xor(unsigned mask, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
  Rendezvous& warp = full_warp("__shfl_xor_sync needs all 32 lanes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp.exchange(lane(), bits, lane() ^ offset);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(tls.state->smem.data());
}

}  // namespace otq_emu
