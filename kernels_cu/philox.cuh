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

// One 128-bit block: ctr = (x, y, z, w), key = (seed low 32 bits, seed high 32 bits).
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    if (round > 0) {
      key.x += kPhiloxW0;
      key.y += kPhiloxW1;
    }
    // one 32x32->64 multiply each (IMAD.WIDE.U32), as curand's __umulhi + a*b pair
    const unsigned long long p0 = static_cast<unsigned long long>(kPhiloxM0) * ctr.x;
    const unsigned long long p1 = static_cast<unsigned long long>(kPhiloxM1) * ctr.z;
    const unsigned hi0 = static_cast<unsigned>(p0 >> 32), lo0 = static_cast<unsigned>(p0);
    const unsigned hi1 = static_cast<unsigned>(p1 >> 32), lo1 = static_cast<unsigned>(p1);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

}  // namespace cuflash
