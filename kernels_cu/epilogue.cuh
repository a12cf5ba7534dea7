// The epilogues of the forward and of the backward, each shared by the sm_80 and sm_90a
// kernels: both hold their accumulators in the m16n8 layout (lane holds rows lane/4 and
// lane/4 + 8, columns 2(lane%4), +1 of every 8-column tile).
#pragma once

#include "attn_config.cuh"
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

// dk = softmax_scale * acc_dk and dv = dv_scale * acc_dv for this thread's two key rows (head-dim
// columns col0.. of the accumulators), in the input dtype; under GQA (dk_part not null)
// into the fp32 per-query-head slices (B, Sk, H, D) that attn_bwd_dkv_reduce_kernel sums.
//   key_lo: this thread's first key row (its second is key_lo + 8)
template <typename T, int DT>
__device__ __forceinline__ void store_dkv_rows(const float (&acc_dk)[DT][4], const float (&acc_dv)[DT][4],
                                               long long key_lo, int col0, T* dk, T* dv, float* dk_part,
                                               float* dv_part, const Strides& dkv_st, int b, int h, int hk,
                                               int nheads, long long seqlen_k, int head_dim, float softmax_scale,
                                               float dv_scale) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < DT; ++t)
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const long long j = key_lo + 8 * rh;
      const int d = col0 + 8 * t + 2 * (lane & 3);
      if (j >= seqlen_k || d >= head_dim) continue;  // key tail, padded head dim
      const float k0 = acc_dk[t][2 * rh] * softmax_scale, k1 = acc_dk[t][2 * rh + 1] * softmax_scale;
      const float v0 = acc_dv[t][2 * rh] * dv_scale, v1 = acc_dv[t][2 * rh + 1] * dv_scale;
      if (dk_part) {  // GQA: one fp32 slice per query head, summed in a fixed order later
        const long long o = ((static_cast<long long>(b) * seqlen_k + j) * nheads + h) * head_dim + d;
        *reinterpret_cast<float2*>(dk_part + o) = make_float2(k0, k1);
        *reinterpret_cast<float2*>(dv_part + o) = make_float2(v0, v1);
      } else {
        const long long o = b * dkv_st.b + j * dkv_st.s + hk * dkv_st.h + d;
        *reinterpret_cast<unsigned*>(dk + o) = pack2<T>(k0, k1);
        *reinterpret_cast<unsigned*>(dv + o) = pack2<T>(v0, v1);
      }
    }
}

}  // namespace cuflash
