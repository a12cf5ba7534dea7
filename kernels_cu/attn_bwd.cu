// Fused attention backward (FlashAttention-2 schedule, sm_80 mma.sync path).
//
//   q, dout: (B, Sq, H, D)   k, v: (B, Sk, Hk, D)   lse, delta: (B, H, Sq) fp32
//   dq_accum: (splits, B, H, Sq, kHeadDim) fp32, zeroed; dk, dv: (B, Sk, Hk, D) in the input
//   dtype, or, under GQA (group > 1), dk_part/dv_part: (B, Sk, H, D) fp32, reduced afterwards.
//
// A CTA owns key blocks of one (b, h) (walk_key_block: rounds of gridDim.x blocks): kBlockN
// keys each, walking the query blocks that see them. The default launch has one CTA per key
// block, all adding dQ into split 0 with fp32 atomics (order varies run to run). The
// deterministic launch has gridDim.x = splits CTAs per (b, h), CTA s adding only into
// split s (dq_split_stride apart): every dQ element of a split then has one writer thread,
// which adds in program order, and attn_bwd_dq_kernel sums the splits in index order.
// Per query block: S = Q K^T, P = exp(S*scale - lse), dP = dO V^T, the forward's dropout
// mask regenerated from (seed, offset) in the same fragment layout, then
//   dV += (P∘keep·s)^T dO,  dS = P∘(dP∘keep·s − delta),  dK += dS^T Q,  dQ += dS K.
// Warps: warp = rs + 4*dh. rs picks 16 query rows (for S, dP, dQ) or 16 key rows (for
// dK, dV); dh picks a slice of the keys (S, dP) or of the head dim (dK, dV, dQ), so
// head dim 256 splits its accumulators over two warps.
#include "attn_config.cuh"
#include "copy_sm80.cuh"
#include "attn_bwd_aux.cuh"
#include "dropout.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "softmax.cuh"

using namespace cuflash;

constexpr int kQStages = CUFLASH_Q_STAGES;     // shared-memory stages of the Q and dO tiles
constexpr int kWD = kWarps / 4;                  // warps sharing one 16-row slice
constexpr int kLd = kHeadDim + kSmemPad;         // row stride of Q, dO, K, V tiles
constexpr int kLdP = kBlockN + kSmemPad;         // row stride of the P and dS tiles
constexpr int kSN = kBlockN / kWD;               // keys per warp in S and dP
constexpr int kDN = kHeadDim / kWD;              // head-dim columns per warp in dK, dV, dQ
constexpr int kDQChunk = kDN % 32 == 0 ? 32 : 16;  // dQ columns per pass (bounds live registers)
static_assert(kQStages == 1 || kQStages == 2, "single or double buffered Q/dO");
static_assert(kWarps % 4 == 0 && kBlockM == 64 && kBlockN == 16 * 4, "4 row slices of 16");
static_assert(kSN % 16 == 0 && kDN % 16 == 0 && kDN % kDQChunk == 0, "whole 16-wide mma/dropout blocks");

extern "C" __global__ void __launch_bounds__(kThreads)
attn_bwd_kernel(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                float* __restrict__ dq_accum, elem_t* __restrict__ dk, elem_t* __restrict__ dv,
                float* __restrict__ dk_part, float* __restrict__ dv_part,
                long long dq_split_stride,  // elements between splits: 0 (default) or B*H*Sq*kHeadDim
                STRIDE_ARGS(q), STRIDE_ARGS(k), STRIDE_ARGS(v), STRIDE_ARGS(do), STRIDE_ARGS(dkv),
                int nheads, int group, long long seqlen_q, long long seqlen_k, int head_dim,
                float scale_log2, float softmax_scale, SHARD_ARGS, RNG_ARGS) {
  STRIDES(q);
  STRIDES(k);
  STRIDES(v);
  STRIDES(do);
  STRIDES(dkv);

  extern __shared__ __align__(16) unsigned char smem_raw[];
  elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sV = sK + kBlockN * kLd;
  elem_t* sQ0 = sV + kBlockN * kLd;  // kQStages stages of (Q, dO): block mb+1 loads while mb computes
  elem_t* sP = sQ0 + 2 * kQStages * kBlockM * kLd;  // P∘keep·s, [query][key]
  elem_t* sdS = sP + kBlockM * kLdP;  // dS, [query][key]
  float* sLse = reinterpret_cast<float*>(sdS + kBlockM * kLdP);  // lse * log2 e (+inf: empty row)
  float* sDelta = sLse + kBlockM;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rs = warp & 3, dh = warp >> 2;
  const int bh = blockIdx.y, b = bh / nheads, h = bh % nheads, hk = h / group;
  const int n_mblocks = static_cast<int>((seqlen_q + kBlockM - 1) / kBlockM);
  const int n_kblocks = static_cast<int>((seqlen_k + kBlockN - 1) / kBlockN);
  const DropoutParams dp = make_dropout_params(seed, offset, rng_state, threshold, drop_scale);
  float* dq_split = dq_accum + blockIdx.x * dq_split_stride;

  for (int t = 0; t * static_cast<int>(gridDim.x) < n_kblocks; ++t) {
    const int nb = walk_key_block(t);
    if (nb >= n_kblocks) continue;  // the last round's tail (uniform across the CTA)
    const long long n0 = static_cast<long long>(nb) * kBlockN;
    const int rows_kv = block_rows<kBlockN>(seqlen_k, n0);

    load_tile_async<kBlockN, kHeadDim, kThreads>(sK, kLd, k + b * k_st.b + hk * k_st.h + n0 * k_st.s, k_st.s,
                                                 rows_kv, head_dim);
    load_tile_async<kBlockN, kHeadDim, kThreads>(sV, kLd, v + b * v_st.b + hk * v_st.h + n0 * v_st.s, v_st.s,
                                                 rows_kv, head_dim);
    cp_async_commit();

    float acc_dk[kDN / 8][4], acc_dv[kDN / 8][4];
#pragma unroll
    for (int t = 0; t < kDN / 8; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[t][e] = acc_dv[t][e] = 0.f;

    const long long first_q = first_query_seeing<kCausal>(n0, causal_diag);
    const int m_begin = static_cast<int>(first_q / kBlockM);

    // Q and dO of query block mb into stage st (Q at sQ0 + 2 st tiles, dO right after).
    auto load_q_do = [&](int mb, int st) {
      const long long m0 = static_cast<long long>(mb) * kBlockM;
      const int rows_q = block_rows<kBlockM>(seqlen_q, m0);
      elem_t* sq = sQ0 + 2 * st * kBlockM * kLd;
      load_tile_async<kBlockM, kHeadDim, kThreads>(sq, kLd, q + b * q_st.b + h * q_st.h + m0 * q_st.s, q_st.s,
                                                   rows_q, head_dim);
      load_tile_async<kBlockM, kHeadDim, kThreads>(sq + kBlockM * kLd, kLd,
                                                   dout + b * do_st.b + h * do_st.h + m0 * do_st.s, do_st.s, rows_q,
                                                   head_dim);
    };
    if (kQStages == 2 && m_begin < n_mblocks) load_q_do(m_begin, 0);
    cp_async_commit();

    for (int mb = m_begin; mb < n_mblocks; ++mb) {
      const long long m0 = static_cast<long long>(mb) * kBlockM;
      const int rows_q = block_rows<kBlockM>(seqlen_q, m0);
      const int st = kQStages == 2 ? (mb - m_begin) & 1 : 0;
      const elem_t* sQ = sQ0 + 2 * st * kBlockM * kLd;
      const elem_t* sdO = sQ + kBlockM * kLd;
      // Two stages: prefetch block mb+1 into the other one (the barrier that ended block mb-1
      // freed it). One stage (GPUs with less shared memory): load block mb now.
      if (kQStages == 1) {
        load_q_do(mb, 0);
      } else if (mb + 1 < n_mblocks) {
        load_q_do(mb + 1, st ^ 1);
      }
      cp_async_commit();
      for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
        const long long i = m0 + r;
        const float l = i < seqlen_q ? lse[static_cast<long long>(bh) * seqlen_q + i] : CUFLASH_INF;
        // An empty row (lse = -inf) or a tail row gets +inf, so P = exp2(-inf or x - inf) = 0.
        sLse[r] = l == -CUFLASH_INF ? CUFLASH_INF : l * kLog2e;
        sDelta[r] = i < seqlen_q ? delta[static_cast<long long>(bh) * seqlen_q + i] : 0.f;
      }
      cp_async_wait<kQStages - 1>();  // block mb's Q and dO (and K, V) have landed; mb+1's may be in flight
      __syncthreads();  // Q, dO, lse, delta (and K, V on the first pass) visible to all warps

      // S and dP for rows rs*16.. (queries) x keys dh*kSN..
      float s[kSN / 8][4], dpv[kSN / 8][4];
#pragma unroll
      for (int t = 0; t < kSN / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[t][e] = dpv[t][e] = 0.f;
      warp_gemm_ss<elem_t, kSN / 8, kHeadDim / 16, false, false>(s, sQ + rs * 16 * kLd, kLd, sK + dh * kSN * kLd, kLd);
      warp_gemm_ss<elem_t, kSN / 8, kHeadDim / 16, false, false>(dpv, sdO + rs * 16 * kLd, kLd, sV + dh * kSN * kLd,
                                                                 kLd);

      const int r_lo = rs * 16 + (lane >> 2);
      const long long j_base = n0 + dh * kSN;
#pragma unroll
      for (int t = 0; t < kSN / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = r_lo + 8 * (e >> 1);
          const long long j = j_base + 8 * t + 2 * (lane & 3) + (e & 1);
          const bool vis = score_visible<kCausal>(m0 + r, j, seqlen_k, causal_diag);
          s[t][e] = vis ? fast_exp2(fmaf(s[t][e], scale_log2, -sLse[r])) : 0.f;  // P
        }
      // pd = P∘keep (the forward's weights of V but for the factor s = 1 / keep probability,
      // which dV takes once in the epilogue), and dpv = dP∘keep·s
      float pd[kSN / 8][4];
#pragma unroll
      for (int t = 0; t < kSN / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          pd[t][e] = s[t][e];
          if constexpr (kDropout) dpv[t][e] *= drop_scale;
        }
      if constexpr (kDropout) {
        const unsigned R = static_cast<unsigned>((q_start + m0 + rs * 16) >> 4);  // global 16-row block
#pragma unroll
        for (int c16 = 0; c16 < kSN / 16; ++c16) {
          const unsigned C = static_cast<unsigned>(((k_start + j_base) >> 4) + c16);
          const uint4 w = dropout_block_words(dp, b, h, R, C, lane);
          apply_keep(pd[2 * c16], w.x, w.y, threshold);
          apply_keep(pd[2 * c16 + 1], w.z, w.w, threshold);
          apply_keep(dpv[2 * c16], w.x, w.y, threshold);
          apply_keep(dpv[2 * c16 + 1], w.z, w.w, threshold);
        }
      }
#pragma unroll
      for (int t = 0; t < kSN / 8; ++t)
#pragma unroll
        for (int rh = 0; rh < 2; ++rh) {
          const int r = r_lo + 8 * rh;
          const int c = dh * kSN + 8 * t + 2 * (lane & 3);
          const float dl = sDelta[r];
          *reinterpret_cast<unsigned*>(sP + r * kLdP + c) = pack2<elem_t>(pd[t][2 * rh], pd[t][2 * rh + 1]);
          *reinterpret_cast<unsigned*>(sdS + r * kLdP + c) =
              pack2<elem_t>(s[t][2 * rh] * (dpv[t][2 * rh] - dl), s[t][2 * rh + 1] * (dpv[t][2 * rh + 1] - dl));
        }
      __syncthreads();  // P and dS tiles complete before any warp reads them transposed

      // dV += Pd^T dO and dK += dS^T Q for key rows rs*16.., head-dim columns dh*kDN..
      warp_gemm_ss<elem_t, kDN / 8, kBlockM / 16, true, true>(acc_dv, sP + rs * 16, kLdP, sdO + dh * kDN, kLd);
      warp_gemm_ss<elem_t, kDN / 8, kBlockM / 16, true, true>(acc_dk, sdS + rs * 16, kLdP, sQ + dh * kDN, kLd);

      // dQ += dS K for query rows rs*16.., head-dim columns dh*kDN.., kDQChunk at a time.
      float* dq_rows = dq_split + (static_cast<long long>(bh) * seqlen_q + m0) * kHeadDim;
#pragma unroll
      for (int c0 = 0; c0 < kDN; c0 += kDQChunk) {
        float acc_dq[kDQChunk / 8][4];
#pragma unroll
        for (int t = 0; t < kDQChunk / 8; ++t) acc_dq[t][0] = acc_dq[t][1] = acc_dq[t][2] = acc_dq[t][3] = 0.f;
        warp_gemm_ss<elem_t, kDQChunk / 8, kBlockN / 16, false, true>(acc_dq, sdS + rs * 16 * kLdP, kLdP,
                                                                       sK + dh * kDN + c0, kLd);
#pragma unroll
        for (int t = 0; t < kDQChunk / 8; ++t)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = r_lo + 8 * (e >> 1);
            if (r >= rows_q) continue;  // tail rows of the last query block
            const int d = dh * kDN + c0 + 8 * t + 2 * (lane & 3) + (e & 1);
            float* dst = dq_rows + static_cast<long long>(r) * kHeadDim + d;
            atomicAdd(dst, acc_dq[t][e]);
          }
      }
      __syncthreads();  // every warp is done with Q, dO, P, dS before the next block overwrites them
    }
    cp_async_wait<0>();  // K, V copies must land even if no query block touched them

    // Epilogue: dK = softmax_scale * dS^T Q, dV = drop_scale * (P keep)^T dO; zero when nothing saw these keys.
    store_dkv_rows<elem_t, kDN / 8>(acc_dk, acc_dv, n0 + rs * 16 + (lane >> 2), dh * kDN, dk, dv, dk_part, dv_part,
                                    dkv_st, b, h, hk, nheads, seqlen_k, head_dim, softmax_scale, drop_scale);
  }  // key blocks: the m loop ended on a barrier, so the next block's K/V loads may overwrite sK, sV
}
