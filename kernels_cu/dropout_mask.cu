// dropout_mask(): the keep mask as a (B, H, Sq, Sk) uint8 array (1 = kept).
// Exists so users (and tests) can see the exact mask the attention kernels apply.
// Thread layout mirrors the attention kernels: one thread per (16x16 block, lane),
// one Philox call, eight elements written. The three kernels reach the mask by the three
// routes the kernels use (the accumulator fragment: the forwards and the sm_80 backward;
// keep bits of the transposed fragment with its lane-pair swap: the Hopper backward; the
// element-wise definition: dropout_keep), so a test that compares each with the NumPy twin
// checks every route.
#include "dropout.cuh"

extern "C" __global__ void dropout_mask_kernel(unsigned char* __restrict__ out,  // (B, H, Sq, Sk)
                                               int B, int H, long long Sq, int Sk,
                                               unsigned long long seed, unsigned offset,
                                               unsigned threshold) {
  using namespace cuflash;
  const long long nC = (static_cast<long long>(Sk) + 15) / 16;  // Sk near 2^31 must not overflow int
  const long long t = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // (C, lane)
  if (t >= nC * 32) return;  // tail of the last thread block
  const unsigned lane = static_cast<unsigned>(t & 31);
  const unsigned C = static_cast<unsigned>(t >> 5);
  const unsigned R = blockIdx.y;
  const unsigned bh = blockIdx.z;
  const unsigned b = bh / H, h = bh % H;
  DropoutParams dp{seed, offset, threshold, 1.0f};
  const uint4 w = dropout_block_words(dp, b, h, R, C, lane);
  const unsigned words[4] = {w.x, w.y, w.z, w.w};
  unsigned char* base = out + static_cast<long long>(bh) * Sq * Sk;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {  // row half: rows lane/4 and lane/4 + 8
    const long long i = 16LL * R + (lane >> 2) + 8 * rh;
    if (i >= Sq) continue;  // last row block may be partial
#pragma unroll
    for (int n8 = 0; n8 < 2; ++n8) {  // 8-column tile of the 16x16 block
      const unsigned keep = dropout_pair_keep(words[2 * n8 + rh], threshold);
      const int j = 16 * C + 8 * n8 + 2 * (lane & 3);
      if (j < Sk) base[i * Sk + j] = keep & 1u;          // column may fall past Sk
      if (j + 1 < Sk) base[i * Sk + j + 1] = keep >> 1;
    }
  }
}

// The same mask element by element from dropout_keep(): a second path through the
// definition, used by the tests to check the fragment path above against it.
extern "C" __global__ void dropout_mask_elementwise_kernel(unsigned char* __restrict__ out,
                                                           int B, int H, long long Sq, int Sk,
                                                           unsigned long long seed, unsigned offset,
                                                           unsigned threshold) {
  using namespace cuflash;
  const long long n = static_cast<long long>(B) * H * Sq * Sk;
  DropoutParams dp{seed, offset, threshold, 1.0f};
  for (long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const unsigned j = static_cast<unsigned>(e % Sk);
    const long long i = (e / Sk) % Sq;
    const unsigned bh = static_cast<unsigned>(e / (Sk * Sq));
    out[e] = dropout_keep(dp, bh / H, bh % H, i, j) ? 1 : 0;
  }
}

// The same mask through the Hopper backward's route: one warp per 16x16 block (R, C) of
// (b, h), lane t drawing call dropout_t_lane(t) and keeping, after the pair swap, the 8
// elements of the transposed accumulator fragment: keys 16 C + hc * 8 + t/4, queries
// 16 R + 8 n8 + 2 (t%4) + e (bit 4 n8 + 2 hc + e).
extern "C" __global__ void dropout_mask_transposed_kernel(unsigned char* __restrict__ out,
                                                          int B, int H, long long Sq, int Sk,
                                                          unsigned long long seed, unsigned offset,
                                                          unsigned threshold) {
  using namespace cuflash;
  const unsigned lane = threadIdx.x & 31;  // blockDim.x == 32: every lane takes part in the shuffles
  const unsigned C = blockIdx.x, R = blockIdx.y, bh = blockIdx.z;
  DropoutParams dp{seed, offset, threshold, 1.0f};
  const unsigned bits = dropout_block_keep_t(dp, bh / H, bh % H, R, C, lane);
  unsigned char* base = out + static_cast<long long>(bh) * Sq * Sk;
#pragma unroll
  for (int n8 = 0; n8 < 2; ++n8)
#pragma unroll
    for (int hc = 0; hc < 2; ++hc)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const long long i = 16LL * R + 8 * n8 + 2 * (lane & 3) + e;
        const long long j = 16LL * C + 8 * hc + (lane >> 2);
        if (i < Sq && j < Sk) base[i * Sk + j] = (bits >> (4 * n8 + 2 * hc + e)) & 1u;  // edge blocks
      }
}
