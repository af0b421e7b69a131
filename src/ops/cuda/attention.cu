// Attention without the (B, heads, N, N) matrices, for forward passes that keep nothing for a
// backward pass (inference, the EMA teacher): out = softmax(scale · q·kᵀ)·v per (image, head), read
// straight from the qkv projection (B, N, 3, heads, 64) and written in token order (B, N, heads·64),
// so neither the head split nor the merge is a copy. bf16 in and out (autocast), tensor-core
// matmuls (wmma, f32 accumulation), the softmax online in f32 over key tiles as FlashAttention
// does it: each tile's probabilities are rounded to bf16 for the ·v product, as PyTorch's autocast
// rounds the whole matrix, and the row sums they are divided by stay in f32.
//
// A block takes 64 queries of one (image, head), a warp 16 of them, and walks the keys 32 at a time.
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

#define HEAD_DIM 64u
#define Q_TILE 64u  // queries per block: 4 warps of 16
#define K_TILE 32u  // keys per step
#define WARPS 4u

// A tile of `rows` rows of HEAD_DIM bf16 from the qkv projection (part `part`: 0 q, 1 k, 2 v) into
// shared memory, zeros past the last token; 16-byte loads by all threads of the block.
__device__ __forceinline__ void load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *qkv, unsigned int first,
                                          unsigned int rows, unsigned int n, unsigned int part, unsigned int b,
                                          unsigned int h, unsigned int heads) {
    const unsigned int vecs = rows * HEAD_DIM / 8;  // 8 bf16 per 16 bytes
    for (unsigned int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const unsigned int r = i / (HEAD_DIM / 8), c = (i % (HEAD_DIM / 8)) * 8;
        const unsigned int token = first + r;
        uint4 v = {0u, 0u, 0u, 0u};
        if (token < n) {
            const size_t at = (((size_t)b * n + token) * 3 + part) * heads * HEAD_DIM + (size_t)h * HEAD_DIM + c;
            v = *reinterpret_cast<const uint4 *>(qkv + at);
        }
        *reinterpret_cast<uint4 *>(dst + r * HEAD_DIM + c) = v;
    }
}

extern "C" __global__ void dino_attention_fwd_bf16(const __nv_bfloat16 *qkv, __nv_bfloat16 *out, unsigned int n,
                                                   unsigned int heads, float scale) {
    __shared__ __align__(32) __nv_bfloat16 qs[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 ks[K_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 vs[K_TILE * HEAD_DIM];
    __shared__ __align__(32) float ss[WARPS][16 * K_TILE];     // scores of a warp's 16 rows
    __shared__ __align__(32) __nv_bfloat16 ps[WARPS][16 * K_TILE];  // their probabilities, unnormalised
    __shared__ __align__(32) float os[WARPS][16 * HEAD_DIM];   // the output rows so far

    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const unsigned int q0 = blockIdx.x * Q_TILE;

    load_tile(qs, qkv, q0, Q_TILE, n, 0, b, h, heads);
    for (unsigned int i = lane; i < 16 * HEAD_DIM; i += 32) os[warp][i] = 0.0f;
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> qf[HEAD_DIM / 16];
    for (unsigned int k = 0; k < HEAD_DIM / 16; ++k)
        wmma::load_matrix_sync(qf[k], qs + warp * 16 * HEAD_DIM + k * 16, HEAD_DIM);

    // Each row belongs to two lanes, each of which takes half of its K_TILE columns and half of its
    // HEAD_DIM outputs; both keep the row's running max and sum.
    const unsigned int row = lane / 2, side = lane % 2;
    float m = __int_as_float(0xff800000u), l = 0.0f;  // -inf, 0

    for (unsigned int k0 = 0; k0 < n; k0 += K_TILE) {
        __syncthreads();  // the last tile's ks and vs are no longer read
        load_tile(ks, qkv, k0, K_TILE, n, 1, b, h, heads);
        load_tile(vs, qkv, k0, K_TILE, n, 2, b, h, heads);
        __syncthreads();

        // Scores: the warp's 16 queries against the tile's keys.
        for (unsigned int j = 0; j < K_TILE / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
            for (unsigned int k = 0; k < HEAD_DIM / 16; ++k) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> kf;
                wmma::load_matrix_sync(kf, ks + j * 16 * HEAD_DIM + k * 16, HEAD_DIM);
                wmma::mma_sync(acc, qf[k], kf, acc);
            }
            wmma::store_matrix_sync(ss[warp] + j * 16, acc, K_TILE, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax over this tile's columns of the lane's row.
        const float *sr = ss[warp] + row * K_TILE + side * (K_TILE / 2);
        __nv_bfloat16 *pr = ps[warp] + row * K_TILE + side * (K_TILE / 2);
        float tile_max = __int_as_float(0xff800000u);
        for (unsigned int c = 0; c < K_TILE / 2; ++c)
            if (k0 + side * (K_TILE / 2) + c < n) tile_max = fmaxf(tile_max, scale * sr[c]);
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m, tile_max);  // finite: every tile has a key
        const float alpha = expf(m - m_new);      // 0 on the first tile
        float sum = 0.0f;
        for (unsigned int c = 0; c < K_TILE / 2; ++c) {
            float p = k0 + side * (K_TILE / 2) + c < n ? expf(scale * sr[c] - m_new) : 0.0f;
            sum += p;
            pr[c] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = m_new;
        float *orow = os[warp] + row * HEAD_DIM + side * (HEAD_DIM / 2);
        for (unsigned int c = 0; c < HEAD_DIM / 2; ++c) orow[c] *= alpha;
        __syncwarp();

        // os += p · v
        for (unsigned int j = 0; j < HEAD_DIM / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, os[warp] + j * 16, HEAD_DIM, wmma::mem_row_major);
            for (unsigned int k = 0; k < K_TILE / 16; ++k) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> pf;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> vf;
                wmma::load_matrix_sync(pf, ps[warp] + k * 16, K_TILE);
                wmma::load_matrix_sync(vf, vs + k * 16 * HEAD_DIM + j * 16, HEAD_DIM);
                wmma::mma_sync(acc, pf, vf, acc);
            }
            wmma::store_matrix_sync(os[warp] + j * 16, acc, HEAD_DIM, wmma::mem_row_major);
        }
        __syncwarp();
    }

    const unsigned int token = q0 + warp * 16 + row;
    if (token < n) {
        const float inv = 1.0f / l;
        const float *orow = os[warp] + row * HEAD_DIM + side * (HEAD_DIM / 2);
        __nv_bfloat16 *dst = out + ((size_t)b * n + token) * heads * HEAD_DIM + (size_t)h * HEAD_DIM + side * (HEAD_DIM / 2);
        for (unsigned int c = 0; c < HEAD_DIM / 2; ++c) dst[c] = __float2bfloat16(orow[c] * inv);
    }
}
