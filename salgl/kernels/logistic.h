/* The logistic function for the fused kernels (salgl/kernels/*.c), vectorisable and without
   fast-math: NaN and infinities keep their meaning. */

#ifndef SALGL_LOGISTIC_H
#define SALGL_LOGISTIC_H

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

/* sigma(x) = 1 / (1 + exp(-x)). Beyond |x| = 40 sigma is 0 or 1 to far below float32's
   resolution of the O(1) sums it enters, so the argument is clamped there (a NaN passes through
   the comparisons). */
static inline float sigmoid(float x)
{
    float z = -x;
    z = z > 40.0f ? 40.0f : z;
    z = z < -40.0f ? -40.0f : z;
    return 1.0f / (1.0f + exp_bounded(z));
}

#endif
