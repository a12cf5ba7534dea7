// Which scores exist: sequence bounds and causal masking, aligned bottom-right
// (as FlashAttention-2 >= 2.1 and cuDNN): query row i sees key j iff j <= i + Sk - Sq.
#pragma once

namespace cuflash {

template <bool CAUSAL>
__device__ __forceinline__ bool score_visible(long long i, long long j, long long seqlen_q, long long seqlen_k) {
  if (j >= seqlen_k) return false;
  if (CAUSAL && j > i + seqlen_k - seqlen_q) return false;
  return true;
}

// Number of key columns query rows [0, row_end) can see at all: the end of the key
// loop for a block of queries.
template <bool CAUSAL>
__device__ __forceinline__ long long visible_key_end(long long row_end, long long seqlen_q, long long seqlen_k) {
  if (!CAUSAL) return seqlen_k;
  const long long e = row_end + seqlen_k - seqlen_q;
  return e < 0 ? 0 : (e > seqlen_k ? seqlen_k : e);
}

// First query row that sees key column j (for the backward's loop over query blocks).
template <bool CAUSAL>
__device__ __forceinline__ long long first_query_seeing(long long j, long long seqlen_q, long long seqlen_k) {
  if (!CAUSAL) return 0;
  const long long i = j - (seqlen_k - seqlen_q);
  return i < 0 ? 0 : i;
}

}  // namespace cuflash
