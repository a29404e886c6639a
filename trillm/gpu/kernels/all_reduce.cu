// all_reduce.cu — all-reduce (sum, in place) of a small or mid-sized tensor over the GPUs of one host, through
// buffers every rank maps with CUDA IPC (reference: the sum of the ranks' tensors, in rank order). One kernel,
// all_reduce_kernel<T, W, TWO_SHOT>, in two variants:
//
// one_shot: for the few kilobytes of a decode step's all-reduce NCCL's ring costs tens of microseconds of protocol;
// here each rank copies its tensor into its own shared slot, raises a flag, waits for the others' flags and sums
// everyone's slot straight over NVLink. One launch, no host involvement, so it lives inside the decode CUDA graphs.
// Each rank reads (W - 1) × N bytes from its peers: cheap for small N, but it grows with the rank count W.
//
// two_shot (W >= 4, mid sizes): reduce-scatter then all-gather through the same slots, 2 × (W - 1) / W × N bytes
// read per rank. Each rank publishes its whole tensor (stage 1, flag 1), sums only its own partition q = rank of
// ceil(N / W) vectors from every slot in rank order (stage 2) and writes that sum over its own slot's partition (no
// peer reads it there in stage 2: peers read their own partitions), raises flag 2, then copies every other
// partition's sum from the slot of the rank that owns it (stage 3). Same rank-order fp32 sums as one_shot, so the
// two paths give the same bits and every rank holds identical results.
//
// Layout of each rank's IPC region (cudaMalloc'd, zeroed once): [flags: 2 × AR_BLOCKS u32 (flag 1, flag 2), padded
// to AR_FLAG_BYTES][slot 0: slot_bytes][slot 1: slot_bytes]. `epochs` [AR_BLOCKS] u32 is a per-rank, not shared,
// counter, advanced by both kernels (one call number sequence).
// Mapping: grid = (AR_BLOCKS) always (fixed, so every block sees every call and all blocks agree on the call
// number); block = AR_THREADS threads; one_shot: block b moves the 16-byte vectors v ≡ b·AR_THREADS + t (mod grid
// width); two_shot: the same, counted from the start of each partition (so the block that reads a vector of a peer's
// slot is the block whose flag covers it on that peer).
//
// Call k (the k-th launch on this rank, counted per block in `epochs`, the same on every rank since they run the
// same sequence of all-reduces, each on the same path) uses slot k % 2. Block b: copies its vectors of `data` into
// its slot, fences, sets flag[b] = k; waits until every peer's flag[b] >= k; sums the ranks' slots in rank order
// (identical rounding on every rank, so the ranks stay bit-identical) into `data`. Reuse is safe: a rank writes slot
// k % 2 in call k only after seeing a peer's flag[b] >= k - 1, which the peer sets in its call k - 1, after its whole
// call k - 2 (the last reader of that slot, stage 3 included) finished on its stream. A peer may run one call ahead,
// hence `>=`. A peer that never arrives (dead rank) traps after AR_TIMEOUT_NS instead of hanging the GPU.
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

// Raises this rank's flag `index` to `epoch` once the block's writes are visible, then waits (threads t < W, one per
// peer) until every peer's flag `index` reaches it. Ends with the whole block past the barrier.
template <int W>
TRILLM_INLINE void exchange_flags(const u64* regions, int rank, int index, u32 epoch) {
  const int t = threadIdx.x;
  __syncthreads();
  if (t == 0) {
    fence_system();  // the slot's bytes are visible to the peers before the flag is
    store_flag(reinterpret_cast<u32*>(regions[rank]) + index, epoch);
  }
  if (t < W && t != rank) {
    const u32* flag = reinterpret_cast<const u32*>(regions[t]) + index;
    const unsigned long long start = now_ns();
    while (load_flag(flag) < epoch) trap_if(now_ns() - start > AR_TIMEOUT_NS);
    fence_system();
  }
  __syncthreads();
}

// The block's call number: epochs[b] + 1, stored back (every rank's blocks count the same calls).
TRILLM_INLINE u32 next_epoch(u32* epochs) {
  __shared__ u32 epoch_shared;
  if (threadIdx.x == 0) {
    epoch_shared = epochs[blockIdx.x] + 1;
    epochs[blockIdx.x] = epoch_shared;
  }
  __syncthreads();
  return epoch_shared;
}

// One call's view of the regions: every rank's region address, this block's call number, and this rank's slot.
struct Call {
  u64 regions[AR_MAX_RANKS];
  u32 epoch;
  u64 slot_offset;  // bytes from a region's start to this call's slot (k % 2)
  U4* mine;         // this rank's slot
  TRILLM_INLINE Call(u64 r0, u64 r1, u64 r2, u64 r3, u64 r4, u64 r5, u64 r6, u64 r7, u32* epochs, int rank,
                     u64 slot_bytes)
      : regions{r0, r1, r2, r3, r4, r5, r6, r7},
        epoch(next_epoch(epochs)),
        slot_offset(AR_FLAG_BYTES + (epoch & 1u) * slot_bytes),
        mine(reinterpret_cast<U4*>(regions[rank] + slot_offset)) {}
};

template <typename T, int W>
TRILLM_INLINE U4 sum_slots(const u64* regions, u64 slot_offset, int v) {
  VecSum<T> sum;
  sum.zero();
#pragma unroll
  for (int r = 0; r < W; ++r) sum.add(load_peer(reinterpret_cast<const U4*>(regions[r] + slot_offset) + v));
  return sum.pack();
}

template <typename T, int W>
TRILLM_INLINE void one_shot(const Call& c, U4* vecs, int rank, int num_vecs) {
  const int b = blockIdx.x, t = threadIdx.x, stride = AR_BLOCKS * AR_THREADS;
  for (int v = b * AR_THREADS + t; v < num_vecs; v += stride) c.mine[v] = vecs[v];
  exchange_flags<W>(c.regions, rank, b, c.epoch);
  for (int v = b * AR_THREADS + t; v < num_vecs; v += stride) vecs[v] = sum_slots<T, W>(c.regions, c.slot_offset, v);
}

template <typename T, int W>
TRILLM_INLINE void two_shot(const Call& c, U4* vecs, int rank, int num_vecs) {
  const int b = blockIdx.x, t = threadIdx.x, stride = AR_BLOCKS * AR_THREADS;
  const int part = (num_vecs + W - 1) / W;  // vectors per partition; the last one may be shorter (or empty)
  // Stage 1: publish the whole tensor, partition by partition (block b's vectors of each).
  for (int q = 0; q < W; ++q) {
    const int end = imin(num_vecs, (q + 1) * part);
    for (int v = q * part + b * AR_THREADS + t; v < end; v += stride) c.mine[v] = vecs[v];
  }
  exchange_flags<W>(c.regions, rank, b, c.epoch);
  // Stage 2: this rank's partition, summed over every rank's slot; the sum replaces it in the slot too.
  const int own_end = imin(num_vecs, (rank + 1) * part);
  for (int v = rank * part + b * AR_THREADS + t; v < own_end; v += stride) {
    const U4 sum = sum_slots<T, W>(c.regions, c.slot_offset, v);
    vecs[v] = sum;
    c.mine[v] = sum;
  }
  exchange_flags<W>(c.regions, rank, AR_BLOCKS + b, c.epoch);
  // Stage 3: every other partition's sum, from the slot of the rank that owns it.
  for (int q = 0; q < W; ++q) {
    if (q == rank) continue;
    const U4* owner = reinterpret_cast<const U4*>(c.regions[q] + c.slot_offset);
    const int end = imin(num_vecs, (q + 1) * part);
    for (int v = q * part + b * AR_THREADS + t; v < end; v += stride) vecs[v] = load_peer(owner + v);
  }
}

template <typename T, int W, bool TWO_SHOT>
__global__ void __launch_bounds__(AR_THREADS)
    all_reduce_kernel(T* __restrict__ data, u64 region0, u64 region1, u64 region2, u64 region3, u64 region4,
                      u64 region5, u64 region6, u64 region7, u32* __restrict__ epochs, int rank, int num_vecs,
                      u64 slot_bytes) {
  const Call c(region0, region1, region2, region3, region4, region5, region6, region7, epochs, rank, slot_bytes);
  U4* vecs = reinterpret_cast<U4*>(data);
  if constexpr (TWO_SHOT) {
    two_shot<T, W>(c, vecs, rank, num_vecs);
  } else {
    one_shot<T, W>(c, vecs, rank, num_vecs);
  }
}
