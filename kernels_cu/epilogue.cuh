// The forward's epilogue, shared by the sm_80 and sm_90a kernels: both hold acc_o in the
// m16n8 accumulator layout (lane holds rows lane/4 and lane/4 + 8, columns 2(lane%4), +1
// of every 8-column tile).
#pragma once

#include "mma_sm80.cuh"

namespace cuflash {

// out[i, :] = acc_o * row_mul and lse[i] = row_lse for this thread's two rows.
//   o_rows: (Sq, D) slice of out for this (b, h), row stride o_row_stride elements
//   lse_rows: (Sq,) slice of lse for this (b, h); row_lo: this thread's first row
template <typename T, int DT>
__device__ __forceinline__ void store_rows(const float (&acc_o)[DT][4], const float (&row_mul)[2],
                                           const float (&row_lse)[2], T* o_rows, long long o_row_stride,
                                           float* lse_rows, long long row_lo, long long seqlen_q, int head_dim) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const long long i = row_lo + 8 * rh;
    if (i >= seqlen_q) continue;  // tail rows of the last query block
    T* o_row = o_rows + i * o_row_stride;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      const int d = dt * 8 + 2 * (lane & 3);
      if (d < head_dim)  // padded head dims are computed but not stored
        *reinterpret_cast<unsigned*>(o_row + d) =
            pack2<T>(acc_o[dt][2 * rh] * row_mul[rh], acc_o[dt][2 * rh + 1] * row_mul[rh]);
    }
    if ((lane & 3) == 0) lse_rows[i] = row_lse[rh];  // one lane of the quad writes the row's lse
  }
}

}  // namespace cuflash
