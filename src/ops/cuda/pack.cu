// A transformer block's parameter gradients (src/ops/block/portable.rs) written into one f32
// buffer laid out as its packed parameters (src/ops/block/pack.rs): one launch for the twelve, each f32
// or bf16, where candle took a cast for each bf16 one and a copy for every one.
#include <cuda_bf16.h>

// src/ops/launch.rs's PACK_PARTS.
#define PACK_PARTS 12

// Layouts written by src/ops/launch.rs (`PackPart`, `PackParts`), passed by value.
struct PackPart {
    const void *src;
    unsigned int n;       // elements
    unsigned int offset;  // where the first goes in out
    unsigned int bf16;    // src holds bf16 values (else f32)
    unsigned int pad;
};
static_assert(sizeof(PackPart) == 24, "PackPart layout");

struct PackParts {
    PackPart part[PACK_PARTS];
};

// Block row y copies part y, grid-stride over its elements. Widening bf16 to f32 is exact.
extern "C" __global__ void dino_pack_f32(PackParts parts, float *out) {
    const PackPart p = parts.part[blockIdx.y];
    const unsigned int stride = gridDim.x * blockDim.x;
    float *dst = out + p.offset;
    if (p.bf16) {
        const __nv_bfloat16 *src = static_cast<const __nv_bfloat16 *>(p.src);
        for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) dst[i] = __bfloat162float(src[i]);
    } else {
        const float *src = static_cast<const float *>(p.src);
        for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) dst[i] = src[i];
    }
}
