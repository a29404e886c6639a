// common.cuh — what every trillm kernel family shares: element types, conversions, 16-byte vectors, warp
// reductions, and thin wrappers over the PTX instructions the kernels use (cp.async, ldmatrix, mma.sync).
//
// kernels.py pastes this file in front of each family's source before handing it to NVRTC (through
// cupy.RawModule), so the source that CuPy hashes for its kernel cache covers the header too. NVRTC has no
// standard headers: only builtin types and intrinsics appear here.
//
// With TRILLM_EMULATE defined, the same sources compile as host C++ against emulate.cuh, a CPU model of a
// thread block, so the kernels can be run and tested on a machine without a GPU (tests/gpu/test_kernels.py).
#ifndef TRILLM_COMMON_CUH
#define TRILLM_COMMON_CUH

#ifdef TRILLM_EMULATE
#include "emulate.cuh"
#define TRILLM_INLINE inline
#define TRILLM_DYNAMIC_SMEM(name) U4* name = reinterpret_cast<U4*>(emu::dynamic_smem())
#else
#define TRILLM_INLINE __device__ __forceinline__
#define TRILLM_DYNAMIC_SMEM(name) extern __shared__ U4 name[]
#endif

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// 16, 8 and 4-element vectors: loads and stores through these compile to single wide instructions.
struct alignas(16) U4 { u32 x, y, z, w; };
struct alignas(8) U2 { u32 x, y; };
struct alignas(16) F4 { float x, y, z, w; };

// Storage types of the two 16-bit floating formats (raw bits; all arithmetic happens in fp32).
struct bf16_t { u16 bits; };
struct fp16_t { u16 bits; };

TRILLM_INLINE float bits_to_float(u32 u) {
#ifdef TRILLM_EMULATE
  float f;
  memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

TRILLM_INLINE u32 float_to_bits(float f) {
#ifdef TRILLM_EMULATE
  u32 u;
  memcpy(&u, &f, 4);
  return u;
#else
  return __float_as_uint(f);
#endif
}

#define TRILLM_NEG_INF bits_to_float(0xff800000u)

TRILLM_INLINE int imin(int a, int b) { return a < b ? a : b; }
TRILLM_INLINE int imax(int a, int b) { return a > b ? a : b; }

// 2^x; ex2.approx maps -inf to +0, which the online softmax relies on.
TRILLM_INLINE float fast_exp2(float x) {
#ifdef TRILLM_EMULATE
  return exp2f(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

template <typename T> struct Elem;

template <> struct Elem<bf16_t> {
  static constexpr bool is_bf16 = true;
  static TRILLM_INLINE float to_float(u16 b) { return bits_to_float(u32(b) << 16); }
  static TRILLM_INLINE u16 from_float(float f) {
#ifdef TRILLM_EMULATE
    return emu::float_to_bf16_rn(f);
#else
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#endif
  }
  // Two floats into one 32-bit word: `lo` in the low half (the lower address), `hi` in the high half.
  static TRILLM_INLINE u32 pack2(float lo, float hi) {
#ifdef TRILLM_EMULATE
    return u32(from_float(lo)) | (u32(from_float(hi)) << 16);
#else
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
  }
  static TRILLM_INLINE void unpack2(u32 w, float& lo, float& hi) {
    lo = bits_to_float(w << 16);
    hi = bits_to_float(w & 0xffff0000u);
  }
};

template <> struct Elem<fp16_t> {
  static constexpr bool is_bf16 = false;
  static TRILLM_INLINE float to_float(u16 b) {
#ifdef TRILLM_EMULATE
    return emu::fp16_to_float(b);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#endif
  }
  static TRILLM_INLINE u16 from_float(float f) {
#ifdef TRILLM_EMULATE
    return emu::float_to_fp16_rn(f);
#else
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#endif
  }
  static TRILLM_INLINE u32 pack2(float lo, float hi) {
#ifdef TRILLM_EMULATE
    return u32(from_float(lo)) | (u32(from_float(hi)) << 16);
#else
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
  }
  static TRILLM_INLINE void unpack2(u32 w, float& lo, float& hi) {
    lo = to_float(u16(w & 0xffffu));
    hi = to_float(u16(w >> 16));
  }
};

// 8 elements of a 16-byte vector to floats, and back (round to nearest even).
template <typename T> TRILLM_INLINE void unpack8(const U4& v, float f[8]) {
  Elem<T>::unpack2(v.x, f[0], f[1]);
  Elem<T>::unpack2(v.y, f[2], f[3]);
  Elem<T>::unpack2(v.z, f[4], f[5]);
  Elem<T>::unpack2(v.w, f[6], f[7]);
}

template <typename T> TRILLM_INLINE U4 pack8(const float f[8]) {
  U4 v;
  v.x = Elem<T>::pack2(f[0], f[1]);
  v.y = Elem<T>::pack2(f[2], f[3]);
  v.z = Elem<T>::pack2(f[4], f[5]);
  v.w = Elem<T>::pack2(f[6], f[7]);
  return v;
}

// Positions and slots may come as int32 or int64 tensors; the flag says which.
TRILLM_INLINE i64 load_index(const void* p, i64 i, int is_int64) {
  return is_int64 ? static_cast<const i64*>(p)[i] : static_cast<i64>(static_cast<const int*>(p)[i]);
}

TRILLM_INLINE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
TRILLM_INLINE float shfl(float v, int src_lane) { return __shfl_sync(0xffffffffu, v, src_lane); }

TRILLM_INLINE float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += shfl_xor(v, m);
  return v;
}

// Sum over the whole block; every thread gets the total. `scratch` holds one float per warp (32 at most).
TRILLM_INLINE float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = (blockDim.x + 31) / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = lane < num_warps ? scratch[lane] : 0.f;
  total = warp_sum(total);
  __syncthreads();  // scratch may be reused right after
  return total;
}

// ---- 16-byte global loads with cache hints ----

// A 16-byte load that will not be reused: read-only path, no L1 allocation (weights stream through once).
TRILLM_INLINE U4 load_stream(const U4* p) {
#ifdef TRILLM_EMULATE
  return *p;
#else
  U4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

// A peer's slot is read past every cache of this GPU (it changes between calls behind our back).
TRILLM_INLINE U4 load_peer(const U4* p) {
#ifdef TRILLM_EMULATE
  return *p;
#else
  U4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
#endif
}

// ---- asynchronous global -> shared copies (sm_80+) ----

TRILLM_INLINE u32 smem_addr(const void* p) {
#ifdef TRILLM_EMULATE
  return emu::smem_offset(p);
#else
  u32 r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
#endif
}

// Copies 16 bytes; when `valid` is false nothing is read and the destination is zero-filled, so masked
// tokens hold zeros (never stale NaNs that 0 * NaN would spread).
TRILLM_INLINE void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
#ifdef TRILLM_EMULATE
  emu::cp_async(smem_dst, gmem_src, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(valid ? 16 : 0));
#endif
}

TRILLM_INLINE void cp_async_commit() {
#ifdef TRILLM_EMULATE
  emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N> TRILLM_INLINE void cp_async_wait() {
#ifdef TRILLM_EMULATE
  emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// ---- tensor cores (sm_80+) ----

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
TRILLM_INLINE void ldmatrix_x4(u32 r[4], const void* row) {
#ifdef TRILLM_EMULATE
  emu::ldmatrix_x4(r, row, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}

// The same, each matrix transposed on the way (lane l gets column l/4, rows 2(l%4) and 2(l%4)+1).
TRILLM_INLINE void ldmatrix_x4_trans(u32 r[4], const void* row) {
#ifdef TRILLM_EMULATE
  emu::ldmatrix_x4(r, row, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
#endif
}

// D = A * B + D for one warp: A 16x16 (row-major fragments), B 16x8 (column-major), fp32 accumulators.
template <typename T> TRILLM_INLINE void mma_16816(float d[4], const u32 a[4], const u32 b[2]) {
#ifdef TRILLM_EMULATE
  emu::mma_16816(d, a, b, Elem<T>::is_bf16);
#else
  if constexpr (Elem<T>::is_bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// Bytes of dynamic shared memory this launch got (kernels check it against what they need).
TRILLM_INLINE u32 dynamic_smem_bytes() {
#ifdef TRILLM_EMULATE
  return emu::dynamic_smem_size();
#else
  u32 r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}

TRILLM_INLINE void trap_if(bool bad) {
#ifdef TRILLM_EMULATE
  if (bad) emu::trap();
#else
  if (bad) __trap();
#endif
}

#endif  // TRILLM_COMMON_CUH
