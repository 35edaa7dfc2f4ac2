// A caching allocator for torch's large CPU tensors (see moeforge/runtime.py for why and when).
//
// Blocks of at least `threshold` bytes are not given back when a tensor dies: they go to a
// free list and the next request of about the same size reuses them, so a training step
// that allocates and frees the same large tensors every step stops paying the kernel's
// page faults (glibc serves them with fresh mmap pages each time: its mmap threshold cannot
// go above 32 MiB). Smaller requests go to the allocator that was installed before (torch's
// default, glibc's heap underneath).
//
// Choices:
// - Sizes are rounded up to 2 MiB; a free block serves a request if it is at most 1/8 (and
//   2 MiB) larger, smallest first, so one big block is not spent on a much smaller tensor.
// - At most `limit` bytes stay cached; beyond it the least recently freed blocks are
//   returned to the system. A failed allocation empties the cache and tries once more.
// - Blocks come from c10::alloc_cpu (the default allocator's own routine: alignment, the
//   optional transparent huge pages) and go back with c10::free_cpu, and the allocator
//   reports every hand-out and every return to torch's memory profiler itself, so
//   profile_memory sees tensors, not the cache.
// - The allocator object is never destroyed: tensors may outlive static destruction.
// - One mutex; pthread_atfork keeps it usable in forked children (data loader workers).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <vector>

namespace {

constexpr size_t kRound = size_t(2) << 20;

struct Block {
  void* ptr;
  size_t size;
};

struct Stats {
  int64_t hits = 0, misses = 0, evictions = 0, cached_bytes = 0, live_bytes = 0, cached_blocks = 0;
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator(c10::Allocator* fallback, size_t threshold, size_t limit)
      : fallback_(fallback), threshold_(threshold), limit_(limit) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < threshold_) return fallback_->allocate(n);
    size_t size = (n + kRound - 1) / kRound * kRound;
    Stats now;
    void* ptr = take(size, &now);
    if (ptr == nullptr) {
      try {
        ptr = c10::alloc_cpu(size);
      } catch (...) {  // out of memory: give the cache back and try once more
        shrink_to(0);
        ptr = c10::alloc_cpu(size);
      }
      std::lock_guard<std::mutex> g(mu_);
      blocks_[ptr] = new Block{ptr, size};
      stats_.misses++;
      stats_.live_bytes += int64_t(size);
      now = stats_;
    }
    report(ptr, int64_t(size), now);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // small blocks carry the fallback's deleter, large ones ours: raw_deallocate asks which
  c10::DeleterFnPtr raw_deleter() const override { return &raw_release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // a large block's tensor died: cache the block, evicting the least recently freed beyond the limit
  void give_back(void* ptr) {
    std::vector<Block*> evicted;
    size_t size;
    Stats now;
    {
      std::lock_guard<std::mutex> g(mu_);
      Block* b = blocks_.at(ptr);
      size = b->size;
      stats_.live_bytes -= int64_t(size);
      if (size > limit_) {  // over the limit by itself: straight back, the cache as it was
        blocks_.erase(ptr);
        evicted.push_back(b);
        stats_.evictions++;
      } else {
        lru_.push_back(b);
        by_size_.emplace(size, std::prev(lru_.end()));
        stats_.cached_bytes += int64_t(size);
        stats_.cached_blocks++;
        evicted = evict_over(int64_t(limit_));
      }
      now = stats_;
    }
    report(ptr, -int64_t(size), now);
    free_blocks(evicted);
  }

  // give cached blocks back to the system until at most `bytes` stay cached
  void shrink_to(int64_t bytes) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> g(mu_);
      evicted = evict_over(bytes);
    }
    free_blocks(evicted);
  }

  void set_limit(size_t limit) {
    {
      std::lock_guard<std::mutex> g(mu_);
      limit_ = limit;
    }
    shrink_to(int64_t(limit));
  }

  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return stats_;
  }

  static void release(void* ptr);
  static void raw_release(void* ptr);
  static void before_fork();
  static void after_fork();

 private:
  // the smallest free block of at least `size` bytes and at most 1/8 (and 2 MiB) more, or nullptr
  void* take(size_t size, Stats* now) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = by_size_.lower_bound(size);
    if (it == by_size_.end() || it->first > size + std::max(kRound, size / 8)) return nullptr;
    Block* b = *it->second;
    lru_.erase(it->second);
    by_size_.erase(it);
    stats_.cached_bytes -= int64_t(b->size);
    stats_.cached_blocks--;
    stats_.live_bytes += int64_t(b->size);
    stats_.hits++;
    *now = stats_;
    return b->ptr;
  }

  // caller holds mu_: takes the least recently freed blocks out of the cache and the table
  // until at most `bytes` stay cached, and returns them (to be freed without the lock)
  std::vector<Block*> evict_over(int64_t bytes) {
    std::vector<Block*> out;
    while (stats_.cached_bytes > bytes) {
      Block* b = lru_.front();
      auto range = by_size_.equal_range(b->size);
      for (auto it = range.first; it != range.second; ++it) {
        if (*it->second == b) {
          by_size_.erase(it);
          break;
        }
      }
      lru_.pop_front();
      blocks_.erase(b->ptr);
      stats_.cached_bytes -= int64_t(b->size);
      stats_.cached_blocks--;
      out.push_back(b);
    }
    stats_.evictions += int64_t(out.size());
    return out;
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* b : blocks) {
      c10::free_cpu(b->ptr);
      delete b;
    }
  }

  // torch's memory profiler sees a tensor's block allocated and freed, not the cache's keeping it
  static void report(void* ptr, int64_t delta, const Stats& now) {
    c10::reportMemoryUsageToProfiler(ptr, delta, size_t(now.live_bytes), size_t(now.live_bytes + now.cached_bytes),
                                     c10::Device(c10::DeviceType::CPU));
  }

  c10::Allocator* fallback_;
  size_t threshold_, limit_;
  std::mutex mu_;
  std::map<void*, Block*> blocks_;  // every block this allocator made that is not freed
  std::list<Block*> lru_;           // free blocks, least recently freed first
  std::multimap<size_t, std::list<Block*>::iterator> by_size_;
  Stats stats_;
};

CachingCpuAllocator* g_alloc = nullptr;  // never destroyed (tensors may outlive static destruction)

void CachingCpuAllocator::release(void* ptr) { g_alloc->give_back(ptr); }

void CachingCpuAllocator::raw_release(void* ptr) {
  bool ours;
  {
    std::lock_guard<std::mutex> g(g_alloc->mu_);
    ours = g_alloc->blocks_.count(ptr) != 0;
  }
  if (ours) {
    g_alloc->give_back(ptr);
  } else {
    g_alloc->fallback_->raw_deallocate(ptr);
  }
}

void CachingCpuAllocator::before_fork() {
  if (g_alloc) g_alloc->mu_.lock();
}

void CachingCpuAllocator::after_fork() {
  if (g_alloc) g_alloc->mu_.unlock();
}

}  // namespace

extern "C" {

// Installs the allocator as torch's CPU allocator (once; later calls only change the limit).
// Returns 1 when installed by this call, 0 when it already was.
int mf_cache_install(int64_t threshold, int64_t limit) {
  if (g_alloc != nullptr) {
    g_alloc->set_limit(size_t(limit));
    return 0;
  }
  g_alloc = new CachingCpuAllocator(c10::GetCPUAllocator(), size_t(threshold), size_t(limit));
  pthread_atfork(&CachingCpuAllocator::before_fork, &CachingCpuAllocator::after_fork, &CachingCpuAllocator::after_fork);
  c10::SetCPUAllocator(g_alloc, /*priority=*/UINT8_MAX);
  return 1;
}

// hits, misses, evictions, cached bytes, live bytes, cached blocks
void mf_cache_stats(int64_t* out) {
  Stats s = g_alloc ? g_alloc->stats() : Stats{};
  int64_t v[6] = {s.hits, s.misses, s.evictions, s.cached_bytes, s.live_bytes, s.cached_blocks};
  std::memcpy(out, v, sizeof(v));
}

void mf_cache_empty() {
  if (g_alloc) g_alloc->shrink_to(0);
}

void mf_cache_set_limit(int64_t limit) {
  if (g_alloc) g_alloc->set_limit(size_t(limit));
}
}
