/* CPU decode kernels: block-quantized matrix products, RMSNorm, rotary + KV write, paged decode attention (float32).
 *
 * Built by gpu/cpu_kernels.py (AVX2 + FMA, no FP contraction: each C expression rounds as written) and called through
 * ctypes from gpu/cpu_ops.py for decode batches, where a step is a few hundred tiny torch calls otherwise.
 *
 * Block matmul layout: rows of W in groups of 4, each group's blocks interleaved (one group: one sequential stream):
 *   group g = rows 4g .. 4g+3: for block b = 0 .. K/32-1: for row r = 0 .. 3: the block record of row 4g+r.
 *   Q4_1 record (24 bytes): float d, float m, 16 bytes: low nibble of byte j = element j, high nibble = element j+16.
 *       w = fma(q, d, m): one rounding, as gguf's dequantize computes d * q + m (d * q is exact).
 *   Q8_0 record (36 bytes): float d, 32 int8. w = q * d (exact: an fp16 scale times 8 bits).
 * x [M][K] float32, y [M][N] float32 (N a multiple of 4, K of 32). Each dot product sums in float32 in its own order,
 * as any sgemm does. Work splits over row groups between OpenMP threads (torch's libgomp: the same pool as torch's).
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define Q4_1_BYTES 24
#define Q8_0_BYTES 36
/* The 8-row tile reads its 8 rows of x once per row of W: where they fit beside the weights in a 32 KiB L1 it beats
 * two 4x2 tiles (SmolLM2's K = 576: 18 KiB); past that (down_proj's K = 1,536: 48 KiB) the 4x2 tiles, whose 4 rows
 * stay in L1, win (batch 8: 4.5 vs 6.0 ms a step over down_proj). Every tile sums an element in the same order. */
#define X_ROWS_IN_L1_BYTES (24 * 1024)

/* Stage timing, compiled in only for bench/cpu_stages.py (-DTRILLM_STAGE_TIMING): each stage of
 * trillm_decode_forward ends its loop without the implicit barrier, every thread notes when its own share ended, and
 * the threads meet at an explicit barrier instead; summed over calls: each stage's wall time (thread 0, barrier to
 * barrier) and each thread's busy time. Without the flag the stages keep their loops' implicit barriers. */
#ifdef TRILLM_STAGE_TIMING
#include <omp.h>
#define STAGE_THREADS 8
#define STAGES 9
double trillm_stage_busy_s[STAGE_THREADS][STAGES], trillm_stage_wall_s[STAGES];
long trillm_stage_calls;
#define NOWAIT nowait
#define OMP_FOR_GUIDED _Pragma("omp for schedule(guided, 4) nowait")
#define STAGE_END(k)                                                                                                   \
    do {                                                                                                               \
        const int thread_ = omp_get_thread_num();                                                                      \
        if (thread_ < STAGE_THREADS) trillm_stage_busy_s[thread_][k] += omp_get_wtime() - stage_start;               \
        _Pragma("omp barrier");                                                                                        \
        const double after_ = omp_get_wtime();                                                                         \
        if (thread_ == 0) trillm_stage_wall_s[k] += after_ - stage_start;                                             \
        stage_start = after_;                                                                                          \
    } while (0)
#else
#define NOWAIT
#define OMP_FOR_GUIDED _Pragma("omp for schedule(guided, 4)")
#define STAGE_END(k)
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 values of a Q4_1 record. Each 8-byte half is widened to 32-bit lanes straight from memory and split into its
 * low nibbles (elements 0..7, 8..15) and high nibbles (16..23, 24..31) in the lanes: four fewer vector operations a
 * record than splitting the 16 bytes first, which a batch-1 step, bound by this unpacking, feels as ~20 %. */
static inline __attribute__((always_inline)) void q4_1_block(const uint8_t *p, __m256 w[4]) {
    float d, m;
    memcpy(&d, p, 4);
    memcpy(&m, p + 4, 4);
    const __m256i nib = _mm256_set1_epi32(0x0F);
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)));   /* bytes 0..7 */
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 16)));  /* bytes 8..15 */
    const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, nib)), vd, vm);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, nib)), vd, vm);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), vd, vm);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), vd, vm);
}

static inline __attribute__((always_inline)) void q8_0_block(const uint8_t *p, __m256 w[4]) {
    float d;
    memcpy(&d, p, 4);
    const __m256 vd = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++) {
        const __m128i q = _mm_loadl_epi64((const __m128i *)(p + 4 + 8 * i));
        w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vd);
    }
}

/* One tile: MR rows of x against rows r0 .. r0+NR-1 of one group; one accumulator per (x row, W row) pair, fed over
 * blocks, then 8-wide chunks, so every tile (and batch size) gives an output element the same bits. */
#define TILE(NAME, BLOCK, BYTES, MR, NR)                                                                               \
    static void NAME##_##MR##x##NR(const float *x, long K, const uint8_t *group, int r0, float *y, long N) {           \
        const long nb = K / 32;                                                                                        \
        __m256 acc[NR][MR];                                                                                            \
        for (int r = 0; r < NR; r++)                                                                                   \
            for (int i = 0; i < MR; i++) acc[r][i] = _mm256_setzero_ps();                                              \
        for (long b = 0; b < nb; b++) {                                                                                \
            const uint8_t *records = group + b * 4 * (BYTES);                                                          \
            _mm_prefetch((const char *)(records + 8 * 4 * (BYTES)), _MM_HINT_T0);                                      \
            _mm_prefetch((const char *)(records + 8 * 4 * (BYTES) + 64), _MM_HINT_T0);                                 \
            for (int r = 0; r < NR; r++) {                                                                             \
                __m256 w[4];                                                                                           \
                BLOCK(records + (r0 + r) * (BYTES), w);                                                                \
                for (int i = 0; i < MR; i++) {                                                                         \
                    const float *xp = x + i * K + b * 32;                                                              \
                    for (int j = 0; j < 4; j++)                                                                        \
                        acc[r][i] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8 * j), w[j], acc[r][i]);                     \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        for (int r = 0; r < NR; r++)                                                                                   \
            for (int i = 0; i < MR; i++) y[i * N + r0 + r] = hsum(acc[r][i]);                                          \
    }

#define KERNEL(NAME, BLOCK, BYTES)                                                                                    \
    TILE(NAME, BLOCK, BYTES, 1, 4)                                                                                   \
    TILE(NAME, BLOCK, BYTES, 2, 4)                                                                                   \
    TILE(NAME, BLOCK, BYTES, 3, 4)                                                                                   \
    TILE(NAME, BLOCK, BYTES, 4, 2)                                                                                   \
    TILE(NAME, BLOCK, BYTES, 8, 1)                                                                                   \
    /* one group of 4 rows of W (y's columns 4g .. 4g+3, y advanced to them) against all M rows of x */             \
    static void NAME##_group(const float *x, long M, long K, const uint8_t *group, float *y, long N) {              \
        for (long m0 = 0; m0 < M;) {                                                                                 \
            const long left = M - m0;                                                                                \
            const float *xm = x + m0 * K;                                                                            \
            float *ym = y + m0 * N;                                                                                  \
            if (left >= 8 && 8 * K * (long)sizeof(float) <= X_ROWS_IN_L1_BYTES) {                                    \
                for (int r = 0; r < 4; r++) NAME##_8x1(xm, K, group, r, ym, N);                                      \
                m0 += 8;                                                                                             \
            } else if (left >= 4) {                                                                                  \
                NAME##_4x2(xm, K, group, 0, ym, N);                                                                  \
                NAME##_4x2(xm, K, group, 2, ym, N);                                                                  \
                m0 += 4;                                                                                             \
            } else if (left == 3) {                                                                                  \
                NAME##_3x4(xm, K, group, 0, ym, N);                                                                  \
                m0 += 3;                                                                                             \
            } else if (left == 2) {                                                                                  \
                NAME##_2x4(xm, K, group, 0, ym, N);                                                                  \
                m0 += 2;                                                                                             \
            } else {                                                                                                 \
                NAME##_1x4(xm, K, group, 0, ym, N);                                                                  \
                m0 += 1;                                                                                             \
            }                                                                                                        \
        }                                                                                                            \
    }                                                                                                                \
    /* the row groups shared among the threads of the enclosing parallel region (all of them when there is none),    \
     * handed out in shrinking chunks: a thread the OS parks (the serving process runs on the same cores) leaves its \
     * rest to the others instead of holding them at the next barrier; each group's outputs are the same bits        \
     * whichever thread computes them. (Chunks of 4 groups throughout cost more in handing out than they save.) */   \
    static void NAME##_matmul_for(const float *x, long M, long K, const uint8_t *w, long N, float *y) {              \
        const long groups = N / 4, group_bytes = K / 32 * 4 * (BYTES);                                               \
        OMP_FOR_GUIDED for (long g = 0; g < groups; g++)                                                             \
            NAME##_group(x, M, K, w + g * group_bytes, y + 4 * g, N);                                                \
    }                                                                                                                \
    void trillm_##NAME##_matmul(const float *x, long M, long K, const uint8_t *w, long N, float *y) {                \
        _Pragma("omp parallel") NAME##_matmul_for(x, M, K, w, N, y);                                                 \
    }

KERNEL(q4_1, q4_1_block, Q4_1_BYTES)
KERNEL(q8_0, q8_0_block, Q8_0_BYTES)

/* ------------------------------------------------------------------------------------------------------------------
 * RMSNorm with the residual add: summed = x + residual (when residual), y = (s * (1 / sqrt(mean(s²) + eps))) * w.
 * x, residual, summed, y: [M][K] contiguous (summed may alias x or residual). */
static void rms_row(const float *x, const float *residual, float *summed, const float *w, float eps, long K, float *y) {
    if (residual) {
        for (long j = 0; j < K; j++) summed[j] = x[j] + residual[j];
        x = summed;
    }
    double sum = 0.0;
    for (long j = 0; j < K; j++) sum += (double)x[j] * x[j];
    const float inv = 1.0f / sqrtf((float)(sum / K) + eps);
    for (long j = 0; j < K; j++) y[j] = (x[j] * inv) * w[j];
}

void trillm_rms_norm(const float *x, const float *residual, float *summed, const float *w, float eps, long M, long K,
                     float *y) {
    for (long i = 0; i < M; i++)
        rms_row(x + i * K, residual ? residual + i * K : NULL, summed ? summed + i * K : NULL, w, eps, K, y + i * K);
}

/* ------------------------------------------------------------------------------------------------------------------
 * Rotate-half rotary over q and k heads in place, then k and v into the paged caches.
 * qkv [T][row_stride]: q heads at column 0, k heads at q_cols, v heads at q_cols + kv_cols (each head D floats).
 * cos_sin [max_pos][D]: cos in the first D/2 columns, sin in the rest. Caches [blocks][kv_heads][block_size][D].
 * first half: x1 * cos + x2 * -sin; second half: x2 * cos + x1 * sin (each product and sum rounded, as cpu_ops). */
static void rotate_head(float *h, const float *cs, long D) {
    const long half = D / 2;
    for (long j = 0; j < half; j++) {
        const float c = cs[j], s = cs[half + j], x1 = h[j], x2 = h[half + j];
        const float a = x1 * c, b = x2 * -s, e = x2 * c, f = x1 * s;
        h[j] = a + b;
        h[half + j] = e + f;
    }
}

static void rotary_row(float *row, long num_heads, long num_kv_heads, long D, int64_t position, const float *cos_sin,
                       int64_t slot, float *k_cache, float *v_cache, long block_size) {
    const float *cs = cos_sin + position * D;
    for (long h = 0; h < num_heads + num_kv_heads; h++) rotate_head(row + h * D, cs, D);
    if (slot < 0) return;
    const long block = slot / block_size, offset = slot % block_size;
    for (long h = 0; h < num_kv_heads; h++) {
        const long at = ((block * num_kv_heads + h) * block_size + offset) * D;
        memcpy(k_cache + at, row + (num_heads + h) * D, D * sizeof(float));
        memcpy(v_cache + at, row + (num_heads + num_kv_heads + h) * D, D * sizeof(float));
    }
}

void trillm_rotary_cache_write(float *qkv, long T, long row_stride, long num_heads, long num_kv_heads, long D,
                               const int64_t *positions, const float *cos_sin, const int64_t *slots, float *k_cache,
                               float *v_cache, long block_size) {
    for (long t = 0; t < T; t++)
        rotary_row(qkv + t * row_stride, num_heads, num_kv_heads, D, positions[t], cos_sin, slots[t], k_cache, v_cache,
                   block_size);
}

/* ------------------------------------------------------------------------------------------------------------------
 * Paged decode attention, one query per sequence: out[s][h] = softmax(q·K * scale) V over the sequence's context.
 * q [S][q_stride] (head h at column h * D), out [S][H][D], tables [S][max_blocks] int32, context_lens [S] int32.
 * One task per (sequence, KV head) serves the group of query heads that share it. exp: Cephes-style polynomial,
 * within 2 ulp of expf. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float dot(const float *a, const float *b, long D) {
    __m256 acc = _mm256_setzero_ps();
    for (long j = 0; j < D; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    return hsum(acc);
}

/* [sum(v[0]), ..., sum(v[7])]: the eight vectors' horizontal sums in one vector */
static inline __m256 hsum8(const __m256 v[8]) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

/* q · k for 8 keys at once (independent FMA chains), stored scaled at p[0..7] */
static inline void dot8(const float *q, const float *const k[8], long D, float scale, float *p) {
    __m256 acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
    for (long j = 0; j < D; j += 8) {
        const __m256 qj = _mm256_loadu_ps(q + j);
        for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(qj, _mm256_loadu_ps(k[i] + j), acc[i]);
    }
    _mm256_storeu_ps(p, _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale)));
}

#define MAX_HEAD_DIM 128
#define PARALLEL_POSITIONS 4096 /* query heads × cached positions: ~0.5 M multiply-adds at head_dim 64 */

/* position t's row of one KV head; a power-of-two block size shifts and masks (a 64-bit division is ~40 cycles) */
#define PAGE(t) (is_pow2 ? (t) >> shift : (t) / block_size)
#define OFFSET(t) (is_pow2 ? (t) & (block_size - 1) : (t) % block_size)
#define CACHE_ROW(cache, t) ((cache) + (((long)table[PAGE(t)] * KVH + kvh) * block_size + OFFSET(t)) * D)
#define KEY_ROW(t) CACHE_ROW(k_cache, t)
#define VALUE_ROW(t) CACHE_ROW(v_cache, t)

#define PREFETCH_ROWS 16 /* cache rows ahead of the one being read */
#define VALUE_CHUNK 32   /* cached rows of V per pass of a group's heads (8 KiB at head_dim 64) */
#define MAX_GROUP 64     /* query heads per KV head (cpu_ops checks) */

static inline void prefetch_row(const float *row, long D) {
    for (long j = 0; j < D; j += 16) _mm_prefetch((const char *)(row + j), _MM_HINT_T0);
}

/* The G query heads that share KV head kvh, of one sequence, over its n cached positions: head g's query at
 * q + g * D, its scores at p[g * n ...], its output at o + g * D. The heads go through each chunk of cached rows
 * together while the chunk is in L1 (a head after head pass would stream the whole K and V once per head; at batch 8
 * those reads from L2, not the arithmetic, set the time). Each head's sums run in the same order as one head alone. */
static inline __attribute__((always_inline)) void attend_group_d(const float *q, long G, const float *k_cache,
        const float *v_cache, const int32_t *table, long n, long KVH, long kvh, long D, long block_size, float scale,
        float *p, float *o) {
    const int is_pow2 = (block_size & (block_size - 1)) == 0, shift = __builtin_ctzl(block_size);
    long t = 0;
    for (; t + 8 <= n; t += 8) {
        const float *keys[8];
        for (int i = 0; i < 8; i++) keys[i] = KEY_ROW(t + i);
        if (t + PREFETCH_ROWS + 8 <= n)  /* the hardware prefetcher stops at each 4 KiB page: 16 rows of 64 floats */
            for (int i = 0; i < 8; i++) prefetch_row(KEY_ROW(t + PREFETCH_ROWS + i), D);
        for (long g = 0; g < G; g++) dot8(q + g * D, keys, D, scale, p + g * n + t);
    }
    for (; t < n; t++)
        for (long g = 0; g < G; g++) p[g * n + t] = dot(q + g * D, KEY_ROW(t), D) * scale;
    float inv[MAX_GROUP];
    for (long g = 0; g < G; g++) {
        float *pg = p + g * n, top = -INFINITY;
        for (t = 0; t < n; t++) top = pg[t] > top ? pg[t] : top;
        __m256 vsum = _mm256_setzero_ps();
        const __m256 vtop = _mm256_set1_ps(top);
        for (t = 0; t + 8 <= n; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(pg + t), vtop));
            _mm256_storeu_ps(pg + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum(vsum);
        for (; t < n; t++) {
            pg[t] = expf(pg[t] - top);
            sum += pg[t];
        }
        inv[g] = 1.0f / sum;
    }
    const long nv = D / 8;
    for (long t0 = 0; t0 < n; t0 += VALUE_CHUNK) {  /* each head's accumulators wait in o between chunks */
        const long t1 = t0 + VALUE_CHUNK < n ? t0 + VALUE_CHUNK : n;
        for (long g = 0; g < G; g++) {
            const float *pg = p + g * n;
            float *og = o + g * D;
            __m256 acc[MAX_HEAD_DIM / 8];
            for (long j = 0; j < nv; j++) acc[j] = t0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(og + 8 * j);
            for (t = t0; t < t1; t++) {
                const float *v = VALUE_ROW(t);
                if (g == 0 && t + PREFETCH_ROWS < n) prefetch_row(VALUE_ROW(t + PREFETCH_ROWS), D);
                const __m256 w = _mm256_set1_ps(pg[t] * inv[g]);
                for (long j = 0; j < nv; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * j), acc[j]);
            }
            for (long j = 0; j < nv; j++) _mm256_storeu_ps(og + 8 * j, acc[j]);
        }
    }
}

/* head_dim a compile-time constant where it is 64 or 128: the accumulators of P·V then stay in registers */
static void attend_group(const float *q, long G, const float *k_cache, const float *v_cache, const int32_t *table,
                         long n, long KVH, long kvh, long D, long block_size, float scale, float *p, float *o) {
    if (D == 64)
        attend_group_d(q, G, k_cache, v_cache, table, n, KVH, kvh, 64, block_size, scale, p, o);
    else if (D == 128)
        attend_group_d(q, G, k_cache, v_cache, table, n, KVH, kvh, 128, block_size, scale, p, o);
    else
        attend_group_d(q, G, k_cache, v_cache, table, n, KVH, kvh, D, block_size, scale, p, o);
}

void trillm_decode_attention(const float *q, long q_stride, const float *k_cache, const float *v_cache,
                             const int32_t *tables, long max_blocks, const int32_t *context_lens, long S, long H,
                             long KVH, long D, long block_size, float scale, float *out) {
    const long group = H / KVH;
    long positions = 0;  /* below PARALLEL_POSITIONS the threads' start and end barrier costs more than the work */
    for (long s = 0; s < S; s++) positions += context_lens[s];
#pragma omp parallel for schedule(static) if (S * KVH > 1 && positions * H >= PARALLEL_POSITIONS)
    for (long task = 0; task < S * KVH; task++) {
        const long s = task / KVH, kvh = task % KVH, n = context_lens[s];
        float *p = malloc(group * n * sizeof(float));  /* the group's scores */
        attend_group(q + s * q_stride + kvh * group * D, group, k_cache, v_cache, tables + s * max_blocks, n, KVH, kvh,
                     D, block_size, scale, p, out + (s * H + kvh * group) * D);
        free(p);
    }
}

/* ------------------------------------------------------------------------------------------------------------------
 * SwiGLU: out[i][j] = silu(x[i][j]) * x[i][F + j] for x [M][2F], out [M][F]; silu(g) = g / (1 + exp(-g)). */
static void silu_row(const float *gate, long F, float *o) {
    const float *up = gate + F;
    long j = 0;
    for (; j + 8 <= F; j += 8) {
        const __m256 g = _mm256_loadu_ps(gate + j);
        const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
    }
    for (; j < F; j++) o[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

void trillm_silu_and_mul(const float *x, long M, long F, float *out) {
    for (long i = 0; i < M; i++) silu_row(x + i * 2 * F, F, out + i * F);
}

/* ------------------------------------------------------------------------------------------------------------------
 * A whole decode step's layers in one call and one parallel region (the CPU's counterpart of a CUDA graph): per
 * layer norm → qkv → rotary + KV write → attention → o_proj → norm → gate_up → SwiGLU → down.
 * Each stage computes what the per-op calls above compute, with the same code, so the result is the same to the bit;
 * the threads meet at a barrier between stages instead of forking and joining once per op, and Python never runs
 * between them. For decode rows only, every projection in blocks, no biases (gpu/cpu_decode.py checks).
 *
 * layers [L][LAYER_FIELDS] int64: qkv, o, gate_up, down (packed blocks), input norm, post norm, k cache, v cache
 * (addresses), then the four projections' kinds (0 = Q4_1, 1 = Q8_0).
 * hidden [M][Hd]: the embeddings; out [M][Hd]: the last layer's output, whose residual stream is scratch's first M × Hd
 * floats (the final norm is the caller's). scratch: trillm_decode_scratch_floats(...) floats. */
enum { LAYER_FIELDS = 12 };

static void block_matmul_for(int64_t kind, const float *x, long M, long K, const void *w, long N, float *y) {
    if (kind == 0)
        q4_1_matmul_for(x, M, K, w, N, y);
    else
        q8_0_matmul_for(x, M, K, w, N, y);
}

long trillm_decode_scratch_floats(long M, long Hd, long H, long KVH, long D, long F) {
    return M * (3 * Hd + (H + 2 * KVH) * D + H * D + 3 * F);
}

void trillm_decode_forward(const int64_t *layers, long L, long M, long Hd, long H, long KVH, long D, long F, float eps,
                           const int64_t *positions, const float *cos_sin,
                           const int64_t *slots, const int32_t *tables, long max_blocks, const int32_t *context_lens,
                           long block_size, float scale, float *hidden, float *scratch, float *out) {
    const long QKV = (H + 2 * KVH) * D, group = H / KVH;
    float *residual = scratch, *normed = residual + M * Hd, *proj = normed + M * Hd, *qkv = proj + M * Hd;
    float *attn = qkv + M * QKV, *gate_up = attn + M * H * D, *act = gate_up + M * 2 * F;
    long longest = 1;
    for (long s = 0; s < M; s++) longest = context_lens[s] > longest ? context_lens[s] : longest;
#pragma omp parallel
    {
        float *p = malloc(group * longest * sizeof(float));  /* this thread's attention scores (one KV group's) */
        const float *h = hidden;  /* the layer's input: the embeddings, then each layer's down_proj output */
#ifdef TRILLM_STAGE_TIMING
        double stage_start = omp_get_wtime();
#endif
        for (long l = 0; l < L; l++) {
            const int64_t *f = layers + l * LAYER_FIELDS;
            const float *input_norm = (const float *)f[4], *post_norm = (const float *)f[5];
            float *k_cache = (float *)f[6], *v_cache = (float *)f[7];
#pragma omp for schedule(static) NOWAIT
            for (long i = 0; i < M; i++) {  /* layer 0: the residual stream starts as the embeddings */
                if (l == 0) memcpy(residual + i * Hd, h + i * Hd, Hd * sizeof(float));
                rms_row(l == 0 ? residual + i * Hd : h + i * Hd, l == 0 ? NULL : residual + i * Hd,
                        residual + i * Hd, input_norm, eps, Hd, normed + i * Hd);
            }
            STAGE_END(0);
            block_matmul_for(f[8], normed, M, Hd, (const void *)f[0], QKV, qkv);
            STAGE_END(1);
#pragma omp for schedule(static) NOWAIT
            for (long i = 0; i < M; i++)
                rotary_row(qkv + i * QKV, H, KVH, D, positions[i], cos_sin, slots[i], k_cache, v_cache, block_size);
            STAGE_END(2);
#pragma omp for schedule(dynamic, 1) NOWAIT
            for (long task = 0; task < M * KVH; task++) {
                const long s = task / KVH, kvh = task % KVH;
                attend_group(qkv + s * QKV + kvh * group * D, group, k_cache, v_cache, tables + s * max_blocks,
                             context_lens[s], KVH, kvh, D, block_size, scale, p, attn + (s * H + kvh * group) * D);
            }
            STAGE_END(3);
            block_matmul_for(f[9], attn, M, H * D, (const void *)f[1], Hd, proj);
            STAGE_END(4);
#pragma omp for schedule(static) NOWAIT
            for (long i = 0; i < M; i++)
                rms_row(proj + i * Hd, residual + i * Hd, residual + i * Hd, post_norm, eps, Hd, normed + i * Hd);
            STAGE_END(5);
            block_matmul_for(f[10], normed, M, Hd, (const void *)f[2], 2 * F, gate_up);
            STAGE_END(6);
#pragma omp for schedule(static) NOWAIT
            for (long i = 0; i < M; i++) silu_row(gate_up + i * 2 * F, F, act + i * F);
            STAGE_END(7);
            block_matmul_for(f[11], act, M, F, (const void *)f[3], Hd, l == L - 1 ? out : proj);
            STAGE_END(8);
            h = proj;
        }
        free(p);
#ifdef TRILLM_STAGE_TIMING
#pragma omp master
        trillm_stage_calls++;
#endif
    }
}
