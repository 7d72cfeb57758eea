/* Skinny GEMMs over block-quantized weights, for decode steps on a CPU.
 *
 * y[M, N] = x[M, K] W^T, where W [N, K] is held in blocks of 32 along K, as the GGUF
 * formats store it. Each weight is rebuilt in fp32 exactly as the dequantized tensor
 * holds it (Q4_1: fma(d, q, m), with d * q exact; Q8_0: d * q, exact), then multiplied
 * in fp32: the arithmetic of an fp32 GEMM on the same values, summed in another order.
 *
 * Layout (cpu_blocks.py packs it):
 *   q4: qs uint8 [N, K / 2], 16 bytes per block: byte j holds q[j] (low nibble) and
 *       q[j + 16] (high nibble); dm float [N, K / 32, 2] = (d, m).
 *   q8: qs int8 [N, K]; d float [N, K / 32].
 * A decode step reads 0.75 (q4) or 1.125 (q8) bytes a weight instead of 4.
 *
 * Rows of x go in chunks of up to 8, one AVX2 accumulator per row; columns are split
 * across OpenMP threads (the runtime torch itself loaded, see cpu_blocks.py).
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4 /* rows of x per pass: ROWS x COLS accumulators stay in registers */
#define COLS 2 /* output columns per pass: each x load feeds COLS FMAs */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc[r][c] += x[r, k .. k + 8) * w[c] for this pass's rows and columns */
#define ACCUMULATE(w, k)                                                           \
    for (int r = 0; r < rows; r++) {                                               \
        const __m256 xv = _mm256_loadu_ps(x + (int64_t)r * ldx + (k));             \
        for (int c = 0; c < cols; c++) acc[r][c] = _mm256_fmadd_ps(xv, w[c], acc[r][c]); \
    }

#define STORE()                                                                    \
    for (int r = 0; r < rows; r++)                                                 \
        for (int c = 0; c < cols; c++) y[(int64_t)r * ldy + c] = hsum(acc[r][c]);

/* `cols` columns of W from column n on, `rows` rows of x: both constants at each call site */
static inline __attribute__((always_inline)) void q4_pass(const float *x, int64_t ldx, int K,
        const uint8_t *qs, const float *dm, float *y, int64_t ldy, const int rows, const int cols) {
    __m256 acc[ROWS][COLS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi32(15);
    for (int g = 0; g < K / 32; g++) {
        __m256i b0[COLS], b1[COLS];
        __m256 d[COLS], m[COLS], w[COLS];
        for (int c = 0; c < cols; c++) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(qs + (int64_t)c * (K / 2) + 16 * g));
            b0[c] = _mm256_cvtepu8_epi32(bytes);
            b1[c] = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
            d[c] = _mm256_set1_ps(dm[(int64_t)c * (K / 16) + 2 * g]);
            m[c] = _mm256_set1_ps(dm[(int64_t)c * (K / 16) + 2 * g + 1]);
        }
        const int k = g * 32;
        for (int c = 0; c < cols; c++) w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0[c], low)), d[c], m[c]);
        ACCUMULATE(w, k)
        for (int c = 0; c < cols; c++) w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1[c], low)), d[c], m[c]);
        ACCUMULATE(w, k + 8)
        for (int c = 0; c < cols; c++) w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0[c], 4)), d[c], m[c]);
        ACCUMULATE(w, k + 16)
        for (int c = 0; c < cols; c++) w[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1[c], 4)), d[c], m[c]);
        ACCUMULATE(w, k + 24)
    }
    STORE()
}

static inline __attribute__((always_inline)) void q8_pass(const float *x, int64_t ldx, int K,
        const int8_t *qs, const float *ds, float *y, int64_t ldy, const int rows, const int cols) {
    __m256 acc[ROWS][COLS];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm256_setzero_ps();
    for (int g = 0; g < K / 32; g++) {
        __m256 d[COLS], w[COLS];
        for (int c = 0; c < cols; c++) d[c] = _mm256_set1_ps(ds[(int64_t)c * (K / 32) + g]);
        for (int part = 0; part < 4; part++) {
            const int k = g * 32 + 8 * part;
            for (int c = 0; c < cols; c++) {
                const __m128i bytes = _mm_loadl_epi64((const __m128i *)(qs + (int64_t)c * K + k));
                w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d[c]);
            }
            ACCUMULATE(w, k)
        }
    }
    STORE()
}

/* Every (rows, cols) pair a constant, so the accumulators stay in registers. */
#define BY_SHAPE(pass, rows, cols, ...)                                                  \
    if (cols == COLS) {                                                                  \
        switch (rows) {                                                                  \
            case 4: pass(__VA_ARGS__, 4, COLS); break; case 3: pass(__VA_ARGS__, 3, COLS); break; \
            case 2: pass(__VA_ARGS__, 2, COLS); break; default: pass(__VA_ARGS__, 1, COLS); break; \
        }                                                                                \
    } else {                                                                             \
        switch (rows) {                                                                  \
            case 4: pass(__VA_ARGS__, 4, 1); break; case 3: pass(__VA_ARGS__, 3, 1); break; \
            case 2: pass(__VA_ARGS__, 2, 1); break; default: pass(__VA_ARGS__, 1, 1); break; \
        }                                                                                \
    }

/* y [M, ldy] (its first N columns) = x [M, ldx] W^T for a q4 weight W [N, K] */
void q4_gemm(const float *x, int64_t ldx, int M, int K, const uint8_t *qs, const float *dm, int N,
             float *y, int64_t ldy) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += COLS) {
        const int cols = N - n < COLS ? N - n : COLS;
        for (int r0 = 0; r0 < M; r0 += ROWS) {
            const int rows = M - r0 < ROWS ? M - r0 : ROWS;
            BY_SHAPE(q4_pass, rows, cols, x + (int64_t)r0 * ldx, ldx, K, qs + (int64_t)n * (K / 2),
                     dm + (int64_t)n * (K / 16), y + (int64_t)r0 * ldy + n, ldy)
        }
    }
}

/* the same for a q8 weight */
void q8_gemm(const float *x, int64_t ldx, int M, int K, const int8_t *qs, const float *ds, int N,
             float *y, int64_t ldy) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n += COLS) {
        const int cols = N - n < COLS ? N - n : COLS;
        for (int r0 = 0; r0 < M; r0 += ROWS) {
            const int rows = M - r0 < ROWS ? M - r0 : ROWS;
            BY_SHAPE(q8_pass, rows, cols, x + (int64_t)r0 * ldx, ldx, K, qs + (int64_t)n * K,
                     ds + (int64_t)n * (K / 32), y + (int64_t)r0 * ldy + n, ldy)
        }
    }
}
