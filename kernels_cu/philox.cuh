// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11),
// written to be bit-identical to curand's curand_Philox4x32_10(ctr, key): the same
// round function, the same constants, the same key schedule. tests/test_gpu_mask.py
// checks it against curand_kernel.h on a GPU, and cuflash/rng.py is its NumPy twin.
//
// An inline copy (rather than curand_kernel.h itself) keeps the attention kernels free
// of curand's ~200 KB of skip-ahead tables and of its host-side includes.
#pragma once

namespace cuflash {

constexpr unsigned kPhiloxM0 = 0xD2511F53u;  // round multiplier applied to ctr.x
constexpr unsigned kPhiloxM1 = 0xCD9E8D57u;  // round multiplier applied to ctr.z
constexpr unsigned kPhiloxW0 = 0x9E3779B9u;  // key.x increment between rounds (golden ratio)
constexpr unsigned kPhiloxW1 = 0xBB67AE85u;  // key.y increment between rounds (sqrt(3) - 1)
constexpr int kPhiloxRounds = 10;

// lo, hi = the 64-bit product a * M, as one IMAD.WIDE.U32. Written in PTX because the C++
// forms cost twice that (SASS of the H100 forward, 2026-11-25): ((u64)M * a) >> 32 let
// NVVM widen the whole round to 64-bit arithmetic, and ptxas then added a no-op VIADD and a
// UMOV of zero to every product; __umulhi(a, M) with a * M became IMAD.HI + IMAD.
// (hd128 forward with dropout, S = 4k: 272 TFLOP/s with this, 247 with __umulhi.)
template <unsigned M>
__device__ __forceinline__ void philox_mul_wide(unsigned a, unsigned& lo, unsigned& hi) {
  asm("{\n\t.reg .b64 prod;\n\tmul.wide.u32 prod, %2, %3;\n\tmov.b64 {%0, %1}, prod;\n\t}"
      : "=r"(lo), "=r"(hi)
      : "r"(a), "n"(M));
}

// One 128-bit block: ctr = (x, y, z, w), key = (seed low 32 bits, seed high 32 bits).
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      key.x += kPhiloxW0;
      key.y += kPhiloxW1;
    }
    unsigned lo0, hi0, lo1, hi1;
    philox_mul_wide<kPhiloxM0>(ctr.x, lo0, hi0);
    philox_mul_wide<kPhiloxM1>(ctr.z, lo1, hi1);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

}  // namespace cuflash
