// LayerNorm over rows of d f32 values, forward and backward (src/ops/layer_norm/portable.rs). One warp per row;
// the mean and variance in two passes (candle's layernorm kernel takes E[x^2] - mean^2 in one,
// which cancels when a row's mean is large against its spread).
#include "common.cuh"

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Mean and 1/sqrt(var + eps) of row `x` (d values), the same in every lane.
__device__ __forceinline__ float2 row_stats(const float *x, unsigned int d, float eps) {
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) s += x[c];
    const float mean = warp_sum(s) / (float)d;
    float q = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) {
        float v = x[c] - mean;
        q += v * v;
    }
    const float var = warp_sum(q) / (float)d;
    return make_float2(mean, rsqrtf(var + eps));
}

// y = (x - mean) * rstd * w + b, written as T: f32, or bf16 where the output feeds a bf16 matmul
// under autocast (computed in f32, rounded once: what PyTorch's f32 LayerNorm and the cast give).
template <typename T>
__device__ void layer_norm_fwd(const float *x, const float *w, const float *b, T *y, unsigned int rows,
                               unsigned int d, float eps) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const float *xr = x + (size_t)row * d;
    T *yr = y + (size_t)row * d;
    const float2 st = row_stats(xr, d, eps);
    for (unsigned int c = threadIdx.x; c < d; c += WARP) narrow((xr[c] - st.x) * st.y * w[c] + b[c], &yr[c]);
}

extern "C" __global__ void dino_layer_norm_fwd(const float *x, const float *w, const float *b, float *y,
                                               unsigned int rows, unsigned int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}
extern "C" __global__ void dino_layer_norm_fwd_bf16(const float *x, const float *w, const float *b,
                                                    __nv_bfloat16 *y, unsigned int rows, unsigned int d, float eps) {
    layer_norm_fwd(x, w, b, y, rows, d, eps);
}

// dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w, xhat = (x - mean) * rstd; each
// row's mean and rstd are kept in `stats` for the column sums.
extern "C" __global__ void dino_layer_norm_bwd_rows(const float *x, const float *w, const float *g, float *dx,
                                                    float2 *stats, unsigned int rows, unsigned int d, float eps) {
    const unsigned int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y;
    if (row >= rows) return;
    const size_t at = (size_t)row * d;
    const float2 st = row_stats(x + at, d, eps);
    float sg = 0.0f, sgx = 0.0f;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) {
        float gw = g[at + c] * w[c];
        sg += gw;
        sgx += gw * (x[at + c] - st.x) * st.y;
    }
    const float mean_gw = warp_sum(sg) / (float)d, mean_gwx = warp_sum(sgx) / (float)d;
    for (unsigned int c = threadIdx.x; c < d; c += WARP) {
        float gw = g[at + c] * w[c];
        float xhat = (x[at + c] - st.x) * st.y;
        dx[at + c] = st.y * (gw - mean_gw - xhat * mean_gwx);
    }
    if (threadIdx.x == 0) stats[row] = st;
}

// partial[tile][c] of dw (sum of g * xhat) and db (sum of g) over a tile of `tile_rows` rows, for
// 32 columns per block. blockDim = (32, 8): the 8 row lanes are summed in a fixed order.
extern "C" __global__ void dino_layer_norm_bwd_cols(const float *x, const float *g, const float2 *stats,
                                                    float *partial_dw, float *partial_db, unsigned int rows,
                                                    unsigned int d, unsigned int tile_rows) {
    __shared__ float sdw[ROWS_PER_BLOCK][WARP + 1];
    __shared__ float sdb[ROWS_PER_BLOCK][WARP + 1];
    const unsigned int c = blockIdx.x * WARP + threadIdx.x;
    const unsigned int first = blockIdx.y * tile_rows, last = min(first + tile_rows, rows);
    float a = 0.0f, s = 0.0f;
    if (c < d) {
        for (unsigned int r = first + threadIdx.y; r < last; r += ROWS_PER_BLOCK) {
            const size_t at = (size_t)r * d + c;
            const float2 st = stats[r];
            a += g[at] * ((x[at] - st.x) * st.y);
            s += g[at];
        }
    }
    sdw[threadIdx.y][threadIdx.x] = a;
    sdb[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        for (unsigned int k = 1; k < ROWS_PER_BLOCK; ++k) {
            a += sdw[k][threadIdx.x];
            s += sdb[k][threadIdx.x];
        }
        partial_dw[(size_t)blockIdx.y * d + c] = a;
        partial_db[(size_t)blockIdx.y * d + c] = s;
    }
}

// dw[c], db[c]: the tiles' partial sums in tile order.
extern "C" __global__ void dino_layer_norm_bwd_sum(const float *partial_dw, const float *partial_db, float *dw,
                                                   float *db, unsigned int tiles, unsigned int d) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float a = 0.0f, s = 0.0f;
    for (unsigned int t = 0; t < tiles; ++t) {
        a += partial_dw[(size_t)t * d + c];
        s += partial_db[(size_t)t * d + c];
    }
    dw[c] = a;
    db[c] = s;
}
