// rotary.cu — rotate-half RoPE fused with the paged KV-cache write (reference: gpu/reference.py apply_rotary,
// write_kv_cache, rotary_cache_write). One kernel serves all three: the flags and null pointers pick the parts.
//
// Layouts:
//   q_in/q_out [num_tokens, num_heads, head_dim], k_in/k_out/v [num_tokens, num_kv_heads, head_dim]: heads and
//     head_dim packed, the token stride is a parameter (views into a fused qkv projection need no copy);
//     q_out == q_in and k_out == k_in rotate in place.
//   positions [num_tokens], slot_mapping [num_tokens]: int32 or int64 (flags); slot -1 writes nothing.
//   cos_sin_cache [max_positions, rotary_dim] of C (float or T): cos in the first half, sin in the second.
//   k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim]; slot = block * block_size + offset.
// Mapping: grid = (num_tokens, splits): `splits` CTAs per token share its work (more than one only for small
// batches, where one CTA per token left a decode step's rotation latency-bound: 5 us at batch 1); block = 128
// threads, unit u of a token handled by CTA u / 128 % splits. Pass 1: one thread per (head, 8 rotary
// pairs): x1 = x[8j..8j+8), x2 = x[rot/2 + 8j..), 16-byte vectors (rotary_dim % 16 == 0); rotated q goes to
// q_out, rotated k to k_out and to the cache. Pass 2: one thread per 16-byte vector of the pass-through dims
// (head_dim > rotary_dim) of q (only when q_out != q_in), k (unrotated when rotate_k == 0) and v (cache only).
// Every vector is read and written by the same thread, so in-place rotation needs no barrier.
#include "common.cuh"

template <typename C> TRILLM_INLINE void load_cos_sin8(const C* row, int half, int j, float c[8], float s[8]);

template <> TRILLM_INLINE void load_cos_sin8<float>(const float* row, int half, int j, float c[8], float s[8]) {
  const F4* cv = reinterpret_cast<const F4*>(row + 8 * j);
  const F4* sv = reinterpret_cast<const F4*>(row + half + 8 * j);
  const F4 c0 = cv[0], c1 = cv[1], s0 = sv[0], s1 = sv[1];
  c[0] = c0.x, c[1] = c0.y, c[2] = c0.z, c[3] = c0.w, c[4] = c1.x, c[5] = c1.y, c[6] = c1.z, c[7] = c1.w;
  s[0] = s0.x, s[1] = s0.y, s[2] = s0.z, s[3] = s0.w, s[4] = s1.x, s[5] = s1.y, s[6] = s1.z, s[7] = s1.w;
}

template <> TRILLM_INLINE void load_cos_sin8<bf16_t>(const bf16_t* row, int half, int j, float c[8], float s[8]) {
  unpack8<bf16_t>(*reinterpret_cast<const U4*>(row + 8 * j), c);
  unpack8<bf16_t>(*reinterpret_cast<const U4*>(row + half + 8 * j), s);
}

template <> TRILLM_INLINE void load_cos_sin8<fp16_t>(const fp16_t* row, int half, int j, float c[8], float s[8]) {
  unpack8<fp16_t>(*reinterpret_cast<const U4*>(row + 8 * j), c);
  unpack8<fp16_t>(*reinterpret_cast<const U4*>(row + half + 8 * j), s);
}

template <typename T, typename C>
__global__ void __launch_bounds__(128)
    rotary_cache_kernel(T* q_out, const T* q_in, i64 q_out_stride, i64 q_in_stride, int num_heads,  //
                        T* k_out, const T* k_in, i64 k_out_stride, i64 k_in_stride, int num_kv_heads,
                        const T* __restrict__ v, i64 v_stride, T* __restrict__ k_cache, T* __restrict__ v_cache,
                        const void* __restrict__ slot_mapping, int slot_is_int64,
                        const void* __restrict__ positions, int pos_is_int64,
                        const C* __restrict__ cos_sin_cache, int rotary_dim, int head_dim, int block_size,
                        int rotate_k, int write_cache) {
  const i64 token = blockIdx.x;
  const int first_unit = blockIdx.y * blockDim.x + threadIdx.x, unit_stride = gridDim.y * blockDim.x;
  const int half = rotary_dim / 2;
  const int pair_vecs = half / 8;
  const i64 slot = write_cache ? load_index(slot_mapping, token, slot_is_int64) : -1;
  // cache row of this token for kv head h: ((block * num_kv_heads + h) * block_size + offset) * head_dim
  const i64 cache_base = slot >= 0 ? ((slot / block_size) * num_kv_heads * block_size + slot % block_size) * head_dim : 0;
  const i64 cache_head_stride = i64(block_size) * head_dim;

  // Pass 1: rotary pairs of q heads, then (when rotating k) of k heads.
  const int rot_units = (num_heads + (rotate_k ? num_kv_heads : 0)) * pair_vecs;
  if (rot_units > 0) {
    const C* cs_row = cos_sin_cache + load_index(positions, token, pos_is_int64) * rotary_dim;
    for (int u = first_unit; u < rot_units; u += unit_stride) {
      const int head = u / pair_vecs, j = u % pair_vecs;
      const bool is_q = head < num_heads;
      const int h = is_q ? head : head - num_heads;
      const T* src = is_q ? q_in + token * q_in_stride + h * head_dim : k_in + token * k_in_stride + h * head_dim;
      float x1[8], x2[8], c[8], s[8], o1[8], o2[8];
      unpack8<T>(*reinterpret_cast<const U4*>(src + 8 * j), x1);
      unpack8<T>(*reinterpret_cast<const U4*>(src + half + 8 * j), x2);
      load_cos_sin8<C>(cs_row, half, j, c, s);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        o1[e] = x1[e] * c[e] - x2[e] * s[e];
        o2[e] = x2[e] * c[e] + x1[e] * s[e];
      }
      const U4 r1 = pack8<T>(o1), r2 = pack8<T>(o2);
      T* dst = is_q ? q_out + token * q_out_stride + h * head_dim
                    : (k_out != nullptr ? k_out + token * k_out_stride + h * head_dim : nullptr);
      if (dst != nullptr) {
        *reinterpret_cast<U4*>(dst + 8 * j) = r1;
        *reinterpret_cast<U4*>(dst + half + 8 * j) = r2;
      }
      if (!is_q && slot >= 0) {
        T* cache_row = k_cache + cache_base + h * cache_head_stride;
        *reinterpret_cast<U4*>(cache_row + 8 * j) = r1;
        *reinterpret_cast<U4*>(cache_row + half + 8 * j) = r2;
      }
    }
  }

  // Pass 2a: q pass-through dims, only when rotating out of place.
  const int pass_vecs = (head_dim - rotary_dim) / 8;
  if (q_out != q_in && pass_vecs > 0) {
    for (int u = first_unit; u < num_heads * pass_vecs; u += unit_stride) {
      const int h = u / pass_vecs, d = rotary_dim + 8 * (u % pass_vecs);
      *reinterpret_cast<U4*>(q_out + token * q_out_stride + h * head_dim + d) =
          *reinterpret_cast<const U4*>(q_in + token * q_in_stride + h * head_dim + d);
    }
  }

  // Pass 2b: the k dims pass 1 did not handle, and v.
  const bool copy_k = k_out != nullptr && k_out != k_in;
  if (slot < 0 && !copy_k) return;
  const int row_vecs = head_dim / 8;
  const int k_first_vec = rotate_k ? rotary_dim / 8 : 0;
  for (int u = first_unit; u < num_kv_heads * row_vecs; u += unit_stride) {
    const int h = u / row_vecs, vec = u % row_vecs;
    T* cache_off = slot >= 0 ? k_cache + cache_base + h * cache_head_stride + 8 * vec : nullptr;
    if (vec >= k_first_vec) {
      const U4 kv = *reinterpret_cast<const U4*>(k_in + token * k_in_stride + h * head_dim + 8 * vec);
      if (copy_k) *reinterpret_cast<U4*>(k_out + token * k_out_stride + h * head_dim + 8 * vec) = kv;
      if (cache_off != nullptr) *reinterpret_cast<U4*>(cache_off) = kv;
    }
    if (slot >= 0) {
      *reinterpret_cast<U4*>(v_cache + cache_base + h * cache_head_stride + 8 * vec) =
          *reinterpret_cast<const U4*>(v + token * v_stride + h * head_dim + 8 * vec);
    }
  }
}
