/* Fused CPU kernels for SALGL's semantic attention scores (eq. 1-3), see salgl/native.py.

   With s = logistic(2 u_j * v_i) elementwise over the attention dimension d1 (tanh = 2s - 1):
     forward   out[b, i, j] = sum_k p_k s_k
     backward  du[b, j] += sum_i w v_i,  dv[i] += sum_bj w u_j,  dp += sum g s,  w = g s (1 - s)
   one pass over the (B, n, m, d1) intermediate each, never stored. Each call covers regions
   j0 <= j < j1 of every batch row, so threads given disjoint region ranges write disjoint du rows;
   dv and dp are per-thread accumulators that the caller sums. Plain C, vectorised by the compiler
   (no fast-math: NaN and infinities keep their meaning). */

#include <stdint.h>
#include <string.h>

/* exp(x) for x in [-87, 87] (Cephes' expf: a degree-6 polynomial on x - n ln2, times 2^n). */
static inline float exp_bounded(float x)
{
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* logistic(2x). Beyond |2x| = 40 the logistic is 0 or 1 to far below float32's resolution of the
   sums it enters, so the argument is clamped there (a NaN passes through the comparisons). */
static inline float logistic2(float x)
{
    float z = -2.0f * x;
    z = z > 40.0f ? 40.0f : z;
    z = z < -40.0f ? -40.0f : z;
    return 1.0f / (1.0f + exp_bounded(z));
}

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
