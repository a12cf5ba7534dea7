// The backward's small kernels, shared by the sm_80 (attn_bwd.cu) and sm_90a
// (attn_bwd_sm90.cu) variants: delta before the main kernel, the dq cast (and split sum)
// and the GQA dk/dv reduction after it.
#pragma once

#include "attn_config.cuh"
#include "mma_sm80.cuh"

using namespace cuflash;

// Key block of step t of a main-kernel CTA's walk. Steps go in rounds of gridDim.x blocks,
// forward in even rounds and backward in odd ones: with one CTA per key block (the default
// launch) step 0 is block blockIdx.x and the only one. In a deterministic launch (gridDim.x
// = dQ splits) the back-and-forth pairs, under causal masking, the long key blocks (seen by
// many query blocks) with short ones in every CTA; a plain stride gave CTA 0 the longest
// block of every round (hd 128, S = 4k, 2 splits: 544 vs 512 query blocks). The last round
// may pass n_kblocks; callers skip those steps.
__device__ __forceinline__ int walk_key_block(int t) {
  const int n = static_cast<int>(gridDim.x), c = static_cast<int>(blockIdx.x);
  return t * n + ((t & 1) ? n - 1 - c : c);
}

// delta = rowsum(dO ∘ O) in fp32, one warp per (b, h, row): (B, H, Sq).
extern "C" __global__ void attn_bwd_delta_kernel(const elem_t* __restrict__ dout, const elem_t* __restrict__ out,
                                                 float* __restrict__ delta, STRIDE_ARGS(do), STRIDE_ARGS(o),
                                                 int nheads, long long seqlen_q, int head_dim, long long rows) {
  STRIDES(do);
  STRIDES(o);

  const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps exit together
  const long long i = row % seqlen_q;
  const int bh = static_cast<int>(row / seqlen_q), b = bh / nheads, h = bh % nheads;
  const elem_t* a = dout + b * do_st.b + h * do_st.h + i * do_st.s;
  const elem_t* o = out + b * o_st.b + h * o_st.h + i * o_st.s;
  float acc = 0.f;
  for (int d = lane; d < head_dim; d += 32) acc += to_float(a[d]) * to_float(o[d]);
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (lane == 0) delta[row] = acc;
}

// dq = softmax_scale * (sum over splits of dq_accum), cast to the input dtype:
// (splits, B, H, Sq, kHeadDim) fp32 -> (B, Sq, H, D). The splits are summed in index order,
// so a deterministic backward stays bitwise reproducible.
extern "C" __global__ void attn_bwd_dq_kernel(const float* __restrict__ dq_accum, elem_t* __restrict__ dq,
                                              STRIDE_ARGS(dq), int nheads, long long seqlen_q, int head_dim,
                                              float softmax_scale, long long total, int splits,
                                              long long split_stride) {
  STRIDES(dq);

  const long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // one pair of columns
  if (e >= total) return;
  const int pairs = head_dim / 2;
  const int d = static_cast<int>(e % pairs) * 2;
  const long long row = e / pairs, i = row % seqlen_q;
  const int bh = static_cast<int>(row / seqlen_q), b = bh / nheads, h = bh % nheads;
  const float* src = dq_accum + row * kHeadDim + d;
  float2 acc = *reinterpret_cast<const float2*>(src);
  for (int sp = 1; sp < splits; ++sp) {
    const float2 part = *reinterpret_cast<const float2*>(src + sp * split_stride);
    acc.x += part.x;
    acc.y += part.y;
  }
  *reinterpret_cast<unsigned*>(dq + b * dq_st.b + i * dq_st.s + h * dq_st.h + d) =
      pack2<elem_t>(acc.x * softmax_scale, acc.y * softmax_scale);
}

// GQA: dk[b, j, hk] = sum over the group's query heads of dk_part[b, j, h], in head order.
extern "C" __global__ void attn_bwd_dkv_reduce_kernel(const float* __restrict__ dk_part,
                                                      const float* __restrict__ dv_part, elem_t* __restrict__ dk,
                                                      elem_t* __restrict__ dv, STRIDE_ARGS(dkv), int nheads,
                                                      int group, long long seqlen_k, int head_dim, long long total) {
  STRIDES(dkv);

  const long long e = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;  // over (B, Sk, Hk, D)
  if (e >= total) return;
  const int nheads_k = nheads / group;
  const int d = static_cast<int>(e % head_dim);
  const int hk = static_cast<int>((e / head_dim) % nheads_k);
  const long long bj = e / (static_cast<long long>(head_dim) * nheads_k);  // b * Sk + j
  float sk = 0.f, sv = 0.f;
  for (int g = 0; g < group; ++g) {  // fixed order: bitwise reproducible
    const long long o = (bj * nheads + hk * group + g) * head_dim + d;
    sk += dk_part[o];
    sv += dv_part[o];
  }
  const long long b = bj / seqlen_k, j = bj % seqlen_k;
  const long long o = b * dkv_st.b + j * dkv_st.s + hk * dkv_st.h + d;
  dk[o] = static_cast<elem_t>(sk);
  dv[o] = static_cast<elem_t>(sv);
}
