// Online softmax over the accumulator fragment (FlashAttention-2, Alg. 1): per row the
// running max m_i (in exp2 units: scores * softmax_scale * log2 e) and this thread's
// partial row sum l_i; the 4 lanes of a quad share a row, so row reductions are two
// xor-shuffles.
#pragma once

#include "mask.cuh"

namespace cuflash {

// 2^x on the MUFU unit alone (ex2.approx.ftz.f32). exp2f() wraps the same MUFU.EX2 in a
// range test and two multiplies per call so that results below 2^-126 come out as
// denormals (FSETP + 2 FMUL in the H100 SASS, 2026-11-25: a third of the forward's
// instructions without dropout). Here they flush to 0: a probability below 2^-126 of
// the row's largest one changes no fp32 row sum and no fp16/bf16 operand.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Readies the scores of one key block (m16n8 accumulator layout: n8 tile t, element e at
// row row_lo + 8 (e >> 1), column n0 + 8 t + 2 (lane % 4) + (e & 1)) for OnlineSoftmax and
// returns the scale its update takes. Most blocks go in raw, with scale_log2. Those that
// cross the key end or the causal diagonal (need_mask), and all of them under a negative
// scale, are multiplied into exp2 units here, the invisible scores set to -inf, and the
// update takes scale 1: a masked -inf times a zero or negative scale would be NaN or +inf.
template <bool CAUSAL, int NT>
__device__ __forceinline__ float prescale_scores(float (&s)[NT][4], float scale_log2, bool need_mask,
                                                 long long row_lo, long long n0, int lane, long long seqlen_k,
                                                 long long causal_diag) {
  if (!need_mask && scale_log2 >= 0.f) return scale_log2;
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const long long i = row_lo + 8 * (e >> 1), j = n0 + 8 * t + 2 * (lane & 3) + (e & 1);
      const bool visible = !need_mask || score_visible<CAUSAL>(i, j, seqlen_k, causal_diag);
      s[t][e] = visible ? s[t][e] * scale_log2 : -CUFLASH_INF;
    }
  return 1.f;
}

// exp2 units a lazily kept row max may lag the true one (OnlineSoftmax::update_scores).
constexpr float kLazySlack = 8.f;

template <int NT>
struct OnlineSoftmax {
  float m[2] = {-CUFLASH_INF, -CUFLASH_INF};  // row max so far, rows lane/4 and lane/4 + 8
  float l[2] = {0.f, 0.f};              // this thread's part of the row sum

  // s: the scores of one key block, in exp2 units once multiplied by scale_log2, which
  // must be >= 0: the row max is taken over s and then scaled, and each p is one FFMA and
  // one MUFU (exp2(s * scale_log2 - m)). A block with masked scores, or any block under a
  // negative scale, comes pre-scaled (masked ones -inf) with scale_log2 = 1: see
  // prescale_scores. On return s holds p = exp2(s * scale_log2 - m_new) and acc has been
  // rescaled by exp2(m_old - m_new).
  template <int DT>
  __device__ __forceinline__ void update(float (&s)[NT][4], float scale_log2, float (&acc)[DT][4]) {
    float corr[2];
    update_scores(s, scale_log2, corr);
    rescale(acc, corr);
  }

  // The two halves of update(), for a caller that must rescale acc later (the Hopper
  // kernel: acc may still be an operand of an in-flight wgmma while the scores are done).
  //
  // kLazy (FlashAttention-4's conditional rescaling): when no row of the warp has a new max
  // more than kLazySlack above the one in use, keep the old max for every row of the warp:
  // corr is 1, l and acc need no rescale, and p = exp2(s * scale - m) may reach 2^kLazySlack
  // (256; fp16 and bf16 hold it with full relative precision, fp32 l and acc with room to
  // spare). Any max gives the same softmax and lse = (m + log2 l) ln 2, only the rounding
  // of p moves. Returns whether acc must be rescaled by corr (always, without kLazy).
  template <bool kLazy = false>
  __device__ __forceinline__ bool update_scores(float (&s)[NT][4], float scale_log2, float (&corr)[2]) {
    float m_new[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = -CUFLASH_INF;
#pragma unroll
      for (int t = 0; t < NT; ++t) mx = fmaxf(mx, fmaxf(s[t][2 * rh], s[t][2 * rh + 1]));
      // max(s) * scale = max(s * scale) for scale >= 0 (rounding is monotone)
      m_new[rh] = fmaxf(m[rh], quad_max(mx) * scale_log2);
    }
    // m_new <= m + slack is false when m_new is NaN, and true when both are -inf (a row that
    // has seen no visible key yet keeps m = -inf, and its p are exp2(-inf - 0) = 0 below).
    const bool keep_max = kLazy && __all_sync(0xffffffffu, m_new[0] <= m[0] + kLazySlack &&
                                                               m_new[1] <= m[1] + kLazySlack);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const float m_old = m[rh];
      if (!keep_max) m[rh] = m_new[rh];
      // A row that has seen no visible key yet has m = -inf: subtract 0 instead, so
      // exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
      const float m_use = m[rh] == -CUFLASH_INF ? 0.f : m[rh];
      corr[rh] = 1.f;
      if (!keep_max) {
        corr[rh] = fast_exp2(m_old - m_use);  // m_old = -inf gives 0: nothing to rescale
        l[rh] *= corr[rh];
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        s[t][2 * rh] = fast_exp2(fmaf(s[t][2 * rh], scale_log2, -m_use));
        s[t][2 * rh + 1] = fast_exp2(fmaf(s[t][2 * rh + 1], scale_log2, -m_use));
        l[rh] += s[t][2 * rh] + s[t][2 * rh + 1];
      }
    }
    return !keep_max;
  }

  template <int DT>
  __device__ __forceinline__ static void rescale(float (&acc)[DT][4], const float (&corr)[2]) {
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      acc[d][0] *= corr[0];
      acc[d][1] *= corr[0];
      acc[d][2] *= corr[1];
      acc[d][3] *= corr[1];
    }
  }

  // Per row half: the factor for acc (out_scale / l_i) and lse in natural log.
  // A row that saw no key (l_i = 0) gets factor 0 (output 0) and lse = -inf.
  __device__ __forceinline__ void finalize(float out_scale, float (&row_mul)[2], float (&row_lse)[2]) const {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const float L = quad_sum(l[rh]);
      const bool empty = L == 0.f;
      row_mul[rh] = empty ? 0.f : out_scale / L;
      row_lse[rh] = empty ? -CUFLASH_INF : (m[rh] + log2f(L)) * 0.6931471805599453f;
    }
  }
};

}  // namespace cuflash
