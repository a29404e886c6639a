// deterministic.cu — the batch-invariant kernels of `--deterministic`: a projection (GEMM) and a paged attention whose
// result for one token depends on that token's inputs alone, never on how many other tokens share the launch, where
// it sits in the batch, or whether it is computed in a prefill, a prefill chunk or a decode step.
//
// The rule that gives that: every sum has one fixed order per output element, decided by the element's own indices
// and the model's shapes, never by the batch. Launch shapes (tile sizes, grid, CTAs per SM) only decide who computes
// an element, not how.
//
// det_gemm_kernel: y[M, N] = x[M, K] · w[N, K]ᵀ (+ bias[N]). One fp32 accumulator per output element, starting at 0
// and updated by mma.sync m16n8k16 over k = 0, 16, 32, ... in order (no split-K, no atomics); then + bias, rounded to
// T once. The tile shape (MT x NT mma tiles per warp, WM x WN warps, BK, STAGES) is picked per M for speed: small M
// streams the weights with many narrow CTAs, large M uses 128 x 128 tiles; every choice gives the same bits.
// Layouts: x rows 16-byte aligned with stride ldx (elements); w [N, K] contiguous (row-major: K innermost); bias [N]
// or null; y [M, N] contiguous. K % 8 == 0 and N % 8 == 0 (the wrapper checks); the last k tile is zero-filled.
// Mapping: grid = (ceil(N / BN), ceil(M / BM)); block = WM x WN warps, each owning MT x NT mma tiles of the CTA's
// BM x BN tile; STAGES k tiles of x and w in flight through cp.async, read back with ldmatrix.
//
// det_attention_kernel: paged attention for any set of query tokens, each with its own context length (keys at
// positions 0 .. ctx-1 of its sequence). The context is cut into chunks of DA_CHUNK positions at fixed offsets (0,
// 256, 512, ...), each chunk into DA_WARPS sub-ranges of DA_SUB positions, one per warp. A warp runs the online
// softmax over its sub-range key by key; the sub-ranges of a chunk are folded in warp order, the chunks in position
// order. SPLIT = 1 (decode): one CTA per chunk writes the chunk's (max, sum, acc) to a workspace and
// det_attention_merge_kernel folds them; SPLIT = 0 (prefill): one CTA walks its token's chunks and folds as it goes.
// Both run the same device functions in the same order, so a position gets the same bits either way. Every
// floating-point step that could fuse differently (a * b + c) is written with explicit round-to-nearest operations.
// Mapping: grid = (max_chunks or 1, KVH, T); block = DA_WARPS warps, all G query heads of one kv head; merge: grid =
// (H, T), one thread per element of a head. Layouts: q [T, H, D] with token stride q_stride; caches [num_blocks, KVH, block_size, D]; block_tables [S, max_blocks]
// int32; seq_index [T] int32 (the block-table row of each token; null: row t); ctx_lens [T] int32 (>= 1); out [T, H, D].
#include "common.cuh"

TRILLM_INLINE float mul_rn(float a, float b) {
#ifdef TRILLM_EMULATE
  volatile float r = a * b;
  return r;
#else
  return __fmul_rn(a, b);
#endif
}

TRILLM_INLINE float add_rn(float a, float b) {
#ifdef TRILLM_EMULATE
  volatile float r = a + b;
  return r;
#else
  return __fadd_rn(a, b);
#endif
}

TRILLM_INLINE float fma_rn(float a, float b, float c) {
#ifdef TRILLM_EMULATE
  return std::fma(a, b, c);
#else
  return __fmaf_rn(a, b, c);
#endif
}

TRILLM_INLINE float div_rn(float a, float b) {
#ifdef TRILLM_EMULATE
  volatile float r = a / b;
  return r;
#else
  return __fdiv_rn(a, b);
#endif
}

// ---------------------------------------------------------------------------------------------------------------------
// GEMM

template <typename T, int MT, int NT, int WM, int WN, int BK, int STAGES>
__global__ void __launch_bounds__(WM * WN * 32)
    det_gemm_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                    int M, int N, int K, int ldx) {
  constexpr int BM = 16 * MT * WM, BN = 8 * NT * WN, THREADS = WM * WN * 32;
  constexpr int LD = BK + 8;  // smem row stride in elements: 16 bytes of padding keep ldmatrix free of bank conflicts
  constexpr int A_ELEMS = BM * LD, B_ELEMS = BN * LD;
  constexpr int CHUNKS = BK / 8;  // 16-byte vectors per tile row
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  static_assert(BK % 16 == 0, "k tiles are whole mma steps");
  TRILLM_DYNAMIC_SMEM(smem_raw);
  u16* smem = reinterpret_cast<u16*>(smem_raw);
  trap_if(dynamic_smem_bytes() < u32(STAGES * (A_ELEMS + B_ELEMS) * 2));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / WN, wn = warp % WN;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int num_k_tiles = (K + BK - 1) / BK;
  const u16* xs = reinterpret_cast<const u16*>(x);
  const u16* ws = reinterpret_cast<const u16*>(w);

  auto load_tile = [&](int stage, int k_tile) {
    u16* a_dst = smem + stage * (A_ELEMS + B_ELEMS);
    u16* b_dst = a_dst + A_ELEMS;
    const int k0 = k_tile * BK;
    for (int c = threadIdx.x; c < BM * CHUNKS; c += THREADS) {
      const int r = c / CHUNKS, kc = k0 + (c % CHUNKS) * 8;
      const bool valid = m0 + r < M && kc < K;
      cp_async16(a_dst + r * LD + (c % CHUNKS) * 8, valid ? xs + i64(m0 + r) * ldx + kc : xs, valid);
    }
    for (int c = threadIdx.x; c < BN * CHUNKS; c += THREADS) {
      const int r = c / CHUNKS, kc = k0 + (c % CHUNKS) * 8;
      const bool valid = n0 + r < N && kc < K;
      cp_async16(b_dst + r * LD + (c % CHUNKS) * 8, valid ? ws + i64(n0 + r) * K + kc : ws, valid);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k_tiles) load_tile(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt landed for every thread; everyone is done with the stage refilled below
    const int next = kt + STAGES - 1;
    if (next < num_k_tiles) load_tile(next % STAGES, next);
    cp_async_commit();
    const u16* a_tile = smem + (kt % STAGES) * (A_ELEMS + B_ELEMS);
    const u16* b_tile = a_tile + A_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      u32 a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = (wm * MT + i) * 16 + lane % 16;
        ldmatrix_x4(a[i], a_tile + row * LD + kk * 16 + (lane / 16) * 8);
      }
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        const int row = (wn * NT + j) * 8 + lane % 8 + (lane / 16) * 8;
        u32 q[4];
        ldmatrix_x4(q, b_tile + row * LD + kk * 16 + ((lane / 8) % 2) * 8);
        b[j][0] = q[0], b[j][1] = q[1], b[j + 1][0] = q[2], b[j + 1][1] = q[3];
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();

  const int g = lane / 4, t = lane % 4;
  u32* y32 = reinterpret_cast<u32*>(y);
  const u16* bias16 = reinterpret_cast<const u16*>(bias);
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int col = n0 + (wn * NT + j) * 8 + 2 * t;
    if (col >= N) continue;
    const float b0 = bias != nullptr ? Elem<T>::to_float(bias16[col]) : 0.f;
    const float b1 = bias != nullptr ? Elem<T>::to_float(bias16[col + 1]) : 0.f;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + (wm * MT + i) * 16 + g + half * 8;
        if (row >= M) continue;
        const float lo = add_rn(acc[i][j][2 * half], b0), hi = add_rn(acc[i][j][2 * half + 1], b1);
        y32[(i64(row) * N + col) / 2] = Elem<T>::pack2(lo, hi);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------------
// Attention

constexpr int DA_WARPS = 4;
constexpr int DA_CHUNK = 256;                  // positions per chunk (fixed offsets: the split never follows the batch)
constexpr int DA_SUB = DA_CHUNK / DA_WARPS;    // positions per warp within a chunk
constexpr int DA_BATCH = 8;                    // keys whose K and V rows a warp loads before using them

// A lane's share of one head row: E = D / 32 consecutive elements (4 for D = 128, 2 for D = 64).
template <typename T, int E> struct RowSlice;
template <typename T> struct RowSlice<T, 4> {
  U2 bits;
  TRILLM_INLINE void load(const T* p) { bits = *reinterpret_cast<const U2*>(p); }
  TRILLM_INLINE void floats(float f[4]) const {
    Elem<T>::unpack2(bits.x, f[0], f[1]);
    Elem<T>::unpack2(bits.y, f[2], f[3]);
  }
};
template <typename T> struct RowSlice<T, 2> {
  u32 bits;
  TRILLM_INLINE void load(const T* p) { bits = *reinterpret_cast<const u32*>(p); }
  TRILLM_INLINE void floats(float f[2]) const { Elem<T>::unpack2(bits, f[0], f[1]); }
};

// Online-softmax state of one head: running max m and sum l (in the log2 domain), uniform over the warp.
struct SoftmaxState {
  float m, l;
};

// (m1, l1, a1) := (m1, l1, a1) ⊕ (m2, l2, a2): both sides rescaled to the larger max, then added.
TRILLM_INLINE void fold(float& m1, float& l1, float& a1, float m2, float l2, float a2) {
  const float m = fmaxf(m1, m2);
  const float c1 = fast_exp2(m1 - m), c2 = fast_exp2(m2 - m);
  l1 = add_rn(mul_rn(l1, c1), mul_rn(l2, c2));
  a1 = add_rn(mul_rn(a1, c1), mul_rn(a2, c2));
  m1 = m;
}

// One warp's online softmax over keys [lo, hi) of its token's sequence, for the G query heads of kv head `kvh`.
// q holds the lane's E elements of each head; on return m/l (per head, uniform) and acc (the lane's elements).
template <typename T, int D, int G>
TRILLM_INLINE void warp_subrange(const float q[G][D / 32], const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                                 const int* __restrict__ table, int kvh, int num_kv_heads, int block_log2, int lo,
                                 int hi, float scale_log2, SoftmaxState st[G], float acc[G][D / 32]) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x % 32, block_mask = (1 << block_log2) - 1;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    st[h].m = TRILLM_NEG_INF, st[h].l = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[h][e] = 0.f;
  }
  for (int base = lo; base < hi; base += DA_BATCH) {
    RowSlice<T, E> kr[DA_BATCH], vr[DA_BATCH];
#pragma unroll
    for (int i = 0; i < DA_BATCH; ++i) {
      const int pos = imin(base + i, hi - 1);  // past hi: a harmless reread of the last key, never used
      const i64 row = (i64(table[pos >> block_log2]) * num_kv_heads + kvh) * (block_mask + 1) + (pos & block_mask);
      kr[i].load(k_cache + row * D + lane * E);
      vr[i].load(v_cache + row * D + lane * E);
    }
#pragma unroll
    for (int i = 0; i < DA_BATCH; ++i) {
      if (base + i >= hi) break;
      float kf[E], vf[E];
      kr[i].floats(kf);
      vr[i].floats(vf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float dot = mul_rn(q[h][0], kf[0]);
#pragma unroll
        for (int e = 1; e < E; ++e) dot = fma_rn(q[h][e], kf[e], dot);
        dot = warp_sum(dot);  // butterfly: every lane adds the same pairs, so every lane gets the same bits
        const float s = mul_rn(dot, scale_log2);
        const float m = fmaxf(st[h].m, s);
        const float corr = fast_exp2(st[h].m - m), p = fast_exp2(s - m);
        st[h].l = add_rn(mul_rn(st[h].l, corr), p);
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][e] = add_rn(mul_rn(acc[h][e], corr), mul_rn(p, vf[e]));
        st[h].m = m;
      }
    }
  }
}

// Shared memory of one CTA: each warp's sub-range result (per head: m, l, then D accumulators).
template <int D, int G> struct DetAttnSmem {
  static constexpr int ROW = D + 2;
  static constexpr int BYTES = DA_WARPS * G * ROW * 4;
};

// The chunk `chunk` of token t: the four warps' sub-ranges, then (after the barrier) folded in warp order by the
// threads that own (head, element) pairs: thread i owns pairs i, i + blockDim, ... of the G * D pairs.
template <typename T, int D, int G>
TRILLM_INLINE void chunk_partial(float* part, const float q[G][D / 32], const T* k_cache, const T* v_cache,
                                 const int* table, int kvh, int num_kv_heads, int block_log2, int ctx, int chunk,
                                 float scale_log2) {
  constexpr int E = D / 32, ROW = DetAttnSmem<D, G>::ROW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lo = chunk * DA_CHUNK + warp * DA_SUB, hi = imin(lo + DA_SUB, ctx);
  if (lo < hi) {
    SoftmaxState st[G];
    float acc[G][E];
    warp_subrange<T, D, G>(q, k_cache, v_cache, table, kvh, num_kv_heads, block_log2, lo, hi, scale_log2, st, acc);
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float* row = part + (warp * G + h) * ROW;
      if (lane == 0) row[0] = st[h].m, row[1] = st[h].l;
#pragma unroll
      for (int e = 0; e < E; ++e) row[2 + lane * E + e] = acc[h][e];
    }
  }
  __syncthreads();
}

// Fold the non-empty sub-ranges of a chunk (warp order) for pair (h, d): returns m, l, a.
template <int D, int G>
TRILLM_INLINE void fold_subranges(const float* part, int h, int d, int chunk, int ctx, float& m, float& l, float& a) {
  constexpr int ROW = DetAttnSmem<D, G>::ROW;
  const float* row = part + h * ROW;  // warp 0
  m = row[0], l = row[1], a = row[2 + d];
  for (int w = 1; w < DA_WARPS; ++w) {
    if (chunk * DA_CHUNK + w * DA_SUB >= ctx) break;
    const float* r = part + (w * G + h) * ROW;
    fold(m, l, a, r[0], r[1], r[2 + d]);
  }
}

template <typename T, int D, int G>
TRILLM_INLINE void load_query(float q[G][D / 32], const T* qp, i64 q_stride, int t, int head0) {
  constexpr int E = D / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int h = 0; h < G; ++h) {
    RowSlice<T, E> r;
    r.load(qp + i64(t) * q_stride + i64(head0 + h) * D + lane * E);
    r.floats(q[h]);
  }
}

// grid (SPLIT ? max_chunks : 1, num_kv_heads, T); block DA_WARPS warps.
// SPLIT: chunk blockIdx.x of token blockIdx.z → part_acc [T, H, max_chunks, D], part_ml [T, H, max_chunks, 2].
// Else: all of the token's chunks in order, folded, → out.
template <typename T, int D, int G, int SPLIT>
__global__ void __launch_bounds__(DA_WARPS * 32)
    det_attention_kernel(T* __restrict__ out, float* __restrict__ part_acc, float* __restrict__ part_ml,
                         const T* __restrict__ q, i64 q_stride, const T* __restrict__ k_cache,
                         const T* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks,
                         const int* __restrict__ seq_index, const int* __restrict__ ctx_lens, int num_heads,
                         int num_kv_heads, int block_log2, float scale_log2, int max_chunks) {
  constexpr int PAIRS = G * D, PER_THREAD = (PAIRS + DA_WARPS * 32 - 1) / (DA_WARPS * 32);
  __shared__ float part[DetAttnSmem<D, G>::BYTES / 4];
  const int t = blockIdx.z, kvh = blockIdx.y;
  const int ctx = ctx_lens[t];
  const int num_chunks = (ctx + DA_CHUNK - 1) / DA_CHUNK;
  const int seq = seq_index != nullptr ? seq_index[t] : t;
  const int* table = block_tables + i64(seq) * max_blocks;
  const int head0 = kvh * G;
  float qv[G][D / 32];
  load_query<T, D, G>(qv, q, q_stride, t, head0);
  if (SPLIT) {
    const int chunk = blockIdx.x;
    if (chunk >= num_chunks) return;
    chunk_partial<T, D, G>(part, qv, k_cache, v_cache, table, kvh, num_kv_heads, block_log2, ctx, chunk, scale_log2);
    for (int i = threadIdx.x; i < PAIRS; i += DA_WARPS * 32) {
      const int h = i / D, d = i % D;
      float m, l, a;
      fold_subranges<D, G>(part, h, d, chunk, ctx, m, l, a);
      const i64 slot = (i64(t) * num_heads + head0 + h) * max_chunks + chunk;
      part_acc[slot * D + d] = a;
      if (d == 0) part_ml[slot * 2] = m, part_ml[slot * 2 + 1] = l;
    }
    return;
  }
  float ms[PER_THREAD], ls[PER_THREAD], as[PER_THREAD];
  for (int chunk = 0; chunk < num_chunks; ++chunk) {
    chunk_partial<T, D, G>(part, qv, k_cache, v_cache, table, kvh, num_kv_heads, block_log2, ctx, chunk, scale_log2);
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int i = threadIdx.x + j * DA_WARPS * 32;
      if (i >= PAIRS) break;
      float m, l, a;
      fold_subranges<D, G>(part, i / D, i % D, chunk, ctx, m, l, a);
      if (chunk == 0) {
        ms[j] = m, ls[j] = l, as[j] = a;
      } else {
        fold(ms[j], ls[j], as[j], m, l, a);
      }
    }
    __syncthreads();  // part is rewritten by the next chunk
  }
  u16* o = reinterpret_cast<u16*>(out);
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) {
    const int i = threadIdx.x + j * DA_WARPS * 32;
    if (i >= PAIRS) break;
    o[(i64(t) * num_heads + head0) * D + i] = Elem<T>::from_float(div_rn(as[j], ls[j]));
  }
}

// grid (num_heads, T); block D threads: fold token t's chunks of head blockIdx.x in order, divide, store.
template <typename T, int D>
__global__ void __launch_bounds__(D)
    det_attention_merge_kernel(T* __restrict__ out, const float* __restrict__ part_acc,
                               const float* __restrict__ part_ml, const int* __restrict__ ctx_lens, int num_heads,
                               int max_chunks) {
  const int h = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
  const int num_chunks = (ctx_lens[t] + DA_CHUNK - 1) / DA_CHUNK;
  const i64 slot0 = (i64(t) * num_heads + h) * max_chunks;
  float m = part_ml[slot0 * 2], l = part_ml[slot0 * 2 + 1], a = part_acc[slot0 * D + d];
  for (int c = 1; c < num_chunks; ++c) fold(m, l, a, part_ml[(slot0 + c) * 2], part_ml[(slot0 + c) * 2 + 1],
                                            part_acc[(slot0 + c) * D + d]);
  reinterpret_cast<u16*>(out)[(i64(t) * num_heads + h) * D + d] = Elem<T>::from_float(div_rn(a, l));
}
