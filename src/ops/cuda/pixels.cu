// Crops arrive on the GPU as planar u8 (N, 3, H, W), a quarter of the bytes of f32; this turns them
// into the normalised f32 the model takes, (v/255 - mean)/std per channel, by looking each value up
// in the same 3 x 256 table the CPU uses (src/augment/normalize.rs), so both give the same bits.
#include "common.cuh"

// out[i] = table[256 * channel(i) + px[i]], channel(i) = (i / plane) % 3.
extern "C" __global__ void dino_normalize_u8(const unsigned char *px, const float *table, float *out, unsigned int n,
                                             unsigned int plane) {
    GRID_STRIDE(i, n) { out[i] = table[((i / plane) % 3u) * 256u + px[i]]; }
}
