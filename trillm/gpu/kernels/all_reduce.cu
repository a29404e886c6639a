// all_reduce.cu — one-shot all-reduce (sum, in place) of a small tensor over the GPUs of one host, through buffers
// every rank maps with CUDA IPC (reference: the sum of the ranks' tensors, in rank order).
//
// For the few kilobytes of a decode step's all-reduce NCCL's ring costs tens of microseconds of protocol; here each
// rank copies its tensor into its own shared slot, raises a flag, waits for the others' flags and sums everyone's
// slot straight over NVLink. One launch, no host involvement, so it lives inside the decode CUDA graphs.
//
// Layout of each rank's IPC region (cudaMalloc'd, zeroed once): [flags: AR_BLOCKS u32, padded to AR_FLAG_BYTES]
// [slot 0: slot_bytes][slot 1: slot_bytes]. `epochs` [AR_BLOCKS] u32 is a per-rank, not shared, counter.
// Mapping: grid = (AR_BLOCKS) always (fixed, so every block sees every call and all blocks agree on the call
// number); block = AR_THREADS threads; block b moves the 16-byte vectors v ≡ b·AR_THREADS + t (mod grid width).
//
// Call k (the k-th launch on this rank, counted per block in `epochs`, the same on every rank since they run the
// same sequence of all-reduces) uses slot k % 2. Block b: copies its vectors of `data` into its slot, fences, sets
// flag[b] = k; waits until every peer's flag[b] >= k; sums the ranks' slots in rank order (identical rounding on every
// rank, so the ranks stay bit-identical) into `data`. Reuse is safe: a rank writes slot k % 2 in call k only after
// seeing a peer's flag[b] >= k - 1, which the peer sets in its call k - 1, after its whole call k - 2 (the last
// reader of that slot) finished on its stream. A peer may run one call ahead, hence `>=`. A peer that never arrives
// (dead rank) traps after AR_TIMEOUT_NS instead of hanging the GPU.
#include "common.cuh"

constexpr int AR_BLOCKS = 24;
constexpr int AR_THREADS = 512;
constexpr int AR_MAX_RANKS = 8;
constexpr int AR_FLAG_BYTES = 4096;
constexpr unsigned long long AR_TIMEOUT_NS = 30ull * 1000 * 1000 * 1000;

TRILLM_INLINE u32 load_flag(const u32* p) {
#ifdef TRILLM_EMULATE
  return *reinterpret_cast<const volatile u32*>(p);
#else
  u32 v;
  asm volatile("ld.volatile.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
#endif
}

TRILLM_INLINE void store_flag(u32* p, u32 v) {
#ifdef TRILLM_EMULATE
  *reinterpret_cast<volatile u32*>(p) = v;
#else
  asm volatile("st.volatile.global.u32 [%0], %1;\n" ::"l"(p), "r"(v));
#endif
}

TRILLM_INLINE void fence_system() {
#ifndef TRILLM_EMULATE
  __threadfence_system();
#endif
}

TRILLM_INLINE unsigned long long now_ns() {
#ifdef TRILLM_EMULATE
  static unsigned long long ticks = 0;
  return ticks += 1000;  // a waiting emulated thread gives up after AR_TIMEOUT_NS / 1000 polls
#else
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

// Sums 16-byte vectors of T in fp32: 8 elements for the 16-bit types, 4 for float.
template <typename T> struct VecSum {
  float f[8];
  TRILLM_INLINE void zero() {
    for (int j = 0; j < 8; ++j) f[j] = 0.f;
  }
  TRILLM_INLINE void add(const U4& v) {
    float g[8];
    unpack8<T>(v, g);
    for (int j = 0; j < 8; ++j) f[j] += g[j];
  }
  TRILLM_INLINE U4 pack() const { return pack8<T>(f); }
};

template <> struct VecSum<float> {
  float f[4];
  TRILLM_INLINE void zero() {
    for (int j = 0; j < 4; ++j) f[j] = 0.f;
  }
  TRILLM_INLINE void add(const U4& v) {
    f[0] += bits_to_float(v.x);
    f[1] += bits_to_float(v.y);
    f[2] += bits_to_float(v.z);
    f[3] += bits_to_float(v.w);
  }
  TRILLM_INLINE U4 pack() const {
    return U4{float_to_bits(f[0]), float_to_bits(f[1]), float_to_bits(f[2]), float_to_bits(f[3])};
  }
};

template <typename T, int W>
__global__ void __launch_bounds__(AR_THREADS)
    one_shot_all_reduce_kernel(T* __restrict__ data, u64 region0, u64 region1, u64 region2, u64 region3,
                               u64 region4, u64 region5, u64 region6, u64 region7, u32* __restrict__ epochs,
                               int rank, int num_vecs, u64 slot_bytes) {
  __shared__ u32 epoch_shared;
  const u64 regions[AR_MAX_RANKS] = {region0, region1, region2, region3, region4, region5, region6, region7};
  const int b = blockIdx.x, t = threadIdx.x;
  if (t == 0) {
    epoch_shared = epochs[b] + 1;
    epochs[b] = epoch_shared;
  }
  __syncthreads();
  const u32 epoch = epoch_shared;
  const u64 slot_offset = AR_FLAG_BYTES + (epoch & 1u) * slot_bytes;
  U4* mine = reinterpret_cast<U4*>(regions[rank] + slot_offset);
  U4* vecs = reinterpret_cast<U4*>(data);
  const int stride = AR_BLOCKS * AR_THREADS;
  for (int v = b * AR_THREADS + t; v < num_vecs; v += stride) mine[v] = vecs[v];
  __syncthreads();
  if (t == 0) {
    fence_system();  // the slot's bytes are visible to the peers before the flag is
    store_flag(reinterpret_cast<u32*>(regions[rank]) + b, epoch);
  }
  if (t < W && t != rank) {
    const u32* flag = reinterpret_cast<const u32*>(regions[t]) + b;
    const unsigned long long start = now_ns();
    while (load_flag(flag) < epoch) trap_if(now_ns() - start > AR_TIMEOUT_NS);
    fence_system();
  }
  __syncthreads();
  for (int v = b * AR_THREADS + t; v < num_vecs; v += stride) {
    VecSum<T> sum;
    sum.zero();
#pragma unroll
    for (int r = 0; r < W; ++r) sum.add(load_peer(reinterpret_cast<const U4*>(regions[r] + slot_offset) + v));
    vecs[v] = sum.pack();
  }
}
