// Attention without the (B, heads, N, N) matrices (src/ops/attention/flash.rs): out = softmax(scale ·
// q·kᵀ)·v per (image, head), read straight from the qkv projection (B, N, 3, heads, 64) and written
// in token order (B, N, heads·64), so neither the head split nor the merge is a copy. bf16 in and
// out (autocast), tensor-core matmuls (wmma, f32 accumulation), the softmax online in f32 over key
// tiles as FlashAttention does it: each tile's probabilities are rounded to bf16 for the ·v
// product, as PyTorch's autocast rounds the whole matrix, and the row sums they are divided by stay
// in f32.
//
// The forward pass: a block takes 64 queries of one (image, head), a warp 16 of them, and walks the
// keys 32 at a time. The backward pass recomputes the probabilities from the forward's row
// log-sum-exps, as FlashAttention-2 does, in three kernels: each row's Σ dout·out; dk and dv, a
// block per 64 keys walking the queries; dq, a block per 64 queries walking the keys. Each gradient
// element is summed by one warp in a fixed order (no atomics), so a step repeats bit for bit. They
// write the gradient of the qkv projection, (B, N, 3, heads, 64), directly.
//
// Tiles that the matmuls read again and again are stored with padded rows (LD, SLD, PLD), so that
// the 16 rows of a fragment do not all fall in the same shared-memory banks.
#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;

#define HEAD_DIM 64u
#define Q_TILE 64u  // queries per block: 4 warps of 16
#define K_TILE 32u  // keys per step
#define WARPS 4u
#define LD (HEAD_DIM + 8u)  // row stride of re-read bf16 tiles: 144 bytes
#define SLD (K_TILE + 4u)   // row stride of f32 score tiles: 144 bytes
#define PLD (K_TILE + 8u)   // row stride of bf16 probability tiles: 80 bytes

// A tile of `rows` tokens of head h's HEAD_DIM bf16 into shared memory, `ld` elements from row to
// row, zeros past the last token; 16-byte loads by all threads of the block. `src` is (B, N, parts,
// heads, HEAD_DIM): the qkv projection (parts 3; part 0 q, 1 k, 2 v) or an output or its gradient
// (parts 1).
__device__ __forceinline__ void load_tile(__nv_bfloat16 *dst, const __nv_bfloat16 *src, unsigned int first,
                                          unsigned int rows, unsigned int n, unsigned int parts, unsigned int part,
                                          unsigned int b, unsigned int h, unsigned int heads, unsigned int ld) {
    const unsigned int vecs = rows * HEAD_DIM / 8;  // 8 bf16 per 16 bytes
    for (unsigned int i = threadIdx.x; i < vecs; i += blockDim.x) {
        const unsigned int r = i / (HEAD_DIM / 8), c = (i % (HEAD_DIM / 8)) * 8;
        const unsigned int token = first + r;
        uint4 v = {0u, 0u, 0u, 0u};
        if (token < n) {
            const size_t at = (((size_t)b * n + token) * parts + part) * heads * HEAD_DIM + (size_t)h * HEAD_DIM + c;
            v = *reinterpret_cast<const uint4 *>(src + at);
        }
        *reinterpret_cast<uint4 *>(dst + r * ld + c) = v;
    }
}

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> RowsFragment;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> Accumulator;

// The warp's 16 rows of HEAD_DIM from a block tile of unpadded rows, as matrix_a fragments (read
// once per block: queries, keys, values or output gradients the warp owns).
__device__ __forceinline__ void warp_rows(RowsFragment *f, const __nv_bfloat16 *tile) {
    const unsigned int warp = threadIdx.x / 32;
    for (unsigned int k = 0; k < HEAD_DIM / 16; ++k)
        wmma::load_matrix_sync(f[k], tile + warp * 16 * HEAD_DIM + k * 16, HEAD_DIM);
}

// out (16 × K_TILE f32, row stride SLD) = a · tileᵀ: a warp's 16 rows of HEAD_DIM (as fragments)
// against the K_TILE rows of a shared tile (row stride LD). Scores q·kᵀ and their gradients' dout·vᵀ.
__device__ __forceinline__ void rows_by_tile(const RowsFragment *a, const __nv_bfloat16 *tile, float *out) {
    for (unsigned int j = 0; j < K_TILE / 16; ++j) {
        Accumulator acc;
        wmma::fill_fragment(acc, 0.0f);
        for (unsigned int k = 0; k < HEAD_DIM / 16; ++k) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> t;
            wmma::load_matrix_sync(t, tile + j * 16 * LD + k * 16, LD);
            wmma::mma_sync(acc, a[k], t, acc);
        }
        wmma::store_matrix_sync(out + j * 16, acc, SLD, wmma::mem_row_major);
    }
}

// acc (16 × HEAD_DIM, as fragments) += p · tile: a warp's 16 rows of K_TILE weights (bf16, row
// stride PLD) over the K_TILE rows of a shared tile (row stride LD).
__device__ __forceinline__ void add_weighted_tile(Accumulator *acc, const __nv_bfloat16 *p,
                                                  const __nv_bfloat16 *tile) {
    for (unsigned int j = 0; j < HEAD_DIM / 16; ++j)
        for (unsigned int k = 0; k < K_TILE / 16; ++k) {
            RowsFragment a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> t;
            wmma::load_matrix_sync(a, p + k * 16, PLD);
            wmma::load_matrix_sync(t, tile + k * 16 * LD + j * 16, LD);
            wmma::mma_sync(acc[j], a, t, acc[j]);
        }
}

// out (B, N, heads·64); with `lse` (not null), also each row's log-sum-exp of its scaled scores,
// (B, N, heads) in f32, for the backward pass.
extern "C" __global__ void dino_attention_fwd_bf16(const __nv_bfloat16 *qkv, __nv_bfloat16 *out, float *lse,
                                                   unsigned int n, unsigned int heads, float scale) {
    __shared__ __align__(32) __nv_bfloat16 qs[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 ks[K_TILE * LD];
    __shared__ __align__(32) __nv_bfloat16 vs[K_TILE * LD];
    __shared__ __align__(32) float ss[WARPS][16 * SLD];     // scores of a warp's 16 rows
    __shared__ __align__(32) __nv_bfloat16 ps[WARPS][16 * PLD];  // their probabilities, unnormalised
    __shared__ __align__(32) float os[WARPS][16 * HEAD_DIM];   // the output rows so far

    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const unsigned int q0 = blockIdx.x * Q_TILE;

    load_tile(qs, qkv, q0, Q_TILE, n, 3, 0, b, h, heads, HEAD_DIM);
    for (unsigned int i = lane; i < 16 * HEAD_DIM; i += 32) os[warp][i] = 0.0f;
    __syncthreads();
    RowsFragment qf[HEAD_DIM / 16];
    warp_rows(qf, qs);

    // Each row belongs to two lanes, each of which takes half of its K_TILE columns and half of its
    // HEAD_DIM outputs; both keep the row's running max and sum.
    const unsigned int row = lane / 2, side = lane % 2;
    float m = __int_as_float(0xff800000u), l = 0.0f;  // -inf, 0

    for (unsigned int k0 = 0; k0 < n; k0 += K_TILE) {
        __syncthreads();  // the last tile's ks and vs are no longer read
        load_tile(ks, qkv, k0, K_TILE, n, 3, 1, b, h, heads, LD);
        load_tile(vs, qkv, k0, K_TILE, n, 3, 2, b, h, heads, LD);
        __syncthreads();

        // Scores: the warp's 16 queries against the tile's keys.
        rows_by_tile(qf, ks, ss[warp]);
        __syncwarp();

        // Online softmax over this tile's columns of the lane's row.
        const float *sr = ss[warp] + row * SLD + side * (K_TILE / 2);
        __nv_bfloat16 *pr = ps[warp] + row * PLD + side * (K_TILE / 2);
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
        // The output rows rescaled by their alpha, a row at a time: lane c takes columns c and
        // c + 32, so the warp reads 32 consecutive floats (all 32 banks), and each row's alpha comes
        // from one of the row's two lanes. A lane per half row walked 32 columns whose addresses
        // all fell in one bank across the warp: a 32-way conflict per column.
        for (unsigned int r = 0; r < 16; ++r) {
            const float a = __shfl_sync(0xffffffffu, alpha, 2 * r);
            float *orow = os[warp] + r * HEAD_DIM;
            orow[lane] *= a;
            orow[lane + 32] *= a;
        }
        __syncwarp();

        // os += p · v (os in shared memory: its rows were rescaled above)
        Accumulator o[HEAD_DIM / 16];
        for (unsigned int j = 0; j < HEAD_DIM / 16; ++j)
            wmma::load_matrix_sync(o[j], os[warp] + j * 16, HEAD_DIM, wmma::mem_row_major);
        add_weighted_tile(o, ps[warp], vs);
        for (unsigned int j = 0; j < HEAD_DIM / 16; ++j)
            wmma::store_matrix_sync(os[warp] + j * 16, o[j], HEAD_DIM, wmma::mem_row_major);
        __syncwarp();
    }

    // The output written a row at a time by the whole warp, two columns a lane: each store covers
    // the row's 128 contiguous bytes (a lane per half row made every store touch 32 rows, a token
    // apart in memory), and the float2 reads from shared memory are conflict-free.
    const float inv = 1.0f / l;
    for (unsigned int r = 0; r < 16; ++r) {
        const float inv_r = __shfl_sync(0xffffffffu, inv, 2 * r);
        const unsigned int token = q0 + warp * 16 + r;
        if (token < n) {  // the same for the whole warp
            const float2 v = *reinterpret_cast<const float2 *>(os[warp] + r * HEAD_DIM + 2 * lane);
            __nv_bfloat16 *dst = out + ((size_t)b * n + token) * heads * HEAD_DIM + (size_t)h * HEAD_DIM + 2 * lane;
            dst[0] = __float2bfloat16(v.x * inv_r);
            dst[1] = __float2bfloat16(v.y * inv_r);
        }
    }
    const unsigned int token = q0 + warp * 16 + row;
    if (lse != nullptr && side == 0 && token < n) lse[((size_t)b * n + token) * heads + h] = m + logf(l);
}

// One warp per row of (B, N, heads) rows of HEAD_DIM: dot[row] = Σ dout·out, in f32.
extern "C" __global__ void dino_attention_bwd_dot(const __nv_bfloat16 *out, const __nv_bfloat16 *dout, float *dot,
                                                  unsigned int rows) {
    const unsigned int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    const size_t at = (size_t)row * HEAD_DIM + threadIdx.x;
    float s = __bfloat162float(out[at]) * __bfloat162float(dout[at]) +
              __bfloat162float(out[at + 32]) * __bfloat162float(dout[at + 32]);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) dot[row] = s;
}

// Writes a warp's 16 rows of HEAD_DIM accumulated in `acc` (scaled by `scale`) to tokens first..
// of part `part` of dqkv, through `stage` (16 rows of SLD f32, the warp's own), two fragments at a time.
__device__ __forceinline__ void write_rows(Accumulator *acc, float *stage,
                                           __nv_bfloat16 *dqkv, unsigned int first, unsigned int n,
                                           unsigned int part, unsigned int b, unsigned int h, unsigned int heads) {
    const unsigned int lane = threadIdx.x % 32, row = lane / 2, side = lane % 2;
    const unsigned int token = first + row;
    for (unsigned int half = 0; half < HEAD_DIM / K_TILE; ++half) {
        wmma::store_matrix_sync(stage, acc[2 * half], SLD, wmma::mem_row_major);
        wmma::store_matrix_sync(stage + 16, acc[2 * half + 1], SLD, wmma::mem_row_major);
        __syncwarp();
        if (token < n) {
            __nv_bfloat16 *dst = dqkv + (((size_t)b * n + token) * 3 + part) * heads * HEAD_DIM + (size_t)h * HEAD_DIM +
                                 half * K_TILE + side * 16;
            for (unsigned int c = 0; c < 16; ++c) dst[c] = __float2bfloat16(stage[row * SLD + side * 16 + c]);
        }
        __syncwarp();
    }
}

// dk and dv for 64 keys of one (image, head), a warp's 16 keys against every query, 32 at a time:
// Pᵀ = exp(scale · k·qᵀ − lse), dv += Pᵀ·dout, dPᵀ = v·doutᵀ, dSᵀ = scale · Pᵀ ∘ (dPᵀ − dot),
// dk += dSᵀ·q.
extern "C" __global__ void dino_attention_bwd_dkdv(const __nv_bfloat16 *qkv, const __nv_bfloat16 *dout,
                                                   const float *lse, const float *dot, __nv_bfloat16 *dqkv,
                                                   unsigned int n, unsigned int heads, float scale) {
    __shared__ __align__(32) __nv_bfloat16 ks[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 vs[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 qs[K_TILE * LD];
    __shared__ __align__(32) __nv_bfloat16 dos[K_TILE * LD];
    __shared__ float lses[K_TILE], dots[K_TILE];
    __shared__ __align__(32) float st[WARPS][16 * SLD];
    __shared__ __align__(32) __nv_bfloat16 pt[WARPS][16 * PLD];
    __shared__ __align__(32) __nv_bfloat16 dst[WARPS][16 * PLD];

    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane / 2, side = lane % 2;
    const unsigned int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const unsigned int k0 = blockIdx.x * Q_TILE;
    load_tile(ks, qkv, k0, Q_TILE, n, 3, 1, b, h, heads, HEAD_DIM);
    load_tile(vs, qkv, k0, Q_TILE, n, 3, 2, b, h, heads, HEAD_DIM);
    __syncthreads();
    RowsFragment kf[HEAD_DIM / 16], vf[HEAD_DIM / 16];
    warp_rows(kf, ks);
    warp_rows(vf, vs);
    Accumulator dk[HEAD_DIM / 16], dv[HEAD_DIM / 16];
    for (unsigned int j = 0; j < HEAD_DIM / 16; ++j) {
        wmma::fill_fragment(dk[j], 0.0f);
        wmma::fill_fragment(dv[j], 0.0f);
    }
    float p[K_TILE / 2];

    for (unsigned int q0 = 0; q0 < n; q0 += K_TILE) {
        __syncthreads();  // the last step's qs, dos, lses and dots are no longer read
        load_tile(qs, qkv, q0, K_TILE, n, 3, 0, b, h, heads, LD);
        load_tile(dos, dout, q0, K_TILE, n, 1, 0, b, h, heads, LD);
        for (unsigned int i = threadIdx.x; i < K_TILE; i += blockDim.x) {
            const unsigned int token = q0 + i;
            const size_t at = ((size_t)b * n + token) * heads + h;
            lses[i] = token < n ? lse[at] : 0.0f;
            dots[i] = token < n ? dot[at] : 0.0f;
        }
        __syncthreads();

        // Sᵀ: the warp's keys against the step's queries.
        rows_by_tile(kf, qs, st[warp]);
        __syncwarp();
        for (unsigned int c = 0; c < K_TILE / 2; ++c) {
            const unsigned int col = side * (K_TILE / 2) + c;
            p[c] = q0 + col < n ? expf(scale * st[warp][row * SLD + col] - lses[col]) : 0.0f;
            pt[warp][row * PLD + col] = __float2bfloat16(p[c]);
        }
        __syncwarp();

        // dv += Pᵀ·dout
        add_weighted_tile(dv, pt[warp], dos);
        // dPᵀ = v·doutᵀ, over Sᵀ (read above)
        rows_by_tile(vf, dos, st[warp]);
        __syncwarp();
        for (unsigned int c = 0; c < K_TILE / 2; ++c) {
            const unsigned int col = side * (K_TILE / 2) + c;
            dst[warp][row * PLD + col] = __float2bfloat16(scale * p[c] * (st[warp][row * SLD + col] - dots[col]));
        }
        __syncwarp();

        // dk += dSᵀ·q
        add_weighted_tile(dk, dst[warp], qs);
    }
    __syncwarp();
    write_rows(dk, st[warp], dqkv, k0 + warp * 16, n, 1, b, h, heads);
    write_rows(dv, st[warp], dqkv, k0 + warp * 16, n, 2, b, h, heads);
}

// dq for 64 queries of one (image, head), a warp's 16 queries against every key, 32 at a time:
// P = exp(scale · q·kᵀ − lse), dP = dout·vᵀ, dS = scale · P ∘ (dP − dot), dq += dS·k.
extern "C" __global__ void dino_attention_bwd_dq(const __nv_bfloat16 *qkv, const __nv_bfloat16 *dout,
                                                 const float *lse, const float *dot, __nv_bfloat16 *dqkv,
                                                 unsigned int n, unsigned int heads, float scale) {
    __shared__ __align__(32) __nv_bfloat16 qs[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 dos[Q_TILE * HEAD_DIM];
    __shared__ __align__(32) __nv_bfloat16 ks[K_TILE * LD];
    __shared__ __align__(32) __nv_bfloat16 vs[K_TILE * LD];
    __shared__ __align__(32) float ss[WARPS][16 * SLD];
    __shared__ __align__(32) __nv_bfloat16 ds[WARPS][16 * PLD];

    const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row = lane / 2, side = lane % 2;
    const unsigned int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const unsigned int q0 = blockIdx.x * Q_TILE;
    load_tile(qs, qkv, q0, Q_TILE, n, 3, 0, b, h, heads, HEAD_DIM);
    load_tile(dos, dout, q0, Q_TILE, n, 1, 0, b, h, heads, HEAD_DIM);
    __syncthreads();
    RowsFragment qf[HEAD_DIM / 16], df[HEAD_DIM / 16];
    warp_rows(qf, qs);
    warp_rows(df, dos);
    Accumulator dq[HEAD_DIM / 16];
    for (unsigned int j = 0; j < HEAD_DIM / 16; ++j) wmma::fill_fragment(dq[j], 0.0f);
    const unsigned int token = q0 + warp * 16 + row;
    const size_t at = ((size_t)b * n + token) * heads + h;
    const float my_lse = token < n ? lse[at] : 0.0f, my_dot = token < n ? dot[at] : 0.0f;
    float p[K_TILE / 2];

    for (unsigned int k0 = 0; k0 < n; k0 += K_TILE) {
        __syncthreads();  // the last step's ks and vs are no longer read
        load_tile(ks, qkv, k0, K_TILE, n, 3, 1, b, h, heads, LD);
        load_tile(vs, qkv, k0, K_TILE, n, 3, 2, b, h, heads, LD);
        __syncthreads();

        rows_by_tile(qf, ks, ss[warp]);
        __syncwarp();
        for (unsigned int c = 0; c < K_TILE / 2; ++c) {
            const unsigned int col = side * (K_TILE / 2) + c;
            p[c] = k0 + col < n ? expf(scale * ss[warp][row * SLD + col] - my_lse) : 0.0f;
        }
        __syncwarp();
        // dP = dout·vᵀ, over S (read above)
        rows_by_tile(df, vs, ss[warp]);
        __syncwarp();
        for (unsigned int c = 0; c < K_TILE / 2; ++c) {
            const unsigned int col = side * (K_TILE / 2) + c;
            ds[warp][row * PLD + col] = __float2bfloat16(scale * p[c] * (ss[warp][row * SLD + col] - my_dot));
        }
        __syncwarp();
        // dq += dS·k
        add_weighted_tile(dq, ds[warp], ks);
    }
    __syncwarp();
    write_rows(dq, ss[warp], dqkv, q0 + warp * 16, n, 0, b, h, heads);
}
