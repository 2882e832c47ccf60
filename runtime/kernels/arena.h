// Memory for repacked weights: 2 MiB-aligned chunks that Linux is asked to back with huge pages, shared by every
// kernel of the process (matmul_rows.cpp, matmul_float_rows.cpp).
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

// Repacked weights live in 2 MiB-aligned chunks that Linux is asked to back with huge pages
// (madvise: under its default THP mode, "madvise", heap memory otherwise gets 4 KiB pages). A forward streams
// every weight once, and through 4 KiB pages that costs a TLB miss every 4 KiB: SmolLM2 int4, 2 threads, one
// process, the two alternating, 1 row 7.74 -> 6.75 ms a forward, 8 rows 8.95 -> 8.51. The process's kernels share
// the chunks (most of a small model's matrices are far below 2 MiB); a chunk goes when its last array does.
constexpr size_t kHugePage = size_t(1) << 21, kChunk = size_t(32) << 20;

class Arena {
 public:
  static void *take(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    State &state = shared();
    std::lock_guard<std::mutex> lock(state.mutex);
    auto &chunks = state.chunks;
    if (chunks.empty() || chunks.back().used + bytes > chunks.back().size) {
      const size_t size = std::max(kChunk, (bytes + kHugePage - 1) / kHugePage * kHugePage);
      void *base = std::aligned_alloc(kHugePage, size);
      if (!base) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
      madvise(base, size, MADV_HUGEPAGE);  // a hint: where THP is off the pages stay 4 KiB, and nothing else changes
#endif
      chunks.push_back({static_cast<uint8_t *>(base), size, 0, 0});
    }
    Chunk &chunk = chunks.back();
    void *p = chunk.base + chunk.used;
    chunk.used += bytes;
    chunk.live++;
    return p;
  }
  static void give(void *p) {
    State &state = shared();
    std::lock_guard<std::mutex> lock(state.mutex);
    const auto at = static_cast<uint8_t *>(p);
    for (auto chunk = state.chunks.begin(); chunk != state.chunks.end(); ++chunk)
      if (at >= chunk->base && at < chunk->base + chunk->size) {
        if (--chunk->live == 0) {
          std::free(chunk->base);
          state.chunks.erase(chunk);
        }
        return;
      }
  }

 private:
  struct Chunk {
    uint8_t *base;
    size_t size, used, live;
  };
  struct State {
    std::mutex mutex;
    std::vector<Chunk> chunks;
  };
  // Never destroyed: sessions, and with them kernels, may outlive the library's static objects at exit.
  static State &shared() {
    static State *state = new State;
    return *state;
  }
};

template <typename T>
struct ArenaAllocator {
  using value_type = T;
  ArenaAllocator() = default;
  template <typename U>
  ArenaAllocator(const ArenaAllocator<U> &) {}
  T *allocate(size_t n) { return static_cast<T *>(Arena::take(n * sizeof(T))); }
  void deallocate(T *p, size_t) { Arena::give(p); }
  bool operator==(const ArenaAllocator &) const { return true; }
  bool operator!=(const ArenaAllocator &) const { return false; }
};
template <typename T>
using Store = std::vector<T, ArenaAllocator<T>>;
