// The residual update of a block, out = x + branch * mask[sample], with x (the stream) f32 and
// the branch f32 or bf16 (the end of a bf16 matmul under autocast); mask holds one f32 per
// sample (0 or 1/keep_prob, stochastic depth). Rounded as the CPU kernel: one product, one sum.
#include "common.cuh"

template <typename T> __device__ void residual(const float *x, const T *b, float *out, unsigned int n) {
    GRID_STRIDE(i, n) { out[i] = __fadd_rn(x[i], widen(b[i])); }
}

template <typename T>
__device__ void residual_masked(const float *x, const T *b, const float *mask, float *out, unsigned int n,
                                unsigned int per_sample) {
    GRID_STRIDE(i, n) { out[i] = __fadd_rn(x[i], __fmul_rn(mask[i / per_sample], widen(b[i]))); }
}

// The branch's value with the linear layer's bias added and rounded in the branch's dtype, as the
// layer's own bias add would write it (then read back here).
__device__ __forceinline__ float biased(float b, float bias) { return __fadd_rn(b, bias); }
__device__ __forceinline__ float biased(__nv_bfloat16 b, __nv_bfloat16 bias) {
    return __bfloat162float(__float2bfloat16(__fadd_rn(widen(b), widen(bias))));
}

// out = x + mask[sample] * (branch + bias[column]) (mask null: x + (branch + bias)): the linear
// layer's bias add and the residual update in one pass instead of two.
template <typename T>
__device__ void residual_bias(const float *x, const T *b, const T *bias, const float *mask, float *out, unsigned int n,
                              unsigned int per_sample, unsigned int d) {
    GRID_STRIDE(i, n) {
        const float v = biased(b[i], bias[i % d]);
        out[i] = mask ? __fadd_rn(x[i], __fmul_rn(mask[i / per_sample], v)) : __fadd_rn(x[i], v);
    }
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
extern "C" __global__ void dino_residual_bias_f32(const float *x, const float *b, const float *bias, const float *mask,
                                                  float *out, unsigned int n, unsigned int per_sample, unsigned int d) {
    residual_bias(x, b, bias, mask, out, n, per_sample, d);
}
extern "C" __global__ void dino_residual_bias_bf16(const float *x, const __nv_bfloat16 *b, const __nv_bfloat16 *bias,
                                                   const float *mask, float *out, unsigned int n,
                                                   unsigned int per_sample, unsigned int d) {
    residual_bias(x, b, bias, mask, out, n, per_sample, d);
}
