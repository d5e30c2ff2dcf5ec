/* Fused CPU kernels for SALGL's semantic attention scores (eq. 1-3), see salgl/native.py.

   With s = logistic(2 u_j * v_i) elementwise over the attention dimension d1 (tanh = 2s - 1):
     forward   out[b, i, j] = sum_k p_k s_k
     backward  du[b, j] += sum_i w v_i,  dv[i] += sum_bj w u_j,  dp += sum g s,  w = g s (1 - s)
   one pass over the (B, n, m, d1) intermediate each, never stored. Each call covers regions
   j0 <= j < j1 of every batch row, so threads given disjoint region ranges write disjoint du rows;
   dv and dp are per-thread accumulators that the caller sums. Plain C, vectorised by the compiler
   (no fast-math: NaN and infinities keep their meaning). */

#include "logistic.h"

static inline float logistic2(float x) { return sigmoid(2.0f * x); }

void bilinear_logistic_forward(const float *restrict u, const float *restrict v, const float *restrict p,
                               float *restrict scores, long batch, long n, long m, long d, long j0, long j1)
{
    for (long b = 0; b < batch; b++)
        for (long i = 0; i < n; i++) {
            const float *vi = v + i * d;
            float *out = scores + (b * n + i) * m;
            for (long j = j0; j < j1; j++) {
                const float *uj = u + (b * m + j) * d;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (long k = 0; k < d; k++) acc += p[k] * logistic2(uj[k] * vi[k]);
                out[j] = acc;
            }
        }
}

void bilinear_logistic_backward(const float *restrict u, const float *restrict v, const float *restrict grad,
                                float *restrict du, float *restrict dv, float *restrict dp,
                                long batch, long n, long m, long d, long j0, long j1)
{
    for (long b = 0; b < batch; b++)
        for (long i = 0; i < n; i++) {
            const float *vi = v + i * d;
            float *dvi = dv + i * d;
            const float *g = grad + (b * n + i) * m;
            for (long j = j0; j < j1; j++) {
                const float *uj = u + (b * m + j) * d;
                float *duj = du + (b * m + j) * d;
                const float gj = g[j];
#pragma omp simd
                for (long k = 0; k < d; k++) {
                    float s = logistic2(uj[k] * vi[k]);
                    dp[k] += gj * s;
                    float w = gj * s * (1.0f - s);
                    duj[k] += w * vi[k];
                    dvi[k] += w * uj[k];
                }
            }
        }
}
