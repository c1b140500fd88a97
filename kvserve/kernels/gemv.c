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
#include <string.h>

#define MAX_M 8

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

#define GEMV(NAME, WTYPE)                                                                \
  void NAME(const WTYPE *restrict W, const float *restrict X, float *restrict Y, int m,  \
            int n, int k, int accumulate) {                                               \
    _Pragma("omp parallel for schedule(static) num_threads(kv_team())")                                          \
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

/* s[0..len) <- exp(s - max(s)); returns their sum (the softmax denominator). */
static inline float exp_shifted(float *s, int len) {
  float mx = -INFINITY, total = 0.f;
  for (int t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
  for (int t = 0; t < len; t++) {
    s[t] = expf(s[t] - mx);
    total += s[t];
  }
  return total;
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
    for (int j = 0; j < inter; j++) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
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
 * Reference: kvserve.model.attention.attention_reference. */
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

/* Decode attention of a batch of sequences over a paged K/V store, one query token each:
 * K, V are [num_blocks, block_size, num_kv, d]; sequence b's token t lives in block
 * block_tables[b * max_blocks + t / block_size], slot t % block_size, for t < context_lens[b]
 * (its new K/V already written there). q rows are q_row_stride floats apart, heads d apart;
 * out is [B, num_heads, d] contiguous. Blocks are read where they lie: nothing is gathered.
 * `scores` is scratch of B * num_heads * max_context floats.
 * Reference: kvserve.model.attention.attention_reference over the gathered blocks. */
#define PAGED_DECODE(NAME, KTYPE, LOADK)                                                         \
  void NAME(const float *restrict q, int q_row_stride, const KTYPE *restrict K,                  \
            const KTYPE *restrict V, const int *restrict block_tables, int max_blocks,            \
            const int *restrict context_lens, int batch, int block_size, int num_heads,           \
            int num_kv, int d, int max_context, float *restrict out, float *restrict scores) {    \
    int group = num_heads / num_kv;                                                               \
    float scale = 1.0f / sqrtf((float)d);                                                         \
    size_t row_elems = (size_t)num_kv * d, block_elems = (size_t)block_size * row_elems;          \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(kv_team())")                       \
    for (int bh = 0; bh < batch * num_heads; bh++) {                                              \
      int b = bh / num_heads, h = bh % num_heads, len = context_lens[b];                          \
      const int *table = block_tables + (size_t)b * max_blocks;                                   \
      size_t head_off = (size_t)(h / group) * d;                                                  \
      const float *qh = q + (size_t)b * q_row_stride + (size_t)h * d;                             \
      float *s = scores + (size_t)bh * max_context;                                               \
      for (int t = 0; t < len; t++) {                                                             \
        const KTYPE *k = K + table[t / block_size] * block_elems +                                \
                         (size_t)(t % block_size) * row_elems + head_off;                         \
        float acc = 0.f;                                                                          \
        _Pragma("omp simd reduction(+ : acc)")                                                    \
        for (int j = 0; j < d; j++) acc += qh[j] * LOADK(k[j]);                                   \
        s[t] = acc * scale;                                                                       \
      }                                                                                           \
      float total = exp_shifted(s, len);                                                          \
      float *o = out + (size_t)bh * d;                                                            \
      for (int j = 0; j < d; j++) o[j] = 0.f;                                                     \
      for (int t = 0; t < len; t++) {                                                             \
        const KTYPE *v = V + table[t / block_size] * block_elems +                                \
                         (size_t)(t % block_size) * row_elems + head_off;                         \
        float p = s[t] / total;                                                                   \
        _Pragma("omp simd")                                                                       \
        for (int j = 0; j < d; j++) o[j] += p * LOADK(v[j]);                                      \
      }                                                                                           \
    }                                                                                             \
  }
PAGED_DECODE(kv_paged_decode_attention_f32, float, LOAD1_F32)
PAGED_DECODE(kv_paged_decode_attention_bf16, bf16_t, LOAD1_BF16)
