// Test-vector kernels (tests only): curand's own Philox4x32-10 stream, and cuflash's
// inline philox4x32_10() on the same inputs, so a GPU can show the two bit-identical.
#include <curand_kernel.h>

#include "philox.cuh"

// cases[c] = (seed, subsequence, offset); out[c * count + k] = k-th curand4() after curand_init.
extern "C" __global__ void curand_philox_stream(const unsigned long long* __restrict__ cases,
                                                int n_cases, int count, uint4* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n_cases) return;
  curandStatePhilox4_32_10_t state;
  curand_init(cases[3 * c], cases[3 * c + 1], cases[3 * c + 2], &state);
  for (int k = 0; k < count; ++k) out[static_cast<long long>(c) * count + k] = curand4(&state);
}

// Block function on raw (counter, key) pairs: curand's and cuflash's side by side.
extern "C" __global__ void philox_block_pair(const uint4* __restrict__ ctr, const uint2* __restrict__ key,
                                             int n, uint4* __restrict__ by_curand,
                                             uint4* __restrict__ by_cuflash) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  by_curand[e] = curand_Philox4x32_10(ctr[e], key[e]);
  by_cuflash[e] = cuflash::philox4x32_10(ctr[e], key[e]);
}
