// Parameter updates on the GPU over all parameters at once ("multi-tensor", as PyTorch's foreach
// optimisers): one launch for AdamW, one for the EMA teacher, two for gradient clipping, instead of
// three or four per parameter (~150 of them in a ViT-S). Each block takes one chunk of one tensor
// from a table built on the host (src/ops/optim/update.rs, `chunk_table`).
//
// The arithmetic is that of src/ops/optim/update.rs's CPU kernels, each operation rounded on its own (no
// fused multiply-add), so a step gives the same bits on both devices.

// Elements per chunk; update.rs's CHUNK must be the same.
#define CHUNK 8192u

struct Chunk {
    unsigned int tensor;
    unsigned int start;
};

// Layouts written by update.rs (`AdamWRecord`, `PairRecord`, `GradRecord`).
struct AdamWTensor {
    float *p, *m, *v;
    const float *g;
    unsigned int n;
    float decay;    // 1 - lr * weight_decay
    float inv_bc2;  // 1 / sqrt(1 - beta2^t)
    float step;     // lr / (1 - beta1^t)
};
static_assert(sizeof(AdamWTensor) == 48, "AdamWTensor layout");

struct EmaTensor {
    float *t;
    const float *s;
    unsigned int n;
    unsigned int pad;
};
static_assert(sizeof(EmaTensor) == 24, "EmaTensor layout");

struct GradTensor {
    float *g;
    unsigned int n;
    unsigned int first_chunk;  // this tensor's chunks are first_chunk .. first_chunk + num_chunks
    unsigned int num_chunks;
    unsigned int pad;
};
static_assert(sizeof(GradTensor) == 24, "GradTensor layout");

#define CHUNK_LOOP(i, c, n) \
    for (unsigned int i = (c).start + threadIdx.x, end_ = min((c).start + CHUNK, (n)); i < end_; i += blockDim.x)

// m <- m + (g - m) * keep1            (PyTorch's m.lerp_(g, 1 - beta1))
// v <- v * beta2 + g * g * keep2      (keep2 = 1 - beta2)
// p <- p * decay - (m / (sqrt(v) * inv_bc2 + eps)) * step
extern "C" __global__ void dino_adamw_foreach(const AdamWTensor *tensors, const Chunk *chunks, float keep1,
                                              float beta2, float keep2, float eps) {
    const Chunk c = chunks[blockIdx.x];
    const AdamWTensor t = tensors[c.tensor];
    CHUNK_LOOP(i, c, t.n) {
        float g = t.g[i];
        float a = t.m[i];
        float m = __fadd_rn(a, __fmul_rn(__fsub_rn(g, a), keep1));
        float v = __fadd_rn(__fmul_rn(t.v[i], beta2), __fmul_rn(__fmul_rn(g, g), keep2));
        t.m[i] = m;
        t.v[i] = v;
        float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v), t.inv_bc2), eps);
        t.p[i] = __fsub_rn(__fmul_rn(t.p[i], t.decay), __fmul_rn(__fdiv_rn(m, denom), t.step));
    }
}

// teacher <- teacher * momentum + student * keep   (keep = 1 - momentum)
extern "C" __global__ void dino_ema_foreach(const EmaTensor *tensors, const Chunk *chunks, float momentum,
                                            float keep) {
    const Chunk c = chunks[blockIdx.x];
    const EmaTensor t = tensors[c.tensor];
    CHUNK_LOOP(i, c, t.n) {
        t.t[i] = __fadd_rn(__fmul_rn(t.t[i], momentum), __fmul_rn(t.s[i], keep));
    }
}

// partial[chunk] <- the sum of squares of the chunk's gradient elements. A fixed reduction order,
// so the norms (and training) repeat bit for bit. Needs blockDim.x == 256.
extern "C" __global__ void dino_sumsq_foreach(const GradTensor *tensors, const Chunk *chunks, float *partial) {
    __shared__ float acc[256];
    const Chunk c = chunks[blockIdx.x];
    const GradTensor t = tensors[c.tensor];
    float s = 0.0f;
    CHUNK_LOOP(i, c, t.n) {
        float x = t.g[i];
        s = __fadd_rn(s, __fmul_rn(x, x));
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (unsigned int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) acc[threadIdx.x] = __fadd_rn(acc[threadIdx.x], acc[threadIdx.x + k]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

// g <- g * clip / (norm + 1e-6) where that factor is below 1 (DINO's clip_gradients), the norm of
// each tensor summed from its chunks' partial sums. Every block of a tensor sums them in the same
// order, so all agree on its factor; nothing is read back to the host.
extern "C" __global__ void dino_clip_foreach(const GradTensor *tensors, const Chunk *chunks,
                                             const float *partial, float clip) {
    __shared__ float coef;
    const Chunk c = chunks[blockIdx.x];
    const GradTensor t = tensors[c.tensor];
    if (threadIdx.x < 32) {
        float s = 0.0f;
        for (unsigned int k = threadIdx.x; k < t.num_chunks; k += 32) s = __fadd_rn(s, partial[t.first_chunk + k]);
        for (int o = 16; o > 0; o >>= 1) s = __fadd_rn(s, __shfl_down_sync(0xffffffffu, s, o));
        if (threadIdx.x == 0) coef = __fdiv_rn(clip, __fadd_rn(__fsqrt_rn(s), 1e-6f));
    }
    __syncthreads();
    const float f = coef;
    if (f >= 1.0f) return;
    CHUNK_LOOP(i, c, t.n) {
        t.g[i] = __fmul_rn(t.g[i], f);
    }
}
