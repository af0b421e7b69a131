// The DINO head's weight-normalised last layer, w = g * v / ||v|| per output row (src/ops/weight_norm.rs),
// forward and backward. One warp per row (a row is the bottleneck's 256 values; out_dim rows). v and g
// are the f32 master parameters; the row sums are taken in f32.
#include "common.cuh"

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// w = v * (g / sqrt(sum v^2)), written as T: f32, or bf16 for the matmul under autocast (rounded once).
template <typename T>
__device__ void weight_norm_fwd(const float *v, const float *g, T *w, unsigned int rows, unsigned int d) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const float *vr = v + (size_t)row * d;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) s += vr[c] * vr[c];
    const float f = g[row] / sqrtf(warp_sum(s));
    T *wr = w + (size_t)row * d;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) narrow(vr[c] * f, &wr[c]);
}

// With n = ||v|| and dot = sum dw * v over the row: dv = (g / n) * (dw - v * dot / n^2) into out[0, rows * d),
// dg = dot / n into out[rows * d + row]. dw is the matmul's weight gradient (bf16 under autocast).
template <typename T>
__device__ void weight_norm_bwd(const T *dw, const float *v, const float *g, float *out, unsigned int rows,
                                unsigned int d) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const size_t at = (size_t)row * d;
    float vv = 0.0f, dv = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) {
        const float x = v[at + c];
        vv += x * x;
        dv += widen(dw[at + c]) * x;
    }
    const float sq = warp_sum(vv), dot = warp_sum(dv);
    const float n = sqrtf(sq);
    const float a = g[row] / n, b = dot / sq;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) out[at + c] = a * (widen(dw[at + c]) - v[at + c] * b);
    if (threadIdx.x == 0) out[(size_t)rows * d + row] = dot / n;
}

extern "C" __global__ void dino_weight_norm_fwd_f32(const float *v, const float *g, float *w, unsigned int rows,
                                                    unsigned int d) {
    weight_norm_fwd(v, g, w, rows, d);
}
extern "C" __global__ void dino_weight_norm_fwd_bf16(const float *v, const float *g, __nv_bfloat16 *w,
                                                     unsigned int rows, unsigned int d) {
    weight_norm_fwd(v, g, w, rows, d);
}
extern "C" __global__ void dino_weight_norm_bwd_f32(const float *dw, const float *v, const float *g, float *out,
                                                    unsigned int rows, unsigned int d) {
    weight_norm_bwd(dw, v, g, out, rows, d);
}
extern "C" __global__ void dino_weight_norm_bwd_bf16(const __nv_bfloat16 *dw, const float *v, const float *g,
                                                     float *out, unsigned int rows, unsigned int d) {
    weight_norm_bwd(dw, v, g, out, rows, d);
}
