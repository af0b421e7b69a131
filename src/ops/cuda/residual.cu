// The residual update of a block, out = x + branch * mask[sample], with x (the stream) f32 and
// the branch f32 or bf16 (the end of a bf16 matmul under autocast); mask holds one f32 per
// sample (0 or 1/keep_prob, stochastic depth). Rounded as the CPU kernel: one product, one sum.
#include <cuda_bf16.h>

#define GRID_STRIDE(i, n) \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ void residual(const float *x, const T *b, float *out, unsigned int n) {
    GRID_STRIDE(i, n) { out[i] = __fadd_rn(x[i], widen(b[i])); }
}

template <typename T>
__device__ void residual_masked(const float *x, const T *b, const float *mask, float *out, unsigned int n,
                                unsigned int per_sample) {
    GRID_STRIDE(i, n) { out[i] = __fadd_rn(x[i], __fmul_rn(mask[i / per_sample], widen(b[i]))); }
}

extern "C" __global__ void dino_residual_f32(const float *x, const float *b, float *out, unsigned int n) {
    residual(x, b, out, n);
}
extern "C" __global__ void dino_residual_bf16(const float *x, const __nv_bfloat16 *b, float *out, unsigned int n) {
    residual(x, b, out, n);
}
extern "C" __global__ void dino_residual_masked_f32(const float *x, const float *b, const float *mask, float *out,
                                                    unsigned int n, unsigned int per_sample) {
    residual_masked(x, b, mask, out, n, per_sample);
}
extern "C" __global__ void dino_residual_masked_bf16(const float *x, const __nv_bfloat16 *b, const float *mask,
                                                     float *out, unsigned int n, unsigned int per_sample) {
    residual_masked(x, b, mask, out, n, per_sample);
}
