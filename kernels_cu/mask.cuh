// Which scores exist: sequence bounds and causal masking.
//
// A launch covers local query rows i in [0, Sq) and local key columns j in [0, Sk).
// Causal masking is one number, the diagonal: row i sees key j iff j <= i + diag.
// Python sets diag = Sk - Sq for a whole problem (bottom-right alignment, as
// FlashAttention-2 >= 2.1 and cuDNN), and diag = (q_start - k_start) + (Sk_total - Sq_total)
// for a shard of a larger problem (context parallelism), so the mask is the global one.
#pragma once

namespace cuflash {

template <bool CAUSAL>
__device__ __forceinline__ bool score_visible(long long i, long long j, long long seqlen_k, long long diag) {
  if (j >= seqlen_k) return false;
  if (CAUSAL && j > i + diag) return false;
  return true;
}

// Number of key columns query rows [0, row_end) can see at all: the end of the key
// loop for a block of queries.
template <bool CAUSAL>
__device__ __forceinline__ long long visible_key_end(long long row_end, long long seqlen_k, long long diag) {
  if (!CAUSAL) return seqlen_k;
  const long long e = row_end + diag;
  return e < 0 ? 0 : (e > seqlen_k ? seqlen_k : e);
}

// The query block a forward CTA owns. The grid's x runs over query blocks and CTAs start
// in x order; under causal masking later query blocks see more keys, so x counts down from
// the last block: the longest CTAs start first and the short ones fill the last wave.
template <bool CAUSAL>
__device__ __forceinline__ long long forward_query_block() {
  return CAUSAL ? static_cast<long long>(gridDim.x - 1 - blockIdx.x) : static_cast<long long>(blockIdx.x);
}

// First query row that sees key column j (for the backward's loop over query blocks).
template <bool CAUSAL>
__device__ __forceinline__ long long first_query_seeing(long long j, long long diag) {
  if (!CAUSAL) return 0;
  const long long i = j - diag;
  return i < 0 ? 0 : i;
}

}  // namespace cuflash
