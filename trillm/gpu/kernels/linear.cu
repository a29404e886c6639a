// linear.cu — y = x Wᵀ (+ bias) for the few rows of a decode step, with the RMSNorm that precedes a projection (and
// its residual add) fused in front and SwiGLU fused behind (reference: gpu/reference.py fused_linear).
//
// At batch 1..8 a projection is a matrix-vector product: every weight byte is read once and used M times, so the
// kernel is a stream over W at DRAM bandwidth and everything else must hide under it. Fusing the norm in front
// removes the rms_norm launch and its round trip through memory; fusing SwiGLU removes silu_and_mul's.
//
// Layouts (row-major): x, residual [M, k] with row stride x_stride (elements; rows 16-byte aligned);
// norm_weight [k]; weight [n_w, k] contiguous with n_w = n_out, or 2 * n_out with SWIGLU (gate rows, then up rows);
// bias [n_w] or null; out [M, n_out]; residual_out [M, k] (x + residual, written when residual is given).
// Mapping: grid = (ceil(n_out / LIN_WARPS)); block = LIN_WARPS warps; warp w of block b owns output column
// b * LIN_WARPS + w: its lanes stride over k in 16-byte vectors (k % 8 == 0), LIN_UNROLL vectors of each weight row
// in flight per lane (streamed past L1), x re-read through L1 (it is tiny and shared by every warp), fp32
// accumulators reduced across the warp at the end. No shared memory, no block barrier.
//
// NORM: every warp computes the row's inverse RMS itself (one read of x, and residual, from L2/L1) after issuing its
// first weight loads, so the prologue hides under them; warp 0 of block 0 writes residual_out. Roundings follow
// the unfused ops: x + residual rounded to T, x * inv_rms rounded to T, times the norm weight rounded to T, the
// projection rounded to T (after its bias), and SwiGLU's product rounded once.
#include "common.cuh"

constexpr int LIN_WARPS = 8;
constexpr int LIN_UNROLL = 4;

TRILLM_INLINE float round_to(float f, bool is_bf16) {
  return is_bf16 ? Elem<bf16_t>::to_float(Elem<bf16_t>::from_float(f)) : Elem<fp16_t>::to_float(Elem<fp16_t>::from_float(f));
}

// The 8 input features of vector `v` of row `m`, as the projection sees them (normalised when NORM).
template <typename T, int NORM>
TRILLM_INLINE void input_vector(float f[8], const T* __restrict__ x, const T* __restrict__ residual,
                                const T* __restrict__ norm_weight, int m, int v, int x_stride, float inv_rms) {
  constexpr bool is_bf16 = Elem<T>::is_bf16;
  unpack8<T>(reinterpret_cast<const U4*>(x + i64(m) * x_stride)[v], f);
  if (NORM) {
    if (residual != nullptr) {
      float r[8];
      unpack8<T>(reinterpret_cast<const U4*>(residual + i64(m) * x_stride)[v], r);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] = round_to(f[j] + r[j], is_bf16);
    }
    float w[8];
    unpack8<T>(reinterpret_cast<const U4*>(norm_weight)[v], w);
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = round_to(round_to(f[j] * inv_rms, is_bf16) * w[j], is_bf16);
  }
}

template <typename T, int M, int NORM, int SWIGLU>
__global__ void __launch_bounds__(LIN_WARPS * 32)
    gemv_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                const T* __restrict__ residual, const T* __restrict__ norm_weight, const T* __restrict__ weight,
                const T* __restrict__ bias, int n_out, int k, int x_stride, float eps) {
  constexpr int NW = SWIGLU ? 2 : 1;  // weight rows per output column
  constexpr bool is_bf16 = Elem<T>::is_bf16;
  const int lane = threadIdx.x % 32;
  const int col = blockIdx.x * LIN_WARPS + threadIdx.x / 32;
  if (col >= n_out) return;
  const int num_vecs = k / 8;
  const U4* w_rows[NW];
#pragma unroll
  for (int r = 0; r < NW; ++r) w_rows[r] = reinterpret_cast<const U4*>(weight + (i64(col) + i64(r) * n_out) * k);

  // The first weight vectors are requested before the prologue's reads of x, so the two overlap.
  U4 wv[LIN_UNROLL][NW];
#pragma unroll
  for (int u = 0; u < LIN_UNROLL; ++u) {
    const int v = u * 32 + lane;
#pragma unroll
    for (int r = 0; r < NW; ++r) wv[u][r] = v < num_vecs ? load_stream(w_rows[r] + v) : U4{0, 0, 0, 0};
  }

  float inv_rms[M];
#pragma unroll
  for (int m = 0; m < M; ++m) inv_rms[m] = 1.f;
  if (NORM) {
    const bool writes_sum = residual != nullptr && blockIdx.x == 0 && threadIdx.x < 32;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float sum_sq = 0.f;
      for (int v = lane; v < num_vecs; v += 32) {
        float f[8];
        unpack8<T>(reinterpret_cast<const U4*>(x + i64(m) * x_stride)[v], f);
        if (residual != nullptr) {
          float r[8];
          unpack8<T>(reinterpret_cast<const U4*>(residual + i64(m) * x_stride)[v], r);
#pragma unroll
          for (int j = 0; j < 8; ++j) f[j] += r[j];
          const U4 sum = pack8<T>(f);
          unpack8<T>(sum, f);  // rounded to T, as the separate add would leave it
          if (writes_sum) reinterpret_cast<U4*>(residual_out + i64(m) * k)[v] = sum;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) sum_sq += f[j] * f[j];
      }
      inv_rms[m] = rsqrtf(warp_sum(sum_sq) / float(k) + eps);
    }
  }

  float acc[NW][M];
#pragma unroll
  for (int r = 0; r < NW; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  for (int base = 0; base < num_vecs; base += LIN_UNROLL * 32) {
#pragma unroll
    for (int u = 0; u < LIN_UNROLL; ++u) {
      const int v = base + u * 32 + lane;
      if (v < num_vecs) {
        float wf[NW][8];
#pragma unroll
        for (int r = 0; r < NW; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          input_vector<T, NORM>(xf, x, residual, norm_weight, m, v, x_stride, inv_rms[m]);
#pragma unroll
          for (int r = 0; r < NW; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][m] += wf[r][j] * xf[j];
        }
      }
      // Refill this slot with the vector LIN_UNROLL * 32 further on: a whole round of loads stays in flight.
      const int next = v + LIN_UNROLL * 32;
#pragma unroll
      for (int r = 0; r < NW; ++r) wv[u][r] = next < num_vecs ? load_stream(w_rows[r] + next) : U4{0, 0, 0, 0};
    }
  }

#pragma unroll
  for (int r = 0; r < NW; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
  if (lane < M) {
    // Lane m writes row m (registers are indexed with compile-time m only, so the value is picked by a loop).
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (m != lane) continue;
      float y = acc[0][m] + (bias != nullptr ? Elem<T>::to_float(reinterpret_cast<const u16*>(bias)[col]) : 0.f);
      y = round_to(y, is_bf16);
      if (SWIGLU) {
        float up = acc[NW - 1][m] + (bias != nullptr ? Elem<T>::to_float(reinterpret_cast<const u16*>(bias)[n_out + col]) : 0.f);
        up = round_to(up, is_bf16);
        y = y / (1.f + __expf(-y)) * up;
      }
      reinterpret_cast<u16*>(out)[i64(m) * n_out + col] = Elem<T>::from_float(y);
    }
  }
}
