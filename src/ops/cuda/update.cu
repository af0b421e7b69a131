// In-place parameter updates on the GPU: the arithmetic of src/ops/update.rs's CPU kernels, each
// operation rounded on its own (no fused multiply-add), so a step gives the same bits on both.

#define GRID_STRIDE(i, n) \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

// m <- m + (g - m) * w   (PyTorch's m.lerp_(g, 1 - beta1))
extern "C" __global__ void dino_adamw_m(float *m, const float *g, float w, unsigned int n) {
    GRID_STRIDE(i, n) {
        float a = m[i];
        m[i] = __fadd_rn(a, __fmul_rn(__fsub_rn(g[i], a), w));
    }
}

// v <- v * beta2 + g * g * w   (w = 1 - beta2)
extern "C" __global__ void dino_adamw_v(float *v, const float *g, float beta2, float w, unsigned int n) {
    GRID_STRIDE(i, n) {
        float b = g[i];
        v[i] = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(b, b), w));
    }
}

// p <- p * decay - (m / (sqrt(v) * inv_bc2 + eps)) * step
extern "C" __global__ void dino_adamw_param(float *p, const float *m, const float *v, float decay,
                                            float inv_bc2, float eps, float step, unsigned int n) {
    GRID_STRIDE(i, n) {
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v[i]), inv_bc2), eps);
        p[i] = __fsub_rn(__fmul_rn(p[i], decay), __fmul_rn(__fdiv_rn(m[i], denom), step));
    }
}

// teacher <- teacher * momentum + student * w   (w = 1 - momentum)
extern "C" __global__ void dino_ema(float *t, const float *s, float momentum, float w, unsigned int n) {
    GRID_STRIDE(i, n) {
        t[i] = __fadd_rn(__fmul_rn(t[i], momentum), __fmul_rn(s[i], w));
    }
}

// g <- g * (clip / (norm + 1e-6)) where that factor is below 1 (DINO's clip_gradients); `norm` is
// the gradient's L2 norm, one float in device memory, so nothing is read back to the host.
extern "C" __global__ void dino_clip(float *g, const float *norm, float clip, unsigned int n) {
    float coef = __fdiv_rn(clip, __fadd_rn(norm[0], 1e-6f));
    if (coef >= 1.0f) return;
    GRID_STRIDE(i, n) {
        g[i] = __fmul_rn(g[i], coef);
    }
}
