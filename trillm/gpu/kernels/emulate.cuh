// emulate.cuh — a CPU model of CUDA thread blocks, so trillm's kernels run (slowly) on a machine without a GPU.
//
// Test tooling only: common.cuh includes it when TRILLM_EMULATE is defined, and tests/gpu/test_kernels.py builds
// each kernel family with g++ against it and launches it through ctypes with the same argument packing as the
// CuPy path. It is never part of what NVRTC compiles.
//
// Model: the blocks of a grid run one after another; the threads of a block are cooperative fibers (ucontext)
// on one OS thread, switched only at barriers; the order in which waiting fibers resume is shuffled at every
// barrier and random warps sit out rounds, so that a missing __syncthreads/__syncwarp shows up as wrong results. Warp-collective
// instructions (shuffles, ldmatrix, mma.sync) exchange their operands through a per-warp buffer between two
// warp barriers and compute exactly what the PTX ISA specifies for each lane. cp.async copies are queued per
// thread and only land when cp.async.wait_group retires their group, so reading a stage before waiting for it
// reads stale bytes (half the copies, chosen at random, land at once instead, so refilling a stage that another
// warp still reads also shows up). Dynamic shared memory starts filled with 0xff bytes (NaN in bf16, fp16 and fp32).
#ifndef TRILLM_EMULATE_CUH
#define TRILLM_EMULATE_CUH

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024;

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
  int waiting = 0;  // 0 runnable, 1 on the block barrier, 2 on its warp's barrier
  unsigned wait_generation = 0;
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
};

struct Runtime {
  dim3 grid, block, block_idx;
  int num_threads = 0;
  int current = 0;
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  std::function<void()> body;
  std::vector<unsigned char> smem;
  size_t smem_size = 0;
  int block_arrived = 0, block_live = 0;
  unsigned block_generation = 0;
  int warp_arrived[32] = {}, warp_live[32] = {};
  unsigned warp_generation[32] = {};
  alignas(16) unsigned char exchange[32][32][64];
  std::mt19937 rng{12345};
  bool trapped = false;
};

inline Runtime* rt = nullptr;

inline Fiber& self() { return rt->fibers[rt->current]; }
inline int lane_id() { return int(self().tid.x) % 32; }
inline int warp_id() { return int(self().tid.x) / 32; }

inline void yield_to_scheduler() { swapcontext(&self().context, &rt->scheduler); }

inline void syncthreads() {
  Fiber& f = self();
  if (++rt->block_arrived == rt->block_live) {
    rt->block_arrived = 0;
    ++rt->block_generation;
    return;
  }
  f.waiting = 1;
  f.wait_generation = rt->block_generation;
  yield_to_scheduler();
}

inline void syncwarp() {
  Fiber& f = self();
  const int w = warp_id();
  if (++rt->warp_arrived[w] == rt->warp_live[w]) {
    rt->warp_arrived[w] = 0;
    ++rt->warp_generation[w];
    return;
  }
  f.waiting = 2;
  f.wait_generation = rt->warp_generation[w];
  yield_to_scheduler();
}

inline void run_copies(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.bytes == 16) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
  group.clear();
}

inline void exit_thread() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open_group));
  for (auto& g : f.groups) run_copies(g);
  f.groups.clear();
  f.done = true;
  const int w = warp_id();
  // An exited thread no longer counts at barriers (as on Volta and later).
  --rt->block_live;
  if (rt->block_arrived > 0 && rt->block_arrived == rt->block_live) {
    rt->block_arrived = 0;
    ++rt->block_generation;
  }
  --rt->warp_live[w];
  if (rt->warp_arrived[w] > 0 && rt->warp_arrived[w] == rt->warp_live[w]) {
    rt->warp_arrived[w] = 0;
    ++rt->warp_generation[w];
  }
  swapcontext(&f.context, &rt->scheduler);
  std::abort();  // a finished fiber is never resumed
}

inline void trap() {
  std::fprintf(stderr, "emulator: kernel trapped in block (%u,%u,%u) thread %u\n", rt->block_idx.x,
               rt->block_idx.y, rt->block_idx.z, self().tid.x);
  rt->trapped = true;
  exit_thread();
}

inline void fiber_entry() {
  rt->body();
  exit_thread();
}

inline bool runnable(const Fiber& f) {
  if (f.done) return false;
  if (f.waiting == 0) return true;
  if (f.waiting == 1) return rt->block_generation != f.wait_generation;
  return rt->warp_generation[int(f.tid.x) / 32] != f.wait_generation;
}

inline void run_block() {
  const int n = rt->num_threads;
  rt->block_arrived = 0;
  rt->block_live = n;
  for (int w = 0; w < 32; ++w) {
    rt->warp_arrived[w] = 0;
    rt->warp_live[w] = std::max(0, std::min(32, n - 32 * w));
  }
  std::fill(rt->smem.begin(), rt->smem.end(), 0xff);
  for (int i = 0; i < n; ++i) {
    Fiber& f = rt->fibers[i];
    f.tid.x = unsigned(i) % rt->block.x;
    f.tid.y = (unsigned(i) / rt->block.x) % rt->block.y;
    f.tid.z = unsigned(i) / (rt->block.x * rt->block.y);
    f.done = false;
    f.waiting = 0;
    f.open_group.clear();
    f.groups.clear();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  bool stalled = false;
  for (;;) {
    bool progressed = false, all_done = true;
    std::shuffle(order.begin(), order.end(), rt->rng);
    // Each round a random quarter of the warps sits out, so warps drift apart as they would on a GPU and a
    // missing barrier between warps shows up (a round after a stall runs everyone).
    unsigned skip = 0;
    for (int w = 0; w < 32 && !stalled; ++w) skip |= (rt->rng() % 4u == 0u ? 1u : 0u) << w;
    for (int i : order) {
      Fiber& f = rt->fibers[i];
      if (!f.done) all_done = false;
      if (!runnable(f) || (skip >> (i / 32) & 1u)) continue;
      f.waiting = 0;
      rt->current = i;
      swapcontext(&rt->scheduler, &f.context);
      progressed = true;
    }
    if (all_done) return;
    if (!progressed && !stalled) {
      stalled = true;
      continue;
    }
    stalled = false;
    if (!progressed) {
      std::fprintf(stderr, "emulator: deadlock in block (%u,%u,%u)\n", rt->block_idx.x, rt->block_idx.y,
                   rt->block_idx.z);
      rt->trapped = true;
      return;
    }
  }
}

// Runs `body` as the kernel for every block of the grid; returns 0, or 1 if a thread trapped or deadlocked.
inline int launch(dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  Runtime runtime;
  rt = &runtime;
  runtime.grid = grid;
  runtime.block = block;
  runtime.num_threads = int(block.x * block.y * block.z);
  if (runtime.num_threads > kMaxThreads || runtime.num_threads <= 0) return 1;
  runtime.fibers.resize(runtime.num_threads);
  for (Fiber& f : runtime.fibers) f.stack.resize(kStackBytes);
  runtime.smem.resize(std::max<size_t>(smem_bytes, 16));
  runtime.smem_size = smem_bytes;
  runtime.body = std::move(body);
  for (unsigned z = 0; z < grid.z && !runtime.trapped; ++z) {
    for (unsigned y = 0; y < grid.y && !runtime.trapped; ++y) {
      for (unsigned x = 0; x < grid.x && !runtime.trapped; ++x) {
        runtime.block_idx = dim3{x, y, z};
        run_block();
      }
    }
  }
  rt = nullptr;
  return runtime.trapped ? 1 : 0;
}

inline void* dynamic_smem() { return rt->smem.data(); }
inline unsigned dynamic_smem_size() { return unsigned(rt->smem_size); }

inline unsigned smem_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < rt->smem.data() || c >= rt->smem.data() + rt->smem.size()) trap();
  return unsigned(c - rt->smem.data());
}

inline void cp_async(void* dst, const void* src, int bytes) {
  smem_offset(dst);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (bytes && reinterpret_cast<uintptr_t>(src) % 16 != 0)) trap();
  // A copy lands at a random moment between its issue and the wait that retires it: right away (catches a
  // stage refilled while other warps still read it) or at the wait (catches a stage read before its wait).
  std::vector<Copy> now{Copy{dst, src, bytes}};
  if (rt->rng() & 1u) {
    run_copies(now);
  } else {
    self().open_group.push_back(now[0]);
  }
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = self();
  while (int(f.groups.size()) > pending) {
    run_copies(f.groups.front());
    f.groups.erase(f.groups.begin());
  }
}

// Each lane publishes `bytes` of its own, all lanes meet, each reads what it needs, all lanes meet again.
template <typename V> inline void publish(const V& v) {
  static_assert(sizeof(V) <= 64, "exchange slot is 64 bytes");
  std::memcpy(rt->exchange[warp_id()][lane_id()], &v, sizeof(V));
}
template <typename V> inline V peek(int lane) {
  V v;
  std::memcpy(&v, rt->exchange[warp_id()][lane & 31], sizeof(V));
  return v;
}

template <typename V> inline V shuffle(V v, int src_lane) {
  publish(v);
  syncwarp();
  V r = peek<V>(src_lane);
  syncwarp();
  return r;
}

inline uint16_t float_to_bf16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float fp16_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return float(h);
}

inline uint16_t float_to_fp16_rn(float f) {
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

inline float b16_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return fp16_to_float(b);
}

inline void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) trap();
  smem_offset(row);
  publish(row);
  syncwarp();
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* p = peek<const uint16_t*>(i * 8 + lane / 4);
      lo = p[2 * (lane % 4)];
      hi = p[2 * (lane % 4) + 1];
    } else {
      lo = peek<const uint16_t*>(i * 8 + 2 * (lane % 4))[lane / 4];
      hi = peek<const uint16_t*>(i * 8 + 2 * (lane % 4) + 1)[lane / 4];
    }
    r[i] = unsigned(lo) | (unsigned(hi) << 16);
  }
  syncwarp();
}

struct MmaOperands {
  unsigned a[4];
  unsigned b[2];
};

// m16n8k16, A row-major 16x16, B 16x8, fragments as in the PTX ISA: groupID g = lane / 4, t = lane % 4;
// A reg j holds row g + 8 * (j & 1), columns 2t, 2t+1 (+8 when j >= 2); B reg j holds rows 2t, 2t+1 (+8 when
// j == 1) of column g; C/D element i is row g + 8 * (i >= 2), column 2t + (i & 1).
inline void mma_16816(float d[4], const unsigned a[4], const unsigned b[2], bool bf16) {
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof(mine.a));
  std::memcpy(mine.b, b, sizeof(mine.b));
  publish(mine);
  syncwarp();
  auto a_at = [&](int row, int k) {
    const MmaOperands o = peek<MmaOperands>((row % 8) * 4 + (k % 8) / 2);
    const unsigned w = o.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return b16_to_float(uint16_t(k % 2 ? w >> 16 : w & 0xffffu), bf16);
  };
  auto b_at = [&](int k, int n) {
    const MmaOperands o = peek<MmaOperands>(n * 4 + (k % 8) / 2);
    const unsigned w = o.b[k >= 8 ? 1 : 0];
    return b16_to_float(uint16_t(k % 2 ? w >> 16 : w & 0xffffu), bf16);
  };
  const int lane = lane_id(), g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += a_at(row, k) * b_at(k, col);
    out[i] = acc;
  }
  syncwarp();
  std::memcpy(d, out, sizeof(out));
}

// Invokes a kernel with its arguments unpacked from an array of pointers, as cuLaunchKernel does.
template <typename... A, size_t... I>
inline void invoke_impl(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A> inline void invoke(void (*kernel)(A...), void** args) {
  invoke_impl(kernel, args, std::index_sequence_for<A...>{});
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (emu::self().tid)
#define blockIdx (emu::rt->block_idx)
#define blockDim (emu::rt->block)
#define gridDim (emu::rt->grid)

inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }
template <typename V> inline V __shfl_xor_sync(unsigned, V v, int mask) {
  return emu::shuffle(v, (emu::lane_id() ^ mask) & 31);
}
template <typename V> inline V __shfl_sync(unsigned, V v, int src_lane) { return emu::shuffle(v, src_lane & 31); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
using std::exp2f;
using std::fmaxf;
using std::memcpy;

#endif  // TRILLM_EMULATE_CUH
