// Fused attention forward (FlashAttention-2 schedule, sm_80 mma.sync path).
//
//   q: (B, Sq, H, D)   k, v: (B, Sk, Hk, D)   out: (B, Sq, H, D)   lse: (B, H, Sq) fp32
//
// One CTA owns kBlockM query rows of one (b, h); each warp owns 16 of those rows and
// walks the key blocks: S = Q K^T (tensor cores), masking, online softmax (m_i, l_i in
// registers), dropout drawn in the accumulator fragment (one Philox call per thread per
// 16x16 block), acc_o += P V. K(n+1) loads while P V(n) runs, V(n) while S(n) runs.
#include "attn_config.cuh"
#include "copy_sm80.cuh"
#include "dropout.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "softmax.cuh"

using namespace cuflash;

constexpr int kLd = kHeadDim + kSmemPad;  // shared-memory row stride of Q, K, V tiles
constexpr int kNT = kBlockN / 8;          // n8 tiles of S per warp
constexpr int kDT = kHeadDim / 8;         // n8 tiles of acc_o per warp
static_assert(kBlockM == 16 * kWarps, "each warp owns 16 query rows");

extern "C" __global__ void __launch_bounds__(kThreads)
attn_fwd_kernel(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                elem_t* __restrict__ out, float* __restrict__ lse,
                STRIDE_ARGS(q), STRIDE_ARGS(k), STRIDE_ARGS(v), STRIDE_ARGS(o),
                int nheads, int group,  // group = H / Hk: query heads per kv head
                long long seqlen_q, long long seqlen_k, int head_dim,
                float scale_log2,  // softmax_scale * log2(e): scores in exp2 units
                SHARD_ARGS, RNG_ARGS) {
  STRIDES(q);
  STRIDES(k);
  STRIDES(v);
  STRIDES(o);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sK = sQ + kBlockM * kLd;
  elem_t* sV = sK + kBlockN * kLd;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long m0 = forward_query_block<kCausal>() * kBlockM;
  const int bh = blockIdx.y, b = bh / nheads, h = bh % nheads, hk = h / group;

  const elem_t* q_base = q + b * q_st.b + h * q_st.h + m0 * q_st.s;
  const elem_t* k_base = k + b * k_st.b + hk * k_st.h;
  const elem_t* v_base = v + b * v_st.b + hk * v_st.h;
  const int rows_q = block_rows<kBlockM>(seqlen_q, m0);

  const long long key_end = visible_key_end<kCausal>(m0 + kBlockM, seqlen_k, causal_diag);
  const int n_blocks = static_cast<int>((key_end + kBlockN - 1) / kBlockN);

  // acc_o: rows (lane/4, lane/4+8) x D of this warp's 16 rows; m_i, l_i per row half.
  float acc_o[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) acc_o[t][0] = acc_o[t][1] = acc_o[t][2] = acc_o[t][3] = 0.f;
  OnlineSoftmax<kNT> sm;

  // Prologue: Q and K(0) in one copy group.
  load_tile_async<kBlockM, kHeadDim, kThreads>(sQ, kLd, q_base, q_st.s, rows_q, head_dim);
  if (n_blocks > 0) {
    const int rows_k = static_cast<int>(seqlen_k < kBlockN ? seqlen_k : kBlockN);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, kLd, k_base, k_st.s, rows_k, head_dim);
  }
  cp_async_commit();

  const DropoutParams dp = make_dropout_params(seed, offset, rng_state, threshold, drop_scale);
  const long long row_lo = m0 + warp * 16 + (lane >> 2);  // this thread's first row; second is +8

  for (int nb = 0; nb < n_blocks; ++nb) {
    const long long n0 = static_cast<long long>(nb) * kBlockN;
    const int rows_kv = block_rows<kBlockN>(seqlen_k, n0);
    cp_async_wait<0>();
    __syncthreads();  // K(nb) (and Q) visible to all warps; every warp is done with V(nb-1)
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, kLd, v_base + n0 * v_st.s, v_st.s, rows_kv, head_dim);
    cp_async_commit();

    float s[kNT][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    warp_gemm_ss<elem_t, kNT, kHeadDim / 16, false, false>(s, sQ + warp * 16 * kLd, kLd, sK, kLd);

    // Masking: only blocks that cross the key end or the causal diagonal need it.
    const bool need_mask = (n0 + kBlockN > seqlen_k) ||
                           (kCausal && n0 + kBlockN - 1 > m0 + causal_diag);
    const float sc = prescale_scores<kCausal>(s, scale_log2, need_mask, row_lo, n0, lane, seqlen_k, causal_diag);
    sm.update(s, sc, acc_o);  // s becomes P (un-normalised, undropped); acc_o rescaled

    if constexpr (kDropout) {
      const unsigned R = static_cast<unsigned>((q_start + m0 + warp * 16) >> 4);  // global 16-row block
#pragma unroll
      for (int c16 = 0; c16 < kNT / 2; ++c16) {
        const unsigned C = static_cast<unsigned>(((k_start + n0) >> 4) + c16);
        const uint4 w = dropout_block_words(dp, b, h, R, C, lane);
        apply_keep(s[2 * c16], w.x, w.y, threshold);      // n8 tile 0: words 0 (rows 0-7), 1 (rows 8-15)
        apply_keep(s[2 * c16 + 1], w.z, w.w, threshold);  // n8 tile 1: words 2, 3
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V(nb) visible; every warp is done reading K(nb)
    if (nb + 1 < n_blocks) {
      const long long n1 = n0 + kBlockN;
      const int rows_k = static_cast<int>(seqlen_k - n1 < kBlockN ? seqlen_k - n1 : kBlockN);
      load_tile_async<kBlockN, kHeadDim, kThreads>(sK, kLd, k_base + n1 * k_st.s, k_st.s, rows_k, head_dim);
    }
    cp_async_commit();

    // acc_o += P V: P's accumulator fragments are the A fragments of the next mma.
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      unsigned a[4] = {pack2<elem_t>(s[2 * ks][0], s[2 * ks][1]), pack2<elem_t>(s[2 * ks][2], s[2 * ks][3]),
                       pack2<elem_t>(s[2 * ks + 1][0], s[2 * ks + 1][1]),
                       pack2<elem_t>(s[2 * ks + 1][2], s[2 * ks + 1][3])};
#pragma unroll
      for (int dt = 0; dt < kDT; dt += 2) {
        unsigned bf[4];
        ldmatrix_x4_trans(bf, sV + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLd + dt * 8 + (lane >> 4) * 8);
        mma_16816<elem_t>(acc_o[dt], a, bf[0], bf[1]);
        mma_16816<elem_t>(acc_o[dt + 1], a, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may be left in flight at exit

  // Epilogue: out = acc_o * drop_scale / l_i; lse = (m_i + log2 l_i) * ln 2.
  float row_mul[2], row_lse[2];
  sm.finalize(drop_scale, row_mul, row_lse);
  store_rows(acc_o, row_mul, row_lse, out + b * o_st.b + h * o_st.h, o_st.s,
             lse + static_cast<long long>(bh) * seqlen_q, row_lo, seqlen_q, head_dim);
}
