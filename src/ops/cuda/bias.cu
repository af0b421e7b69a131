// Column sums in f32 of a (rows, d) f32 or bf16 matrix: a linear layer's bias gradient
// (src/ops/bias.rs). candle's sum over dim 0 gives each column one block whose threads walk memory
// a row apart, computing a strided index per element; here each block reads 32 adjacent columns of
// a tile of rows (coalesced), and a second kernel adds the tiles' partial sums in tile order: no
// atomics, so the same result every time.
#include "common.cuh"

// partial[tile][c] = sum of g[r][c] over the tile's rows; the 8 row lanes summed in a fixed order.
template <typename T>
__device__ void column_tile(const T *g, float *partial, unsigned int rows, unsigned int d, unsigned int tile_rows) {
    __shared__ float lanes[ROWS_PER_BLOCK][WARP + 1];
    const unsigned int c = blockIdx.x * WARP + threadIdx.x;
    const unsigned int first = blockIdx.y * tile_rows, last = min(first + tile_rows, rows);
    float s = 0.0f;
    if (c < d) {
        for (unsigned int r = first + threadIdx.y; r < last; r += ROWS_PER_BLOCK) s += widen(g[(size_t)r * d + c]);
    }
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        for (unsigned int k = 1; k < ROWS_PER_BLOCK; ++k) s += lanes[k][threadIdx.x];
        partial[(size_t)blockIdx.y * d + c] = s;
    }
}

extern "C" __global__ void dino_column_sums_f32(const float *g, float *partial, unsigned int rows, unsigned int d,
                                                unsigned int tile_rows) {
    column_tile(g, partial, rows, d, tile_rows);
}
extern "C" __global__ void dino_column_sums_bf16(const __nv_bfloat16 *g, float *partial, unsigned int rows,
                                                 unsigned int d, unsigned int tile_rows) {
    column_tile(g, partial, rows, d, tile_rows);
}

// out[c]: the tiles' partial sums in tile order.
extern "C" __global__ void dino_column_sums_total(const float *partial, float *out, unsigned int tiles,
                                                  unsigned int d) {
    const unsigned int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= d) return;
    float s = 0.0f;
    for (unsigned int t = 0; t < tiles; ++t) s += partial[(size_t)t * d + c];
    out[c] = s;
}
