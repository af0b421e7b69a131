// What dino_rs's kernels share, defined once: the warp width, the rows a block of the row kernels
// takes (src/ops/launch.rs launches them with its ROWS_PER_BLOCK, which a test checks against this
// file), the grid-stride loop of the element-wise kernels, and the f32/bf16 conversions that let a
// template serve both dtypes (widen to f32 to compute; narrow back, rounding to nearest even).
#pragma once
#include <cuda_bf16.h>

#define WARP 32u
#define ROWS_PER_BLOCK 8u  // warps per block of the row kernels: blockDim = (32, 8)

#define GRID_STRIDE(i, n) \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ void narrow(float v, float *out) { *out = v; }
__device__ __forceinline__ void narrow(float v, __nv_bfloat16 *out) { *out = __float2bfloat16(v); }
