// Compile-time configuration of one attention kernel variant. Every value comes from
// Python (cuflash/_config.py) as a -D macro; this file only turns them into constexprs
// and checks them. Nothing else in kernels_cu/ restates a tile size.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <math.h> (no INFINITY) and no constexpr route to +inf: the infinity the
// masks and guards use, as the bit pattern 0x7f800000.
#define CUFLASH_INF __int_as_float(0x7f800000)

#ifndef CUFLASH_DTYPE_BF16
#error "CUFLASH_DTYPE_BF16 must come from cuflash/_config.py"
#endif

namespace cuflash {

#if CUFLASH_DTYPE_BF16
using elem_t = __nv_bfloat16;
#else
using elem_t = __half;
#endif

constexpr int kHeadDim = CUFLASH_HEAD_DIM;     // padded head dim this variant computes
constexpr int kBlockM = CUFLASH_BLOCK_M;       // query rows per CTA tile
constexpr int kBlockN = CUFLASH_BLOCK_N;       // key rows per CTA tile
constexpr int kWarps = CUFLASH_WARPS;
constexpr int kThreads = 32 * kWarps;
constexpr int kMinBlocks = CUFLASH_MIN_BLOCKS;  // CTAs per SM (Hopper kernels' __launch_bounds__)
constexpr int kVStages = CUFLASH_V_STAGES;      // shared-memory stages of V (Hopper forward)
constexpr bool kCausal = CUFLASH_CAUSAL != 0;
constexpr bool kDropout = CUFLASH_DROPOUT != 0;
constexpr int kSmemPad = 8;  // elements (16 bytes) per row: ldmatrix rows land in distinct banks

static_assert(kHeadDim % 16 == 0 && kHeadDim <= 256, "head dim is padded to a multiple of 16, at most 256");
static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "tiles are whole 16x16 mma/dropout blocks");

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows of the kRows-row block that starts at row0 which exist in a sequence of len rows:
// kRows, except in the last block of a sequence that is not a multiple of the tile.
template <int kRows>
__device__ __forceinline__ int block_rows(long long len, long long row0) {
  return static_cast<int>(len - row0 < kRows ? len - row0 : kRows);
}

// Strides in elements; every tensor's last dim is contiguous (checked in Python).
struct Strides {
  long long b, s, h;
};

}  // namespace cuflash

// Kernels take each tensor's strides as three scalars (CuPy passes scalars, not structs)
// and rebuild the struct inside: STRIDE_ARGS(q) in the signature, STRIDES(q) in the body.
#define STRIDE_ARGS(t) long long t##_sb, long long t##_ss, long long t##_sh
#define STRIDES(t) const cuflash::Strides t##_st{t##_sb, t##_ss, t##_sh}

// Every attention kernel's trailing arguments: where the launch sits in the global
// problem (mask.cuh: q_start and k_start are the global row and column of local (0, 0),
// multiples of 16; causal_diag the local diagonal) and its dropout stream (dropout.cuh).
#define SHARD_ARGS long long q_start, long long k_start, long long causal_diag
#define RNG_ARGS \
  unsigned long long seed, unsigned offset, const unsigned long long *rng_state, unsigned threshold, float drop_scale
