// Stands in for CUDA's mma.h (nvcuda::wmma) in the CPU emulation (cuda_emu.h). On a GPU a
// fragment's elements are spread over the warp's lanes in an unspecified order; here every lane
// holds the whole tile, in row-major order, and computes the whole product. A kernel that keeps to
// the wmma contract (fragments touched only through these functions, or element-wise alike on all
// x[i]) computes the same here. A store is written by lane 0 alone, after a warp barrier (on the GPU
// each lane writes the elements it holds, so no lane can still be reading them from the tile it
// loaded); loads do not wait. So, as on the GPU, a lane that loads what other lanes wrote, or reads
// what a store wrote, must order that with __syncwarp (a warp barrier here), or read stale values.
#pragma once
#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    T x[rows * cols];
};

inline float to_float(float v) { return v; }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class F, class T> inline void load(F &f, const T *p, unsigned int ldm, bool col) {
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}

template <class Use, int M, int N, int K, class T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major> &f, const T *p, unsigned int ldm) {
    load(f, p, ldm, false);
}
template <class Use, int M, int N, int K, class T>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major> &f, const T *p, unsigned int ldm) {
    load(f, p, ldm, true);
}
template <int M, int N, int K, class T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const T *p, unsigned int ldm, layout_t l) {
    load(f, p, ldm, l == mem_col_major);
}

template <int M, int N, int K, class T>
inline void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T> &f, unsigned int ldm, layout_t l) {
    using F = fragment<accumulator, M, N, K, T>;
    emu::block->warps[emu::warp]->arrive_and_wait();
    if (emu::lane == 0)
        for (int r = 0; r < F::rows; ++r)
            for (int c = 0; c < F::cols; ++c)
                (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * F::cols + c];
}

template <class F, class T> inline void fill_fragment(F &f, T v) {
    for (int i = 0; i < F::num_elements; ++i) f.x[i] = v;
}

// d = a · b + c, products summed in f32 (bf16 products are exact in f32).
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float> &d, const fragment<matrix_a, M, N, K, T, LA> &a,
                     const fragment<matrix_b, M, N, K, T, LB> &b, const fragment<accumulator, M, N, K, float> &c) {
    float out[M * N];
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; ++j) {
            float s = c.x[i * N + j];
            for (int k = 0; k < K; ++k) s += to_float(a.x[i * K + k]) * to_float(b.x[k * N + j]);
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
