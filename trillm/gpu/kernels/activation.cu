// activation.cu — SwiGLU: out = silu(gate) * up (reference: gpu/reference.py silu_and_mul).
//
// Layouts (row-major, contiguous): x [num_tokens, 2 * ffn] = gate | up along the last dim; out [num_tokens, ffn].
// Mapping: grid = (num_tokens, ceil(ffn / 8 / THREADS)); block = THREADS threads; each thread produces 8
// outputs from one 16-byte vector of gate and one of up (so ffn % 8 == 0). fp32 math, one rounding at the end.
#include "common.cuh"

template <typename T>
__global__ void __launch_bounds__(256) silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int ffn) {
  const int vec = blockIdx.y * blockDim.x + threadIdx.x;
  if (vec * 8 >= ffn) return;
  const i64 token = blockIdx.x;
  const U4 gate_v = reinterpret_cast<const U4*>(x + token * 2 * ffn)[vec];
  const U4 up_v = reinterpret_cast<const U4*>(x + token * 2 * ffn + ffn)[vec];
  float gate[8], up[8];
  unpack8<T>(gate_v, gate);
  unpack8<T>(up_v, up);
#pragma unroll
  for (int j = 0; j < 8; ++j) gate[j] = gate[j] / (1.f + __expf(-gate[j])) * up[j];
  reinterpret_cast<U4*>(out + token * ffn)[vec] = pack8<T>(gate);
}
