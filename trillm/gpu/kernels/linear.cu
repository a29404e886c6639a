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
// Mapping: grid = (ceil(n_out / (LIN_WARPS * cols))); block = LIN_WARPS warps; each warp owns `cols` consecutive
// output columns (LIN_ROWS weight rows: 4 columns, or 2 gate/up pairs with SWIGLU). Its lanes stride over k in
// 16-byte vectors (k % 8 == 0): a lane loads one vector of x per row m and uses it for all LIN_ROWS weight rows
// (register reuse keeps x traffic at M/LIN_ROWS of the weight traffic), with LIN_UNROLL vectors of every weight
// row in flight (streamed past L1). fp32 accumulators are reduced across the warp at the end. Columns past n_out
// read row 0 and store nothing.
//
// NORM: the block first forms the normalised input in shared memory (M x k elements of T): x (+ residual, rounded
// to T; block 0 also writes it to residual_out), the row's inverse RMS by a block reduction, then x * inv_rms
// rounded to T, times the norm weight, rounded to T — the unfused ops' roundings. The first weight loads are issued
// before this prologue, so it hides under them. The projection is rounded to T after its bias, SwiGLU's product once.
#include "common.cuh"

constexpr int LIN_WARPS = 4;
constexpr int LIN_ROWS = 4;
constexpr int LIN_UNROLL = 4;  // the H100 profile had o and down at ~80 % of bandwidth with 2: too few bytes in flight

TRILLM_INLINE float round_to(float f, bool is_bf16) {
  return is_bf16 ? Elem<bf16_t>::to_float(Elem<bf16_t>::from_float(f)) : Elem<fp16_t>::to_float(Elem<fp16_t>::from_float(f));
}

template <typename T, int M, int NORM, int SWIGLU>
__global__ void __launch_bounds__(LIN_WARPS * 32)
    gemv_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                const T* __restrict__ residual, const T* __restrict__ norm_weight, const T* __restrict__ weight,
                const T* __restrict__ bias, int n_out, int k, int x_stride, float eps) {
  constexpr int NW = SWIGLU ? 2 : 1;     // weight rows per output column
  constexpr int COLS = LIN_ROWS / NW;    // output columns per warp
  constexpr bool is_bf16 = Elem<T>::is_bf16;
  TRILLM_DYNAMIC_SMEM(x_smem);           // NORM: the normalised input, [M][k] elements of T
  __shared__ float scratch[32];
  const int lane = threadIdx.x % 32;
  const int col0 = (blockIdx.x * LIN_WARPS + threadIdx.x / 32) * COLS;
  const int num_vecs = k / 8;
  const U4* w_rows[LIN_ROWS];
#pragma unroll
  for (int c = 0; c < COLS; ++c)
#pragma unroll
    for (int r = 0; r < NW; ++r) {
      const i64 row = col0 + c < n_out ? i64(col0 + c) + i64(r) * n_out : 0;  // past n_out: a harmless read
      w_rows[c * NW + r] = reinterpret_cast<const U4*>(weight + row * k);
    }

  // The first weight vectors are requested before the prologue, so the two overlap.
  U4 wv[LIN_UNROLL][LIN_ROWS];
#pragma unroll
  for (int u = 0; u < LIN_UNROLL; ++u) {
    const int v = u * 32 + lane;
#pragma unroll
    for (int r = 0; r < LIN_ROWS; ++r) wv[u][r] = v < num_vecs ? load_stream(w_rows[r] + v) : U4{0, 0, 0, 0};
  }

  if (NORM) {
    trap_if(dynamic_smem_bytes() < u32(M) * u32(num_vecs) * 16u);
    const U4* w_norm = reinterpret_cast<const U4*>(norm_weight);
    for (int m = 0; m < M; ++m) {
      const U4* x_row = reinterpret_cast<const U4*>(x + i64(m) * x_stride);
      const U4* r_row = reinterpret_cast<const U4*>(residual + i64(m) * x_stride);
      U4* row_smem = x_smem + m * num_vecs;
      float sum_sq = 0.f;
      for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
        U4 xv = x_row[v];
        float f[8];
        unpack8<T>(xv, f);
        if (residual != nullptr) {
          float r[8];
          unpack8<T>(r_row[v], r);
#pragma unroll
          for (int j = 0; j < 8; ++j) f[j] += r[j];
          xv = pack8<T>(f);
          unpack8<T>(xv, f);  // rounded to T, as the separate add would leave it
          if (blockIdx.x == 0) reinterpret_cast<U4*>(residual_out + i64(m) * k)[v] = xv;
        }
        row_smem[v] = xv;
#pragma unroll
        for (int j = 0; j < 8; ++j) sum_sq += f[j] * f[j];
      }
      const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / float(k) + eps);  // its barriers publish row_smem
      for (int v = threadIdx.x; v < num_vecs; v += blockDim.x) {
        float f[8], w[8];
        unpack8<T>(row_smem[v], f);
        unpack8<T>(w_norm[v], w);
#pragma unroll
        for (int j = 0; j < 8; ++j) f[j] = round_to(f[j] * inv_rms, is_bf16) * w[j];
        row_smem[v] = pack8<T>(f);
      }
    }
    __syncthreads();
  }

  float acc[LIN_ROWS][M];
#pragma unroll
  for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  for (int base = 0; base < num_vecs; base += LIN_UNROLL * 32) {
#pragma unroll
    for (int u = 0; u < LIN_UNROLL; ++u) {
      const int v = base + u * 32 + lane;
      if (v < num_vecs) {
        float wf[LIN_ROWS][8];
#pragma unroll
        for (int r = 0; r < LIN_ROWS; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          unpack8<T>(NORM ? x_smem[m * num_vecs + v] : reinterpret_cast<const U4*>(x + i64(m) * x_stride)[v], xf);
#pragma unroll
          for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][m] += wf[r][j] * xf[j];
        }
      }
      // Refill this slot with the vector LIN_UNROLL * 32 further on: a whole round of loads stays in flight.
      const int next = v + LIN_UNROLL * 32;
#pragma unroll
      for (int r = 0; r < LIN_ROWS; ++r) wv[u][r] = next < num_vecs ? load_stream(w_rows[r] + next) : U4{0, 0, 0, 0};
    }
  }

#pragma unroll
  for (int r = 0; r < LIN_ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
  // Lane c * M + m stores column col0 + c of row m (registers take compile-time indices, hence the loop).
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int col = col0 + c;
      if (lane != c * M + m || col >= n_out) continue;
      float y = acc[c * NW][m] + (bias != nullptr ? Elem<T>::to_float(reinterpret_cast<const u16*>(bias)[col]) : 0.f);
      y = round_to(y, is_bf16);
      if (SWIGLU) {
        float up = acc[c * NW + NW - 1][m];
        if (bias != nullptr) up += Elem<T>::to_float(reinterpret_cast<const u16*>(bias)[n_out + col]);
        up = round_to(up, is_bf16);
        y = y / (1.f + __expf(-y)) * up;
      }
      reinterpret_cast<u16*>(out)[i64(m) * n_out + col] = Elem<T>::from_float(y);
    }
  }
}
