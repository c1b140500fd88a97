/* CPU decode kernels: skinny matrix products and the small ops around them, for m <= MAX_M rows.
 *
 * Decode is bound by reading the weights once per step. torch's CPU GEMV path reaches well under
 * the machine's read bandwidth for these shapes, and each of the ~40 small torch ops per layer
 * costs several microseconds of dispatch; these kernels stream each weight row once (applied to
 * all m rows of X) and fuse the norm, RoPE and SwiGLU around the products. Weight rows are split
 * across OpenMP threads, in the OpenMP runtime torch already loaded (the two share one pool).
 * Activations are float32; weights float32 or bfloat16. The PyTorch reference of each function
 * is named in kvserve/kernels/cpu.py, and tests check one against the other.
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_M 64

int kv_max_m(void) { return MAX_M; }

/* Threads for the weight-streaming loops. Set explicitly because during decode torch's own pool
 * is cut to one thread (its tiny ops only lose time at barriers), which would otherwise also cut
 * ours: both live in the one OpenMP runtime. 0 means the runtime's current default. */
static int kv_threads = 0;
void kv_set_num_threads(int n) { kv_threads = n; }
static inline int kv_team(void) { return kv_threads > 0 ? kv_threads : omp_get_max_threads(); }

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* Y[m, n] (=|+=) X[m, k] @ W[n, k]^T, one weight row at a time, rows split across threads.
 * With AVX2+FMA each row is reduced in four independent 8-wide accumulators (one accumulator
 * would stall on FMA latency: bf16 rows are short enough for that to bound the speed). Other
 * CPUs get the portable loop, which the compiler vectorizes as it can. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float hsum256(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(_mm_hadd_ps(lo, lo));
}
static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bf16(const uint16_t *p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-7 polynomial (the Cephes
 * expf coefficients), 2^n built in the exponent bits. Relative error ~2e-7 over the clamped
 * range [-87.3, 88.7] (below it the result is ~1e-38, not 0: harmless as a softmax weight).
 * libm's scalar expf was most of the softmax and SwiGLU time in batched decode. */
#define KV_HAVE_EXP8 1
#define KV_AVX2 1
static inline __m256 exp8_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.7f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
                                23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#define ROW_DOT(WTYPE, LOAD8, LOAD1)                                                 \
  static inline float row_dot_##WTYPE(const WTYPE *w, const float *x, int k) {       \
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                       \
    int j = 0;                                                                        \
    for (; j + 32 <= k; j += 32) {                                                    \
      a0 = _mm256_fmadd_ps(LOAD8(w + j), _mm256_loadu_ps(x + j), a0);                 \
      a1 = _mm256_fmadd_ps(LOAD8(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);         \
      a2 = _mm256_fmadd_ps(LOAD8(w + j + 16), _mm256_loadu_ps(x + j + 16), a2);       \
      a3 = _mm256_fmadd_ps(LOAD8(w + j + 24), _mm256_loadu_ps(x + j + 24), a3);       \
    }                                                                                 \
    float acc = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))); \
    for (; j < k; j++) acc += LOAD1(w[j]) * x[j];                                     \
    return acc;                                                                       \
  }
#else
#define ROW_DOT(WTYPE, LOAD8, LOAD1)                                                 \
  static inline float row_dot_##WTYPE(const WTYPE *w, const float *x, int k) {       \
    float acc = 0.f;                                                                  \
    _Pragma("omp simd reduction(+ : acc)")                                            \
    for (int j = 0; j < k; j++) acc += LOAD1(w[j]) * x[j];                            \
    return acc;                                                                       \
  }
#endif

#define LOAD1_F32(v) (v)
#define LOAD1_BF16(v) bf16_to_f32(v)
typedef uint16_t bf16_t;
ROW_DOT(float, load8_f32, LOAD1_F32)
ROW_DOT(bf16_t, load8_bf16, LOAD1_BF16)

/* Register tiles for products where both operands run along k (Y = X W^T, scores = q K^T):
 * out[i * ldo + j] (=|+=) dot(a[i], b[j]) for i < ma <= 4 activation rows and j < nb <= 3 rows
 * of the typed operand, in 12 independent 8-wide accumulators: each b load serves 4 rows and
 * each a load 3, so the FMA units, not the loads or one accumulator's latency, set the pace.
 * Shapes with 3 b rows are instantiated for each ma so the compiler keeps acc in registers. */
#ifdef KV_AVX2
#define DOT_TILE(WTYPE, LOAD8, LOAD1)                                                             \
  static inline __attribute__((always_inline)) void tile_body_##WTYPE(                          \
      const float *const *a, int ma, const WTYPE *const *b, int nb, int k, float *out, int ldo,   \
      int accumulate) {                                                                           \
    __m256 acc[4][3];                                                                             \
    for (int i = 0; i < ma; i++)                                                                  \
      for (int j = 0; j < nb; j++) acc[i][j] = _mm256_setzero_ps();                               \
    int p = 0;                                                                                    \
    for (; p + 8 <= k; p += 8) {                                                                  \
      __m256 bv[3];                                                                               \
      for (int j = 0; j < nb; j++) bv[j] = LOAD8(b[j] + p);                                       \
      for (int i = 0; i < ma; i++) {                                                              \
        __m256 av = _mm256_loadu_ps(a[i] + p);                                                    \
        for (int j = 0; j < nb; j++) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);           \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < ma; i++)                                                                  \
      for (int j = 0; j < nb; j++) {                                                              \
        float v = hsum256(acc[i][j]);                                                             \
        for (int q = p; q < k; q++) v += a[i][q] * LOAD1(b[j][q]);                                \
        out[i * ldo + j] = accumulate ? out[i * ldo + j] + v : v;                                 \
      }                                                                                           \
  }                                                                                               \
  /* constant shapes, so each case is unrolled into registers (variable bounds spill acc) */    \
  static void tile_##WTYPE(const float *const *a, int ma, const WTYPE *const *b, int nb, int k,   \
                           float *out, int ldo, int accumulate) {                                 \
    if (nb == 3) {                                                                                \
      switch (ma) {                                                                               \
        case 4: tile_body_##WTYPE(a, 4, b, 3, k, out, ldo, accumulate); return;                   \
        case 3: tile_body_##WTYPE(a, 3, b, 3, k, out, ldo, accumulate); return;                   \
        case 2: tile_body_##WTYPE(a, 2, b, 3, k, out, ldo, accumulate); return;                   \
        case 1: tile_body_##WTYPE(a, 1, b, 3, k, out, ldo, accumulate); return;                   \
      }                                                                                           \
    }                                                                                             \
    tile_body_##WTYPE(a, ma, b, nb, k, out, ldo, accumulate);                                     \
  }
#else
#define DOT_TILE(WTYPE, LOAD8, LOAD1)                                                             \
  static inline void tile_##WTYPE(const float *const *a, int ma, const WTYPE *const *b, int nb,   \
                                  int k, float *out, int ldo, int accumulate) {                   \
    for (int i = 0; i < ma; i++)                                                                  \
      for (int j = 0; j < nb; j++) {                                                              \
        float v = 0.f;                                                                            \
        _Pragma("omp simd reduction(+ : v)")                                                      \
        for (int q = 0; q < k; q++) v += a[i][q] * LOAD1(b[j][q]);                                \
        out[i * ldo + j] = accumulate ? out[i * ldo + j] + v : v;                                 \
      }                                                                                           \
  }
#endif
DOT_TILE(float, load8_f32, LOAD1_F32)
DOT_TILE(bf16_t, load8_bf16, LOAD1_BF16)

/* Y[m, n] (=|+=) X[m, k] @ W[n, k]^T for batches past a few rows: 3-row panels of W split across
 * threads; each panel (a few KiB) stays in L1 while every 4-row tile of X passes over it, so W is
 * still read from memory once per call and X comes from L2. */
#define GEMM(NAME, WTYPE)                                                                         \
  static void NAME(const WTYPE *restrict W, const float *restrict X, float *restrict Y, int m,    \
                   int n, int k, int accumulate) {                                                \
    int panels = (n + 2) / 3;                                                                     \
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")                           \
    for (int pnl = 0; pnl < panels; pnl++) {                                                      \
      int r0 = pnl * 3, nb = n - r0 < 3 ? n - r0 : 3;                                             \
      const WTYPE *b[3];                                                                          \
      for (int j = 0; j < nb; j++) b[j] = W + (size_t)(r0 + j) * k;                               \
      for (int i0 = 0; i0 < m; i0 += 4) {                                                         \
        int ma = m - i0 < 4 ? m - i0 : 4;                                                         \
        const float *a[4];                                                                        \
        for (int i = 0; i < ma; i++) a[i] = X + (size_t)(i0 + i) * k;                             \
        tile_##WTYPE(a, ma, b, nb, k, Y + (size_t)i0 * n + r0, n, accumulate);                    \
      }                                                                                           \
    }                                                                                             \
  }
GEMM(gemm_tiled_float, float)
GEMM(gemm_tiled_bf16_t, bf16_t)

/* Up to GEMV_ROWS rows of X the product is bound by streaming W once (each W row reduced against
 * every X row in four accumulators); past that the FMA units bind and the tiled GEMM above wins. */
#define GEMV_ROWS 4
#define GEMV(NAME, WTYPE)                                                                \
  void NAME(const WTYPE *restrict W, const float *restrict X, float *restrict Y, int m,  \
            int n, int k, int accumulate) {                                               \
    if (m > GEMV_ROWS) {                                                                  \
      gemm_tiled_##WTYPE(W, X, Y, m, n, k, accumulate);                                   \
      return;                                                                             \
    }                                                                                     \
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")                  \
    for (int r = 0; r < n; r++) {                                                         \
      const WTYPE *w = W + (size_t)r * k;                                                 \
      for (int i = 0; i < m; i++) {                                                       \
        float acc = row_dot_##WTYPE(w, X + (size_t)i * k, k);                             \
        float *y = Y + (size_t)i * n + r;                                                 \
        *y = accumulate ? *y + acc : acc;                                                 \
      }                                                                                   \
    }                                                                                     \
  }
GEMV(kv_gemv_f32, float)
GEMV(kv_gemv_bf16, bf16_t)

/* s[0..len) <- exp(s - max(s)); returns their sum (the softmax denominator), max(s) in *max. */
static inline float exp_shifted_max(float *s, int len, float *max) {
  float mx = -INFINITY, total = 0.f;
  int t = 0;
#ifdef KV_HAVE_EXP8
  if (len >= 8) {
    __m256 m8 = _mm256_loadu_ps(s);
    for (t = 8; t + 8 <= len; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  }
#endif
  for (; t < len; t++) mx = s[t] > mx ? s[t] : mx;
  t = 0;
#ifdef KV_HAVE_EXP8
  __m256 vmx = _mm256_set1_ps(mx), vsum = _mm256_setzero_ps();
  for (; t + 8 <= len; t += 8) {
    __m256 e = exp8_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
    _mm256_storeu_ps(s + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  total = hsum256(vsum);
#endif
  for (; t < len; t++) {
    s[t] = expf(s[t] - mx);
    total += s[t];
  }
  *max = mx;
  return total;
}
static inline float exp_shifted(float *s, int len) {
  float mx;
  return exp_shifted_max(s, len, &mx);
}

/* out[m, k] = weight * (x * rsqrt(mean(x^2) + eps)), row by row (Hugging Face's LlamaRMSNorm) */
void kv_rms_norm(const float *restrict X, const float *restrict weight, float *restrict out,
                 int m, int k, float eps) {
  for (int i = 0; i < m; i++) {
    const float *x = X + (size_t)i * k;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < k; j++) ss += x[j] * x[j];
    float scale = 1.0f / sqrtf(ss / (float)k + eps);
    float *o = out + (size_t)i * k;
#pragma omp simd
    for (int j = 0; j < k; j++) o[j] = weight[j] * (x[j] * scale);
  }
}

/* Rotate-half RoPE in place on the first num_heads heads of each row of QK.
 * QK row i starts at QK + i * row_stride and holds heads of head_dim floats;
 * cos/sin are [m, head_dim] (the table rows of each row's position). */
void kv_rope(float *restrict QK, const float *restrict cos_t, const float *restrict sin_t,
             int m, int num_heads, int head_dim, int row_stride) {
  int half = head_dim / 2;
  for (int i = 0; i < m; i++) {
    const float *c = cos_t + (size_t)i * head_dim;
    const float *s = sin_t + (size_t)i * head_dim;
    for (int h = 0; h < num_heads; h++) {
      float *x = QK + (size_t)i * row_stride + (size_t)h * head_dim;
#pragma omp simd
      for (int j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        x[j] = a * c[j] - b * s[j];
        x[j + half] = b * c[j + half] + a * s[j + half];
      }
    }
  }
}

/* out[m, inter] = silu(gate) * up, with GU[m, 2 * inter] = [gate | up] */
void kv_swiglu(const float *restrict GU, float *restrict out, int m, int inter) {
  for (int i = 0; i < m; i++) {
    const float *g = GU + (size_t)i * 2 * inter;
    const float *u = g + inter;
    float *o = out + (size_t)i * inter;
    int j = 0;
#ifdef KV_HAVE_EXP8
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= inter; j += 8) {
      __m256 gv = _mm256_loadu_ps(g + j);
      __m256 sig = _mm256_add_ps(one, exp8_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv)));
      _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(gv, sig), _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < inter; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
  }
}

/* Sum of n floats read once, for measuring read bandwidth (the decode roofline). */
double kv_read_sum(const float *restrict A, size_t n) {
  float total = 0.f;
#pragma omp parallel for simd reduction(+ : total) schedule(static) num_threads(kv_team())
  for (size_t i = 0; i < n; i++) total += A[i];
  return total;
}

static inline uint16_t f32_to_bf16(float f) {
  /* round to nearest even, as torch's float -> bfloat16 conversion does (NaN kept quiet) */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* One decode token of one sequence over a contiguous K/V store, for one layer:
 * writes k_new/v_new (each [num_kv, d]) at position `pos` of K, V ([num_kv, capacity, d]),
 * then out[h] = softmax(q[h] . K[kv(h), 0..pos] / sqrt(d)) @ V[kv(h), 0..pos] for every query
 * head h, where kv(h) = h / (num_heads / num_kv) (grouped-query attention).
 * `scores` is caller scratch of at least (pos + 1) floats per query head.
 * Reference: kvserve.model.attention.ops.attention_reference. */
#define DECODE_ATTENTION(NAME, KTYPE, LOADK, STOREK)                                             \
  void NAME(const float *restrict q, const float *restrict k_new, const float *restrict v_new,    \
            KTYPE *restrict K, KTYPE *restrict V, int pos, int capacity, int num_heads,           \
            int num_kv, int d, float *restrict out, float *restrict scores) {                     \
    int group = num_heads / num_kv, len = pos + 1;                                                \
    float scale = 1.0f / sqrtf((float)d);                                                         \
    for (int g = 0; g < num_kv; g++)                                                              \
      for (int j = 0; j < d; j++) {                                                               \
        K[((size_t)g * capacity + pos) * d + j] = STOREK(k_new[g * d + j]);                       \
        V[((size_t)g * capacity + pos) * d + j] = STOREK(v_new[g * d + j]);                       \
      }                                                                                           \
    for (int h = 0; h < num_heads; h++) {                                                         \
      const KTYPE *kh = K + (size_t)(h / group) * capacity * d;                                   \
      const KTYPE *vh = V + (size_t)(h / group) * capacity * d;                                   \
      const float *qh = q + (size_t)h * d;                                                        \
      float *s = scores + (size_t)h * len;                                                        \
      for (int t = 0; t < len; t++) {                                                             \
        float acc = 0.f;                                                                          \
        _Pragma("omp simd reduction(+ : acc)")                                                    \
        for (int j = 0; j < d; j++) acc += qh[j] * LOADK(kh[(size_t)t * d + j]);                  \
        s[t] = acc * scale;                                                                       \
      }                                                                                           \
      float total = exp_shifted(s, len);                                                          \
      float *o = out + (size_t)h * d;                                                             \
      for (int j = 0; j < d; j++) o[j] = 0.f;                                                     \
      for (int t = 0; t < len; t++) {                                                             \
        float p = s[t] / total;                                                                   \
        _Pragma("omp simd")                                                                       \
        for (int j = 0; j < d; j++) o[j] += p * LOADK(vh[(size_t)t * d + j]);                     \
      }                                                                                           \
    }                                                                                             \
  }
#define STORE_F32(v) (v)
#define STORE_BF16(v) f32_to_bf16(v)
DECODE_ATTENTION(kv_decode_attention_f32, float, LOAD1_F32, STORE_F32)
DECODE_ATTENTION(kv_decode_attention_bf16, bf16_t, LOAD1_BF16, STORE_BF16)

/* Tokens ahead whose K (or V) row a paged decode kernel prefetches: blocks are scattered over
 * the pool and a head's row is a strided slice of each token's, which the hardware prefetcher
 * does not follow (float32 at 2k tokens, 30 layers: 13.4 -> 10.6 ms; 8 to 64 did about as well).
 */
#define KV_PF_TOKENS 16
/* A token's place in a paged sequence, walked token by token (a division per token, t /
 * block_size with a run-time block size, is not needed): block index and slot. */
typedef struct {
  int blk, off;
} kv_cursor;
static inline size_t cursor_at(const kv_cursor *c, const int *table, size_t block_elems,
                               size_t row_elems) {
  return (size_t)table[c->blk] * block_elems + (size_t)c->off * row_elems;
}
static inline void cursor_step(kv_cursor *c, int block_size) {
  if (++c->off == block_size) c->off = 0, c->blk++;
}
/* the current token's element offset, then one step on */
static inline size_t cursor_offset(kv_cursor *c, const int *table, int block_size,
                                   size_t block_elems, size_t row_elems) {
  size_t at = cursor_at(c, table, block_elems, row_elems);
  cursor_step(c, block_size);
  return at;
}
static inline void prefetch_row(const void *p, size_t bytes) {
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)p + off, 0, 3);
}

/* The two products of one (sequence, KV head) pair of paged decode attention, over the `group`
 * query heads that share the KV head. Token t's row of K (or V) for this head lives at
 * base + table[t / block_size] * block_elems + (t % block_size) * row_elems (walked with a
 * kv_cursor). */
#define PAGED_HELPERS(KTYPE, LOAD8, LOADK)                                                        \
  /* s[hh * lds + t] = scale * q[hh] . K[t] for hh < group, t < len */                           \
  __attribute__((unused)) static void paged_qk_##KTYPE(const float *q, int group, int d,         \
                                                      const KTYPE *base,                          \
                               const int *table, int block_size, size_t block_elems,              \
                               size_t row_elems, int len, float scale, float *s, int lds) {       \
    kv_cursor at = {0, 0}, ahead = {KV_PF_TOKENS / block_size, KV_PF_TOKENS % block_size};       \
    for (int t0 = 0; t0 < len; t0 += 3) {                                                         \
      int nb = len - t0 < 3 ? len - t0 : 3;                                                       \
      const KTYPE *b[3];                                                                          \
      for (int j = 0; j < nb; j++) {                                                              \
        b[j] = base + cursor_offset(&at, table, block_size, block_elems, row_elems);              \
        if (t0 + j + KV_PF_TOKENS < len)                                                          \
          prefetch_row(base + cursor_at(&ahead, table, block_elems, row_elems), d * sizeof(KTYPE));\
        cursor_step(&ahead, block_size);                                                          \
      }                                                                                           \
      for (int h0 = 0; h0 < group; h0 += 4) {                                                     \
        int ma = group - h0 < 4 ? group - h0 : 4;                                                 \
        const float *a[4];                                                                        \
        for (int i = 0; i < ma; i++) a[i] = q + (size_t)(h0 + i) * d;                             \
        tile_##KTYPE(a, ma, b, nb, d, s + (size_t)h0 * lds + t0, lds, 0);                         \
      }                                                                                           \
    }                                                                                             \
    for (int hh = 0; hh < group; hh++)                                                            \
      for (int t = 0; t < len; t++) s[(size_t)hh * lds + t] *= scale;                             \
  }                                                                                               \
  /* o[hh] = sum_t p[hh * lds + t] * V[t] for hh < group (o is [group, d]); int8/int4 V has  \
   * block_values instead, so u8_t's instance goes unused */                                    \
  __attribute__((unused)) static void paged_pv_##KTYPE(const float *p, int lds, int group, int d, const KTYPE *base,       \
                               const int *table, int block_size, size_t block_elems,              \
                               size_t row_elems, int len, float *o) {                             \
    int j0 = 0;                                                                                   \
    PAGED_PV_VECTOR(KTYPE, LOAD8)                                                                 \
    for (int hh = 0; hh < group; hh++)                                                            \
      for (int j = j0; j < d; j++) o[(size_t)hh * d + j] = 0.f;                                   \
    kv_cursor at = {0, 0};                                                                        \
    for (int t = 0; t < len && j0 < d; t++) {                                                     \
      const KTYPE *v = base + cursor_offset(&at, table, block_size, block_elems, row_elems);      \
      for (int hh = 0; hh < group; hh++) {                                                        \
        float w = p[(size_t)hh * lds + t], *oh = o + (size_t)hh * d;                              \
        for (int j = j0; j < d; j++) oh[j] += w * LOADK(v[j]);                                    \
      }                                                                                           \
    }                                                                                             \
  }
/* AVX2: 16 columns of up to 4 heads in 8 accumulators, one pass over the tokens per 16 columns
 * (the V rows of one sequence stay in L2 between passes); leaves j0 at the first column left. */
#ifdef KV_AVX2
#define PV_COLUMNS(KTYPE, LOAD8, NH)                                                              \
  {                                                                                               \
    __m256 acc[NH][2];                                                                            \
    for (int i = 0; i < NH; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                     \
    kv_cursor at = {0, 0}, ahead = {KV_PF_TOKENS / block_size, KV_PF_TOKENS % block_size};       \
    for (int t = 0; t < len; t++) {                                                               \
      const KTYPE *v = base + cursor_offset(&at, table, block_size, block_elems, row_elems) + j0; \
      if (j0 == 0 && t + KV_PF_TOKENS < len) /* the first pass brings the rows in */             \
        prefetch_row(base + cursor_at(&ahead, table, block_elems, row_elems), d * sizeof(KTYPE)); \
      cursor_step(&ahead, block_size);                                                            \
      __m256 v0 = LOAD8(v), v1 = LOAD8(v + 8);                                                    \
      for (int i = 0; i < NH; i++) {                                                              \
        __m256 w = _mm256_broadcast_ss(p + (size_t)(h0 + i) * lds + t);                           \
        acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);                                            \
        acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);                                            \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < NH; i++) {                                                                \
      _mm256_storeu_ps(o + (size_t)(h0 + i) * d + j0, acc[i][0]);                                 \
      _mm256_storeu_ps(o + (size_t)(h0 + i) * d + j0 + 8, acc[i][1]);                             \
    }                                                                                             \
  }
#define PAGED_PV_VECTOR(KTYPE, LOAD8)                                                             \
  for (; j0 + 16 <= d; j0 += 16)                                                                  \
    for (int h0 = 0; h0 < group; h0 += 4) {                                                       \
      switch (group - h0 < 4 ? group - h0 : 4) {                                                  \
        case 4: PV_COLUMNS(KTYPE, LOAD8, 4) break;                                                \
        case 3: PV_COLUMNS(KTYPE, LOAD8, 3) break;                                                \
        case 2: PV_COLUMNS(KTYPE, LOAD8, 2) break;                                                \
        default: PV_COLUMNS(KTYPE, LOAD8, 1) break;                                               \
      }                                                                                           \
    }
#else
#define PAGED_PV_VECTOR(KTYPE, LOAD8)
#endif
PAGED_HELPERS(float, load8_f32, LOAD1_F32)
PAGED_HELPERS(bf16_t, load8_bf16, LOAD1_BF16)

/* Runs per (sequence, KV head) task of a paged decode attention: with fewer tasks than 4 per
 * thread (batch 1: 3 KV heads on 2 threads left one idle half the time), each sequence's blocks
 * are cut into runs of at least DECODE_MIN_CHUNK_BLOCKS blocks whose partial softmaxes are
 * merged after (merge_runs), as flash-decoding does. */
#define DECODE_MIN_CHUNK_BLOCKS 16
static inline int decode_chunks(int tasks, int team, int max_context, int block_size) {
  int chunks = 1, longest = max_context / block_size;
  if (tasks < 4 * team) chunks = (4 * team + tasks - 1) / tasks;
  if (chunks > longest / DECODE_MIN_CHUNK_BLOCKS) chunks = longest / DECODE_MIN_CHUNK_BLOCKS;
  return chunks < 1 ? 1 : chunks;
}
/* One output row from n partial softmaxes: partial i has maximum score m[i * stride], exp-sum
 * l[i * stride] and unnormalized output o[i * stride * d]; out = sum_i w_i o_i / sum_i w_i l_i,
 * w_i = exp(m_i - max_i m_i) (an empty partial, l = 0, weighs nothing). */
static inline void merge_partials(int n, size_t stride, int d, const float *m, const float *l,
                                  const float *o, float *out) {
  float mx = -INFINITY, total = 0.f;
  for (int i = 0; i < n; i++) mx = m[i * stride] > mx ? m[i * stride] : mx;
  for (int cc = 0; cc < d; cc++) out[cc] = 0.f;
  for (int i = 0; i < n; i++) {
    float w = l[i * stride] > 0.f ? expf(m[i * stride] - mx) : 0.f;
    const float *oi = o + i * stride * d;
    total += w * l[i * stride];
    for (int cc = 0; cc < d; cc++) out[cc] += w * oi[cc];
  }
  float inv = total > 0.f ? 1.0f / total : 0.f;
  for (int cc = 0; cc < d; cc++) out[cc] *= inv;
}
/* out[bh] for each of the nbh (sequence, query head) rows from `chunks` runs per task: run
 * r = task * chunks + c of head hh holds pm[r * group + hh], pl[...], po[(r * group + hh) * d]. */
static void merge_runs(int nbh, int group, int chunks, int d, const float *pm, const float *pl,
                       const float *po, float *out) {
  _Pragma("omp parallel for schedule(static) num_threads(kv_team())")
  for (int bh = 0; bh < nbh; bh++) {
    size_t at = (size_t)(bh / group) * chunks * group + bh % group;
    merge_partials(chunks, group, d, pm + at, pl + at, po + at * d, out + (size_t)bh * d);
  }
}
/* out[b, h] from sequence b's runs first[b] .. first[b + 1] (each run's maximum score pm[run *
 * num_heads + h], exp-sum pl[...] and unnormalized output po[(run * num_heads + h) * d]). */
static void merge_seq_runs(int batch, int num_heads, int d, const int *first, const float *pm,
                           const float *pl, const float *po, float *out) {
  _Pragma("omp parallel for schedule(static) num_threads(kv_team())")
  for (int bh = 0; bh < batch * num_heads; bh++) {
    int b = bh / num_heads;
    size_t at = (size_t)first[b] * num_heads + bh % num_heads;
    merge_partials(first[b + 1] - first[b], num_heads, d, pm + at, pl + at, po + at * d,
                   out + (size_t)bh * d);
  }
}
/* Decode attention of a batch of sequences over a paged K/V store, one query token each:
 * K, V are [num_blocks, block_size, num_kv, d]; sequence b's token t lives in block
 * block_tables[b * max_blocks + t / block_size], slot t % block_size, for t < context_lens[b]
 * (its new K/V already written there). q rows are q_row_stride floats apart, heads d apart;
 * out is [B, num_heads, d] contiguous. Blocks are read where they lie: nothing is gathered.
 * `scores` is scratch of B * num_heads * max_context floats. Returns 0 (out unwritten) if its
 * own scratch could not be allocated. Reference: kvserve.model.attention.ops.attention_reference
 * over the gathered blocks.
 * float32 / bfloat16 K/V: each sequence is cut into runs of KV_RUN_TOKENS tokens (whole
 * blocks), one task per run over all heads, and the runs merged (merge_seq_runs). Within a run a
 * token's whole K row (every KV head) is read at once, so a block (block_size contiguous rows)
 * streams in order; a task per (sequence, KV head) read a strided third of each row and left
 * the prefetchers behind (9 GB/s at 2k tokens). The run's V rows are prefetched while its scores
 * are computed, then read from cache by the value passes. */
#define KV_RUN_TOKENS 64
#define PAGED_DECODE(NAME, KTYPE, LOADK)                                                         \
  int NAME(const float *restrict q, int q_row_stride, const KTYPE *restrict K,                   \
            const KTYPE *restrict V, const int *restrict block_tables, int max_blocks,            \
            const int *restrict context_lens, int batch, int block_size, int num_heads,           \
            int num_kv, int d, int max_context, float *restrict out, float *restrict scores) {    \
    int group = num_heads / num_kv;                                                               \
    int run_blocks = block_size >= KV_RUN_TOKENS ? 1 : KV_RUN_TOKENS / block_size;                \
    float scale = 1.0f / sqrtf((float)d);                                                         \
    size_t row_elems = (size_t)num_kv * d, block_elems = (size_t)block_size * row_elems;          \
    int *first = malloc(sizeof(int) * (batch + 1));                                               \
    if (!first) return 0;                                                                         \
    first[0] = 0;                                                                                 \
    for (int b = 0; b < batch; b++) {                                                             \
      int nblk = (context_lens[b] + block_size - 1) / block_size;                                 \
      first[b + 1] = first[b] + (nblk + run_blocks - 1) / run_blocks + (nblk == 0);               \
    }                                                                                             \
    int runs = first[batch];                                                                      \
    float *heap = malloc(sizeof(float) * (size_t)runs * num_heads * (d + 2));                     \
    int *seq_of = malloc(sizeof(int) * (runs > 0 ? runs : 1));                                    \
    if (!heap || !seq_of) {                                                                       \
      free(first), free(heap), free(seq_of);                                                      \
      return 0;                                                                                   \
    }                                                                                             \
    for (int b = 0; b < batch; b++)                                                               \
      for (int r = first[b]; r < first[b + 1]; r++) seq_of[r] = b;                                \
    float *pm = heap, *pl = heap + (size_t)runs * num_heads, *po = pl + (size_t)runs * num_heads; \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(kv_team())")                       \
    for (int run = 0; run < runs; run++) {                                                        \
      int b = seq_of[run], c = run - first[b], len = context_lens[b];                             \
      int t0 = c * run_blocks * block_size, t1 = t0 + run_blocks * block_size;                    \
      int nt = (t1 < len ? t1 : len) - t0;                                                        \
      const int *table = block_tables + (size_t)b * max_blocks + c * run_blocks;                  \
      float qb[num_heads * d]; /* the query, scaled once (not every score) */                    \
      for (int i = 0; i < num_heads * d; i++) qb[i] = q[(size_t)b * q_row_stride + i] * scale;    \
      float *s = scores + (size_t)b * num_heads * max_context + t0;                               \
      float *m = pm + (size_t)run * num_heads, *l = pl + (size_t)run * num_heads;                 \
      float *o = po + (size_t)run * num_heads * d;                                                \
      if (nt <= 0) {                                                                              \
        for (int h = 0; h < num_heads; h++) m[h] = -INFINITY, l[h] = 0.f;                         \
        for (int i = 0; i < num_heads * d; i++) o[i] = 0.f;                                       \
        continue;                                                                                 \
      }                                                                                           \
      kv_cursor at = {0, 0}, ahead = {KV_PF_TOKENS / block_size, KV_PF_TOKENS % block_size};     \
      for (int tt = 0; tt < nt; tt += 3) { /* scores, 3 tokens x each KV head's query heads */    \
        int nb = nt - tt < 3 ? nt - tt : 3;                                                       \
        size_t rows[3];                                                                           \
        for (int j = 0; j < nb; j++) {                                                            \
          rows[j] = cursor_offset(&at, table, block_size, block_elems, row_elems);                \
          if (tt + j + KV_PF_TOKENS < nt) {                                                       \
            size_t ahead_at = cursor_at(&ahead, table, block_elems, row_elems);                   \
            prefetch_row(K + ahead_at, row_elems * sizeof(KTYPE));                                \
            prefetch_row(V + ahead_at, row_elems * sizeof(KTYPE));                                \
          }                                                                                       \
          cursor_step(&ahead, block_size);                                                        \
        }                                                                                         \
        for (int g = 0; g < num_kv; g++) {                                                        \
          const KTYPE *bk[3];                                                                     \
          for (int j = 0; j < nb; j++) bk[j] = K + rows[j] + (size_t)g * d;                       \
          for (int h0 = 0; h0 < group; h0 += 4) {                                                 \
            int ma = group - h0 < 4 ? group - h0 : 4;                                             \
            const float *a[4];                                                                    \
            for (int i = 0; i < ma; i++) a[i] = qb + (size_t)(g * group + h0 + i) * d;            \
            tile_##KTYPE(a, ma, bk, nb, d, s + (size_t)(g * group + h0) * max_context + tt,       \
                         max_context, 0);                                                         \
          }                                                                                       \
        }                                                                                         \
      }                                                                                           \
      for (int h = 0; h < num_heads; h++) {                                                       \
        l[h] = exp_shifted_max(s + (size_t)h * max_context, nt, m + h);                           \
      }                                                                                           \
      for (int g = 0; g < num_kv; g++)                                                            \
        paged_pv_##KTYPE(s + (size_t)g * group * max_context, max_context, group, d,              \
                         V + (size_t)g * d, table, block_size, block_elems, row_elems, nt,        \
                         o + (size_t)g * group * d);                                              \
    }                                                                                             \
    merge_seq_runs(batch, num_heads, d, first, pm, pl, po, out);                                  \
    free(first), free(heap), free(seq_of);                                                        \
    return 1;                                                                                     \
  }
PAGED_DECODE(kv_paged_decode_attention_f32, float, LOAD1_F32)
PAGED_DECODE(kv_paged_decode_attention_bf16, bf16_t, LOAD1_BF16)

/* fp8 K/V (kvserve/kvstore/codecs.py is the reference): codes widened in registers (F16C) or
 * read through a 256-entry table (filled from torch's own conversion by kv_set_fp8_lut), with
 * one scale per tensor. The codes are read where they lie, as above: no K or V row is ever
 * widened in memory. */
typedef uint8_t e4m3_t;
typedef uint8_t e5m2_t;
static float kv_fp8_lut[2][256];
void kv_set_fp8_lut(int which, const float *lut) {
  memcpy(kv_fp8_lut[which], lut, sizeof kv_fp8_lut[which]);
}
#define LOAD1_E4M3(v) (kv_fp8_lut[0][(v)])
#define LOAD1_E5M2(v) (kv_fp8_lut[1][(v)])
#ifdef KV_AVX2
#ifdef __F16C__
/* Both fp8 formats widen exactly through fp16 (F16C): e5m2 is the top byte of an fp16; e4m3's
 * sign, exponent and mantissa bits placed in an fp16 (exponent bias 15, not 7) give its value
 * times 2^-8, subnormals included (e4m3fn's NaN, 0x7f, is never stored: codes saturate). */
static inline __m256 load8_e4m3(const uint8_t *p) {
  __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
  __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x80)), 8),
                           _mm_slli_epi16(_mm_and_si128(b, _mm_set1_epi16(0x7f)), 7));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
}
static inline __m256 load8_e5m2(const uint8_t *p) {
  __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
  return _mm256_cvtph_ps(_mm_slli_epi16(b, 8));
}
#else
static inline __m256 load8_e4m3(const uint8_t *p) {
  return _mm256_i32gather_ps(kv_fp8_lut[0],
                             _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), 4);
}
static inline __m256 load8_e5m2(const uint8_t *p) {
  return _mm256_i32gather_ps(kv_fp8_lut[1],
                             _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)), 4);
}
#endif
#endif
DOT_TILE(e4m3_t, load8_e4m3, LOAD1_E4M3)
DOT_TILE(e5m2_t, load8_e5m2, LOAD1_E5M2)
PAGED_HELPERS(e4m3_t, load8_e4m3, LOAD1_E4M3)
PAGED_HELPERS(e5m2_t, load8_e5m2, LOAD1_E5M2)

/* A sequence's residual window (kvserve/kvstore/paged.py): its last `window_blocks` blocks in
 * float32, block j at ring block slot * window_blocks + j % window_blocks of Kr/Vr [slots,
 * window_blocks * block_size, num_kv, d]. Fills ring[] with the ring blocks of blocks [first, nb)
 * and returns first (the first block read from the window; nb when there is none). */
static inline int window_ring(int len, int block_size, int window_blocks, int64_t slot,
                              int *ring) {
  int nb = (len + block_size - 1) / block_size;
  if (window_blocks <= 0) return nb;
  int first = nb > window_blocks ? nb - window_blocks : 0;
  for (int j = first; j < nb; j++) ring[j - first] = (int)(slot * window_blocks + j % window_blocks);
  return first;
}

/* As PAGED_DECODE, over fp8 codes: k_tensor_scale / v_tensor_scale one scale for the whole K / V
 * of this layer (1 if none), folded into the scores' scale and the softmax weights. With
 * window_blocks > 0, each sequence's last window_blocks blocks are read from its residual window
 * (Kr, Vr, slots) in float32 instead of their codes. */
#define PAGED_DECODE_Q(NAME, KTYPE)                                                               \
  void NAME(const float *restrict q, int q_row_stride, const KTYPE *restrict K,                  \
            const KTYPE *restrict V, float k_tensor_scale, float v_tensor_scale,                  \
            const float *restrict Kr, const float *restrict Vr, const int64_t *restrict slots,    \
            int window_blocks, const int *restrict block_tables, int max_blocks,                  \
            const int *restrict context_lens, int batch, int block_size, int num_heads,           \
            int num_kv, int d, int max_context, float *restrict out, float *restrict scores) {    \
    int group = num_heads / num_kv;                                                               \
    float scale = k_tensor_scale / sqrtf((float)d), wscale = 1.0f / sqrtf((float)d);             \
    size_t row_elems = (size_t)num_kv * d, block_elems = (size_t)block_size * row_elems;          \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(kv_team())")                       \
    for (int bg = 0; bg < batch * num_kv; bg++) {                                                 \
      int b = bg / num_kv, g = bg % num_kv, len = context_lens[b], h0 = g * group;                \
      const int *table = block_tables + (size_t)b * max_blocks;                                   \
      const float *qg = q + (size_t)b * q_row_stride + (size_t)h0 * d;                            \
      float *s = scores + ((size_t)b * num_heads + h0) * max_context;                             \
      float *o = out + ((size_t)b * num_heads + h0) * d;                                          \
      int ring[window_blocks > 0 ? window_blocks : 1];                                            \
      int first = window_ring(len, block_size, window_blocks, window_blocks ? slots[b] : 0, ring); \
      int ncode = first * block_size < len ? first * block_size : len, nwin = len - ncode;        \
      paged_qk_##KTYPE(qg, group, d, K + (size_t)g * d, table, block_size, block_elems,           \
                       row_elems, ncode, scale, s, max_context);                                  \
      if (nwin)                                                                                   \
        paged_qk_float(qg, group, d, Kr + (size_t)g * d, ring, block_size, block_elems,           \
                       row_elems, nwin, wscale, s + ncode, max_context);                          \
      for (int hh = 0; hh < group; hh++) {                                                        \
        float *sh = s + (size_t)hh * max_context;                                                 \
        float inv = 1.0f / exp_shifted(sh, len), vinv = v_tensor_scale * inv;                     \
        for (int t = 0; t < ncode; t++) sh[t] *= vinv;                                            \
        for (int t = ncode; t < len; t++) sh[t] *= inv;                                           \
      }                                                                                           \
      paged_pv_##KTYPE(s, max_context, group, d, V + (size_t)g * d, table, block_size,            \
                       block_elems, row_elems, ncode, o);                                         \
      if (nwin) {                                                                                 \
        float part[group * d];                                                                    \
        paged_pv_float(s + ncode, max_context, group, d, Vr + (size_t)g * d, ring, block_size,    \
                       block_elems, row_elems, nwin, part);                                       \
        for (int i = 0; i < group * d; i++) o[i] += part[i];                                      \
      }                                                                                           \
    }                                                                                             \
  }
PAGED_DECODE_Q(kv_paged_decode_attention_e4m3, e4m3_t)
PAGED_DECODE_Q(kv_paged_decode_attention_e5m2, e5m2_t)

/* int4 K/V (kvserve/kvstore/codecs.py's Int4KCodec / Int4VCodec are the reference): two codes per
 * byte (element 2i in the low nibble, 2i+1 in the high), x = code * scale + zero with fp16 scales
 * and zeros: K per channel per block (Ks, Kz [num_blocks, num_kv, d]), V per token per `vgroup`
 * channels (Vs, Vz [num_blocks, block_size, num_kv, d / vgroup]). A sequence's last
 * window_blocks blocks (its partial block among them) are read in float32 from its residual
 * window (window_ring). K's per-channel scale folds into the query once per block (q' = q * scale, plus
 * q . zero per block), V's per-token scale into the softmax weight: codes are never widened in
 * memory. Even and odd channels are kept apart (q's and the output's), so a byte's two nibbles
 * meet their own lanes without shuffles. */
static inline float half_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: normalize */
      int e = -1;
      do { e++; man <<= 1; } while (!(man & 0x400));
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float h2f(uint16_t h) {
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return half_to_f32(h);
#endif
}

/* One row of d int4 codes (element 2i the low nibble of byte i) -> d bytes, in order */
static inline void nibbles_to_bytes(const uint8_t *restrict c, uint8_t *restrict x, int d) {
  int i = 0;
#ifdef KV_AVX2
  __m128i mask = _mm_set1_epi8(0x0f);
  for (; i + 16 <= d; i += 16) {
    __m128i b = _mm_loadl_epi64((const __m128i *)(c + i / 2));
    _mm_storeu_si128((__m128i *)(x + i),
                     _mm_unpacklo_epi8(_mm_and_si128(b, mask),
                                       _mm_and_si128(_mm_srli_epi16(b, 4), mask)));
  }
#endif
  for (; i < d; i += 2) {
    x[i] = c[i / 2] & 15;
    x[i + 1] = c[i / 2] >> 4;
  }
}

#define I4_MAX_D 512
#define I4_MAX_GROUP 16
#define I4_MAX_BLOCK_ELEMS 16384 /* block_size * d of one widened block (64 KiB) */
#define I4_MAX_BLOCK_TOKENS 1024
static const int kv_zero_table[1] = {0};

/* int8 and int4 (K and V each either), one task per (sequence, KV head): int8 codes are read where they lie, through the
 * tiled products the other formats use; int4 codes are first widened to bytes, a block and a KV
 * head at a time, into a buffer that stays in L1. K's per-channel scale folds into the query once
 * per block (q * scale, and q . zero added to the block's scores); V's per-token, per-group scale
 * into the softmax weights (one product per group of columns), its zero into a per-group sum of
 * weights. A sequence's residual window is read as float rows where it lies. */
typedef uint8_t u8_t;
#define LOAD1_U8(v) ((float)(v))
#ifdef KV_AVX2
static inline __m256 load8_u8(const uint8_t *p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#endif
DOT_TILE(u8_t, load8_u8, LOAD1_U8)
PAGED_HELPERS(u8_t, load8_u8, LOAD1_U8)

/* The codes of block `blk`, KV head g: in place (int8: rows code_row bytes apart), or widened
 * from int4 into `wide` (rows d bytes apart). */
static inline const uint8_t *block_codes(int bits, const uint8_t *codes, size_t blk, int g,
                                         int block_size, size_t code_row, int d, uint8_t *wide) {
  const uint8_t *first = codes + blk * block_size * code_row + (size_t)g * d * bits / 8;
  if (bits == 8) return first;
  for (int t = 0; t < block_size; t++) nibbles_to_bytes(first + t * code_row, wide + t * d, d);
  return wide;
}
/* One block's share of the two products, for the `group` query heads of one KV head, over nt
 * code rows `crow` bytes apart (int8 in place, int4 widened):
 *   block_scores:  s[hh * lds + t] = scale * (qs[hh] . codes[t]) + bias[hh]
 *   block_values:  o[hh * ldo + c] += sum_t w[hh * ldw + t] * codes[t][c], c < ncols
 * With AVX2 (d and ncols multiples of 8) scores come 4 tokens at a time, each head's four dot
 * products reduced together by one horizontal-add tree (a tree per token was a third of the
 * kernel), and values accumulate 16 columns of up to 3 heads in registers over the block. */
#ifdef KV_AVX2
static inline __m128 sum4_ps(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}
#define SCORES4(NH)                                                                               \
  {                                                                                               \
    __m256 acc[NH][4];                                                                            \
    for (int i = 0; i < NH; i++)                                                                  \
      for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();                                \
    for (int p = 0; p < d; p += 8)                                                                \
      for (int j = 0; j < 4; j++) {                                                               \
        __m256 bv = load8_u8(codes + (size_t)(t0 + j) * crow + p);                                \
        for (int i = 0; i < NH; i++)                                                              \
          acc[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + (size_t)(h0 + i) * d + p), bv,         \
                                      acc[i][j]);                                                 \
      }                                                                                           \
    for (int i = 0; i < NH; i++)                                                                  \
      _mm_storeu_ps(s + (size_t)(h0 + i) * lds + t0,                                              \
                    _mm_add_ps(_mm_mul_ps(sum4_ps(acc[i][0], acc[i][1], acc[i][2], acc[i][3]),    \
                                          _mm_set1_ps(scale)),                                    \
                               _mm_set1_ps(bias[h0 + i])));                                       \
  }
#define VALUES(NH, NC)                                                                            \
  {                                                                                               \
    __m256 acc[NH][NC];                                                                           \
    for (int i = 0; i < NH; i++)                                                                  \
      for (int k = 0; k < NC; k++) acc[i][k] = _mm256_setzero_ps();                               \
    for (int t = 0; t < nt; t++) {                                                                \
      const uint8_t *row = codes + (size_t)t * crow + c0;                                         \
      __m256 bv[NC];                                                                              \
      for (int k = 0; k < NC; k++) bv[k] = load8_u8(row + 8 * k);                                 \
      for (int i = 0; i < NH; i++) {                                                              \
        __m256 wv = _mm256_broadcast_ss(w + (size_t)(h0 + i) * ldw + t);                          \
        for (int k = 0; k < NC; k++) acc[i][k] = _mm256_fmadd_ps(wv, bv[k], acc[i][k]);           \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < NH; i++)                                                                  \
      for (int k = 0; k < NC; k++) {                                                              \
        float *op = o + (size_t)(h0 + i) * ldo + c0 + 8 * k;                                      \
        _mm256_storeu_ps(op, _mm256_add_ps(_mm256_loadu_ps(op), acc[i][k]));                      \
      }                                                                                           \
  }
#endif
/* K's per-channel scale and zero of one block folded into the query: qs[hh] = q[hh] * scale,
 * bias[hh] = out_scale * (q[hh] . zero) */
static inline void fold_k_scales(const float *q, int group, int d, const uint16_t *ks,
                                 const uint16_t *kz, float out_scale, float *qs, float *bias) {
  int c0 = 0;
  float acc[I4_MAX_GROUP] = {0};
#if defined(KV_AVX2) && defined(__F16C__)
  __m256 acc8[I4_MAX_GROUP];
  for (int hh = 0; hh < group; hh++) acc8[hh] = _mm256_setzero_ps();
  for (; c0 + 8 <= d; c0 += 8) {
    __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ks + c0)));
    __m256 zc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kz + c0)));
    for (int hh = 0; hh < group; hh++) {
      __m256 qv = _mm256_loadu_ps(q + (size_t)hh * d + c0);
      _mm256_storeu_ps(qs + (size_t)hh * d + c0, _mm256_mul_ps(qv, sc));
      acc8[hh] = _mm256_fmadd_ps(qv, zc, acc8[hh]);
    }
  }
  for (int hh = 0; hh < group; hh++) acc[hh] = hsum256(acc8[hh]);
#endif
  for (int hh = 0; hh < group; hh++) {
    for (int c = c0; c < d; c++) {
      qs[(size_t)hh * d + c] = q[(size_t)hh * d + c] * h2f(ks[c]);
      acc[hh] += q[(size_t)hh * d + c] * h2f(kz[c]);
    }
    bias[hh] = acc[hh] * out_scale;
  }
}
/* V's per-token scale and zero of one block and channel group (vs, vz: token t's at t * stride)
 * folded into the softmax weights p [group, lds]: w[hh * block_size + t] = p[hh][t] * scale[t],
 * zsum[hh * zstride] += sum_t p[hh][t] * zero[t]. Eight tokens' scales are widened in a
 * register: widened into memory one by one and then read as a vector, they stalled on
 * store-to-load forwarding (a fifth of the kernel). */
static inline void fold_v_scales(const float *p, int lds, int group, int block_size,
                                 const uint16_t *vs, const uint16_t *vz, size_t stride, float *w,
                                 float *zsum, int zstride) {
  int t0 = 0;
  float zacc[I4_MAX_GROUP] = {0};
#if defined(KV_AVX2) && defined(__F16C__)
  __m256 z8acc[I4_MAX_GROUP];
  for (int hh = 0; hh < group; hh++) z8acc[hh] = _mm256_setzero_ps();
  for (; t0 + 8 <= block_size; t0 += 8) {
    const uint16_t *a = vs + t0 * stride, *z = vz + t0 * stride;
    __m256 a8 = _mm256_cvtph_ps(_mm_setr_epi16(
        (short)a[0], (short)a[stride], (short)a[2 * stride], (short)a[3 * stride],
        (short)a[4 * stride], (short)a[5 * stride], (short)a[6 * stride], (short)a[7 * stride]));
    __m256 z8 = _mm256_cvtph_ps(_mm_setr_epi16(
        (short)z[0], (short)z[stride], (short)z[2 * stride], (short)z[3 * stride],
        (short)z[4 * stride], (short)z[5 * stride], (short)z[6 * stride], (short)z[7 * stride]));
    for (int hh = 0; hh < group; hh++) {
      __m256 pv = _mm256_loadu_ps(p + (size_t)hh * lds + t0);
      _mm256_storeu_ps(w + (size_t)hh * block_size + t0, _mm256_mul_ps(pv, a8));
      z8acc[hh] = _mm256_fmadd_ps(pv, z8, z8acc[hh]);
    }
  }
  for (int hh = 0; hh < group; hh++) zacc[hh] = hsum256(z8acc[hh]);
#endif
  for (int t = t0; t < block_size; t++) {
    float a = h2f(vs[t * stride]), z = h2f(vz[t * stride]);
    for (int hh = 0; hh < group; hh++) {
      float pt = p[(size_t)hh * lds + t];
      w[(size_t)hh * block_size + t] = pt * a;
      zacc[hh] += pt * z;
    }
  }
  for (int hh = 0; hh < group; hh++) zsum[(size_t)hh * zstride] += zacc[hh];
}
static void block_scores(const float *qs, int group, int d, const uint8_t *codes, size_t crow,
                         int nt, float scale, const float *bias, float *s, int lds) {
  int t0 = 0;
#ifdef KV_AVX2
  if (d % 8 == 0)
    for (; t0 + 4 <= nt; t0 += 4)
      for (int h0 = 0; h0 < group; h0 += 3) switch (group - h0 < 3 ? group - h0 : 3) {
          case 3: SCORES4(3) break;
          case 2: SCORES4(2) break;
          default: SCORES4(1) break;
        }
#endif
  if (t0 < nt) {
    paged_qk_u8_t(qs, group, d, codes + (size_t)t0 * crow, kv_zero_table, nt, 0, crow, nt - t0,
                  scale, s + t0, lds);
    for (int hh = 0; hh < group; hh++)
      for (int t = t0; t < nt; t++) s[(size_t)hh * lds + t] += bias[hh];
  }
}
static void block_values(const float *w, int ldw, int group, int ncols, const uint8_t *codes,
                         size_t crow, int nt, float *o, int ldo) {
  int c0 = 0;
#ifdef KV_AVX2
  for (; c0 + 16 <= ncols; c0 += 16) /* 3 heads x 16 columns: 6 accumulators, no spills */
    for (int h0 = 0; h0 < group; h0 += 3) switch (group - h0 < 3 ? group - h0 : 3) {
        case 3: VALUES(3, 2) break;
        case 2: VALUES(2, 2) break;
        default: VALUES(1, 2) break;
      }
  for (; c0 + 8 <= ncols; c0 += 8)
    for (int h0 = 0; h0 < group; h0 += 3) switch (group - h0 < 3 ? group - h0 : 3) {
        case 3: VALUES(3, 1) break;
        case 2: VALUES(2, 1) break;
        default: VALUES(1, 1) break;
      }
#endif
  for (int hh = 0; hh < group; hh++)
    for (int t = 0; t < nt; t++) {
      float wt = w[(size_t)hh * ldw + t], *oh = o + (size_t)hh * ldo;
      const uint8_t *row = codes + (size_t)t * crow;
      for (int c = c0; c < ncols; c++) oh[c] += wt * (float)row[c];
    }
}

/* Sequences are cut into up to `chunks` runs of blocks (the window goes with the last run), so
 * that one sequence's few (sequence, KV head) tasks still keep every thread busy: each run
 * leaves its unnormalized output, score maximum and exp-sum per query head, and the runs are
 * merged as flash-decoding does. At batch 1 (3 KV heads on 2 threads) whole sequences left a
 * thread idle for a third of the time. */
void kv_paged_decode_attention_affine(
    int k_bits, int v_bits, const float *restrict q, int q_row_stride, const uint8_t *restrict K,
    const uint16_t *restrict Ks, const uint16_t *restrict Kz, const uint8_t *restrict V,
    const uint16_t *restrict Vs, const uint16_t *restrict Vz, int vgroup,
    const float *restrict Kr, const float *restrict Vr, const int64_t *restrict slots,
    int window_blocks, const int *restrict block_tables, int max_blocks,
    const int *restrict context_lens, int batch, int block_size, int num_heads, int num_kv, int d,
    int max_context, float *restrict out, float *restrict scores) {
  int group = num_heads / num_kv, ngroups = d / vgroup, team = kv_team();
  float scale = 1.0f / sqrtf((float)d);
  size_t row = (size_t)num_kv * d, k_code_row = row * k_bits / 8, v_code_row = row * v_bits / 8;
  /* where a block's codes are read: in place (int8), or widened into `wide` (int4) */
  size_t k_crow = k_bits == 8 ? row : (size_t)d, v_crow = v_bits == 8 ? row : (size_t)d;
  int tasks = batch * num_kv, chunks = decode_chunks(tasks, team, max_context, block_size);
  float *heap = chunks > 1 ? malloc(sizeof(float) * tasks * chunks * group * (d + 2)) : NULL;
  if (!heap) chunks = 1; /* a chunk's partial output, score maximum and exp-sum per head */
  size_t runs = (size_t)tasks * chunks;
  float *pm = heap, *pl = heap ? heap + runs * group : NULL, *po = heap ? pl + runs * group : NULL;
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads(team)")
  for (size_t run = 0; run < runs; run++) {
    int bg = (int)(run / chunks), c = (int)(run % chunks);
    int b = bg / num_kv, g = bg % num_kv, len = context_lens[b], h0 = g * group;
    int ring[window_blocks];
    int nfull = window_ring(len, block_size, window_blocks, slots[b], ring);
    int j0 = (int)((long)nfull * c / chunks), j1 = (int)((long)nfull * (c + 1) / chunks);
    int nres = c == chunks - 1 ? len - nfull * block_size : 0; /* tokens read from the window */
    int t0 = j0 * block_size, nt = (j1 - j0) * block_size + nres;
    size_t ring_block = (size_t)block_size * row;
    const int *table = block_tables + (size_t)b * max_blocks;
    const float *qg = q + (size_t)b * q_row_stride + (size_t)h0 * d;
    const float *kr = Kr + (size_t)g * d, *vr = Vr + (size_t)g * d;
    float *s = scores + ((size_t)b * num_heads + h0) * max_context;
    float *o = chunks > 1 ? po + run * group * d : out + ((size_t)b * num_heads + h0) * d;
    float mloc[I4_MAX_GROUP], lloc[I4_MAX_GROUP];
    float *m = chunks > 1 ? pm + run * group : mloc, *l = chunks > 1 ? pl + run * group : lloc;
    float qs[I4_MAX_GROUP * I4_MAX_D];
    float part[I4_MAX_GROUP * I4_MAX_D], wp[I4_MAX_GROUP * I4_MAX_BLOCK_TOKENS];
    float zsum[I4_MAX_GROUP * (I4_MAX_D / 32)];
    uint8_t wide[I4_MAX_BLOCK_ELEMS];
    for (int i = 0; i < group * d; i++) o[i] = 0.f;
    if (nt == 0) {
      for (int hh = 0; hh < group; hh++) m[hh] = -INFINITY, l[hh] = 0.f;
      continue;
    }
    for (int j = j0; j < j1; j++) {
      size_t blk = (size_t)table[j];
      float bias[I4_MAX_GROUP];
      fold_k_scales(qg, group, d, Ks + (blk * num_kv + g) * d, Kz + (blk * num_kv + g) * d,
                    scale, qs, bias);
      const uint8_t *kc = block_codes(k_bits, K, blk, g, block_size, k_code_row, d, wide);
      block_scores(qs, group, d, kc, k_crow, block_size, scale, bias,
                   s + (size_t)j * block_size, max_context);
    }
    if (nres)
      paged_qk_float(qg, group, d, kr, ring, block_size, ring_block, row, nres, scale,
                     s + (size_t)nfull * block_size, max_context);
    for (int hh = 0; hh < group; hh++)
      l[hh] = exp_shifted_max(s + (size_t)hh * max_context + t0, nt, m + hh);
    for (int i = 0; i < group * ngroups; i++) zsum[i] = 0.f;
    for (int j = j0; j < j1; j++) {
      size_t blk = (size_t)table[j];
      const float *sj = s + (size_t)j * block_size;
      const uint8_t *vc = block_codes(v_bits, V, blk, g, block_size, v_code_row, d, wide);
      for (int gi = 0; gi < ngroups; gi++) {
        const uint16_t *vs = Vs + ((blk * block_size) * num_kv + g) * ngroups + gi;
        const uint16_t *vz = Vz + ((blk * block_size) * num_kv + g) * ngroups + gi;
        fold_v_scales(sj, max_context, group, block_size, vs, vz, (size_t)num_kv * ngroups, wp,
                      zsum + gi, ngroups);
        block_values(wp, block_size, group, vgroup, vc + (size_t)gi * vgroup, v_crow, block_size,
                     o + (size_t)gi * vgroup, d);
      }
    }
    for (int hh = 0; hh < group; hh++)
      for (int gi = 0; gi < ngroups; gi++) {
        float z = zsum[hh * ngroups + gi], *oh = o + (size_t)hh * d + (size_t)gi * vgroup;
        for (int cc = 0; cc < vgroup; cc++) oh[cc] += z;
      }
    if (nres) {
      paged_pv_float(s + (size_t)nfull * block_size, max_context, group, d, vr, ring,
                     block_size, ring_block, row, nres, part);
      for (int i = 0; i < group * d; i++) o[i] += part[i];
    }
    if (chunks == 1)
      for (int hh = 0; hh < group; hh++) {
        float inv = 1.0f / l[hh];
        for (int cc = 0; cc < d; cc++) o[(size_t)hh * d + cc] *= inv;
      }
  }
  if (chunks > 1) merge_runs(batch * num_heads, group, chunks, d, pm, pl, po, out);
  free(heap);
}

/* Quantized weights, multiplied as they are held (kvserve/kernels/qweight.py: the layouts, and
 * QuantWeight.dequantize, the reference; kvserve/model/gguf_blocks.py: which GGUF formats become
 * which): 32 inputs per block, a scale per block (or per 16 values) and row, float16 or float32
 * (sv_t below),
 *   q4: codes [n, k / 2], byte j of a block holds element j (low nibble) and j + 16 (high);
 *       x = code * scale + min, min [n, k / 32] (Q4_1; Q4_0 as min = -8 * scale; Q4_K);
 *   q5: q4's nibbles plus hbits [n, k / 8], each block's fifth bits as a little-endian 32-bit
 *       word, bit j for element j (GGUF's qh): x = (nibble + 16 * bit) * scale + min (Q5_0 as
 *       min = -16 * scale, Q5_1, Q5_K);
 *   q8: codes [n, k] int8, x = code * scale (+ min), scale [n, k / group] with group 32
 *       (Q8_0) or 16 (Q6_K's sub-blocks), min [n, k / 32] or none.
 * Y[m, n] (=|+=) X[m, k] @ W^T for m <= MAX_M rows of X. Each row of X is first rounded to int16
 * per block of 32 (x ~ xq * dx, dx = max|x| / 32767: an error of at most dx / 2 per element, 2^-16
 * of the block's largest value, ~250x finer than bfloat16), so a weight block's codes are widened
 * only to 16 bits (two shuffles) and multiplied pairwise into 32-bit sums (vpmaddwd), one float
 * conversion and one FMA per block and row; widening every code to float32 cost ~3x as many
 * instructions and left the kernel bound by them, not by the 20 bytes a Q4_1 block reads from
 * memory. The min term is sum_b min_b * (X's exact float sum over block b). Without AVX2 the
 * portable loop multiplies float32 codes by float32 X. */
#define QB 32
/* A row's scales (or mins), of one kind: SV_F16 float16; SV_F32 float32; SV_U8 / SV_I8 the
 * k-quants' small integer sub-block scales as stored, times a float32 per 256-value super-block
 * (sb; 1 << shift entries each: 8 per-32 scales, or 16 per-16 ones), the product exact in float32.
 * Offsets into a row (sv_at) are multiples of a super-block's entries. */
enum { SV_F16 = 0, SV_F32 = 1, SV_U8 = 2, SV_I8 = 3 };
typedef struct {
  const void *p;
  const float *sb;
  int kind, shift;
} sv_t;
static inline sv_t sv_make(const void *p, const float *sb, int kind, int group) {
  sv_t s = {p, sb, kind, group == 16 ? 4 : 3};
  return s;
}
static inline sv_t sv_at(sv_t s, size_t i) {
  if (!s.p) return s;
  s.p = (const char *)s.p + i * (s.kind == SV_F32 ? 4 : s.kind == SV_F16 ? 2 : 1);
  if (s.kind >= SV_U8) s.sb += i >> s.shift;
  return s;
}
static inline float sv1(sv_t s, size_t i) {
  switch (s.kind) {
    case SV_F32: return ((const float *)s.p)[i];
    case SV_U8: return s.sb[i >> s.shift] * (float)((const uint8_t *)s.p)[i];
    case SV_I8: return s.sb[i >> s.shift] * (float)((const int8_t *)s.p)[i];
    default: return h2f(((const uint16_t *)s.p)[i]);
  }
}
#ifdef KV_AVX2
/* entries i..i+7 (i a multiple of 8, so within one super-block) */
static inline __m256 sv8(sv_t s, size_t i) {
  switch (s.kind) {
    case SV_F32: return _mm256_loadu_ps((const float *)s.p + i);
    case SV_U8:
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                               _mm_loadl_epi64((const __m128i *)((const uint8_t *)s.p + i)))),
                           _mm256_set1_ps(s.sb[i >> s.shift]));
    case SV_I8:
      return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                               _mm_loadl_epi64((const __m128i *)((const int8_t *)s.p + i)))),
                           _mm256_set1_ps(s.sb[i >> s.shift]));
    default: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s.p + i)));
  }
}
#endif
typedef struct {
  int16_t *xq;  /* [m, k] */
  float *dx;    /* [m, k / 32] */
  float *xsum;  /* [m, k / 32] */
} qx_t;

static int qx_init(qx_t *q, const float *X, int m, int k) {
  int nb = k / QB;
  q->xq = malloc(sizeof(int16_t) * (size_t)m * k);
  q->dx = malloc(sizeof(float) * (size_t)m * nb);
  q->xsum = malloc(sizeof(float) * (size_t)m * nb);
  if (!q->xq || !q->dx || !q->xsum) return 0;
  for (int i = 0; i < m * nb; i++) {
    const float *x = X + (size_t)(i / nb) * k + (size_t)(i % nb) * QB;
    int16_t *xq = q->xq + (size_t)(i / nb) * k + (size_t)(i % nb) * QB;
#ifdef KV_AVX2
    { /* the same rounding (to nearest, ties to even: the default mode), 8 lanes at a time */
      __m256 v[4], sign = _mm256_set1_ps(-0.f), mx = _mm256_setzero_ps(), sm = mx;
      for (int j = 0; j < 4; j++) {
        v[j] = _mm256_loadu_ps(x + 8 * j);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[j]));
        sm = _mm256_add_ps(sm, v[j]);
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
      __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
      __m256i q0 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
                                      _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)));
      __m256i q1 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
                                      _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)));
      /* packs interleaves 128-bit lanes: put the quarters back in order */
      _mm256_storeu_si256((__m256i *)xq, _mm256_permute4x64_epi64(q0, 0xD8));
      _mm256_storeu_si256((__m256i *)(xq + 16), _mm256_permute4x64_epi64(q1, 0xD8));
      q->dx[i] = amax / 32767.f;
      q->xsum[i] = hsum256(sm);
      continue;
    }
#endif
    float amax = 0.f, sum = 0.f;
    for (int j = 0; j < QB; j++) {
      float a = fabsf(x[j]);
      amax = a > amax ? a : amax;
      sum += x[j];
    }
    float d = amax / 32767.f, inv = amax > 0.f ? 32767.f / amax : 0.f;
    for (int j = 0; j < QB; j++) xq[j] = (int16_t)lrintf(x[j] * inv);
    q->dx[i] = d;
    q->xsum[i] = sum;
  }
  return 1;
}
static void qx_free(qx_t *q) {
  free(q->xq);
  free(q->dx);
  free(q->xsum);
}

static inline void q4_widen_scalar(const uint8_t *c, float *w) {
  for (int j = 0; j < 16; j++) {
    w[j] = (float)(c[j] & 15);
    w[j + 16] = (float)(c[j] >> 4);
  }
}
static inline void q8_widen_scalar(const int8_t *c, float *w) {
  for (int j = 0; j < QB; j++) w[j] = (float)c[j];
}
/* q5: q4's nibbles plus each value's fifth bit, 4 bytes per block (bit j: element j) */
static inline void q5_widen_scalar(const uint8_t *c, const uint8_t *h, float *w) {
  q4_widen_scalar(c, w);
  for (int j = 0; j < QB; j++) w[j] += (float)(((h[j / 8] >> (j % 8)) & 1) << 4);
}

#ifdef KV_AVX2
/* a block's 32 codes as two vectors of 16 int16, in element order */
static inline void q4_widen16(const uint8_t *c, __m256i w[2]) {
  __m128i b = _mm_loadu_si128((const __m128i *)c), mask = _mm_set1_epi8(0x0f);
  w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(b, mask));
  w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), mask));
}
static inline void q8_widen16(const int8_t *c, __m256i w[2]) {
  w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)c));
  w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(c + 16)));
}
/* 16 fifth bits (bits 0-15 of v) as 16 int16 lanes of 0 or 16 */
static inline __m256i q5_bits16(uint32_t v) {
  const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                        8192, 16384, (short)-32768);
  __m256i b = _mm256_and_si256(_mm256_set1_epi16((short)(v & 0xffff)), sel);
  return _mm256_and_si256(_mm256_cmpeq_epi16(b, sel), _mm256_set1_epi16(16));
}
static inline void q5_widen16(const uint8_t *c, const uint8_t *h, __m256i w[2]) {
  uint32_t bits;
  memcpy(&bits, h, 4);
  q4_widen16(c, w);
  w[0] = _mm256_or_si256(w[0], q5_bits16(bits));
  w[1] = _mm256_or_si256(w[1], q5_bits16(bits >> 16));
}
/* codes . x of one block as 8 float partial sums (w: the block's codes as 2 x 16 int16) */
#define QDOT(w, x)                                                                                \
  _mm256_cvtepi32_ps(_mm256_add_epi32(                                                            \
      _mm256_madd_epi16((w)[0], _mm256_loadu_si256((const __m256i *)(x))),                        \
      _mm256_madd_epi16((w)[1], _mm256_loadu_si256((const __m256i *)((x) + 16)))))
/* One weight row against NR <= 4 rows of X: out[i] = sum_b scale_b * dx[i][b] * (codes_b . xq_i,b).
 * Scales are widened 8 blocks at a time and multiplied by X's steps up front; two accumulators
 * per row (even and odd blocks), as one would serialize the loop on the FMA's latency. */
#define QROWS(NAME, CTYPE, WIDEN, CPB, NR)                                                        \
  static inline void NAME(const CTYPE *codes, sv_t scale, const int16_t *xq,         \
                          const float *dx, int k, float *out) {                                   \
    int nb = k / QB;                                                                              \
    __m256 acc[NR][2];                                                                            \
    for (int i = 0; i < NR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();                     \
    for (int b0 = 0; b0 < nb; b0 += 8) {                                                          \
      int nbb = nb - b0 < 8 ? nb - b0 : 8;                                                        \
      float sd[NR][8];                                                                            \
      if (nbb == 8) {                                                                             \
        __m256 sc = sv8(scale, b0);              \
        for (int i = 0; i < NR; i++)                                                              \
          _mm256_storeu_ps(sd[i], _mm256_mul_ps(sc, _mm256_loadu_ps(dx + (size_t)i * nb + b0)));  \
      } else {                                                                                    \
        for (int j = 0; j < nbb; j++)                                                             \
          for (int i = 0; i < NR; i++) sd[i][j] = sv1(scale, b0 + j) * dx[(size_t)i * nb + b0 + j];\
      }                                                                                           \
      int j = 0;                                                                                  \
      for (; j + 2 <= nbb; j += 2) { /* blocks j, j + 1 into the two accumulators */              \
        __m256i w[2], v[2];                                                                       \
        WIDEN(codes + (size_t)(b0 + j) * CPB, w);                                                 \
        WIDEN(codes + (size_t)(b0 + j + 1) * CPB, v);                                             \
        for (int i = 0; i < NR; i++) {                                                            \
          const int16_t *x = xq + (size_t)i * k + (size_t)(b0 + j) * QB;                          \
          acc[i][0] = _mm256_fmadd_ps(QDOT(w, x), _mm256_broadcast_ss(&sd[i][j]), acc[i][0]);     \
          acc[i][1] = _mm256_fmadd_ps(QDOT(v, x + QB), _mm256_broadcast_ss(&sd[i][j + 1]),        \
                                      acc[i][1]);                                                 \
        }                                                                                         \
      }                                                                                           \
      if (j < nbb) {                                                                              \
        __m256i w[2];                                                                             \
        WIDEN(codes + (size_t)(b0 + j) * CPB, w);                                                 \
        for (int i = 0; i < NR; i++) {                                                            \
          const int16_t *x = xq + (size_t)i * k + (size_t)(b0 + j) * QB;                          \
          acc[i][0] = _mm256_fmadd_ps(QDOT(w, x), _mm256_broadcast_ss(&sd[i][j]), acc[i][0]);     \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    for (int i = 0; i < NR; i++) out[i] = hsum256(_mm256_add_ps(acc[i][0], acc[i][1]));           \
  }
#define QROW_SET(PREFIX, CTYPE, WIDEN, CPB)                                                       \
  QROWS(PREFIX##1, CTYPE, WIDEN, CPB, 1)                                                          \
  QROWS(PREFIX##2, CTYPE, WIDEN, CPB, 2)                                                          \
  QROWS(PREFIX##3, CTYPE, WIDEN, CPB, 3)                                                          \
  QROWS(PREFIX##4, CTYPE, WIDEN, CPB, 4)                                                          \
  static void PREFIX(const CTYPE *codes, sv_t scale, const qx_t *q, int m, int k,      \
                     float *out) {                                                                \
    int nb = k / QB;                                                                              \
    for (int i0 = 0; i0 < m; i0 += 4) {                                                           \
      const int16_t *x = q->xq + (size_t)i0 * k;                                                  \
      const float *dx = q->dx + (size_t)i0 * nb;                                                  \
      switch (m - i0 < 4 ? m - i0 : 4) {                                                          \
        case 4: PREFIX##4(codes, scale, x, dx, k, out + i0); break;                               \
        case 3: PREFIX##3(codes, scale, x, dx, k, out + i0); break;                               \
        case 2: PREFIX##2(codes, scale, x, dx, k, out + i0); break;                               \
        default: PREFIX##1(codes, scale, x, dx, k, out + i0); break;                              \
      }                                                                                           \
    }                                                                                             \
  }
QROW_SET(q4_row, uint8_t, q4_widen16, QB / 2)
QROW_SET(q8_row, int8_t, q8_widen16, QB)
/* q5: one weight row against m rows of X, each block widened once for all of them */
static void q5_row(const uint8_t *codes, const uint8_t *hb, sv_t scale, const qx_t *q, int m,
                   int k, float *out) {
  int nb = k / QB;
  __m256 acc[MAX_M];
  for (int i = 0; i < m; i++) acc[i] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    __m256i w[2];
    q5_widen16(codes + (size_t)b * (QB / 2), hb + (size_t)b * 4, w);
    float s = sv1(scale, b);
    for (int i = 0; i < m; i++)
      acc[i] = _mm256_fmadd_ps(QDOT(w, q->xq + (size_t)i * k + (size_t)b * QB),
                               _mm256_set1_ps(s * q->dx[(size_t)i * nb + b]), acc[i]);
  }
  for (int i = 0; i < m; i++) out[i] = hsum256(acc[i]);
}
#endif

#ifdef KV_AVX2
/* The batch-1 kernels take 4 weight rows per call and read them one after the other rather
 * than side by side (a block of each in turn, the order before d93cdf4), prefetching PF_BYTES
 * ahead of the row being read: q4/q5 each whole row in turn, q8 each row's 8-block group (256
 * bytes) in turn. Plain loads in the side-by-side order streamed ~30% slower on this machine
 * (11-13 GB/s against 14-17 in address order). On the default model the LM head (q8, 30 MB)
 * went from 2.27 to 1.55 ms and its 120 q4 layer products from 4.50 to 4.10 ms (interleaved A/B,
 * medians of 21 runs each; 1,024 to 4,096 bytes ahead did about as well). Each row's sums are
 * taken in the same order as before: the results are bit for bit the same. */
#define PF_BYTES 2048
/* q8 at batch 1: one row of X against 4 weight rows (codes_r = codes + r * code_row), each
 * group of 8 blocks read row after row, the 4 results leaving through one horizontal-add tree. */
/* Weight row R's blocks of this group of 8: G16 (Q6_K's 16-value scale groups) scales the two
 * 16-code halves of a block apart, else one scale per block. */
#define Q8ROW_BLOCKS(R, ACC)                                                                      \
  for (int j = 0; j < nbb; j++) {                                                                 \
    const int16_t *x = xq + (size_t)(b0 + j) * QB;                                                \
    const int8_t *c = codes + R * code_row + (size_t)(b0 + j) * QB;                               \
    __m256i w[2];                                                                                 \
    _mm_prefetch((const char *)(c + PF_BYTES), _MM_HINT_T0);                                      \
    q8_widen16(c, w);                                                                             \
    __m256i p0 = _mm256_madd_epi16(w[0], _mm256_loadu_si256((const __m256i *)x));                 \
    __m256i p1 = _mm256_madd_epi16(w[1], _mm256_loadu_si256((const __m256i *)(x + 16)));          \
    if (G16) {                                                                                    \
      ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_broadcast_ss(&sd[R][2 * j]), ACC);     \
      ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_broadcast_ss(&sd[R][2 * j + 1]), ACC); \
    } else {                                                                                      \
      ACC = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)),                         \
                            _mm256_broadcast_ss(&sd[R][j]), ACC);                                 \
    }                                                                                             \
  }
static const int32_t g16_lo[8] = {0, 0, 1, 1, 2, 2, 3, 3}, g16_hi[8] = {4, 4, 5, 5, 6, 6, 7, 7};
/* (the hot batch-1 kernels take the scales' kind as a constant KIND, and G16, at each call, so
 * the compiler specializes them and the switch in sv1/sv8 folds away) */
static inline __attribute__((always_inline)) void q8_rows4(const int8_t *codes, size_t code_row,
                                                           sv_t scale, const int16_t *xq,
                                                           const float *dx, int k, float *y,
                                                           const int KIND, const int G16) {
  int nb = k / QB, per = G16 ? 2 : 1, ns = per * nb; /* scales per block, per row */
  scale.kind = KIND;
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int b0 = 0; b0 < nb; b0 += 8) {
    int nbb = nb - b0 < 8 ? nb - b0 : 8;
    float sd[4][16]; /* scale * dx of the 8 blocks' (16 groups') */
    if (nbb == 8 && G16) {
      __m256 d8 = _mm256_loadu_ps(dx + b0);
      __m256 dlo = _mm256_permutevar8x32_ps(d8, _mm256_loadu_si256((const __m256i *)g16_lo));
      __m256 dhi = _mm256_permutevar8x32_ps(d8, _mm256_loadu_si256((const __m256i *)g16_hi));
      for (int r = 0; r < 4; r++) {
        size_t s = (size_t)r * ns + 2 * b0;
        _mm256_storeu_ps(sd[r], _mm256_mul_ps(sv8(scale, s), dlo));
        _mm256_storeu_ps(sd[r] + 8, _mm256_mul_ps(sv8(scale, s + 8), dhi));
      }
    } else if (nbb == 8) {
      __m256 d8 = _mm256_loadu_ps(dx + b0);
      for (int r = 0; r < 4; r++)
        _mm256_storeu_ps(sd[r], _mm256_mul_ps(sv8(scale, (size_t)r * nb + b0), d8));
    } else {
      for (int r = 0; r < 4; r++)
        for (int j = 0; j < per * nbb; j++)
          sd[r][j] = sv1(scale, (size_t)r * ns + per * b0 + j) * dx[b0 + j / per];
    }
    Q8ROW_BLOCKS(0, a0)
    Q8ROW_BLOCKS(1, a1)
    Q8ROW_BLOCKS(2, a2)
    Q8ROW_BLOCKS(3, a3)
  }
  _mm_storeu_ps(y, sum4_ps(a0, a1, a2, a3));
}
/* the same for one weight row against m rows of X (larger batches) */
static void q8g16_row(const int8_t *codes, sv_t scale, const qx_t *q, int m, int k,
                      float *out) {
  int nb = k / QB;
  for (int i = 0; i < m; i++) {
    const int16_t *xq = q->xq + (size_t)i * k;
    const float *dx = q->dx + (size_t)i * nb;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
      __m256i w[2];
      q8_widen16(codes + (size_t)b * QB, w);
      const __m256i *x = (const __m256i *)(xq + (size_t)b * QB);
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(w[0], _mm256_loadu_si256(x))),
                            _mm256_set1_ps(sv1(scale, 2 * b) * dx[b]), acc);
      acc = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(_mm256_madd_epi16(w[1], _mm256_loadu_si256(x + 1))),
          _mm256_set1_ps(sv1(scale, 2 * b + 1) * dx[b]), acc);
    }
    out[i] = hsum256(acc);
  }
}

/* q4 at batch 1, two blocks per step: one 32-byte load holds blocks b, b + 1 (16 bytes each); its
 * low and high nibbles, zero-extended to 16 bits within each 128-bit lane (unpack, not the
 * cross-lane vpmovzxbw), line up with X laid out per pair of blocks as 4 vectors [x_b[8i:8i+8] |
 * x_b+1[8i:8i+8]] (q4_pair_x). Four vpmaddwd and three adds leave block b's sums in lanes 0-3
 * and b + 1's in lanes 4-7, scaled by one permuted vector of 8 blocks' scale * dx: 9 operations
 * per block and row instead of 12. */
static const int32_t q4_pair_sels[4][8] = {
    {0, 0, 0, 0, 1, 1, 1, 1}, {2, 2, 2, 2, 3, 3, 3, 3}, {4, 4, 4, 4, 5, 5, 5, 5},
    {6, 6, 6, 6, 7, 7, 7, 7}};
/* xq [k] int16 in element order -> xp [npair * 64] in the pair layout (an odd last block pairs
 * with zeros): per pair, the 128-bit halves of the two blocks' vectors interleaved */
static void q4_pair_x(const int16_t *xq, int nb, int16_t *xp) {
  for (int b = 0; b < nb; b += 2) {
    const __m256i *x = (const __m256i *)(xq + (size_t)b * QB);
    __m256i x0 = _mm256_loadu_si256(x), x1 = _mm256_loadu_si256(x + 1);
    __m256i y0 = _mm256_setzero_si256(), y1 = y0;
    if (b + 1 < nb) y0 = _mm256_loadu_si256(x + 2), y1 = _mm256_loadu_si256(x + 3);
    __m256i *out = (__m256i *)(xp + (size_t)b * 32);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(x0, y0, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(x0, y0, 0x31));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(x1, y1, 0x20));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(x1, y1, 0x31));
  }
}
static inline __m256i q4_pair_dot(const uint8_t *c, int two, const __m256i *x) {
  __m256i w = two ? _mm256_loadu_si256((const __m256i *)c)
                  : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)c));
  __m256i mask = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
  __m256i lo = _mm256_and_si256(w, mask), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), mask);
  __m256i s0 = _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), x[0]);
  __m256i s1 = _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), x[1]);
  __m256i s2 = _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), x[2]);
  __m256i s3 = _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), x[3]);
  return _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
}
/* q5: as q4_pair_dot, each nibble's fifth bit ORed in first: the two blocks' 32-bit words of
 * fifth bits broadcast to their lanes, byte i of a lane picking its word's byte (i / 8) (the low
 * nibbles hold elements 0-15: bits 0-15; the high ones 16-31), tested against bit i % 8 */
static inline __m256i q5_pair_dot(const uint8_t *c, const uint8_t *h, int two, const __m256i *x) {
  __m256i w = two ? _mm256_loadu_si256((const __m256i *)c)
                  : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)c));
  uint32_t b0, b1 = 0;
  memcpy(&b0, h, 4);
  if (two) memcpy(&b1, h + 4, 4);
  __m256i v = _mm256_setr_epi32((int)b0, (int)b0, (int)b0, (int)b0, (int)b1, (int)b1, (int)b1,
                                (int)b1);
  const __m256i pick_lo = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0,
                                           0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m256i pick_hi = _mm256_add_epi8(pick_lo, _mm256_set1_epi8(2));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  __m256i mask = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256(), f = _mm256_set1_epi8(16);
  __m256i h_lo = _mm256_and_si256(
      _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, pick_lo), bit), bit), f);
  __m256i h_hi = _mm256_and_si256(
      _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, pick_hi), bit), bit), f);
  __m256i lo = _mm256_or_si256(_mm256_and_si256(w, mask), h_lo);
  __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), mask), h_hi);
  __m256i s0 = _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), x[0]);
  __m256i s1 = _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), x[1]);
  __m256i s2 = _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), x[2]);
  __m256i s3 = _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), x[3]);
  return _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
}
static inline __m256 q4_pair_scales(sv_t scale, const float *dx, int b, int two) {
  __m128 s0 = _mm_set1_ps(sv1(scale, b) * dx[b]);
  __m128 s1 = _mm_set1_ps(two ? sv1(scale, b + 1) * dx[b + 1] : 0.f);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(s0), s1, 1);
}
/* (q5 too: Q5 = 1, hb its fifth bits, hb_row bytes per row) */
static inline __attribute__((always_inline)) void q4_rows4_pair(
    const uint8_t *codes, size_t code_row, const uint8_t *hb, size_t hb_row, sv_t scale,
    sv_t mins, const int16_t *xp, const float *dx, const float *xsum, int nb, float *y,
    const int KIND, const int Q5) {
  scale.kind = mins.kind = KIND;
  int nfull = nb / 8 * 8;
  __m256 acc[4], mn[4];
  for (int r = 0; r < 4; r++) acc[r] = mn[r] = _mm256_setzero_ps();
  for (int r = 0; r < 4; r++) /* one row after the other, in address order (PF_BYTES) */
    for (int b0 = 0; b0 < nfull; b0 += 8) {
      const uint8_t *c = codes + r * code_row + (size_t)b0 * (QB / 2);
      const uint8_t *h = Q5 ? hb + r * hb_row + (size_t)b0 * 4 : NULL;
      _mm_prefetch((const char *)(c + PF_BYTES), _MM_HINT_T0);
      _mm_prefetch((const char *)(c + PF_BYTES + 64), _MM_HINT_T0);
      if (Q5) _mm_prefetch((const char *)(h + PF_BYTES / 4), _MM_HINT_T0);
      __m256 sd = _mm256_mul_ps(sv8(scale, (size_t)r * nb + b0), _mm256_loadu_ps(dx + b0));
      mn[r] = _mm256_fmadd_ps(sv8(mins, (size_t)r * nb + b0), _mm256_loadu_ps(xsum + b0), mn[r]);
      for (int p = 0; p < 4; p++) {
        const __m256i *x = (const __m256i *)(xp + (size_t)(b0 + 2 * p) * 32);
        __m256i xv[4] = {_mm256_loadu_si256(x), _mm256_loadu_si256(x + 1),
                         _mm256_loadu_si256(x + 2), _mm256_loadu_si256(x + 3)};
        __m256i dot = Q5 ? q5_pair_dot(c + p * QB, h + p * 8, 1, xv) : q4_pair_dot(c + p * QB, 1, xv);
        acc[r] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(dot),
            _mm256_permutevar8x32_ps(sd, _mm256_loadu_si256((const __m256i *)q4_pair_sels[p])),
            acc[r]);
      }
    }
  float tail[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = nfull; b < nb; b += 2) { /* the rows' last < 8 blocks */
    int two = b + 1 < nb;
    const __m256i *x = (const __m256i *)(xp + (size_t)b * 32);
    __m256i xv[4] = {_mm256_loadu_si256(x), _mm256_loadu_si256(x + 1), _mm256_loadu_si256(x + 2),
                     _mm256_loadu_si256(x + 3)};
    for (int r = 0; r < 4; r++) {
      const uint8_t *c = codes + r * code_row + (size_t)b * (QB / 2);
      __m256i dot = Q5 ? q5_pair_dot(c, hb + r * hb_row + (size_t)b * 4, two, xv)
                       : q4_pair_dot(c, two, xv);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                               q4_pair_scales(sv_at(scale, (size_t)r * nb), dx, b, two), acc[r]);
      for (int j = b; j < b + 1 + two; j++) tail[r] += sv1(mins, (size_t)r * nb + j) * xsum[j];
    }
  }
  __m128 t = sum4_ps(_mm256_add_ps(acc[0], mn[0]), _mm256_add_ps(acc[1], mn[1]),
                     _mm256_add_ps(acc[2], mn[2]), _mm256_add_ps(acc[3], mn[3]));
  _mm_storeu_ps(y, _mm_add_ps(t, _mm_setr_ps(tail[0], tail[1], tail[2], tail[3])));
}
static inline __m256 q4f16_pair_scales(const uint16_t *scale, const float *dx, int b, int two) {
  __m128 s0 = _mm_set1_ps(h2f(scale[b]) * dx[b]);
  __m128 s1 = _mm_set1_ps(two ? h2f(scale[b + 1]) * dx[b + 1] : 0.f);
  return _mm256_insertf128_ps(_mm256_castps128_ps256(s0), s1, 1);
}
/* The default model's case, q4 with float16 scales at batch 1, keeps its own copy of the pair
 * kernel below with plain float16 pointers, inlined into q_gemv's loop as before the generic one
 * existed: the generic kernel (sv_t scales, q5, compiled per kind; inlined per kind into its own
 * loops, or called per 4 rows) measured 5-10% slower on the default model's 120 products in
 * interleaved A/B runs (2026-11-27). */
static inline void q4f16_rows4(const uint8_t *codes, size_t code_row, const uint16_t *scale,
                                 const uint16_t *mins, const int16_t *xp, const float *dx,
                                 const float *xsum, int nb, float *y) {
  int nfull = nb / 8 * 8;
  __m256 acc[4], mn[4];
  for (int r = 0; r < 4; r++) acc[r] = mn[r] = _mm256_setzero_ps();
  for (int r = 0; r < 4; r++) /* one row after the other, in address order (PF_BYTES) */
    for (int b0 = 0; b0 < nfull; b0 += 8) {
      const uint8_t *c = codes + r * code_row + (size_t)b0 * (QB / 2);
      _mm_prefetch((const char *)(c + PF_BYTES), _MM_HINT_T0);
      _mm_prefetch((const char *)(c + PF_BYTES + 64), _MM_HINT_T0);
      __m256 sd = _mm256_mul_ps(
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + (size_t)r * nb + b0))),
          _mm256_loadu_ps(dx + b0));
      mn[r] = _mm256_fmadd_ps(
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + (size_t)r * nb + b0))),
          _mm256_loadu_ps(xsum + b0), mn[r]);
      for (int p = 0; p < 4; p++) {
        const __m256i *x = (const __m256i *)(xp + (size_t)(b0 + 2 * p) * 32);
        __m256i xv[4] = {_mm256_loadu_si256(x), _mm256_loadu_si256(x + 1),
                         _mm256_loadu_si256(x + 2), _mm256_loadu_si256(x + 3)};
        acc[r] = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(q4_pair_dot(c + p * QB, 1, xv)),
            _mm256_permutevar8x32_ps(sd, _mm256_loadu_si256((const __m256i *)q4_pair_sels[p])),
            acc[r]);
      }
    }
  float tail[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = nfull; b < nb; b += 2) { /* the rows' last < 8 blocks */
    int two = b + 1 < nb;
    const __m256i *x = (const __m256i *)(xp + (size_t)b * 32);
    __m256i xv[4] = {_mm256_loadu_si256(x), _mm256_loadu_si256(x + 1), _mm256_loadu_si256(x + 2),
                     _mm256_loadu_si256(x + 3)};
    for (int r = 0; r < 4; r++) {
      acc[r] = _mm256_fmadd_ps(
          _mm256_cvtepi32_ps(q4_pair_dot(codes + r * code_row + (size_t)b * (QB / 2), two, xv)),
          q4f16_pair_scales(scale + (size_t)r * nb, dx, b, two), acc[r]);
      for (int j = b; j < b + 1 + two; j++) tail[r] += h2f(mins[(size_t)r * nb + j]) * xsum[j];
    }
  }
  __m128 t = sum4_ps(_mm256_add_ps(acc[0], mn[0]), _mm256_add_ps(acc[1], mn[1]),
                     _mm256_add_ps(acc[2], mn[2]), _mm256_add_ps(acc[3], mn[3]));
  _mm_storeu_ps(y, _mm_add_ps(t, _mm_setr_ps(tail[0], tail[1], tail[2], tail[3])));
}
/* The batch-1 q4/q5 product over rows [0, r0), the rows split across threads: compiled once
 * per scale kind and q4/q5, q4_rows4_pair inlined into each with its branches folded away (a
 * call per 4 rows through a pointer, or a kind tested per row group, cost 5-10% here). */
typedef void (*q4_rows_fn)(const uint8_t *, const uint8_t *, sv_t, sv_t, const int16_t *,
                           const qx_t *, int, int, float *, int);
#define Q4_ROWS_FN(NAME, KIND, Q5)                                                               \
  static __attribute__((noinline)) void NAME##_4(                                                \
      const uint8_t *c, const uint8_t *h, size_t cr, const void *sp, const float *ssb,           \
      const void *mp, const float *msb, const int16_t *xp, const float *dx, const float *xs,     \
      int nb, float *y) {                                                                        \
    q4_rows4_pair(c, cr, h, cr / 4, sv_make(sp, ssb, KIND, QB), sv_make(mp, msb, KIND, QB), xp,  \
                  dx, xs, nb, y, KIND, Q5);                                                      \
  }                                                                                              \
  static void NAME(const uint8_t *codes, const uint8_t *hb, sv_t scale, sv_t mins,             \
                   const int16_t *xp, const qx_t *q, int k, int r0, float *Y, int accumulate) {  \
    int nb = k / QB;                                                                             \
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")                         \
    for (int r = 0; r < r0; r += 4) {                                                            \
      float out[4];                                                                              \
      sv_t s = sv_at(scale, (size_t)r * nb), mn = sv_at(mins, (size_t)r * nb);                   \
      NAME##_4(codes + (size_t)r * (k / 2), Q5 ? hb + (size_t)r * (k / 8) : NULL, k / 2, s.p,    \
               s.sb, mn.p, mn.sb, xp, q->dx, q->xsum, nb, out);                                  \
      for (int j = 0; j < 4; j++) Y[r + j] = accumulate ? Y[r + j] + out[j] : out[j];           \
    }                                                                                            \
  }
Q4_ROWS_FN(q4_rows_f16, SV_F16, 0)
Q4_ROWS_FN(q4_rows_f32, SV_F32, 0)
Q4_ROWS_FN(q4_rows_u8, SV_U8, 0)
Q4_ROWS_FN(q5_rows_f16, SV_F16, 1)
Q4_ROWS_FN(q5_rows_f32, SV_F32, 1)
Q4_ROWS_FN(q5_rows_u8, SV_U8, 1)
static q4_rows_fn q4_rows_for(int fmt, int kind) {
  static const q4_rows_fn fns[2][3] = {{q4_rows_f16, q4_rows_f32, q4_rows_u8},
                                       {q5_rows_f16, q5_rows_f32, q5_rows_u8}};
  return kind <= SV_U8 ? fns[fmt == 5][kind] : NULL;
}
#endif

/* sum_b mins[b] * xs[b] over nb blocks */
static inline float q4_min_term(sv_t mins, const float *xs, int nb) {
  int b = 0;
  float s = 0.f;
#if defined(KV_AVX2) && defined(__F16C__)
  __m256 acc = _mm256_setzero_ps();
  for (; b + 8 <= nb; b += 8)
    acc = _mm256_fmadd_ps(sv8(mins, b), _mm256_loadu_ps(xs + b), acc);
  s = hsum256(acc);
#endif
  for (; b < nb; b++) s += sv1(mins, b) * xs[b];
  return s;
}

#ifndef KV_AVX2
/* the portable product of one weight row and every row of X, in float32 */
static void q_row_portable(int fmt, int group, const void *codes, const uint8_t *hb,
                           sv_t scale, const float *X, int m, int k, float *out) {
  for (int i = 0; i < m; i++) out[i] = 0.f;
  for (int b = 0; b < k / QB; b++) {
    float w[QB];
    if (fmt == 4)
      q4_widen_scalar((const uint8_t *)codes + (size_t)b * (QB / 2), w);
    else if (fmt == 5)
      q5_widen_scalar((const uint8_t *)codes + (size_t)b * (QB / 2), hb + (size_t)b * 4, w);
    else
      q8_widen_scalar((const int8_t *)codes + (size_t)b * QB, w);
    for (int j = 0; j < QB; j++) w[j] *= sv1(scale, (b * QB + j) / group);
    for (int i = 0; i < m; i++) {
      const float *x = X + (size_t)i * k + (size_t)b * QB;
      float acc = 0.f;
      for (int j = 0; j < QB; j++) acc += w[j] * x[j];
      out[i] += acc;
    }
  }
}
#endif

#ifdef KV_AVX2
/* Quantized weights against many rows of X (batched decode past a few rows, and prefill): a
 * GEMM on packed integer panels. X is rounded to int16 per 32-value block exactly as for the
 * per-row kernels above (qx_init), so the two paths compute the same products; they differ only
 * in the order their sums are taken. Each thread takes panels of PANEL weight rows; a panel's
 * codes are widened to int16 once per call and laid out pair-major, [k / 2][PANEL] int32 words
 * of two adjacent codes, so that one vpmaddwd of a panel word vector and a broadcast pair of X
 * gives 8 weight rows' partial sums, with no horizontal sums. Integer sums run over one scale
 * group (32 or 16 values; |sum| < 32 * 32767 * 128 < 2^31), then are scaled into float32
 * accumulators: out += (w_scale * x_step) * int_sum, plus min * (X's exact float block sum) for
 * q4/q5. A tile is GEMM_MR rows of X by a panel: 8 integer accumulators. Measured on the default
 * model's four layer products (2 threads, medians, hand-run harness): 32 x 2 beat 16 x 4,
 * 24 x 3/4, 32 x 1/3, 40 x 2 and 48/64 x 1 at 32 rows and at 2,048 (137 ms against 175 for
 * 16 x 4). vpmaddwd ran at half float32 FMA's rate here (a micro-benchmark: 8 vpmaddwd with
 * their adds, 128 products, in 4.1 ns; 8 FMAs, 64 products, in 2.0 ns), as many products a second
 * as float32 FMA: the gain at batched-decode sizes comes from reading each weight once per call
 * with no horizontal sums, and past a few hundred rows torch's float32 GEMM is as fast. */
#define PANEL 32
#define GEMM_MR 2
#define NV (PANEL / 8)
/* q_gemv hands batches of at least this many rows to q_gemm (measured crossover: 8) */
#define GEMM_MIN_M 8
/* cpu.linear takes batches up to GEMM_LINEAR_M rows to kv_gemv_q, larger ones to torch's float32
 * GEMM over the weight dequantized per call: on ten layers of the default model (2 threads,
 * interleaved medians, hand-run harness) the GEMM took 5.0 / 10.1 / 17.2 / 36.0 / 134 ms a layer
 * at 64 / 128 / 256 / 512 / 2,048 rows against torch's 6.8 / 14.2 / 17.5 / 33.8 / 121; a
 * 2,048-row prefill of the bench_batch mix took 17.0 s against 16.7 */
#define GEMM_LINEAR_M 256

/* 8 rows of 8 int32 (row i at src + i * lds) written transposed: dst + i * ldd gets column i */
static inline void transpose8_epi32(const int32_t *src, size_t lds, int32_t *dst, size_t ldd) {
  __m256i r[8], t[8];
  for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(src + i * lds));
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; i++) {
    _mm256_storeu_si256((__m256i *)(dst + i * ldd), _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
    _mm256_storeu_si256((__m256i *)(dst + (i + 4) * ldd),
                        _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
  }
}

/* Panel of weight rows r0 .. r0 + PANEL - 1 (rows past n: zero codes, zero scales):
 * rows [PANEL][k] int16 scratch; P [k / 2][PANEL] pairs; S [ng][PANEL] scales; Mn [nb][PANEL]
 * mins (when mins.p). The 8 x 8 transposes take columns 0-7 of pair-row order to the lanes. */
static void gemm_pack(int fmt, int group, const void *codes, const uint8_t *hb, sv_t scale,
                      sv_t mins, int r0, int n, int k, int16_t *rows, int32_t *P, float *S,
                      float *Mn) {
  int nb = k / QB, ng = k / group;
  for (int j = 0; j < PANEL; j++) {
    int16_t *dst = rows + (size_t)j * k;
    size_t r = (size_t)(r0 + j);
    if (r0 + j >= n) {
      memset(dst, 0, sizeof(int16_t) * (size_t)k);
      for (int g = 0; g < ng; g++) S[(size_t)g * PANEL + j] = 0.f;
      if (mins.p)
        for (int b = 0; b < nb; b++) Mn[(size_t)b * PANEL + j] = 0.f;
      continue;
    }
    for (int b = 0; b < nb; b++) {
      __m256i w[2];
      if (fmt == 4)
        q4_widen16((const uint8_t *)codes + r * (k / 2) + (size_t)b * (QB / 2), w);
      else if (fmt == 5)
        q5_widen16((const uint8_t *)codes + r * (k / 2) + (size_t)b * (QB / 2),
                   hb + r * (k / 8) + (size_t)b * 4, w);
      else
        q8_widen16((const int8_t *)codes + r * k + (size_t)b * QB, w);
      _mm256_storeu_si256((__m256i *)(dst + (size_t)b * QB), w[0]);
      _mm256_storeu_si256((__m256i *)(dst + (size_t)b * QB + 16), w[1]);
    }
    for (int g = 0; g < ng; g++) S[(size_t)g * PANEL + j] = sv1(scale, r * ng + g);
    if (mins.p)
      for (int b = 0; b < nb; b++) Mn[(size_t)b * PANEL + j] = sv1(mins, r * nb + b);
  }
  int kp = k / 2; /* pairs per row: a multiple of 16 */
  const int32_t *src = (const int32_t *)rows;
  for (int j0 = 0; j0 < PANEL; j0 += 8)
    for (int p0 = 0; p0 < kp; p0 += 8)
      transpose8_epi32(src + (size_t)j0 * kp + p0, kp, P + (size_t)p0 * PANEL + j0, PANEL);
}

/* One tile: MR rows of X (xq rows i at xq + i * k; dx, xsum at + i * nb) by a panel; adds the
 * tile's products into acc [MR][PANEL]. */
static inline __attribute__((always_inline)) void gemm_tile(
    const int32_t *P, const float *S, const float *Mn, const int16_t *xq, const float *dx,
    const float *xs, int k, int group, int MR, float *acc) {
  int nb = k / QB, ng = k / group, gp = group / 2;
  __m256 fa[GEMM_MR][NV];
  for (int i = 0; i < MR; i++)
    for (int v = 0; v < NV; v++) fa[i][v] = _mm256_setzero_ps();
  for (int g = 0; g < ng; g++) {
    __m256i ia[GEMM_MR][NV];
    for (int i = 0; i < MR; i++)
      for (int v = 0; v < NV; v++) ia[i][v] = _mm256_setzero_si256();
    const int32_t *pw = P + (size_t)g * gp * PANEL;
    const int16_t *xg = xq + (size_t)g * group;
    for (int p = 0; p < gp; p++) {
      __m256i w[NV];
      for (int v = 0; v < NV; v++) w[v] = _mm256_loadu_si256((const __m256i *)(pw + p * PANEL + 8 * v));
      for (int i = 0; i < MR; i++) {
        int32_t pair;
        memcpy(&pair, xg + (size_t)i * k + 2 * p, 4);
        __m256i xb = _mm256_set1_epi32(pair);
        for (int v = 0; v < NV; v++) ia[i][v] = _mm256_add_epi32(ia[i][v], _mm256_madd_epi16(w[v], xb));
      }
    }
    int b = g * group / QB;
    for (int v = 0; v < NV; v++) {
      __m256 sv = _mm256_loadu_ps(S + (size_t)g * PANEL + 8 * v);
      for (int i = 0; i < MR; i++)
        fa[i][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[i][v]), _mm256_mul_ps(sv, _mm256_set1_ps(dx[(size_t)i * nb + b])), fa[i][v]);
    }
    if (Mn && (g + 1) * group % QB == 0) {
      for (int v = 0; v < NV; v++) {
        __m256 mv = _mm256_loadu_ps(Mn + (size_t)b * PANEL + 8 * v);
        for (int i = 0; i < MR; i++)
          fa[i][v] = _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[(size_t)i * nb + b]), fa[i][v]);
      }
    }
  }
  for (int i = 0; i < MR; i++)
    for (int v = 0; v < NV; v++) _mm256_storeu_ps(acc + (size_t)i * PANEL + 8 * v, fa[i][v]);
}
/* Y [m, n] (+)= X [m, k] @ W^T for any m, X already rounded into q; 0 if scratch failed. */
static int q_gemm(int fmt, int group, const void *codes, const uint8_t *hb, sv_t scale,
                  sv_t mins, const qx_t *q, float *Y, int m, int n, int k, int accumulate) {
  int nb = k / QB, ng = k / group, panels = (n + PANEL - 1) / PANEL, failed = 0;
  _Pragma("omp parallel num_threads(kv_team())")
  {
    size_t bytes = sizeof(int16_t) * PANEL * (size_t)k * 2 + sizeof(float) * PANEL * (ng + nb);
    char *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!buf) {
      _Pragma("omp atomic write")
      failed = 1;
    }
    _Pragma("omp barrier")
    if (!failed) {
      int16_t *rows = (int16_t *)buf;
      int32_t *P = (int32_t *)(rows + PANEL * (size_t)k);
      float *S = (float *)(P + PANEL * (size_t)k / 2), *Mn = S + PANEL * (size_t)ng;
      _Pragma("omp for schedule(static)")
      for (int t = 0; t < panels; t++) {
        int r0 = t * PANEL, cols = n - r0 < PANEL ? n - r0 : PANEL;
        gemm_pack(fmt, group, codes, hb, scale, mins, r0, n, k, rows, P, S, Mn);
        for (int i0 = 0; i0 < m; i0 += GEMM_MR) {
          int mr = m - i0 < GEMM_MR ? m - i0 : GEMM_MR;
          float acc[GEMM_MR * PANEL];
          const int16_t *xq = q->xq + (size_t)i0 * k;
          const float *dx = q->dx + (size_t)i0 * nb, *xs = q->xsum + (size_t)i0 * nb;
          if (mr == GEMM_MR) /* a constant MR, so the accumulators stay in registers */
            gemm_tile(P, S, mins.p ? Mn : NULL, xq, dx, xs, k, group, GEMM_MR, acc);
          else
            gemm_tile(P, S, mins.p ? Mn : NULL, xq, dx, xs, k, group, 1, acc);
          for (int i = 0; i < mr; i++) {
            float *y = Y + (size_t)(i0 + i) * n + r0;
            const float *a = acc + i * PANEL;
            if (accumulate)
              for (int j = 0; j < cols; j++) y[j] += a[j];
            else
              memcpy(y, a, sizeof(float) * cols);
          }
        }
      }
    }
    free(buf);
  }
  return !failed;
}
#endif

/* Rows of W split across threads; group: values per scale (32, or 16 for q8); mins: NULL or one
 * per block of 32 (required for q4). Returns 0 (Y untouched) if scratch could not be allocated. */
/* fmt 4 (q4), 5 (q5: hb, its fifth bits [n, k / 8]) or 8 (q8). m <= MAX_M; with AVX2 any m,
 * from GEMM_MIN_M rows on through q_gemm. */
static int q_gemv(int fmt, int group, const void *codes, const uint8_t *hb, sv_t scale,
                  sv_t mins, const float *X, float *Y, int m, int n, int k, int accumulate) {
  int nb = k / QB, ng = k / group;
  qx_t q;
  if (!qx_init(&q, X, m, k)) {
    qx_free(&q);
    return 0;
  }
  int r0 = 0;
  int16_t *xp = NULL;
#ifdef KV_AVX2
  if (m >= GEMM_MIN_M) {
    int ok = q_gemm(fmt, group, codes, hb, scale, mins, &q, Y, m, n, k, accumulate);
    qx_free(&q);
    return ok;
  }
  if (m == 1 && fmt != 8) { /* X in the pair layout of q4_rows4_pair */
    xp = malloc(sizeof(int16_t) * (size_t)(nb + 1) * QB);
    if (!xp) {
      qx_free(&q);
      return 0;
    }
    q4_pair_x(q.xq, nb, xp);
  }
  q4_rows_fn rows4 = fmt == 8 ? NULL : q4_rows_for(fmt, scale.kind);
  if (m == 1 && fmt == 4 && scale.kind == SV_F16) { /* decode at batch 1: 4 rows at a time */
    r0 = n / 4 * 4;
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")
    for (int r = 0; r < r0; r += 4) {
      float out[4];
      q4f16_rows4((const uint8_t *)codes + (size_t)r * (k / 2), k / 2,
                  (const uint16_t *)scale.p + (size_t)r * nb,
                  (const uint16_t *)mins.p + (size_t)r * nb, xp, q.dx, q.xsum, nb, out);
      for (int j = 0; j < 4; j++) Y[r + j] = accumulate ? Y[r + j] + out[j] : out[j];
    }
  } else if (m == 1 && rows4) { /* decode at batch 1: 4 weight rows at a time */
    r0 = n / 4 * 4;
    rows4((const uint8_t *)codes, hb, scale, mins, xp, &q, k, r0, Y, accumulate);
  } else if (m == 1 && fmt == 8) {
    r0 = n / 4 * 4;
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")
    for (int r = 0; r < r0; r += 4) {
      float out[4];
      const int8_t *c = (const int8_t *)codes + (size_t)r * k;
      sv_t s = sv_at(scale, (size_t)r * nb);
      if (group == QB && scale.kind == SV_F16)
        q8_rows4(c, k, s, q.xq, q.dx, k, out, SV_F16, 0);
      else if (group == QB)
        q8_rows4(c, k, s, q.xq, q.dx, k, out, scale.kind, 0);
      else
        q8_rows4(c, k, sv_at(scale, (size_t)r * ng), q.xq, q.dx, k, out, scale.kind, 1);
      if (mins.p)
        for (int j = 0; j < 4; j++)
          out[j] += q4_min_term(sv_at(mins, (size_t)(r + j) * nb), q.xsum, nb);
      for (int j = 0; j < 4; j++) Y[r + j] = accumulate ? Y[r + j] + out[j] : out[j];
    }
  }
#endif
  _Pragma("omp parallel for schedule(static) num_threads(kv_team()) if (r0 < n)")
  for (int r = r0; r < n; r++) {
    float out[MAX_M];
    sv_t sr = sv_at(scale, (size_t)r * ng);
#ifdef KV_AVX2
    if (fmt == 4)
      q4_row((const uint8_t *)codes + (size_t)r * (k / 2), sr, &q, m, k, out);
    else if (fmt == 5)
      q5_row((const uint8_t *)codes + (size_t)r * (k / 2), hb + (size_t)r * (k / 8), sr, &q, m,
             k, out);
    else if (group == QB)
      q8_row((const int8_t *)codes + (size_t)r * k, sr, &q, m, k, out);
    else
      q8g16_row((const int8_t *)codes + (size_t)r * k, sr, &q, m, k, out);
#else
    q_row_portable(fmt, group,
                   fmt != 8 ? (const void *)((const uint8_t *)codes + (size_t)r * (k / 2))
                            : (const void *)((const int8_t *)codes + (size_t)r * k),
                   fmt == 5 ? hb + (size_t)r * (k / 8) : NULL, sr, X, m, k, out);
#endif
    if (mins.p)
      for (int i = 0; i < m; i++)
        out[i] += q4_min_term(sv_at(mins, (size_t)r * nb), q.xsum + (size_t)i * nb, nb);
    for (int i = 0; i < m; i++) {
      float *y = Y + (size_t)i * n + r;
      *y = accumulate ? *y + out[i] : out[i];
    }
  }
  free(xp);
  qx_free(&q);
  return 1;
}
/* the most rows cpu.linear hands kv_gemv_q; 0 without AVX2 (no panel GEMM: kv_gemv_q then
 * takes at most MAX_M rows) */
int kv_gemm_rows(void) {
#ifdef KV_AVX2
  return GEMM_LINEAR_M;
#else
  return 0;
#endif
}
/* fmt 4, 5 or 8 (q5: hbits, its fifth bits); scales and mins of kind `kind` (sv_t), with their
 * super-block factors scale_sb / mins_sb for SV_U8 / SV_I8 */
int kv_gemv_q(int fmt, int group, const void *codes, const uint8_t *hbits, const void *scale,
              const float *scale_sb, const void *mins, const float *mins_sb, int kind,
              const float *X, float *Y, int m, int n, int k, int accumulate) {
  sv_t s = sv_make(scale, scale_sb, kind, group), mn = sv_make(mins, mins_sb, kind, QB);
  return q_gemv(fmt, fmt == 8 ? group : QB, codes, hbits, s, mn, X, Y, m, n, k, accumulate);
}

/* W dequantized into out [n, k] float32 (prefill-sized batches: the product then runs in
 * torch's float32 GEMM over a weight dequantized once per call). */
/* rows: the weight rows to dequantize, out's row i from weight row rows[i] (an embedding's
 * token rows); NULL: rows 0..n-1 */
void kv_dequantize_rows_q(int fmt, int group, const void *codes, const uint8_t *hbits,
                          const void *scale_p, const float *scale_sb, const void *mins_p,
                          const float *mins_sb, int kind, const int64_t *rows, float *out, int n,
                          int k) {
  int nb = k / QB;
  sv_t scale = sv_make(scale_p, scale_sb, kind, group), mins = sv_make(mins_p, mins_sb, kind, QB);
  _Pragma("omp parallel for schedule(static) num_threads(kv_team()) if (n > 4)")
  for (int i = 0; i < n; i++) {
    size_t r = rows ? (size_t)rows[i] : (size_t)i;
    for (int b = 0; b < nb; b++) {
      float w[QB], *o = out + (size_t)i * k + (size_t)b * QB;
      if (fmt == 4) {
        const uint8_t *c = (const uint8_t *)codes + (size_t)r * (k / 2) + (size_t)b * (QB / 2);
        float d = sv1(scale, (size_t)r * nb + b), mn = sv1(mins, (size_t)r * nb + b);
#ifdef KV_AVX2
        __m128i bytes = _mm_loadu_si128((const __m128i *)c), mask = _mm_set1_epi8(0x0f);
        __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        __m256 dv = _mm256_set1_ps(d), mv = _mm256_set1_ps(mn);
        for (int j = 0; j < 4; j++)
          _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(
              _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), dv, mv));
        continue;
#endif
        q4_widen_scalar(c, w);
        for (int j = 0; j < QB; j++) o[j] = w[j] * d + mn;
      } else if (fmt == 5) {
        const uint8_t *c = (const uint8_t *)codes + (size_t)r * (k / 2) + (size_t)b * (QB / 2);
        float d = sv1(scale, (size_t)r * nb + b), mn = sv1(mins, (size_t)r * nb + b);
        q5_widen_scalar(c, hbits + (size_t)r * (k / 8) + (size_t)b * 4, w);
        for (int j = 0; j < QB; j++) o[j] = fmaf(w[j], d, mn);
      } else { /* group 32 or 16: the scale of element j is scale[(b * 32 + j) / group] */
        const int8_t *c = (const int8_t *)codes + (size_t)r * k + (size_t)b * QB;
        size_t s0 = (size_t)r * (k / group) + (size_t)b * (QB / group);
        float mn = mins.p ? sv1(mins, (size_t)r * nb + b) : 0.f;
#ifdef KV_AVX2
        __m256 mv = _mm256_set1_ps(mn);
        for (int j = 0; j < 4; j++)
          _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                              _mm_loadl_epi64((const __m128i *)(c + 8 * j)))),
                                          _mm256_set1_ps(sv1(scale, s0 + 8 * j / group)), mv));
        continue;
#endif
        q8_widen_scalar(c, w);
        for (int j = 0; j < QB; j++) o[j] = w[j] * sv1(scale, s0 + j / group) + mn;
      }
    }
  }
}
void kv_dequantize_q(int fmt, int group, const void *codes, const uint8_t *hbits,
                     const void *scale_p, const float *scale_sb, const void *mins_p,
                     const float *mins_sb, int kind, float *out, int n, int k) {
  kv_dequantize_rows_q(fmt, group, codes, hbits, scale_p, scale_sb, mins_p, mins_sb, kind, NULL,
                       out, n, k);
}

/* The two halves of a decode layer around attention, one call each (each call from Python costs
 * ~10-20 us on this CPU, several times what the small ops themselves take; a layer made 7 of
 * them besides attention). A weight is described by kv_weight: kind 32 (float32), 16 (bfloat16),
 * 4 (q4), 5 (q5) or 8 (q8), its data (codes), scales, mins, (q8) scale group and (q5) fifth
 * bits. References,
 * composed: kvserve.model.llama.LlamaModel._layer_reference.
 *   kv_layer_pre:  qkv = rope(rms_norm(h) @ Wqkv^T) (the first rope_heads heads rotated)
 *   kv_layer_post: h += o @ Wo^T;  h += swiglu(rms_norm(h) @ Wgu^T) @ Wdown^T
 * Returns 0 when scratch could not be allocated (nothing written then, except by _post's first
 * product, so callers treat it as fatal). */
typedef struct {
  int kind, n, k;
  const void *data;
  const void *scale, *mins;
  int group;      /* q8: values per scale (32 or 16) */
  int scale_kind; /* sv_t's kind of scales and mins */
  const uint8_t *hbits; /* q5: the fifth bits */
  const float *scale_sb, *mins_sb; /* SV_U8 / SV_I8: the super-block factors */
} kv_weight;

static int weight_product(const kv_weight *w, const float *X, float *Y, int m, int accumulate) {
  switch (w->kind) {
    case 32: kv_gemv_f32((const float *)w->data, X, Y, m, w->n, w->k, accumulate); return 1;
    case 16: kv_gemv_bf16((const uint16_t *)w->data, X, Y, m, w->n, w->k, accumulate); return 1;
    case 4:
    case 5:
    case 8: {
      int group = w->kind == 8 ? w->group : QB;
      sv_t s = sv_make(w->scale, w->scale_sb, w->scale_kind, group);
      sv_t mn = sv_make(w->mins, w->mins_sb, w->scale_kind, QB);
      return q_gemv(w->kind, group, w->data, w->hbits, s, mn, X, Y, m, w->n, w->k, accumulate);
    }
  }
  return 0;
}

int kv_layer_pre(const float *h, const float *norm_w, float eps, const kv_weight *qkv,
                 const float *cos_t, const float *sin_t, int rope_heads, int head_dim, int m,
                 float *out) {
  int hidden = qkv->k;
  float *x = malloc(sizeof(float) * (size_t)m * hidden);
  if (!x) return 0;
  kv_rms_norm(h, norm_w, x, m, hidden, eps);
  int ok = weight_product(qkv, x, out, m, 0);
  free(x);
  if (ok) kv_rope(out, cos_t, sin_t, m, rope_heads, head_dim, qkv->n);
  return ok;
}

int kv_layer_post(float *h, const float *o, const kv_weight *wo, const float *norm_w, float eps,
                  const kv_weight *gate_up, const kv_weight *down, int m) {
  int hidden = wo->n, inter = down->k;
  if (!weight_product(wo, o, h, m, 1)) return 0;
  float *x = malloc(sizeof(float) * (size_t)m * hidden);
  float *gu = malloc(sizeof(float) * (size_t)m * 2 * inter);
  float *act = malloc(sizeof(float) * (size_t)m * inter);
  int ok = x && gu && act;
  if (ok) {
    kv_rms_norm(h, norm_w, x, m, hidden, eps);
    ok = weight_product(gate_up, x, gu, m, 0);
  }
  if (ok) {
    kv_swiglu(gu, act, m, inter);
    ok = weight_product(down, act, h, m, 1);
  }
  free(x);
  free(gu);
  free(act);
  return ok;
}

/* A whole decode step's layers in one call, for a paged float32 or bfloat16 K/V store (the
 * default CPU configuration): per layer, kv_layer_pre, the new tokens' K and V written into
 * their slots, the paged decode attention over every row (one new token per sequence), and
 * kv_layer_post. Per layer from Python this was 2 C calls, the store's write (two index_copy_)
 * and the attention's wrapper: ~2 ms a token on this CPU, ~20% of a token's time. References:
 * LlamaModel._layer_fast (which this composes) and PagedKVStore.write.
 *   K, V: [layers][num_blocks, block_size, num_kv, d] each, layer_stride elements apart;
 *   kv_kind 32 (float32) or 16 (bfloat16, rounded to nearest even as torch's conversion);
 *   slots [m] int64 (block * block_size + offset); block_tables [m, max_blocks] int32;
 *   context_lens [m] int32 (the new token included); scores: scratch of m * num_heads *
 *   max_context floats. With lm_head (else NULL), also every row's logits [m, vocab] =
 *   rms_norm(h, final_norm) @ lm_head^T (LlamaModel._logits), one call for the whole step.
 * Returns 0 if scratch could not be allocated (h then partly updated). */
typedef struct {
  const float *input_norm, *post_norm;
  kv_weight qkv, o, gate_up, down;
} kv_layer_ref;

int kv_decode_layers(float *h, int m, const kv_layer_ref *layers, int num_layers, float eps,
                     const float *cos_t, const float *sin_t, int num_heads, int num_kv, int d,
                     int kv_kind, void *K, void *V, size_t layer_stride, const int64_t *slots,
                     const int *block_tables, int max_blocks, const int *context_lens,
                     int block_size, int max_context, float *scores, const float *final_norm,
                     const kv_weight *lm_head, float *logits) {
  int qkv_n = (num_heads + 2 * num_kv) * d, kv_row = num_kv * d;
  float *qkv = malloc(sizeof(float) * (size_t)m * qkv_n);
  float *o = malloc(sizeof(float) * (size_t)m * num_heads * d);
  int ok = qkv && o;
  for (int l = 0; ok && l < num_layers; l++) {
    const kv_layer_ref *w = layers + l;
    ok = kv_layer_pre(h, w->input_norm, eps, &w->qkv, cos_t, sin_t, num_heads + num_kv, d, m,
                      qkv);
    if (!ok) break;
    size_t base = (size_t)l * layer_stride;
    for (int i = 0; i < m; i++) {
      const float *k = qkv + (size_t)i * qkv_n + (size_t)num_heads * d, *v = k + kv_row;
      size_t at = base + (size_t)slots[i] * kv_row;
      if (kv_kind == 32) {
        memcpy((float *)K + at, k, sizeof(float) * kv_row);
        memcpy((float *)V + at, v, sizeof(float) * kv_row);
      } else {
        for (int j = 0; j < kv_row; j++) {
          ((uint16_t *)K)[at + j] = f32_to_bf16(k[j]);
          ((uint16_t *)V)[at + j] = f32_to_bf16(v[j]);
        }
      }
    }
    if (kv_kind == 32)
      ok = kv_paged_decode_attention_f32(qkv, qkv_n, (const float *)K + base,
                                         (const float *)V + base, block_tables, max_blocks,
                                         context_lens, m, block_size, num_heads, num_kv, d,
                                         max_context, o, scores);
    else
      ok = kv_paged_decode_attention_bf16(qkv, qkv_n, (const bf16_t *)K + base,
                                          (const bf16_t *)V + base, block_tables, max_blocks,
                                          context_lens, m, block_size, num_heads, num_kv, d,
                                          max_context, o, scores);
    if (!ok) break;
    ok = kv_layer_post(h, o, &w->o, w->post_norm, eps, &w->gate_up, &w->down, m);
  }
  if (ok && lm_head) { /* every row's logits: logits = rms_norm(h) @ lm_head^T */
    int hidden = lm_head->k;
    float *x = malloc(sizeof(float) * (size_t)m * hidden);
    ok = x != NULL;
    if (ok) {
      kv_rms_norm(h, final_norm, x, m, hidden, eps);
      ok = weight_product(lm_head, x, logits, m, 0);
    }
    free(x);
  }
  free(qkv);
  free(o);
  return ok;
}

/* The index of x's first largest value, a NaN counting as largest (numpy's argmax). */
static int argmax_row(const float *x, int n) {
  int j = 0;
#ifdef KV_AVX2
  __m256 top = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_loadu_ps(x + j);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    top = _mm256_max_ps(top, v);
  }
  if (!_mm256_movemask_ps(unordered)) { /* no NaN so far: the first lane equal to the max */
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, top);
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    for (int t = j; t < n; t++) best = x[t] > best || x[t] != x[t] ? x[t] : best;
    if (best == best) {
      for (int t = 0; t < n; t++)
        if (x[t] == best) return t;
    }
  }
  j = 0; /* a NaN somewhere: the scalar scan finds the first */
#endif
  int best = j;
  for (; j < n; j++) {
    if (x[j] != x[j]) return j;
    if (x[j] > x[best]) best = j;
  }
  return best;
}

/* num_steps greedy decode steps back to back (multi-step scheduling), one call: step s embeds
 * each row's token (step 0: first_ids; then the token step s - 1 picked) from `embed` (kind 32,
 * 16 or a quantized layout), runs kv_decode_layers with every row's logits at position
 * positions[i] + s (its slot from its block table, its context position + 1), and picks each
 * row's argmax: the first largest, a NaN counting as largest (numpy's argmax, the sampler's
 * greedy pick). tokens [num_steps, m] int64 receives the picks. cos_table, sin_table: RoPE's
 * [positions, d] tables, every step's positions inside them; block_tables [m, max_blocks] cover
 * every step's slot; scores: m * num_heads * (the last step's context) floats; logits: scratch
 * of m * vocab floats. Reference: ModelRunner.execute_steps' loop of single steps (forward(),
 * then the sampler). Returns 0 if scratch could not be allocated. */
int kv_decode_steps(const kv_weight *embed, const int64_t *first_ids, const int64_t *positions,
                    int num_steps, int64_t *tokens, int m, const kv_layer_ref *layers,
                    int num_layers, float eps, const float *cos_table, const float *sin_table,
                    int num_heads, int num_kv, int d, int kv_kind, void *K, void *V,
                    size_t layer_stride, const int *block_tables, int max_blocks, int block_size,
                    float *scores, const float *final_norm, const kv_weight *lm_head,
                    float *logits) {
  int hidden = embed->k, vocab = lm_head->n;
  float *h = malloc(sizeof(float) * (size_t)m * hidden);
  float *cs = malloc(sizeof(float) * (size_t)m * d), *sn = malloc(sizeof(float) * (size_t)m * d);
  int64_t *slots = malloc(sizeof(int64_t) * (size_t)m);
  int *ctx = malloc(sizeof(int) * (size_t)m);
  int ok = h && cs && sn && slots && ctx;
  for (int s = 0; ok && s < num_steps; s++) {
    const int64_t *ids = s == 0 ? first_ids : tokens + (size_t)(s - 1) * m;
    if (embed->kind == 32 || embed->kind == 16) {
      for (int i = 0; i < m; i++) {
        float *o = h + (size_t)i * hidden;
        if (embed->kind == 32)
          memcpy(o, (const float *)embed->data + (size_t)ids[i] * hidden, sizeof(float) * hidden);
        else
          for (int j = 0; j < hidden; j++)
            o[j] = bf16_to_f32(((const uint16_t *)embed->data)[(size_t)ids[i] * hidden + j]);
      }
    } else {
      kv_dequantize_rows_q(embed->kind, embed->kind == 8 ? embed->group : QB, embed->data,
                           embed->hbits, embed->scale, embed->scale_sb, embed->mins,
                           embed->mins_sb, embed->scale_kind, ids, h, m, hidden);
    }
    int max_ctx = 0;
    for (int i = 0; i < m; i++) {
      int64_t p = positions[i] + s;
      memcpy(cs + (size_t)i * d, cos_table + (size_t)p * d, sizeof(float) * d);
      memcpy(sn + (size_t)i * d, sin_table + (size_t)p * d, sizeof(float) * d);
      slots[i] = (int64_t)block_tables[(size_t)i * max_blocks + p / block_size] * block_size +
                 p % block_size;
      ctx[i] = (int)(p + 1);
      if (ctx[i] > max_ctx) max_ctx = ctx[i];
    }
    ok = kv_decode_layers(h, m, layers, num_layers, eps, cs, sn, num_heads, num_kv, d, kv_kind, K,
                          V, layer_stride, slots, block_tables, max_blocks, ctx, block_size,
                          max_ctx, scores, final_norm, lm_head, logits);
    for (int i = 0; ok && i < m; i++) tokens[(size_t)s * m + i] = argmax_row(logits + (size_t)i * vocab, vocab);
  }
  free(h);
  free(cs);
  free(sn);
  free(slots);
  free(ctx);
  return ok;
}
