/* Skinny matrix products for decode: Y[m, n] = X[m, k] @ W[n, k]^T with m small (1..8).
 *
 * Decode is bound by reading the weights once per step; torch's CPU GEMV path reaches well under
 * the machine's read bandwidth for these shapes, so this streams each weight row once and applies
 * it to all m rows of X. Rows of W are split across OpenMP threads (the OpenMP runtime torch
 * already loaded, so the two share one pool). W is float32 or bfloat16; X and Y are float32.
 * The reference is torch.nn.functional.linear (kvserve/kernels/cpu.py tests one against the other).
 */
#include <stdint.h>
#include <string.h>

#define ROWS_PER_TASK 8
#define MAX_M 8

static inline float bf16_to_f32(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

void kv_gemv_f32(const float *restrict W, const float *restrict X, float *restrict Y,
                 int m, int n, int k) {
#pragma omp parallel for schedule(static)
  for (int r0 = 0; r0 < n; r0 += ROWS_PER_TASK) {
    int r1 = r0 + ROWS_PER_TASK < n ? r0 + ROWS_PER_TASK : n;
    for (int r = r0; r < r1; r++) {
      const float *w = W + (size_t)r * k;
      for (int i = 0; i < m; i++) {
        const float *x = X + (size_t)i * k;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < k; j++) acc += w[j] * x[j];
        Y[(size_t)i * n + r] = acc;
      }
    }
  }
}

void kv_gemv_bf16(const uint16_t *restrict W, const float *restrict X, float *restrict Y,
                  int m, int n, int k) {
#pragma omp parallel for schedule(static)
  for (int r0 = 0; r0 < n; r0 += ROWS_PER_TASK) {
    int r1 = r0 + ROWS_PER_TASK < n ? r0 + ROWS_PER_TASK : n;
    float wf[4096];
    for (int r = r0; r < r1; r++) {
      const uint16_t *w = W + (size_t)r * k;
      const float *wsrc;
      if (k <= 4096) {
        /* widen the row once, reuse it for every row of X */
#pragma omp simd
        for (int j = 0; j < k; j++) wf[j] = bf16_to_f32(w[j]);
        wsrc = wf;
      } else {
        wsrc = 0;
      }
      for (int i = 0; i < m; i++) {
        const float *x = X + (size_t)i * k;
        float acc = 0.f;
        if (wsrc) {
#pragma omp simd reduction(+ : acc)
          for (int j = 0; j < k; j++) acc += wsrc[j] * x[j];
        } else {
#pragma omp simd reduction(+ : acc)
          for (int j = 0; j < k; j++) acc += bf16_to_f32(w[j]) * x[j];
        }
        Y[(size_t)i * n + r] = acc;
      }
    }
  }
}

int kv_max_m(void) { return MAX_M; }
