/* Causal attention over a whole prompt, fp32, for the cpu backend's prefill: flash-attention tiles in AVX-512.

   The twin is kernels/reference.py `attention(q, k, v, causal=True)` (torch's SDPA). It runs on OpenMP's
   threads, which kernels/native_attention.py only allows when they are torch's own (the one libgomp in the
   process): a prefill's attention sits between torch's MKL GEMMs, and a second pool (the decode layer's) would
   spin against torch's idle workers for the cores (measured: 36 ms per SmolLM2 prefill against SDPA's 27).
   Compiled into the same library as decode_layer.c (kernels/native.py), whose decode layer keeps its own pool. */

#include <math.h>
#include <stdint.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "simd.h"

/* kt (H_kv, hd, L) = k (L, H_kv, hd) transposed: the keys laid out so that 16 keys' values of one dimension
   are one vector for the score tiles. */
void pl_transpose_k(const float *k, float *kt, int64_t L, int64_t Hkv, int64_t hd) {
    for (int64_t j = 0; j < L; j++)
        for (int64_t h = 0; h < Hkv; h++)
            for (int64_t d = 0; d < hd; d++) kt[(h * hd + d) * L + j] = k[(j * Hkv + h) * hd + d];
}

#if defined(__AVX512F__) && defined(_OPENMP)
#define QB 16 /* query rows per tile */
#define KV 4  /* key vectors per tile: 64 keys */
#define KB (16 * KV)

/* One thread's share of pl_causal_attention. Work is cut into (head, 16-row block) tiles, tile t done by part
   t % parts (the OpenMP thread number), which interleaves the short early blocks with the long late ones.
   Flash-attention style: scores of 16 rows x 64 keys (4 rows at a time in registers), an online softmax per
   row over those 64 keys, the output rows accumulated 4 rows x 64 columns at a time. */
static void causal_attention_part(const float *q, const float *kt, const float *v, float *out, int64_t M, int64_t L,
                                  int64_t H, int64_t Hkv, int64_t hd, int64_t part, int64_t parts) {
    const int64_t g = H / Hkv, nv = hd / 16, blocks = (M + QB - 1) / QB, offset = L - M, qs = H * hd, vs = Hkv * hd;
    const __m512 scale = _mm512_set1_ps(1.0f / sqrtf((float)hd)), ninf = _mm512_set1_ps(-INFINITY);
    float p[QB][KB] __attribute__((aligned(64))), scratch[256] __attribute__((aligned(64))), mx[QB], sum[QB];
    for (int64_t t = part; t < H * blocks; t += parts) {
        const int64_t h = t / blocks, i0 = (t % blocks) * QB, kvh = h / g;
        const int64_t rows = M - i0 < QB ? M - i0 : QB;
        const float *ktk = kt + kvh * hd * L, *qb = q + i0 * qs + h * hd, *vb = v + kvh * hd;
        float *ob = out + i0 * qs + h * hd;
        for (int64_t r = 0; r < rows; r++) {
            mx[r] = -INFINITY, sum[r] = 0.0f;
            for (int64_t d = 0; d < hd; d++) ob[r * qs + d] = 0.0f;
        }
        const int64_t last = offset + i0 + rows - 1; /* the block's last query position */
        for (int64_t j0 = 0; j0 <= last; j0 += KB) {
            const int64_t keys = L - j0 < KB ? L - j0 : KB;
            __mmask16 km[KV];
            for (int64_t c = 0; c < KV; c++) {
                int64_t n = keys - 16 * c;
                km[c] = n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1));
            }
            for (int64_t r0 = 0; r0 < rows; r0 += 4) { /* scores: 4 rows x 64 keys in 16 registers */
                const int64_t rr = rows - r0 < 4 ? rows - r0 : 4;
                __m512 s[4][KV];
                for (int64_t r = 0; r < 4; r++)
                    for (int64_t c = 0; c < KV; c++) s[r][c] = _mm512_setzero_ps();
                for (int64_t d = 0; d < hd; d++) {
                    __m512 kv[KV];
                    for (int64_t c = 0; c < KV; c++) kv[c] = _mm512_maskz_loadu_ps(km[c], ktk + d * L + j0 + 16 * c);
                    for (int64_t r = 0; r < 4; r++) {
                        __m512 qv = _mm512_set1_ps(qb[(r0 + (r < rr ? r : 0)) * qs + d]);
                        for (int64_t c = 0; c < KV; c++) s[r][c] = _mm512_fmadd_ps(qv, kv[c], s[r][c]);
                    }
                }
                for (int64_t r = 0; r < 4; r++) /* all 4 (rows past the block's are never read): constant */
                    for (int64_t c = 0; c < KV; c++) _mm512_store_ps(p[r0 + r] + 16 * c, s[r][c]);
            }
            for (int64_t r = 0; r < rows; r++) { /* online softmax of row r over this tile's visible keys */
                const int64_t seen = offset + i0 + r - j0 + 1; /* keys j0 .. its position */
                __m512 sv[KV], m = ninf;
                for (int64_t c = 0; c < KV; c++) {
                    int64_t n = seen - 16 * c;
                    __mmask16 vis = km[c] & (n >= 16 ? (__mmask16)0xFFFF : (n <= 0 ? 0 : (__mmask16)((1u << n) - 1)));
                    sv[c] = _mm512_mask_mov_ps(ninf, vis, _mm512_mul_ps(_mm512_load_ps(p[r] + 16 * c), scale));
                    m = _mm512_max_ps(m, sv[c]);
                }
                const float m_new = fmaxf(mx[r], _mm512_reduce_max_ps(m));
                if (m_new == -INFINITY) { /* no visible key in this tile */
                    for (int64_t c = 0; c < KV; c++) _mm512_store_ps(p[r] + 16 * c, _mm512_setzero_ps());
                    continue;
                }
                const float corr = expf(mx[r] - m_new); /* 0 on the row's first tile */
                __m512 tot = _mm512_setzero_ps(), mv = _mm512_set1_ps(m_new);
                for (int64_t c = 0; c < KV; c++) { /* exp(-inf) is 0: the clamp in exp16 keeps it finite */
                    __m512 e = _mm512_mask_mov_ps(_mm512_setzero_ps(), _mm512_cmp_ps_mask(sv[c], ninf, _CMP_NEQ_OQ),
                                                  exp16(_mm512_sub_ps(sv[c], mv)));
                    tot = _mm512_add_ps(tot, e);
                    _mm512_store_ps(p[r] + 16 * c, e);
                }
                sum[r] = sum[r] * corr + _mm512_reduce_add_ps(tot);
                mx[r] = m_new;
                if (corr != 1.0f)
                    for (int64_t c = 0; c < nv; c++)
                        _mm512_storeu_ps(ob + r * qs + 16 * c,
                                         _mm512_mul_ps(_mm512_loadu_ps(ob + r * qs + 16 * c), _mm512_set1_ps(corr)));
            }
            for (int64_t r0 = 0; r0 < rows; r0 += 4) { /* O[r] += Σ_j p[r][j] v[j]: 4 rows x 64 columns */
                float *orow[4]; /* rows past the block's accumulate into scratch: constant loop bounds below */
                for (int64_t r = 0; r < 4; r++) orow[r] = r0 + r < rows ? ob + (r0 + r) * qs : scratch;
                for (int64_t c0 = 0; c0 < nv; c0 += 4) {
                    if (nv - c0 >= 4) {
                        __m512 acc[4][4];
                        for (int64_t r = 0; r < 4; r++)
                            for (int64_t c = 0; c < 4; c++) acc[r][c] = _mm512_loadu_ps(orow[r] + 16 * (c0 + c));
                        for (int64_t j = 0; j < keys; j++) {
                            const float *vj = vb + (j0 + j) * vs + 16 * c0;
                            __m512 vv[4];
                            for (int64_t c = 0; c < 4; c++) vv[c] = _mm512_loadu_ps(vj + 16 * c);
                            for (int64_t r = 0; r < 4; r++) {
                                __m512 pv = _mm512_set1_ps(p[r0 + r][j]);
                                for (int64_t c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(pv, vv[c], acc[r][c]);
                            }
                        }
                        for (int64_t r = 0; r < 4; r++)
                            for (int64_t c = 0; c < 4; c++) _mm512_storeu_ps(orow[r] + 16 * (c0 + c), acc[r][c]);
                    } else { /* a head size that is not a multiple of 64: its last columns one vector at a time */
                        for (int64_t c = c0; c < nv; c++)
                            for (int64_t r = 0; r < 4; r++) {
                                __m512 acc = _mm512_loadu_ps(orow[r] + 16 * c);
                                for (int64_t j = 0; j < keys; j++)
                                    acc = _mm512_fmadd_ps(_mm512_set1_ps(p[r0 + r][j]),
                                                          _mm512_loadu_ps(vb + (j0 + j) * vs + 16 * c), acc);
                                _mm512_storeu_ps(orow[r] + 16 * c, acc);
                            }
                    }
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / sum[r]);
            for (int64_t c = 0; c < nv; c++)
                _mm512_storeu_ps(ob + r * qs + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(ob + r * qs + 16 * c), inv));
        }
    }
}

/* out (M, H, hd) = softmax(q kᵀ / √hd + causal) v, query row i at position L - M + i; q (M, H, hd) and v
   (L, H_kv, hd) contiguous, kt from pl_transpose_k. Returns 1 for a shape it does not take (hd not a multiple
   of 16 up to 256, M > L, H not a multiple of H_kv), 2 when built without AVX-512 or OpenMP. */
int pl_causal_attention(const float *q, const float *kt, const float *v, float *out, int64_t M, int64_t L,
                        int64_t H, int64_t Hkv, int64_t hd) {
    if (hd % 16 || hd > 256 || hd < 16 || M > L || M < 0 || Hkv < 1 || H % Hkv) return 1;
#pragma omp parallel
    causal_attention_part(q, kt, v, out, M, L, H, Hkv, hd, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}
#else
int pl_causal_attention(const float *q, const float *kt, const float *v, float *out, int64_t M, int64_t L,
                        int64_t H, int64_t Hkv, int64_t hd) {
    (void)q, (void)kt, (void)v, (void)out, (void)M, (void)L, (void)H, (void)Hkv, (void)hd;
    return 2; /* the caller keeps SDPA */
}
#endif
