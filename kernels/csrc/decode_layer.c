/* One LLaMA decode layer for a few rows, fp32, in one call: the cpu backend's fused decode path.

   The twin is the per-op path of model/llama.py `TransformerBlock.forward` (kernels/reference.py). Row m is
   sequence m's newest token; its K/V go to cache slot slots[m] and it attends to positions < seq_lens[m]
   through block_tables[m]. The projections are GEMVs split by output rows over a small spinning thread pool
   (pool.h): each thread streams its weight rows one at a time, with a software prefetch ahead and 16-wide
   (AVX-512) or 8-wide (AVX2/FMA) accumulators per row (a portable loop elsewhere), each row read once for all
   the step's rows. numpy's OpenBLAS cblas_sgemv (handed over by kernels/native.py with pl_set_sgemv) is the
   other GEMV, chosen with pl_use_blas; the pool's pass over SmolLM2's weights was faster in alternating runs
   (bench/results/decode_cpu.md). The small steps between the GEMVs (norms, RoPE, the KV write, attention,
   SwiGLU, unmerged LoRA updates) run on the calling thread.
   Built and loaded by kernels/native.py. */

#define _POSIX_C_SOURCE 200809L /* clock_gettime, pthreads under -std=c11 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "pool.h"
#include "simd.h"

#define MAX_ROWS 8
#define MAX_HEAD_DIM 256

/* An unmerged LoRA update of one projection (peft's order): y[m] += (b @ (a @ x[m])) * scaling for the rows
   listed (all rows when rows is NULL). */
enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN };
typedef struct {
    int64_t proj, r, n_rows;
    const float *a;      /* (r, in) */
    const float *b;      /* (out, r) */
    const int64_t *rows; /* (n_rows,) packed rows, or NULL: every row */
    float scaling;
} Lora;

typedef struct {
    int64_t rows, dim, n_heads, n_kv_heads, head_dim, ffn_dim, block_size, max_blocks;
    float eps;
    const float *x;          /* (rows, dim) the last sub-layer's output (the embeddings for layer 0) */
    const float *residual;   /* (rows, dim) the stream it joins, or NULL for layer 0 */
    float *out;              /* (rows, dim) this layer's FFN output */
    float *stream;           /* (rows, dim) the stream before the FFN (x + residual + attention) */
    const float *attn_norm, *ffn_norm;        /* (dim,) */
    const float *wqkv;       /* (q + 2 kv, dim): wq | wk | wv stacked by rows */
    const float *wo;         /* (dim, q) */
    const float *w13;        /* (2 ffn, dim): w1 (gate) | w3 (up) */
    const float *w2;         /* (dim, ffn) */
    const float *scale_qkv;  /* scale of the fused projection's columns, row m at m * scale_qkv_stride; NULL: none */
    const float *scale_u;    /* scale of the up projection's columns, likewise */
    int64_t scale_qkv_stride, scale_u_stride;  /* 0: one row for every row */
    const float *cos_sin;    /* (rows, head_dim / 2, 2) */
    float *k_cache, *v_cache;                  /* (blocks, block_size, n_kv_heads, head_dim) */
    const int64_t *slots;    /* (rows,) */
    const int64_t *block_tables;               /* (rows, max_blocks) */
    const int64_t *seq_lens; /* (rows,) */
    float *work;             /* scratch: see pl_decode_layer_work */
    const Lora *lora;        /* (n_lora,) this layer's LoRA updates */
    int64_t n_lora;
    /* pl_decode_layers: floats from one layer's scales to the next's (scales stacked over layers) */
    int64_t scale_qkv_layer_stride, scale_u_layer_stride;
} Layer;

static float dot(const float *a, const float *b, int64_t n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* cblas_sgemv with 64-bit integers (numpy's OpenBLAS is built with them), row-major, no transpose. */
typedef void (*sgemv_fn)(int order, int trans, int64_t m, int64_t n, float alpha, const float *a, int64_t lda,
                         const float *x, int64_t incx, float beta, float *y, int64_t incy);
static sgemv_fn sgemv = NULL;
static int use_blas = 0;

void pl_set_sgemv(void *fn) { sgemv = (sgemv_fn)fn; }

/* 1: the projections go through the BLAS (kept to compare the two); 0: the pool. Returns the choice in effect. */
int pl_use_blas(int on) {
    use_blas = on && sgemv != NULL;
    return use_blas;
}

/* Software prefetch distance of the weight stream, in floats (8 KiB: a few rows ahead). The hardware
   prefetchers alone left the GEMVs ~10% under this on a 2-core Xeon (bench/results/decode_cpu.md); reading
   past a matrix's end only prefetches, it never faults. */
#define PREFETCH 2048

/* w · x for one weight row: independent accumulators keep the FMA pipes busy while the row streams in. */
static inline float row_dot(const float *w, const float *x, int64_t k) {
    int64_t j = 0;
    float acc = 0.0f;
#if defined(__AVX512F__)
    __m512 b0 = _mm512_setzero_ps(), b1 = b0;
    for (; j + 32 <= k; j += 32) {
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + j + 16 + PREFETCH), _MM_HINT_T0);
        b0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), b0);
        b1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), b1);
    }
    acc = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; j + 32 <= k; j += 32) {
        _mm_prefetch((const char *)(w + j + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + j + 16 + PREFETCH), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);
    }
    __m256 v = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    acc = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    return acc + dot(w + j, x + j, k - j);
}

typedef struct {
    const float *w, *x;
    float *y;
    int64_t n_out, k, xstride, rows;
} Gemv;

/* thread id's share of the output rows, in whole cache lines of y (8 floats): contiguous weight rows */
static void gemv_job(const void *arg, int id, int n) {
    const Gemv *t = arg;
    int64_t per = ((t->n_out + n - 1) / n + 7) & ~(int64_t)7;
    int64_t i0 = id * per, i1 = i0 + per < t->n_out ? i0 + per : t->n_out;
    for (int64_t i = i0; i < i1; i++) {
        const float *w = t->w + i * t->k;
        for (int64_t m = 0; m < t->rows; m++) t->y[m * t->n_out + i] = row_dot(w, t->x + m * t->xstride, t->k);
    }
}

#define CHUNK_BYTES (4 << 20)

/* y[m] = w @ x[m] for M rows (x rows xstride apart, y rows n_out apart). */
static void linear(const float *w, int64_t n_out, int64_t k, const float *x, int64_t xstride, float *y,
                   int64_t rows) {
    if (!use_blas) {
        Gemv t = {w, x, y, n_out, k, xstride, rows};
        if (n_out * k < 16384) gemv_job(&t, 0, 1); /* too small to share */
        else pool_run(gemv_job, &t);
        return;
    }
    /* BLAS: one GEMV per row, over weight chunks small enough to stay in cache, so a chunk comes from memory
       once for all the rows */
    int64_t step = rows == 1 ? n_out : CHUNK_BYTES / (k * (int64_t)sizeof(float));
    if (step < 1) step = 1;
    for (int64_t c = 0; c < n_out; c += step) {
        int64_t n = n_out - c < step ? n_out - c : step;
        for (int64_t m = 0; m < rows; m++)
            sgemv(101, 111, n, k, 1.0f, w + c * k, k, x + m * xstride, 1, 0.0f, y + m * n_out + c, 1);
    }
}

/* Every LoRA update of projection `proj`: its input rows x (stride xs, width `in`), its output columns
   y[col0 .. col0 + out) of rows ys apart. */
static void apply_lora(const Layer *L, int64_t proj, const float *x, int64_t xs, int64_t in, float *y, int64_t ys,
                       int64_t col0, int64_t out) {
    for (int64_t u = 0; u < L->n_lora; u++) {
        const Lora *d = &L->lora[u];
        if (d->proj != proj) continue;
        int64_t n = d->rows ? d->n_rows : L->rows;
        for (int64_t j = 0; j < n; j++) {
            int64_t m = d->rows ? d->rows[j] : j;
            float t[256];  /* r <= 256: checked by the caller */
            for (int64_t k = 0; k < d->r; k++) t[k] = dot(d->a + k * in, x + m * xs, in);
            float *ym = y + m * ys + col0;
            for (int64_t c = 0; c < out; c++) ym[c] += dot(d->b + c * d->r, t, d->r) * d->scaling;
        }
    }
}

/* RoPE of one head: o = p rotated pair by pair (Meta's interleaved pairs) by the row's table cs (hd/2, 2);
   o may be p. */
static inline void rope_head(const float *p, const float *cs, float *o, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1], x0 = p[2 * i], x1 = p[2 * i + 1];
        o[2 * i] = x0 * c - x1 * s;
        o[2 * i + 1] = x0 * s + x1 * c;
    }
}

static void rms_norm_row(const float *h, const float *w, float *y, int64_t d, float eps) {
    float ss = dot(h, h, d);
    float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) y[i] = h[i] * r * w[i];
}

/* One query head of row m over its paged context: acc = softmax(q kᵀ / √hd) v, KV head kvh. The block table is
   walked block by block (each block's rows are consecutive: no division per token); the output accumulates in a
   local array; p: scratch for the row's scores. Inlined with a constant hd for the common 64 (fully unrolled
   dot products and updates): the attention of a ~300-token decode step took 0.6x the time of the generic
   loop in alternating runs (bench/results/decode_cpu.md). */
static inline __attribute__((always_inline)) void attend_head(const Layer *L, const float *q, int64_t m, int64_t kvh,
                                                              float *acc, float *p, const int64_t hd) {
    const int64_t Hkv = L->n_kv_heads, bs = L->block_size, row = Hkv * hd, n = L->seq_lens[m];
    const int64_t *table = L->block_tables + m * L->max_blocks;
    const float scale = 1.0f / sqrtf((float)hd);
    float mx = -INFINITY, sum = 0.0f, a[MAX_HEAD_DIM];
    for (int64_t t0 = 0; t0 < n; t0 += bs) {
        const float *k = L->k_cache + table[t0 / bs] * bs * row + kvh * hd;
        const int64_t nt = n - t0 < bs ? n - t0 : bs;
        for (int64_t j = 0; j < nt; j++, k += row) {
            const float sc = dot(q, k, hd) * scale;
            p[t0 + j] = sc;
            mx = sc > mx ? sc : mx;
        }
    }
    for (int64_t t = 0; t < n; t++) sum += (p[t] = expf(p[t] - mx));
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < hd; i++) a[i] = 0.0f;
    for (int64_t t0 = 0; t0 < n; t0 += bs) {
        const float *v = L->v_cache + table[t0 / bs] * bs * row + kvh * hd;
        const int64_t nt = n - t0 < bs ? n - t0 : bs;
        for (int64_t j = 0; j < nt; j++, v += row) {
            const float w = p[t0 + j] * inv;
#pragma omp simd
            for (int64_t i = 0; i < hd; i++) a[i] += w * v[i];
        }
    }
    for (int64_t i = 0; i < hd; i++) acc[i] = a[i];
}

/* Scratch floats pl_decode_layer needs: its intermediates, then one row of attention scores. */
int64_t pl_decode_layer_work(int64_t rows, int64_t dim, int64_t qkv_dim, int64_t q_dim, int64_t ffn_dim,
                             int64_t max_context) {
    return rows * (dim + qkv_dim + q_dim + dim + 2 * ffn_dim) + max_context;
}

int pl_decode_layer(const Layer *L) {
    const int64_t M = L->rows, d = L->dim, H = L->n_heads, Hkv = L->n_kv_heads, hd = L->head_dim;
    const int64_t q_dim = H * hd, kv_dim = Hkv * hd, qkv_dim = q_dim + 2 * kv_dim, f = L->ffn_dim;
    const int64_t g = H / Hkv, half = hd / 2;
    if (M < 1 || M > MAX_ROWS || H % Hkv || hd % 2 || hd > MAX_HEAD_DIM) return 1;
    float *normed = L->work;              /* (M, d) */
    float *qkv = normed + M * d;          /* (M, qkv_dim) */
    float *attn = qkv + M * qkv_dim;      /* (M, q_dim) */
    float *o = attn + M * q_dim;          /* (M, d) */
    float *g13 = o + M * d;               /* (M, 2f), then gate := silu(gate) * up * scale */
    const int64_t work_fixed = M * (d + qkv_dim + q_dim + d + 2 * f);

    for (int64_t m = 0; m < M; m++) {  /* stream = x + residual; normed = rms_norm(stream) */
        float *h = L->stream + m * d;
        for (int64_t i = 0; i < d; i++) h[i] = L->x[m * d + i] + (L->residual ? L->residual[m * d + i] : 0.0f);
        rms_norm_row(h, L->attn_norm, normed + m * d, d, L->eps);
    }
    linear(L->wqkv, qkv_dim, d, normed, d, qkv, M);
    if (L->scale_qkv)
        for (int64_t m = 0; m < M; m++) {
            const float *s = L->scale_qkv + m * L->scale_qkv_stride;
            for (int64_t i = 0; i < qkv_dim; i++) qkv[m * qkv_dim + i] *= s[i];
        }
    apply_lora(L, LORA_Q, normed, d, d, qkv, qkv_dim, 0, q_dim);
    apply_lora(L, LORA_K, normed, d, d, qkv, qkv_dim, q_dim, kv_dim);
    apply_lora(L, LORA_V, normed, d, d, qkv, qkv_dim, q_dim + kv_dim, kv_dim);
    for (int64_t m = 0; m < M; m++) {  /* RoPE of Q and K (interleaved pairs), K/V to the cache */
        float *r = qkv + m * qkv_dim;
        const float *cs = L->cos_sin + m * hd;
        for (int64_t head = 0; head < H + Hkv; head++) rope_head(r + head * hd, cs, r + head * hd, half);
        int64_t slot = L->slots[m];
        float *kc = L->k_cache + slot * kv_dim, *vc = L->v_cache + slot * kv_dim;
        for (int64_t i = 0; i < kv_dim; i++) {
            kc[i] = r[q_dim + i];
            vc[i] = r[q_dim + kv_dim + i];
        }
    }
    for (int64_t mh = 0; mh < M * H; mh++) { /* softmax(q kᵀ / √hd) v over the row's paged context */
        if (hd == 64) /* the common head size, unrolled */
            attend_head(L, qkv + (mh / H) * qkv_dim + (mh % H) * hd, mh / H, (mh % H) / g, attn + mh * hd,
                        L->work + work_fixed, 64);
        else
            attend_head(L, qkv + (mh / H) * qkv_dim + (mh % H) * hd, mh / H, (mh % H) / g, attn + mh * hd,
                        L->work + work_fixed, hd);
    }
    linear(L->wo, d, q_dim, attn, q_dim, o, M);
    apply_lora(L, LORA_O, attn, q_dim, q_dim, o, d, 0, d);
    for (int64_t m = 0; m < M; m++) {  /* stream += attention; normed = rms_norm(stream) */
        float *h = L->stream + m * d;
        for (int64_t i = 0; i < d; i++) h[i] += o[m * d + i];
        rms_norm_row(h, L->ffn_norm, normed + m * d, d, L->eps);
    }
    linear(L->w13, 2 * f, d, normed, d, g13, M);
    if (L->scale_u)
        for (int64_t m = 0; m < M; m++) {
            const float *s = L->scale_u + m * L->scale_u_stride;
            float *up = g13 + m * 2 * f + f;
            for (int64_t i = 0; i < f; i++) up[i] *= s[i];
        }
    apply_lora(L, LORA_GATE, normed, d, d, g13, 2 * f, 0, f);
    apply_lora(L, LORA_UP, normed, d, d, g13, 2 * f, f, f);
    for (int64_t m = 0; m < M; m++) {  /* SwiGLU input: silu(gate) * up, in the gate's place */
        float *gate = g13 + m * 2 * f, *up = gate + f;
        for (int64_t i = 0; i < f; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
    /* w2 reads row m's hidden at g13 + m * 2f: a (M, f) matrix with row stride 2f */
    linear(L->w2, d, f, g13, 2 * f, L->out, M);
    apply_lora(L, LORA_DOWN, g13, 2 * f, f, L->out, d, 0, d);
    return 0;
}

/* All n layers of a decode step in one call: layers[0] carries the step's fields (rows, x = the embeddings,
   residual = NULL, out, stream, cos_sin, slots, block_tables, max_blocks, seq_lens, work, and the scales: layer
   0's, their row strides and their per-layer strides); every later layer takes them from it and runs in place
   on layers[0]'s out / stream (a layer reads x and residual before it writes stream, and writes out last). The
   others hold their weights and caches. The result is in layers[0].out and .stream. Returns the first failing
   layer's code. */
int pl_decode_layers(Layer *layers, int64_t n) {
    const Layer *s = &layers[0];
    for (int64_t i = 0; i < n; i++) {
        Layer *L = &layers[i];
        if (i > 0) {
            L->rows = s->rows, L->max_blocks = s->max_blocks;
            L->cos_sin = s->cos_sin, L->slots = s->slots, L->block_tables = s->block_tables;
            L->seq_lens = s->seq_lens, L->work = s->work;
            L->x = s->out, L->residual = s->stream, L->out = s->out, L->stream = s->stream;
            L->scale_qkv = s->scale_qkv ? s->scale_qkv + i * s->scale_qkv_layer_stride : NULL;
            L->scale_u = s->scale_u ? s->scale_u + i * s->scale_u_layer_stride : NULL;
            L->scale_qkv_stride = s->scale_qkv_stride, L->scale_u_stride = s->scale_u_stride;
        }
        int rc = pl_decode_layer(L);
        if (rc != 0) return rc;
    }
    return 0;
}

/* y (M, N) = x (M, K) @ wᵀ for a few rows (the output projection of a decode step). */
int pl_linear(const float *x, const float *w, float *y, int64_t rows, int64_t n_out, int64_t k) {
    if (rows < 1 || rows > MAX_ROWS) return 1;
    linear(w, n_out, k, x, k, y, rows);
    return 0;
}

/* The row passes below (a prefill's add + norm, RoPE + KV write, SwiGLU epilogue) split their rows over OpenMP's
   threads from this many rows on; 0 (the default, and a build without -fopenmp): on the calling thread only.
   kernels/native.py sets it only where those threads are torch's own (the one pool that runs the GEMMs between
   these passes: a second one would spin against it for the cores). */
static int64_t parallel_rows = 0;
void pl_set_parallel_rows(int64_t n) { parallel_rows = n; }
#define PARALLEL_ROWS(rows) if (parallel_rows > 0 && (rows) >= parallel_rows)

/* h = x + residual (residual NULL: h = x, not written) and y = RMSNorm(h) · w, row by row in one pass over
   each row: a prefill's add + norm without torch's five passes and their temporaries. */
int pl_add_rms_norm(const float *x, const float *residual, const float *w, float *h, float *y, int64_t rows,
                    int64_t d, float eps) {
    if (rows < 0 || d < 1) return 1;
#pragma omp parallel for schedule(static) PARALLEL_ROWS(rows)
    for (int64_t m = 0; m < rows; m++) {
        const float *xm = x + m * d;
        const float *hm = xm;
        if (residual != NULL) {
            const float *rm = residual + m * d;
            float *out = h + m * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) out[i] = xm[i] + rm[i];
            hm = out;
        }
        rms_norm_row(hm, w, y + m * d, d, eps);
    }
    return 0;
}

/* RoPE of each row's Q and K heads (interleaved pairs) and the paged-cache write of K and V: q_out (rows, H, hd)
   gets the rotated Q, k_cache / v_cache (slots, H_kv, hd) the rotated K and V at slots[m]. qkv (rows,
   (H + 2 H_kv) hd) is only read. */
int pl_rope_write_kv(const float *qkv, const float *cos_sin, float *k_cache, float *v_cache, const int64_t *slots,
                     float *q_out, int64_t rows, int64_t H, int64_t Hkv, int64_t hd) {
    if (rows < 0 || hd < 2 || hd % 2) return 1;
    const int64_t half = hd / 2, q_dim = H * hd, kv_dim = Hkv * hd, width = q_dim + 2 * kv_dim;
#pragma omp parallel for schedule(static) PARALLEL_ROWS(rows)
    for (int64_t m = 0; m < rows; m++) {
        const float *r = qkv + m * width, *cs = cos_sin + m * hd;
        float *kc = k_cache + slots[m] * kv_dim, *vc = v_cache + slots[m] * kv_dim;
        for (int64_t head = 0; head < H + Hkv; head++)
            rope_head(r + head * hd, cs, head < H ? q_out + m * q_dim + head * hd : kc + (head - H) * hd, half);
        memcpy(vc, r + q_dim + kv_dim, (size_t)kv_dim * sizeof(float));
    }
    return 0;
}

/* SwiGLU's epilogue: out (rows, n) = silu(g13[:, :n]) · g13[:, n:] for the stacked gate | up GEMM output
   (rows, 2n), silu(g) = g / (1 + e^-g). Returns 1 (nothing done) without AVX-512: the caller keeps torch's
   vectorised form rather than a scalar expf loop. */
int pl_silu_mul(const float *g13, float *out, int64_t rows, int64_t n) {
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) PARALLEL_ROWS(rows)
    for (int64_t m = 0; m < rows; m++) {
        const float *g = g13 + m * 2 * n, *u = g + n;
        float *o = out + m * n;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), uv));
        }
    }
    return 0;
#else
    (void)g13, (void)out, (void)rows, (void)n;
    return 1;
#endif
}
