/* Skinny GEMMs over block-quantized weights, for decode-sized steps on a CPU.
 *
 * y[M, N] = x[M, K] W^T, with W [N, K] held in blocks of 32 along K, the way a GGUF file
 * stores it. Each weight is rebuilt in fp32 to exactly the value the dequantized fp32 tensor
 * holds (Q4_1: fma(d, q, m), where d * q is exact; Q8_0: d * q, exact) and multiplied in fp32:
 * an fp32 GEMM on the same numbers, summed in another order. A decode step then reads 0.75
 * (Q4_1) or 1.125 (Q8_0) bytes a weight instead of 4. cpu_blocks.py packs the layout:
 *
 *   q4_1: qs uint8 [N, K / 2], 16 bytes a block: byte j holds q[j] (low nibble) and q[j + 16]
 *         (high nibble); dm float [N, K / 32, 2] = (d, m)
 *   q8_0: qs int8 [N, K]; ds float [N, K / 32]
 *
 * Each pass keeps ROWS x COLS output sums in vector registers, so one load of x feeds COLS
 * multiply-adds and one rebuilt weight vector feeds ROWS. Columns are split over OpenMP
 * threads: the runtime torch loaded, found by its soname (cpu_blocks.py loads torch first).
 * Built with -march=native: AVX-512 where the machine has it, else AVX2 + FMA.
 */
#include <immintrin.h>
#include <stdint.h>

#ifdef __AVX512F__
#define ROWS 8
#define COLS 2
#define MAX_ROWS 16 /* measured crossover with oneDNN's fp32 GEMM on the 2-core CI machine */
typedef __m512 vec;
#define LANES 16
#define vzero _mm512_setzero_ps
#define vload _mm512_loadu_ps
#define vfma _mm512_fmadd_ps
#define vadd _mm512_add_ps
#define vset1 _mm512_set1_ps
static inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
/* the 32 weights of a Q4_1 block as two vectors */
static inline void q4_block(const uint8_t *q, float d, float m, vec w[2]) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    const __m512i low = _mm512_set1_epi32(15);
    w[0] = vfma(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), vset1(d), vset1(m));
    w[1] = vfma(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), vset1(d), vset1(m));
}
static inline void q8_block(const int8_t *q, float d, vec w[2]) {
    for (int h = 0; h < 2; h++)
        w[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * h)))),
                             vset1(d));
}
#else
#define ROWS 4
#define COLS 2
#define MAX_ROWS 8
typedef __m256 vec;
#define LANES 8
#define vzero _mm256_setzero_ps
#define vload _mm256_loadu_ps
#define vfma _mm256_fmadd_ps
#define vadd _mm256_add_ps
#define vset1 _mm256_set1_ps
static inline float vsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
static inline void q4_block(const uint8_t *q, float d, float m, vec w[4]) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)q);
    const __m256i b0 = _mm256_cvtepu8_epi32(bytes), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
    const __m256i low = _mm256_set1_epi32(15);
    w[0] = vfma(_mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), vset1(d), vset1(m));
    w[1] = vfma(_mm256_cvtepi32_ps(_mm256_and_si256(b1, low)), vset1(d), vset1(m));
    w[2] = vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), vset1(d), vset1(m));
    w[3] = vfma(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), vset1(d), vset1(m));
}
static inline void q8_block(const int8_t *q, float d, vec w[4]) {
    for (int h = 0; h < 4; h++)
        w[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * h)))),
                             vset1(d));
}
#endif
#define PARTS (32 / LANES) /* vectors in a block of 32 weights */

/* One pass: `rows` rows of x against `cols` columns of W, both compile-time constants at
 * every call (BY_SHAPE), so the sums stay in registers. FORMAT is 4 (Q4_1) or 8 (Q8_0). */
static inline __attribute__((always_inline)) void pass(const int format, const float *x, int64_t ldx, int K,
                                                       const void *qs, const float *scales, float *y, int64_t ldy,
                                                       const int rows, const int cols) {
    vec acc[ROWS][COLS][PARTS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++)
            for (int p = 0; p < PARTS; p++) acc[r][c][p] = vzero();
    for (int g = 0; g < K / 32; g++) {
        vec w[COLS][PARTS];
        for (int c = 0; c < cols; c++) {
            if (format == 4)
                q4_block((const uint8_t *)qs + (int64_t)c * (K / 2) + 16 * g, scales[(int64_t)c * (K / 16) + 2 * g],
                         scales[(int64_t)c * (K / 16) + 2 * g + 1], w[c]);
            else
                q8_block((const int8_t *)qs + (int64_t)c * K + 32 * g, scales[(int64_t)c * (K / 32) + g], w[c]);
        }
        for (int r = 0; r < rows; r++)
            for (int p = 0; p < PARTS; p++) {
                const vec xv = vload(x + (int64_t)r * ldx + 32 * g + LANES * p);
                for (int c = 0; c < cols; c++) acc[r][c][p] = vfma(xv, w[c][p], acc[r][c][p]);
            }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) {
            vec s = acc[r][c][0];
            for (int p = 1; p < PARTS; p++) s = vadd(s, acc[r][c][p]);
            y[(int64_t)r * ldy + c] = vsum(s);
        }
}

#define ROWS_CASE(n, format, cols, ...) case n: pass(format, __VA_ARGS__, n, cols); break;
#if ROWS == 8
#define BY_ROWS(rows, format, cols, ...)                                                             \
    switch (rows) {                                                                                  \
        ROWS_CASE(8, format, cols, __VA_ARGS__) ROWS_CASE(7, format, cols, __VA_ARGS__)              \
        ROWS_CASE(6, format, cols, __VA_ARGS__) ROWS_CASE(5, format, cols, __VA_ARGS__)              \
        ROWS_CASE(4, format, cols, __VA_ARGS__) ROWS_CASE(3, format, cols, __VA_ARGS__)              \
        ROWS_CASE(2, format, cols, __VA_ARGS__) default: pass(format, __VA_ARGS__, 1, cols); break;  \
    }
#else
#define BY_ROWS(rows, format, cols, ...)                                                             \
    switch (rows) {                                                                                  \
        ROWS_CASE(4, format, cols, __VA_ARGS__) ROWS_CASE(3, format, cols, __VA_ARGS__)              \
        ROWS_CASE(2, format, cols, __VA_ARGS__) default: pass(format, __VA_ARGS__, 1, cols); break;  \
    }
#endif

/* y [M, ldy] (its first N columns) = x [M, ldx] W^T, W [N, K] in `format` blocks */
static inline __attribute__((always_inline)) void gemm(const int format, const float *x, int64_t ldx, int M, int K,
                                                       const void *qs, const float *scales, int N, float *y,
                                                       int64_t ldy) {
    const int64_t qs_row = format == 4 ? K / 2 : K, scales_row = format == 4 ? K / 16 : K / 32;
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += COLS) {
        const void *q = (const char *)qs + n * qs_row;
        for (int r0 = 0; r0 < M; r0 += ROWS) {
            const int rows = M - r0 < ROWS ? M - r0 : ROWS;
            const float *xr = x + (int64_t)r0 * ldx;
            float *yr = y + (int64_t)r0 * ldy + n;
            if (N - n >= COLS) {
                BY_ROWS(rows, format, COLS, xr, ldx, K, q, scales + n * scales_row, yr, ldy)
            } else {
                BY_ROWS(rows, format, 1, xr, ldx, K, q, scales + n * scales_row, yr, ldy)
            }
        }
    }
}

void q4_1_gemm(const float *x, int64_t ldx, int M, int K, const uint8_t *qs, const float *dm, int N, float *y,
               int64_t ldy) {
    gemm(4, x, ldx, M, K, qs, dm, N, y, ldy);
}

void q8_0_gemm(const float *x, int64_t ldx, int M, int K, const int8_t *qs, const float *ds, int N, float *y,
               int64_t ldy) {
    gemm(8, x, ldx, M, K, qs, ds, N, y, ldy);
}

/* up to how many rows of x these GEMMs beat oneDNN's fp32 one (callers use dense weights above) */
int max_rows(void) { return MAX_ROWS; }
