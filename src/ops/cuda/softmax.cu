// Softmax over rows of d values, y = softmax(scale * x), forward and backward (src/ops/softmax/portable.rs),
// f32 and bf16 (attention probabilities under autocast). One warp per row; values are widened to
// f32 and the row statistics kept in f32.
#include "common.cuh"

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ void softmax_fwd(const T *x, T *y, unsigned int rows, unsigned int d, float scale) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const T *xr = x + (size_t)row * d;
    T *yr = y + (size_t)row * d;
    float m = __int_as_float(0xff800000);  // -inf
    for (unsigned int c = threadIdx.x; c < d; c += WARP) m = fmaxf(m, scale * widen(xr[c]));
    m = warp_max(m);
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) s += expf(scale * widen(xr[c]) - m);
    const float inv = 1.0f / warp_sum(s);
    for (unsigned int c = threadIdx.x; c < d; c += WARP) narrow(expf(scale * widen(xr[c]) - m) * inv, &yr[c]);
}

// dx = scale * y * (g - sum(g * y))
template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, unsigned int rows, unsigned int d, float scale) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const size_t at = (size_t)row * d;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) s += widen(g[at + c]) * widen(y[at + c]);
    const float dot = warp_sum(s);
    for (unsigned int c = threadIdx.x; c < d; c += WARP)
        narrow(scale * widen(y[at + c]) * (widen(g[at + c]) - dot), &dx[at + c]);
}

extern "C" __global__ void dino_softmax_fwd_f32(const float *x, float *y, unsigned int rows, unsigned int d, float scale) {
    softmax_fwd(x, y, rows, d, scale);
}
extern "C" __global__ void dino_softmax_fwd_bf16(const __nv_bfloat16 *x, __nv_bfloat16 *y, unsigned int rows,
                                                 unsigned int d, float scale) {
    softmax_fwd(x, y, rows, d, scale);
}
extern "C" __global__ void dino_softmax_bwd_f32(const float *y, const float *g, float *dx, unsigned int rows,
                                                unsigned int d, float scale) {
    softmax_bwd(y, g, dx, rows, d, scale);
}
extern "C" __global__ void dino_softmax_bwd_bf16(const __nv_bfloat16 *y, const __nv_bfloat16 *g, __nv_bfloat16 *dx,
                                                 unsigned int rows, unsigned int d, float scale) {
    softmax_bwd(y, g, dx, rows, d, scale);
}
