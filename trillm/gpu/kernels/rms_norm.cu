// rms_norm.cu — RMSNorm with an optional fused residual add (reference: gpu/reference.py rms_norm).
//
// Layouts (all row-major, contiguous):
//   x, residual, out, residual_out: [num_tokens, hidden]    weight: [hidden]
// Mapping: grid = (num_tokens), one CTA per token row; block = THREADS (a multiple of 32, <= 1024) threads
// striding over the row in 16-byte vectors (8 elements, so hidden % 8 == 0). Dynamic shared memory holds the
// row (hidden elements of T) between the two passes: pass 1 forms x (+ residual), rounded to T exactly as a
// separate add would, stores it to residual_out and accumulates the sum of squares in fp32; pass 2 normalises,
// rounds to T, multiplies by the weight and rounds again (the reference's two roundings).
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(1024)
    rms_norm_kernel(T* __restrict__ out, T* __restrict__ residual_out, const T* __restrict__ x,
                    const T* __restrict__ residual, const T* __restrict__ weight, int hidden, float eps) {
  TRILLM_DYNAMIC_SMEM(row_cache);
  __shared__ float scratch[32];
  const int num_vecs = hidden / 8;
  trap_if(dynamic_smem_bytes() < u32(num_vecs) * 16u);
  const i64 row = i64(blockIdx.x) * hidden;
  const U4* x_row = reinterpret_cast<const U4*>(x + row);
  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    U4 v = x_row[i];
    float f[8];
    unpack8<T>(v, f);
    if (residual != nullptr) {
      float r[8];
      unpack8<T>(reinterpret_cast<const U4*>(residual + row)[i], r);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] += r[j];
      v = pack8<T>(f);
      unpack8<T>(v, f);  // the sum as the model sees it: rounded to T
      reinterpret_cast<U4*>(residual_out + row)[i] = v;
    }
    row_cache[i] = v;
#pragma unroll
    for (int j = 0; j < 8; ++j) sum_sq += f[j] * f[j];
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / float(hidden) + eps);
  const U4* w = reinterpret_cast<const U4*>(weight);
  for (int i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    float f[8], wf[8];
    unpack8<T>(row_cache[i], f);
    unpack8<T>(w[i], wf);
#pragma unroll
    for (int j = 0; j < 8; ++j) f[j] = Elem<T>::to_float(Elem<T>::from_float(f[j] * inv_rms)) * wf[j];
    reinterpret_cast<U4*>(out + row)[i] = pack8<T>(f);
  }
}
