// gelu_erf(x + bias) over rows of `d`, forward and backward, for f32 and bf16 (the MLP's fc1
// under autocast). bf16 values are widened to f32, and x + bias is rounded to the input's dtype
// first, as nn.Linear's bias add followed by nn.GELU does it.
#include "common.cuh"

template <typename T> __device__ __forceinline__ float biased(const T *x, const T *b, unsigned int i, unsigned int d) {
    T v;
    narrow(widen(x[i]) + widen(b[i % d]), &v);
    return widen(v);
}

template <typename T> __device__ void bias_gelu(const T *x, const T *b, T *y, unsigned int n, unsigned int d) {
    GRID_STRIDE(i, n) {
        float v = biased(x, b, i, d);
        narrow(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)), &y[i]);
    }
}

// dx = g * (Phi(v) + v * phi(v)), v = x + bias
template <typename T> __device__ void bias_gelu_bwd(const T *x, const T *b, const T *g, T *dx, unsigned int n, unsigned int d) {
    GRID_STRIDE(i, n) {
        float v = biased(x, b, i, d);
        float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
        float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        narrow(widen(g[i]) * (cdf + v * pdf), &dx[i]);
    }
}

extern "C" __global__ void dino_bias_gelu_f32(const float *x, const float *b, float *y, unsigned int n, unsigned int d) {
    bias_gelu(x, b, y, n, d);
}
extern "C" __global__ void dino_bias_gelu_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *b, __nv_bfloat16 *y,
                                               unsigned int n, unsigned int d) {
    bias_gelu(x, b, y, n, d);
}
extern "C" __global__ void dino_bias_gelu_bwd_f32(const float *x, const float *b, const float *g, float *dx,
                                                  unsigned int n, unsigned int d) {
    bias_gelu_bwd(x, b, g, dx, n, d);
}
extern "C" __global__ void dino_bias_gelu_bwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *b,
                                                   const __nv_bfloat16 *g, __nv_bfloat16 *dx, unsigned int n,
                                                   unsigned int d) {
    bias_gelu_bwd(x, b, g, dx, n, d);
}
