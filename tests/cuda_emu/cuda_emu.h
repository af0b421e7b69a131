// The subset of CUDA that src/ops/cuda/*.cu use, on the CPU, so that tests/cuda_emulated.rs can run
// those kernels without a GPU (CI has none). Each kernel source is compiled as C++ with this header
// forced in first (g++ -include cuda_emu.h); tests/cuda_emulated.rs generates one `emu_launch_<name>`
// per `extern "C" __global__` kernel (EMU_EXPORT), which takes its arguments as cuLaunchKernel does (an array of
// pointers to the values) and runs the grid.
//
// How a launch runs: one launch at a time, blocks one after another; the threads of a block as real threads, so that a
// missing __syncthreads or a shuffle in divergent code shows up as a wrong result or a hang rather
// than passing by luck of a sequential order. `__shared__` variables are function-local statics:
// shared by the threads of the running block, and only one block runs at a time. Warp shuffles
// exchange through a per-warp slot array between two warp barriers.
//
// What it does not model: the memory of a real device (pointers are host pointers), warp-synchronous
// code without __sync intrinsics, fused multiply-adds that nvcc makes of plain a * b + c (compile
// with -ffp-contract=off: a kernel's explicit __f*_rn operations round alike on both), and the
// approximations of fast-math intrinsics. Compare to references with tolerances, except where a
// kernel spells out its rounding.
#pragma once

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

// Correctly rounded single operations, as the _rn intrinsics are (the build turns off contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __int_as_float(int bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}
inline float __int_as_float(unsigned int bits) { return __int_as_float(static_cast<int>(bits)); }

// bfloat16 as cuda_bf16.h's __nv_bfloat16: the top half of an f32; conversion rounds to nearest even.
struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t u = static_cast<uint32_t>(v.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

namespace emu {

constexpr unsigned int kWarp = 32;

// What the threads of the running block share.
struct Block {
    explicit Block(unsigned int threads)
        : sync(static_cast<std::ptrdiff_t>(threads)), slots((threads + kWarp - 1) / kWarp) {
        for (unsigned int w = 0; w < slots.size(); ++w) {
            unsigned int in_warp = std::min(kWarp, threads - w * kWarp);
            warps.push_back(std::make_unique<std::barrier<>>(static_cast<std::ptrdiff_t>(in_warp)));
        }
    }
    std::barrier<> sync;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::array<float, kWarp>> slots;
};

inline thread_local Block *block = nullptr;
inline thread_local unsigned int lane = 0, warp = 0;

// One value per lane in, the value of lane `src(lane)` out; lanes out of range keep their own.
template <class Src> inline float exchange(float v, Src src) {
    float *s = block->slots[warp].data();
    s[lane] = v;
    block->warps[warp]->arrive_and_wait();
    unsigned int from = src(lane);
    float r = from < kWarp ? s[from] : v;
    block->warps[warp]->arrive_and_wait();
    return r;
}

template <class... A, std::size_t... I>
void call(void (*kernel)(A...), void **args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>> *>(args[I])...);
}

// Runs `kernel` over grid × block with cuLaunchKernel's argument array.
template <class... A> void launch(void (*kernel)(A...), const unsigned int *g, const unsigned int *b, void **args) {
    // One launch at a time in the process: `__shared__` variables are statics, one per kernel.
    static std::mutex one_at_a_time;
    const std::lock_guard<std::mutex> lock(one_at_a_time);
    const dim3 grid{g[0], g[1], g[2]}, dims{b[0], b[1], b[2]};
    const unsigned int threads = dims.x * dims.y * dims.z;
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                Block shared(threads);
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned int t = 0; t < threads; ++t) {
                    pool.emplace_back([&, t] {
                        block = &shared;
                        lane = t % kWarp;
                        warp = t / kWarp;
                        threadIdx = uint3{t % dims.x, (t / dims.x) % dims.y, t / (dims.x * dims.y)};
                        blockIdx = uint3{bx, by, bz};
                        blockDim = dims;
                        gridDim = grid;
                        call(kernel, args, std::index_sequence_for<A...>{});
                        // A thread that has returned no longer takes part in barriers, as on the GPU.
                        shared.warps[warp]->arrive_and_drop();
                        shared.sync.arrive_and_drop();
                    });
                }
                for (auto &th : pool) th.join();
            }
}

}  // namespace emu

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { emu::block->warps[emu::warp]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned int, float v, int mask) {
    return emu::exchange(v, [mask](unsigned int l) { return l ^ static_cast<unsigned int>(mask); });
}
inline float __shfl_sync(unsigned int, float v, int src) {
    return emu::exchange(v, [src](unsigned int) { return static_cast<unsigned int>(src); });
}
inline float __shfl_down_sync(unsigned int, float v, unsigned int delta) {
    return emu::exchange(v, [delta](unsigned int l) { return l + delta; });
}

// `emu_launch_<name>(grid, block, args)` for the kernel `ns::name`.
#define EMU_EXPORT(ns, name)                                                                        \
    extern "C" void emu_launch_##name(const unsigned int *grid, const unsigned int *block, void **args) { \
        emu::launch(ns::name, grid, block, args);                                                    \
    }
