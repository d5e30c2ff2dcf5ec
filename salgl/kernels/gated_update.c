/* Fused CPU kernels for the gated update of graph propagation (eq. 14, as released), see
   salgl/native.py and salgl.layers.GatedPropagation.

   Each row is one node (B n rows), d wide. The caller runs the matmuls, without their biases:
     gi = x [W1; W2; W3]^T   (row stride 3d: z, r and candidate parts)
     gh = h [U1; U2]^T       (row stride 2d: z and r parts)
     uc = (r h) U3^T         (row stride d)
   and these kernels the elementwise work between them, one pass each, adding the biases (the
   gates' input and hidden biases summed into b_zr (2d), the candidate's into b_c (d)):
     gates             z = sigma(gi_z + gh_z + b_z),  r = sigma(gi_r + gh_r + b_r),  rh = r h
     output            c = tanh(gi_c + uc + b_c),  h' = h + z (c - h)
   backward, g = dL/dh':
     output_backward   dgi_z = g (c - h) z (1 - z),  dgi_c = g z (1 - c^2),  dh = g (1 - z)
     gates_backward    (drh = dgi_c U3, by the caller)  dgi_r = drh h r (1 - r),  dh += drh r
   dgh = dgi's z and r parts, so the caller reads it as a view of dgi. Each call covers rows
   row0 <= row < row1; threads given disjoint ranges write disjoint rows. Plain C vectorised by
   the compiler, no fast-math (NaN and infinities keep their meaning). */

#include "logistic.h"

/* tanh(x) = 2 sigma(2x) - 1: absolute error of order float32's epsilon, as sums of O(1) terms need. */
static inline float tanh_via_sigmoid(float x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }

void gated_update_gates(const float *restrict gi, const float *restrict gh, const float *restrict b_zr,
                        const float *restrict h, float *restrict z, float *restrict r, float *restrict rh,
                        long d, long row0, long row1)
{
    for (long row = row0; row < row1; row++) {
        const float *gi_z = gi + row * 3 * d, *gi_r = gi_z + d, *gh_z = gh + row * 2 * d, *gh_r = gh_z + d;
        const float *h_row = h + row * d;
        float *z_row = z + row * d, *r_row = r + row * d, *rh_row = rh + row * d;
#pragma omp simd
        for (long k = 0; k < d; k++) {
            z_row[k] = sigmoid(gi_z[k] + gh_z[k] + b_zr[k]);
            float rk = sigmoid(gi_r[k] + gh_r[k] + b_zr[d + k]);
            r_row[k] = rk;
            rh_row[k] = rk * h_row[k];
        }
    }
}

void gated_update_output(const float *restrict gi, const float *restrict uc, const float *restrict b_c,
                         const float *restrict h, const float *restrict z, float *restrict c, float *restrict h_new,
                         long d, long row0, long row1)
{
    for (long row = row0; row < row1; row++) {
        const float *gi_c = gi + row * 3 * d + 2 * d;
        const long at = row * d;
#pragma omp simd
        for (long k = 0; k < d; k++) {
            float ck = tanh_via_sigmoid(gi_c[k] + uc[at + k] + b_c[k]);
            c[at + k] = ck;
            h_new[at + k] = h[at + k] + z[at + k] * (ck - h[at + k]);
        }
    }
}

void gated_update_output_backward(const float *restrict g, const float *restrict z, const float *restrict c,
                                  const float *restrict h, float *restrict dgi, float *restrict dh,
                                  long d, long row0, long row1)
{
    for (long row = row0; row < row1; row++) {
        float *dgi_z = dgi + row * 3 * d, *dgi_c = dgi_z + 2 * d;
        const long at = row * d;
#pragma omp simd
        for (long k = 0; k < d; k++) {
            float gk = g[at + k], zk = z[at + k], ck = c[at + k], hk = h[at + k];
            dgi_z[k] = gk * (ck - hk) * zk * (1.0f - zk);
            dgi_c[k] = gk * zk * (1.0f - ck * ck);
            dh[at + k] = gk * (1.0f - zk);
        }
    }
}

void gated_update_gates_backward(const float *restrict drh, const float *restrict r, const float *restrict h,
                                 float *restrict dgi, float *restrict dh, long d, long row0, long row1)
{
    for (long row = row0; row < row1; row++) {
        float *dgi_r = dgi + row * 3 * d + d;
        const long at = row * d;
#pragma omp simd
        for (long k = 0; k < d; k++) {
            float gk = drh[at + k], rk = r[at + k];
            dgi_r[k] = gk * h[at + k] * rk * (1.0f - rk);
            dh[at + k] += gk * rk;
        }
    }
}
