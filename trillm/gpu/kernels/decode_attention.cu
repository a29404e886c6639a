// decode_attention.cu — paged attention for one query token per sequence, split-KV capable, plus the merge
// kernel for the splits (reference: gpu/reference.py paged_decode_attention).
//
// Layouts:
//   q [num_seqs, num_heads, HEAD_DIM] (token stride q_stride, heads packed); out [num_seqs, num_heads, HEAD_DIM]
//   k_cache, v_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM]; block_size a power of two (log2 given)
//   block_tables [num_seqs, max_blocks_per_seq] int32; context_lens [num_seqs] int32, each >= 1
//   split workspace (num_splits > 1): part_out [num_seqs, num_heads, num_splits, HEAD_DIM] fp32, unnormalised;
//     part_ml [num_seqs, num_heads, num_splits, 2] fp32 = (running max in log2 units, sum of exponentials)
//
// paged_decode_kernel: grid = (num_splits, num_kv_heads * head_chunks, num_seqs); block = 4 warps.
//   A CTA owns one (sequence, kv head, split) and the GROUP query heads of that kv head (a kv head with more
//   than 8 query heads is cut into head_chunks chunks of 8), so each K/V byte is read once for the whole GQA
//   group. The split's context range is ceil(ctx / 16 / num_splits) tiles of 16 tokens, computed on the device
//   from context_lens (the host never needs the lengths: graph capture works).
//   Each warp streams its own tiles (warp w takes tiles w, w+4, ...) through a private 3-stage cp.async ring in
//   shared memory: 16-byte copies, rows addressed through the block table, masked tokens zero-filled.
//   Scores: lane = (token t = lane % 16, half = lane / 16); a lane dots its half of K row t with the fp32 query
//   (pre-scaled by scale * log2 e, kept in shared memory) and one xor-shuffle adds the halves.
//   Online softmax in fp32 with exp2, per warp; P @ V: lane owns HEAD_DIM / 32 output dims and takes p_t from
//   lane t by shuffle. The 4 warps' (max, sum, acc) are merged through shared memory at the end; the CTA writes
//   the normalised output (num_splits == 1) or its split's partial row and (max, sum).
// paged_decode_mma_kernel: the same CTA and ring, with scores and P @ V on tensor cores (see its comment); the
//   wrapper picks it or the CUDA-core kernel by GQA group size.
// paged_decode_merge_kernel: grid = (num_heads, num_seqs); block = HEAD_DIM threads, one output dim each.
#include "common.cuh"

constexpr int DEC_WARPS = 4;
constexpr int DEC_TILE = 16;  // tokens per warp tile
constexpr int DEC_STAGES = 3;  // ring depth of the SIMT kernel
constexpr int DEC_MMA_ROWS = 16;  // query heads per CTA of the mma kernel (one m16 tile)

template <int HEAD_DIM, int GROUP> struct DecodeLayout {
  static constexpr int K_PITCH = HEAD_DIM + 8;  // elements: +16 B puts the 16 token rows on distinct banks
  static constexpr int V_PITCH = HEAD_DIM;
  static constexpr int Q_PITCH = HEAD_DIM + 8;  // floats: the second half starts 4 banks after the first
  static constexpr int STAGE_ELEMS = DEC_TILE * (K_PITCH + V_PITCH);
  static constexpr int Q_BYTES = GROUP * Q_PITCH * 4;
  static constexpr int PIPE_BYTES = DEC_WARPS * DEC_STAGES * STAGE_ELEMS * 2;
  static constexpr int MERGE_BYTES = DEC_WARPS * GROUP * (HEAD_DIM + 2) * 4;
  static constexpr int BYTES = Q_BYTES + (PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES);
};

template <int HEAD_DIM, int STAGES> struct DecodeMmaLayout {
  static constexpr int PITCH = HEAD_DIM + 8;  // K and V rows: +16 B keeps ldmatrix phases conflict-free
  static constexpr int STAGE_ELEMS = 2 * DEC_TILE * PITCH;
  static constexpr int PIPE_BYTES = DEC_WARPS * STAGES * STAGE_ELEMS * 2;
  static constexpr int MERGE_BYTES = DEC_WARPS * DEC_MMA_ROWS * (HEAD_DIM + 2) * 4;
  static constexpr int BYTES = PIPE_BYTES > MERGE_BYTES ? PIPE_BYTES : MERGE_BYTES;
};

// Where a CTA's work is: sequence, kv head, its query heads, and its split's range of 16-token tiles.
struct DecodeWork {
  int seq, kv_head, head_base, heads_here, ctx, tile_begin, tile_end;
};

TRILLM_INLINE DecodeWork decode_work(const int* context_lens, int num_heads, int num_kv_heads, int head_chunks,
                                     int rows_per_chunk, int num_splits) {
  DecodeWork w;
  const int split = blockIdx.x, kv_chunk = blockIdx.y;
  w.seq = blockIdx.z;
  const int group_size = num_heads / num_kv_heads;
  w.kv_head = kv_chunk / head_chunks;
  const int chunk_first = (kv_chunk % head_chunks) * rows_per_chunk;
  w.heads_here = imin(rows_per_chunk, group_size - chunk_first);
  w.head_base = w.kv_head * group_size + chunk_first;
  w.ctx = context_lens[w.seq];
  const int num_tiles = (w.ctx + DEC_TILE - 1) / DEC_TILE;
  const int tiles_per_split = (num_tiles + num_splits - 1) / num_splits;
  w.tile_begin = split * tiles_per_split;
  w.tile_end = imin(num_tiles, w.tile_begin + tiles_per_split);
  return w;
}

// One warp's cp.async copies of a 16-token tile of K and V into shared memory (rows through the block table;
// tokens at or past ctx are zero-filled).
template <int HEAD_DIM>
TRILLM_INLINE void issue_tile(u16* ks, int k_pitch, u16* vs, int v_pitch, const void* k_cache, const void* v_cache,
                              const int* table, int tile, int ctx, int kv_head, int num_kv_heads,
                              int block_size_log2, int lane) {
  constexpr int ROW_VECS = HEAD_DIM / 8;
  constexpr int LOADS = DEC_TILE * ROW_VECS / 32;  // 16-byte copies per lane per tensor
  constexpr int DIM_LOG2 = HEAD_DIM == 128 ? 7 : 6;
  const int block_mask = (1 << block_size_log2) - 1;
  // element offset of (block, kv_head, offset, 0) = ((block * num_kv_heads + kv_head) << log2 bs) + offset) << log2 D
  const i64 head_off = i64(kv_head) << (block_size_log2 + DIM_LOG2);
  const i64 block_stride = i64(num_kv_heads) << (block_size_log2 + DIM_LOG2);
#pragma unroll
  for (int j = 0; j < LOADS; ++j) {
    const int c = lane + 32 * j;
    const int t = c / ROW_VECS, vec = c % ROW_VECS;
    const int token = tile * DEC_TILE + t;
    const bool valid = token < ctx;
    const int block = valid ? table[token >> block_size_log2] : 0;
    const i64 off = (block * block_stride + head_off + i64(token & block_mask) * HEAD_DIM + vec * 8) * 2;  // bytes
    cp_async16(ks + t * k_pitch + vec * 8, static_cast<const unsigned char*>(k_cache) + off, valid);
    cp_async16(vs + t * v_pitch + vec * 8, static_cast<const unsigned char*>(v_cache) + off, valid);
  }
}

// Merges the 4 warps' (max, sum, acc) rows from shared memory and writes the CTA's result: the normalised output
// (num_splits == 1) or its split's partial row and (max, sum). red_acc [DEC_WARPS][ROWS][HEAD_DIM],
// red_ml [DEC_WARPS][ROWS][2]; call after a __syncthreads that follows the writes.
template <typename T, int HEAD_DIM, int ROWS>
TRILLM_INLINE void combine_warps(const float* red_acc, const float* red_ml, const DecodeWork& w, T* out,
                                 float* part_out, float* part_ml, int num_heads, int num_splits) {
  const int split = blockIdx.x;
  for (int i = threadIdx.x; i < w.heads_here * HEAD_DIM; i += blockDim.x) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    float m_all = TRILLM_NEG_INF;
#pragma unroll
    for (int k = 0; k < DEC_WARPS; ++k) m_all = fmaxf(m_all, red_ml[(k * ROWS + g) * 2]);
    float sum = 0.f, o = 0.f;
    if (m_all != TRILLM_NEG_INF) {  // -inf: an empty split (all its warps saw no tile)
#pragma unroll
      for (int k = 0; k < DEC_WARPS; ++k) {
        const float scale = fast_exp2(red_ml[(k * ROWS + g) * 2] - m_all);
        sum += red_ml[(k * ROWS + g) * 2 + 1] * scale;
        o += red_acc[(k * ROWS + g) * HEAD_DIM + d] * scale;
      }
    }
    const i64 head_row = i64(w.seq) * num_heads + w.head_base + g;
    if (num_splits == 1) {
      out[head_row * HEAD_DIM + d].bits = Elem<T>::from_float(o / sum);
    } else {
      const i64 part_row = head_row * num_splits + split;
      part_out[part_row * HEAD_DIM + d] = o;
      if (d == 0) {
        part_ml[part_row * 2] = m_all;
        part_ml[part_row * 2 + 1] = sum;
      }
    }
  }
}

// ---- CUDA-core kernel -------------------------------------------------------------------------------------------

template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    paged_decode_kernel(T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_ml,
                        const T* __restrict__ q, i64 q_stride, const T* __restrict__ k_cache,
                        const T* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks_per_seq,
                        const int* __restrict__ context_lens, int num_heads, int num_kv_heads, int head_chunks,
                        int block_size_log2, float scale_log2, int num_splits) {
  using L = DecodeLayout<HEAD_DIM, GROUP>;
  constexpr int HALF = HEAD_DIM / 2;
  constexpr int HALF_VECS = HALF / 8;  // 16-byte vectors in half a row
  constexpr int DIMS = HEAD_DIM / 32;  // output dims per lane
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim 64 or 128");

  TRILLM_DYNAMIC_SMEM(smem);
  trap_if(dynamic_smem_bytes() < u32(L::BYTES));
  float* q_s = reinterpret_cast<float*>(smem);                                             // [GROUP][Q_PITCH]
  u16* pipe = reinterpret_cast<u16*>(reinterpret_cast<unsigned char*>(smem) + L::Q_BYTES);  // per-warp rings

  const DecodeWork w = decode_work(context_lens, num_heads, num_kv_heads, head_chunks, GROUP, num_splits);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  u16* ring = pipe + warp * DEC_STAGES * L::STAGE_ELEMS;
  const int* table = block_tables + i64(w.seq) * max_blocks_per_seq;
  auto issue = [&](int local) {
    const int tile = w.tile_begin + warp + local * DEC_WARPS;
    if (tile < w.tile_end) {
      u16* ks = ring + (local % DEC_STAGES) * L::STAGE_ELEMS;
      issue_tile<HEAD_DIM>(ks, L::K_PITCH, ks + DEC_TILE * L::K_PITCH, L::V_PITCH, k_cache, v_cache, table, tile,
                           w.ctx, w.kv_head, num_kv_heads, block_size_log2, lane);
    }
    cp_async_commit();  // possibly empty: keeps the group count uniform for wait_group
  };

#pragma unroll
  for (int s = 0; s < DEC_STAGES - 1; ++s) issue(s);  // before q, so both latencies overlap
  for (int i = threadIdx.x; i < GROUP * HEAD_DIM; i += blockDim.x) {
    const int g = i / HEAD_DIM, d = i % HEAD_DIM;
    const float v =
        g < w.heads_here ? Elem<T>::to_float(q[w.seq * q_stride + i64(w.head_base + g) * HEAD_DIM + d].bits) : 0.f;
    q_s[g * L::Q_PITCH + (d < HALF ? d : d + 4)] = v * scale_log2;
  }
  __syncthreads();

  float m[GROUP], l[GROUP], acc[GROUP][DIMS];
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
    m[g] = TRILLM_NEG_INF;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < DIMS; ++j) acc[g][j] = 0.f;
  }
  const int t_lane = lane % DEC_TILE, half = lane / DEC_TILE;
  const float* q_half = q_s + half * (HALF + 4);

  for (int local = 0; w.tile_begin + warp + local * DEC_WARPS < w.tile_end; ++local) {
    cp_async_wait<DEC_STAGES - 2>();
    __syncwarp();  // this tile's copies are visible to the warp, and the previous tile is fully consumed
    issue(local + DEC_STAGES - 1);
    const int tile = w.tile_begin + warp + local * DEC_WARPS;
    const u16* ks = ring + (local % DEC_STAGES) * L::STAGE_ELEMS;
    const u16* vs = ks + DEC_TILE * L::K_PITCH;

    float s[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) s[g] = 0.f;
    const u16* k_row = ks + t_lane * L::K_PITCH + half * HALF;
#pragma unroll
    for (int c = 0; c < HALF_VECS; ++c) {
      float kf[8];
      unpack8<T>(*reinterpret_cast<const U4*>(k_row + c * 8), kf);
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const F4 qa = *reinterpret_cast<const F4*>(q_half + g * L::Q_PITCH + c * 8);
        const F4 qb = *reinterpret_cast<const F4*>(q_half + g * L::Q_PITCH + c * 8 + 4);
        s[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                qb.z * kf[6] + qb.w * kf[7];
      }
    }
    const bool valid = tile * DEC_TILE + t_lane < w.ctx;
    float p[GROUP];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
      float score = s[g] + shfl_xor(s[g], 16);
      score = valid ? score : TRILLM_NEG_INF;
      float tile_max = score;
#pragma unroll
      for (int off = DEC_TILE / 2; off > 0; off >>= 1) tile_max = fmaxf(tile_max, shfl_xor(tile_max, off));
      // tile < num_tiles, so token tile*16 is valid and tile_max (hence m_new) is finite
      const float m_new = fmaxf(m[g], tile_max);
      const float alpha = fast_exp2(m[g] - m_new);
      p[g] = fast_exp2(score - m_new);
      l[g] = l[g] * alpha + (half == 0 ? p[g] : 0.f);  // per-lane partial sums; each token counted once
#pragma unroll
      for (int j = 0; j < DIMS; ++j) acc[g][j] *= alpha;
      m[g] = m_new;
    }
#pragma unroll
    for (int t = 0; t < DEC_TILE; ++t) {
      float vf[DIMS];
      if constexpr (DIMS == 4) {
        const U2 v2 = *reinterpret_cast<const U2*>(vs + t * L::V_PITCH + lane * DIMS);
        Elem<T>::unpack2(v2.x, vf[0], vf[1]);
        Elem<T>::unpack2(v2.y, vf[2], vf[3]);
      } else {
        const u32 v1 = *reinterpret_cast<const u32*>(vs + t * L::V_PITCH + lane * DIMS);
        Elem<T>::unpack2(v1, vf[0], vf[1]);
      }
#pragma unroll
      for (int g = 0; g < GROUP; ++g) {
        const float pt = shfl(p[g], t);
#pragma unroll
        for (int j = 0; j < DIMS; ++j) acc[g][j] += pt * vf[j];
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int g = 0; g < GROUP; ++g) l[g] = warp_sum(l[g]);

  __syncthreads();  // every warp is out of its ring: reuse it for the merge
  float* red_acc = reinterpret_cast<float*>(pipe);         // [DEC_WARPS][GROUP][HEAD_DIM]
  float* red_ml = red_acc + DEC_WARPS * GROUP * HEAD_DIM;  // [DEC_WARPS][GROUP][2]
#pragma unroll
  for (int g = 0; g < GROUP; ++g) {
#pragma unroll
    for (int j = 0; j < DIMS; ++j) red_acc[(warp * GROUP + g) * HEAD_DIM + lane * DIMS + j] = acc[g][j];
    if (lane == 0) {
      red_ml[(warp * GROUP + g) * 2] = m[g];
      red_ml[(warp * GROUP + g) * 2 + 1] = l[g];
    }
  }
  __syncthreads();
  combine_warps<T, HEAD_DIM, GROUP>(red_acc, red_ml, w, out, part_out, part_ml, num_heads, num_splits);
}

// ---- tensor-core kernel -----------------------------------------------------------------------------------------
// Same grid, ring and outputs, but the scores of a 16-token tile are S = Q K^T on mma.sync.m16n8k16 with the CTA's
// query heads (up to 16, zero rows past the group) as M: Q lives in A fragments in registers, K rows come in as
// B fragments through ldmatrix; the exponentials are repacked from the accumulator layout into A fragments for
// O += P V (V through ldmatrix.trans). A lane holds heads g and g + 8 (g = lane / 4): row max and sum need two
// quad shuffles. STAGES: 3 (two CTAs per SM) or 6 (one CTA per SM, deep prefetch for small grids).

template <typename T, int HEAD_DIM, int STAGES>
__global__ void __launch_bounds__(DEC_WARPS * 32)
    paged_decode_mma_kernel(T* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_ml,
                            const T* __restrict__ q, i64 q_stride, const T* __restrict__ k_cache,
                            const T* __restrict__ v_cache, const int* __restrict__ block_tables,
                            int max_blocks_per_seq, const int* __restrict__ context_lens, int num_heads,
                            int num_kv_heads, int head_chunks, int block_size_log2, float scale_log2,
                            int num_splits) {
  using L = DecodeMmaLayout<HEAD_DIM, STAGES>;
  constexpr int K_STEPS = HEAD_DIM / 16;
  constexpr int D_TILES = HEAD_DIM / 8;
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim 64 or 128");

  TRILLM_DYNAMIC_SMEM(smem);
  trap_if(dynamic_smem_bytes() < u32(L::BYTES));
  u16* pipe = reinterpret_cast<u16*>(smem);

  const DecodeWork w = decode_work(context_lens, num_heads, num_kv_heads, head_chunks, DEC_MMA_ROWS, num_splits);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
  u16* ring = pipe + warp * STAGES * L::STAGE_ELEMS;
  const int* table = block_tables + i64(w.seq) * max_blocks_per_seq;
  auto issue = [&](int local) {
    const int tile = w.tile_begin + warp + local * DEC_WARPS;
    if (tile < w.tile_end) {
      u16* ks = ring + (local % STAGES) * L::STAGE_ELEMS;
      issue_tile<HEAD_DIM>(ks, L::PITCH, ks + DEC_TILE * L::PITCH, L::PITCH, k_cache, v_cache, table, tile, w.ctx,
                           w.kv_head, num_kv_heads, block_size_log2, lane);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s);  // before q, so both latencies overlap

  // Q as A fragments: row g = head g of the chunk, row g + 8 = head g + 8; rows past the group are zeros.
  u32 qa[K_STEPS][4];
  {
    const bool has0 = g < w.heads_here, has1 = g + 8 < w.heads_here;
    const T* q0 = q + w.seq * q_stride + i64(w.head_base + g) * HEAD_DIM + tq * 2;
    const T* q1 = q0 + 8 * HEAD_DIM;
#pragma unroll
    for (int kk = 0; kk < K_STEPS; ++kk) {
      qa[kk][0] = has0 ? *reinterpret_cast<const u32*>(q0 + kk * 16) : 0u;
      qa[kk][1] = has1 ? *reinterpret_cast<const u32*>(q1 + kk * 16) : 0u;
      qa[kk][2] = has0 ? *reinterpret_cast<const u32*>(q0 + kk * 16 + 8) : 0u;
      qa[kk][3] = has1 ? *reinterpret_cast<const u32*>(q1 + kk * 16 + 8) : 0u;
    }
  }
  float o[D_TILES][4];
#pragma unroll
  for (int i = 0; i < D_TILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {TRILLM_NEG_INF, TRILLM_NEG_INF}, l_r[2] = {0.f, 0.f};
  const int mat = lane / 8, mrow = lane % 8;  // ldmatrix: this lane addresses row mrow of matrix mat

  for (int local = 0; w.tile_begin + warp + local * DEC_WARPS < w.tile_end; ++local) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // this tile's copies are visible to the warp, and the previous tile is fully consumed
    issue(local + STAGES - 1);
    const int tile = w.tile_begin + warp + local * DEC_WARPS;
    const u16* ks = ring + (local % STAGES) * L::STAGE_ELEMS;
    const u16* vs = ks + DEC_TILE * L::PITCH;

    float sc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
      for (int kp = 0; kp < K_STEPS / 2; ++kp) {
        // matrices: tokens nt*8.. x dims kp*32 + 8 mat: B fragments of k-steps 2kp (mat 0, 1) and 2kp+1 (mat 2, 3)
        u32 kb[4];
        ldmatrix_x4(kb, ks + (nt * 8 + mrow) * L::PITCH + kp * 32 + mat * 8);
        const u32 b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(sc[nt], qa[2 * kp], b0);
        mma_16816<T>(sc[nt], qa[2 * kp + 1], b1);
      }
    }
    const int token0 = tile * DEC_TILE + tq * 2;
    float row_max[2] = {TRILLM_NEG_INF, TRILLM_NEG_INF};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float v = token0 + nt * 8 + (e & 1) < w.ctx ? sc[nt][e] * scale_log2 : TRILLM_NEG_INF;
        sc[nt][e] = v;
        row_max[e >> 1] = fmaxf(row_max[e >> 1], v);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 2));
      const float m_new = fmaxf(m_r[r], row_max[r]);  // finite: the tile's first token is valid
      alpha[r] = fast_exp2(m_r[r] - m_new);
      m_r[r] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = fast_exp2(sc[nt][e] - m_r[e >> 1]);
        sc[nt][e] = p;
        row_sum[e >> 1] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l_r[r] = l_r[r] * alpha[r] + row_sum[r];
#pragma unroll
    for (int i = 0; i < D_TILES; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // accumulator layout of n-tiles 0, 1 == A-fragment layout of the tile's one k-step
    const u32 pa[4] = {Elem<T>::pack2(sc[0][0], sc[0][1]), Elem<T>::pack2(sc[0][2], sc[0][3]),
                       Elem<T>::pack2(sc[1][0], sc[1][1]), Elem<T>::pack2(sc[1][2], sc[1][3])};
#pragma unroll
    for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
      u32 vb[4];
      ldmatrix_x4_trans(vb, vs + (mrow + (mat & 1) * 8) * L::PITCH + dp * 16 + (mat >> 1) * 8);
      const u32 b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
      mma_16816<T>(o[2 * dp], pa, b0);
      mma_16816<T>(o[2 * dp + 1], pa, b1);
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += shfl_xor(l_r[r], 1);
    l_r[r] += shfl_xor(l_r[r], 2);
  }

  __syncthreads();  // every warp is out of its ring: reuse it for the merge
  float* red_acc = reinterpret_cast<float*>(pipe);                // [DEC_WARPS][16][HEAD_DIM]
  float* red_ml = red_acc + DEC_WARPS * DEC_MMA_ROWS * HEAD_DIM;  // [DEC_WARPS][16][2]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * DEC_MMA_ROWS + g + 8 * r;
#pragma unroll
    for (int i = 0; i < D_TILES; ++i) {
      red_acc[row * HEAD_DIM + i * 8 + tq * 2] = o[i][2 * r];
      red_acc[row * HEAD_DIM + i * 8 + tq * 2 + 1] = o[i][2 * r + 1];
    }
    if (tq == 0) {
      red_ml[row * 2] = m_r[r];
      red_ml[row * 2 + 1] = l_r[r];
    }
  }
  __syncthreads();
  combine_warps<T, HEAD_DIM, DEC_MMA_ROWS>(red_acc, red_ml, w, out, part_out, part_ml, num_heads, num_splits);
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM)
    paged_decode_merge_kernel(T* __restrict__ out, const float* __restrict__ part_out,
                              const float* __restrict__ part_ml, int num_heads, int num_splits) {
  const int head = blockIdx.x, seq = blockIdx.y, d = threadIdx.x;
  const i64 head_row = i64(seq) * num_heads + head;
  const float* ml = part_ml + head_row * num_splits * 2;
  float m_all = TRILLM_NEG_INF;
  for (int p = 0; p < num_splits; ++p) m_all = fmaxf(m_all, ml[2 * p]);
  float sum = 0.f, o = 0.f;
  for (int p = 0; p < num_splits; ++p) {
    if (ml[2 * p] == TRILLM_NEG_INF) continue;  // empty split: its partial row is zeros
    const float scale = fast_exp2(ml[2 * p] - m_all);
    sum += ml[2 * p + 1] * scale;
    o += part_out[(head_row * num_splits + p) * HEAD_DIM + d] * scale;
  }
  out[head_row * HEAD_DIM + d].bits = Elem<T>::from_float(o / sum);
}
