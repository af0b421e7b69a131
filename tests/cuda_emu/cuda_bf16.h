// Stands in for CUDA's cuda_bf16.h in the CPU emulation: __nv_bfloat16 and its conversions are in
// cuda_emu.h, which the build forces in before every kernel source.
#pragma once
#include "cuda_emu.h"
