// prefill_attention.cu — causal attention for ragged query chunks over the paged KV cache, on tensor cores
// (reference: gpu/reference.py paged_prefill_attention). Chunked prefill and prefix-cache hits use the same
// kernel: the chunk's queries sit at the end of the context, and its own K/V must already be in the cache.
//
// Layouts:
//   q [num_tokens, num_heads, HEAD_DIM] (token stride q_stride, heads packed), sequences back to back;
//   out [num_tokens, num_heads, HEAD_DIM] contiguous
//   cu_seqlens_q [num_seqs + 1] int32: sequence s owns query rows cu[s] .. cu[s+1]
//   context_lens [num_seqs] int32: cached positions including this chunk's; row i of s sits at ctx - q_len + i
//   k_cache, v_cache [num_blocks, num_kv_heads, block_size, HEAD_DIM]; block_tables [num_seqs, max_blocks] int32
//
// Mapping: grid = (q-tile bound, num_heads); block = 4 warps. gridDim.x - 1 - blockIdx.x is a tile of 64 query
// rows counted over all sequences (sequence s has ceil(q_len_s / 64) tiles; counting from the end of the grid
// starts the tiles that see the most keys first); warp 0 finds its sequence with a prefix sum over cu_seqlens_q
// on the device, CTAs past the last tile exit. So the grid needs only host-known sizes.
// Each warp owns 16 query rows. Q (64 x HEAD_DIM) is staged through shared memory into mma A fragments once;
// K and V stream in tiles of 64 tokens through a 2-stage cp.async double buffer (rows found through the block
// table, tokens past the causal limit zero-filled). S = Q K^T with mma.sync.m16n8k16 (bf16/fp16 -> fp32; K rows
// read as B fragments with ldmatrix), masked causally, online softmax in fp32 with exp2; P is
// repacked from the accumulator layout straight into A fragments, and O += P V uses ldmatrix.trans for the V
// fragments. Shared-memory rows are padded by 16 bytes so fragment loads are bank-conflict free.
#include "common.cuh"

constexpr int PF_WARPS = 4;
constexpr int PF_BM = 64;  // query rows per CTA (16 per warp)
constexpr int PF_BN = 64;  // KV tokens per tile

template <int HEAD_DIM> struct PrefillLayout {
  static constexpr int PITCH = HEAD_DIM + 8;  // elements per shared-memory row
  static constexpr int Q_ELEMS = PF_BM * PITCH;
  static constexpr int KV_ELEMS = PF_BN * PITCH;  // one tensor, one stage
  static constexpr int BYTES = (Q_ELEMS + 2 * 2 * KV_ELEMS) * 2;
};

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(PF_WARPS * 32)
    paged_prefill_kernel(T* __restrict__ out, const T* __restrict__ q, i64 q_stride, const T* __restrict__ k_cache,
                         const T* __restrict__ v_cache, const int* __restrict__ block_tables, int max_blocks_per_seq,
                         const int* __restrict__ cu_seqlens_q, const int* __restrict__ context_lens, int num_seqs,
                         int num_heads, int num_kv_heads, int block_size_log2, float scale_log2) {
  using L = PrefillLayout<HEAD_DIM>;
  constexpr int ROW_VECS = HEAD_DIM / 8;
  constexpr int K_STEPS = HEAD_DIM / 16;  // mma k-steps over head_dim for S
  constexpr int N_TILES = PF_BN / 8;      // mma n-tiles over KV tokens for S
  constexpr int D_TILES = HEAD_DIM / 8;   // mma n-tiles over head_dim for O
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "head_dim 64 or 128");

  TRILLM_DYNAMIC_SMEM(smem);
  trap_if(dynamic_smem_bytes() < u32(L::BYTES));
  __shared__ int found[2];  // (sequence, its q tile) of this CTA

  if (threadIdx.x < 32) {
    // heaviest first: the last tiles of a sequence see the most keys, so count tiles from the end of the grid
    const int lane = threadIdx.x, target = gridDim.x - 1 - blockIdx.x;
    if (lane == 0) found[0] = -1;
    __syncwarp();
    int running = 0;  // tiles of the sequences before this chunk of 32
    for (int base = 0; base < num_seqs; base += 32) {
      const int s = base + lane;
      const int n = s < num_seqs ? (cu_seqlens_q[s + 1] - cu_seqlens_q[s] + PF_BM - 1) / PF_BM : 0;
      int incl = n;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_sync(0xffffffffu, incl, (lane - off) & 31);
        if (lane >= off) incl += y;
      }
      if (target >= running + incl - n && target < running + incl) {
        found[0] = s;
        found[1] = target - running - (incl - n);
      }
      running += __shfl_sync(0xffffffffu, incl, 31);
      if (target < running) break;
    }
  }
  __syncthreads();
  const int seq = found[0];
  if (seq < 0) return;  // past the last tile (the grid is an upper bound)

  const int q_tile = found[1];
  const int head = blockIdx.y;
  const int kv_head = head / (num_heads / num_kv_heads);
  const int q_start = cu_seqlens_q[seq];
  const int q_len = cu_seqlens_q[seq + 1] - q_start;
  const int ctx = context_lens[seq];
  const int row0 = q_tile * PF_BM;
  const int rows = imin(PF_BM, q_len - row0);
  const int pos0 = ctx - q_len + row0;       // position of the tile's first row
  const int kv_end = imin(ctx, pos0 + rows);  // the last row sees positions < kv_end
  const int num_kv_tiles = (kv_end + PF_BN - 1) / PF_BN;

  u16* q_s = reinterpret_cast<u16*>(smem);
  u16* kv_s = q_s + L::Q_ELEMS;  // stage s: K at kv_s + 2 s KV_ELEMS, V right after it
  const int tid = threadIdx.x;

  for (int c = tid; c < PF_BM * ROW_VECS; c += blockDim.x) {
    const int r = c / ROW_VECS, vec = c % ROW_VECS;
    const bool valid = r < rows;
    const T* src = q + i64(q_start + row0 + (valid ? r : 0)) * q_stride + i64(head) * HEAD_DIM + vec * 8;
    cp_async16(q_s + r * L::PITCH + vec * 8, src, valid);
  }

  const int* table = block_tables + i64(seq) * max_blocks_per_seq;
  const int block_mask = (1 << block_size_log2) - 1;
  const i64 head_off = i64(kv_head) << (block_size_log2 + (HEAD_DIM == 128 ? 7 : 6));
  const i64 block_stride = i64(num_kv_heads) << (block_size_log2 + (HEAD_DIM == 128 ? 7 : 6));
  auto load_kv = [&](int tile, int stage) {
    u16* ks = kv_s + stage * 2 * L::KV_ELEMS;
    u16* vs = ks + L::KV_ELEMS;
    for (int c = tid; c < PF_BN * ROW_VECS; c += blockDim.x) {
      const int t = c / ROW_VECS, vec = c % ROW_VECS;
      const int token = tile * PF_BN + t;
      const bool valid = token < kv_end;
      const int block = valid ? table[token >> block_size_log2] : 0;
      const i64 off = block * block_stride + head_off + i64(token & block_mask) * HEAD_DIM + vec * 8;
      cp_async16(ks + t * L::PITCH + vec * 8, k_cache + off, valid);
      cp_async16(vs + t * L::PITCH + vec * 8, v_cache + off, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();  // group 0: Q and the first KV tile

  const int warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int mat = lane / 8, mrow = lane % 8;  // ldmatrix: this lane addresses row mrow of matrix mat
  const int wrow = warp * 16;
  // positions of this thread's two rows (g and g + 8); rows past the chunk are clamped to a real one so their
  // (discarded) softmax stays finite
  int pos_r[2];
  pos_r[0] = pos0 + imin(wrow + g, rows - 1);
  pos_r[1] = pos0 + imin(wrow + g + 8, rows - 1);
  const int warp_first_pos = pos0 + imin(wrow, rows - 1);

  u32 qa[K_STEPS][4];
  float o[D_TILES][4];
#pragma unroll
  for (int i = 0; i < D_TILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {TRILLM_NEG_INF, TRILLM_NEG_INF}, l_r[2] = {0.f, 0.f};

  for (int it = 0; it < num_kv_tiles; ++it) {
    if (it + 1 < num_kv_tiles) {
      load_kv(it + 1, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < K_STEPS; ++kk) {
        const u16* r0 = q_s + (wrow + g) * L::PITCH + kk * 16 + tq * 2;
        const u16* r1 = r0 + 8 * L::PITCH;
        qa[kk][0] = *reinterpret_cast<const u32*>(r0);
        qa[kk][1] = *reinterpret_cast<const u32*>(r1);
        qa[kk][2] = *reinterpret_cast<const u32*>(r0 + 8);
        qa[kk][3] = *reinterpret_cast<const u32*>(r1 + 8);
      }
    }
    const u16* ks = kv_s + (it & 1) * 2 * L::KV_ELEMS;
    const u16* vs = ks + L::KV_ELEMS;

    float sc[N_TILES][4];
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) {
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

    const int kv0 = it * PF_BN;
    const bool need_mask = kv0 + PF_BN - 1 > warp_first_pos;  // warp-uniform
    float row_max[2] = {TRILLM_NEG_INF, TRILLM_NEG_INF};
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = sc[nt][e] * scale_log2;
        if (need_mask && kv0 + nt * 8 + tq * 2 + (e & 1) > pos_r[e >> 1]) v = TRILLM_NEG_INF;
        sc[nt][e] = v;
        row_max[e >> 1] = fmaxf(row_max[e >> 1], v);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 1));
      row_max[r] = fmaxf(row_max[r], shfl_xor(row_max[r], 2));
      // position 0 is visible to every row, so after the first tile m_r is finite
      const float m_new = fmaxf(m_r[r], row_max[r]);
      alpha[r] = fast_exp2(m_r[r] - m_new);
      m_r[r] = m_new;
    }
    float row_sum[2] = {0.f, 0.f};
#pragma unroll
    for (int nt = 0; nt < N_TILES; ++nt) {
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

#pragma unroll
    for (int kk = 0; kk < PF_BN / 16; ++kk) {
      // accumulator layout of n-tiles 2kk, 2kk+1 == A-fragment layout of k-step kk
      const u32 pa[4] = {Elem<T>::pack2(sc[2 * kk][0], sc[2 * kk][1]), Elem<T>::pack2(sc[2 * kk][2], sc[2 * kk][3]),
                         Elem<T>::pack2(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                         Elem<T>::pack2(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < HEAD_DIM / 16; ++dp) {
        u32 vb[4];
        ldmatrix_x4_trans(vb, vs + (kk * 16 + mrow + (mat & 1) * 8) * L::PITCH + dp * 16 + (mat >> 1) * 8);
        const u32 b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(o[2 * dp], pa, b0);
        mma_16816<T>(o[2 * dp + 1], pa, b1);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_r[r] += shfl_xor(l_r[r], 1);
    l_r[r] += shfl_xor(l_r[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wrow + g + 8 * r;
    if (row >= rows) continue;
    const float inv = 1.f / l_r[r];
    T* dst = out + (i64(q_start + row0 + row) * num_heads + head) * HEAD_DIM + tq * 2;
#pragma unroll
    for (int i = 0; i < D_TILES; ++i) {
      *reinterpret_cast<u32*>(dst + i * 8) = Elem<T>::pack2(o[i][2 * r] * inv, o[i][2 * r + 1] * inv);
    }
  }
}
