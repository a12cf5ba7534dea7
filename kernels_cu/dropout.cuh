// The dropout mask: one definition, shared by every kernel (forward, backward, the
// dropout_mask() kernel) and twinned in NumPy by cuflash/mask.py.
//
// keep(b, h, i, j) for batch b, query head h, query row i, key column j:
//   block     R = i >> 4,  C = j >> 4          (a 16x16 block of the score matrix)
//   in-block  r = i & 15,  c = j & 15
//   lane      = (r & 7) * 4 + ((c & 7) >> 1)   (0..31)
//   words     = Philox4x32-10(counter = (C * 32 + lane, R, (b << 16) | h, offset),
//                             key     = (seed & 0xffffffff, seed >> 32))
//             = curand_init(seed, (offset << 32) | (b << 16) | h, 4 * ((R << 32) | (C << 5) | lane))
//               followed by one curand4()
//   u16       = 16-bit half (c & 1) of words[((c >> 3) << 1) | (r >> 3)]   (half 0 = low bits)
//   keep      = u16 >= threshold,  threshold = round(p * 65536)
// The realized keep probability is (65536 - threshold) / 65536 and kept values are
// scaled by its inverse, so the expectation is exact (no bias from quantizing p).
//
// Why this layout: in the accumulator fragment of mma.m16n8k16 (and of wgmma, which
// repeats it per 8 columns) lane t holds rows t/4 and t/4 + 8 of a 16-row tile and
// columns 2(t%4), 2(t%4)+1 of each 8-column tile. So over a 16x16 block lane t owns
// exactly the 8 elements of Philox call `lane = t`: one call per thread per block,
// no shuffles, and word[2*n8 + row_half] holds the column pair that becomes one
// half2 of P. The mask is still a pure function of (seed, offset, b, h, i, j, p):
// tiles, warps, head dim, causal flags, GPU and kernel path never enter it.
// Limits (checked in Python): b, h < 2^16, offset < 2^32, j < 2^31, i < 2^36.
#pragma once

#include "philox.cuh"

namespace cuflash {

constexpr unsigned kDropoutBits = 16;                 // random bits per element
constexpr unsigned kDropoutRange = 1u << kDropoutBits;  // threshold scale: p * 65536

struct DropoutParams {
  unsigned long long seed;  // Philox key
  unsigned offset;          // selects a fresh mask per call (Philox counter word w)
  unsigned threshold;       // round(p * 65536); 0 keeps everything
  float scale;              // 65536 / (65536 - threshold) = 1 / keep probability
};

// The parameters of one launch. The Philox key and counter word come either as values
// (seed, offset) or, when rng_state is not null, from device memory (rng_state[0] = seed,
// rng_state[1] = offset): a captured CUDA graph then reads the state current at each
// replay instead of the value baked in at capture.
__device__ __forceinline__ DropoutParams make_dropout_params(unsigned long long seed, unsigned offset,
                                                             const unsigned long long* rng_state,
                                                             unsigned threshold, float scale) {
  if (rng_state != nullptr) {
    seed = rng_state[0];
    offset = static_cast<unsigned>(rng_state[1]);
  }
  return DropoutParams{seed, offset, threshold, scale};
}

// The four words of 16x16 block (R, C) for `lane` of batch b, head h. (Calls that share
// R, b, h, or C, lane, share their first rounds' products: NVVM finds and hoists those
// common subexpressions itself (sm_90a SASS, 2026-12-01: 18 products per call), so no call
// site spells them out.)
__device__ __forceinline__ uint4 dropout_block_words(const DropoutParams& dp, unsigned b, unsigned h,
                                                     unsigned R, unsigned C, unsigned lane) {
  const uint4 ctr = make_uint4(C * 32u + lane, R, (b << 16) | h, dp.offset);
  const uint2 key = make_uint2(static_cast<unsigned>(dp.seed), static_cast<unsigned>(dp.seed >> 32));
  return philox4x32_10(ctr, key);
}

// u16 >= threshold for the halves of a word, compared in the high half of the register:
// lo >= t iff (word << 16) >= (t << 16), and hi >= t iff word >= (t << 16) (the low bits
// cannot lift word past a multiple of 2^16). One shift and two compares per pair instead
// of a mask, a shift and two compares. threshold < 2^16 (checked in Python).
__device__ __forceinline__ bool keep_lo(unsigned word, unsigned threshold) { return (word << 16) >= (threshold << 16); }
__device__ __forceinline__ bool keep_hi(unsigned word, unsigned threshold) { return word >= (threshold << 16); }

// Keep bits of one column pair (c even, c + 1): bit 0 for column c, bit 1 for c + 1.
__device__ __forceinline__ unsigned dropout_pair_keep(unsigned word, unsigned threshold) {
  return (keep_lo(word, threshold) ? 1u : 0u) | (keep_hi(word, threshold) ? 2u : 0u);
}

__device__ __forceinline__ unsigned select_word(const uint4& w, unsigned idx) {
  return idx == 0 ? w.x : idx == 1 ? w.y : idx == 2 ? w.z : w.w;
}

// keep(b, h, i, j) for one element, straight from the definition above (for code that
// does not hold mma fragments, such as the dropout_mask() kernel's bounds path).
__device__ __forceinline__ bool dropout_keep(const DropoutParams& dp, unsigned b, unsigned h,
                                             unsigned long long i, unsigned j) {
  const unsigned r = static_cast<unsigned>(i & 15), c = j & 15;
  const uint4 w = dropout_block_words(dp, b, h, static_cast<unsigned>(i >> 4), j >> 4,
                                      (r & 7) * 4 + ((c & 7) >> 1));
  const unsigned word = select_word(w, ((c >> 3) << 1) | (r >> 3));
  return ((word >> (16 * (c & 1))) & 0xffffu) >= dp.threshold;
}

// Zero the dropped elements of one n8 accumulator tile; word_lo covers row lane/4,
// word_hi row lane/4 + 8, each as (column 2(lane%4), column 2(lane%4)+1) halves.
// (Tried, H200 2026-12-01: keep as a factor 1.f / 0.f from PRMT + FADD.SAT, multiplied in,
// to take the compare and select off the integer pipe. ALU pipe 45 -> 40 % busy, but more
// instructions, and the hd 64 forward ran 2.50 vs 2.41 ms: the integer pipe is not its limit.)
__device__ __forceinline__ void apply_keep(float (&f)[4], unsigned word_lo, unsigned word_hi, unsigned threshold) {
  const unsigned k0 = dropout_pair_keep(word_lo, threshold), k1 = dropout_pair_keep(word_hi, threshold);
  f[0] = (k0 & 1u) ? f[0] : 0.f;
  f[1] = (k0 & 2u) ? f[1] : 0.f;
  f[2] = (k1 & 1u) ? f[2] : 0.f;
  f[3] = (k1 & 2u) ? f[3] : 0.f;
}

// The Philox call (`lane` argument of dropout_block_words) that lane t draws for the
// transposed fragment below: (2 (t % 4) + e_own) * 4 + t / 8, e_own = (t / 4) & 1.
__device__ __forceinline__ unsigned dropout_t_lane(unsigned lane) {
  return (2u * (lane & 3u) + ((lane >> 2) & 1u)) * 4u + (lane >> 3);
}

// The same mask in the transposed fragment: the Hopper backward computes S^T = K Q^T, so
// its accumulator holds keys as rows. Over a 16x16 block lane t then owns keys t/4 and
// t/4 + 8 (in-block c) and queries 2(t%4) + e and +8 (in-block r), e in {0, 1}: the
// elements of Philox calls (2(t%4) + e) * 4 + t/8, e = 0 and 1, and of each call's words
// only the halves (t/4) & 1. Lanes t and t^4 need the same two calls and opposite halves,
// so each draws one call (e = (t/4) & 1) and the pair swaps the halves the other needs:
// still one Philox call per thread per block, plus two shuffles.
// Returns the keep bits of the block in accumulator order: bit 4*n8 + 2*hc + e is the
// element of n8 tile n8 (query rows 8*n8.., in-block r >> 3 = n8) at key row hc*8 + t/4,
// query column 2(t%4) + e -- flat index 4*n8 + 2*hc + e of the two m64 n8 tiles.
__device__ __forceinline__ unsigned dropout_block_keep_t(const DropoutParams& dp, unsigned b, unsigned h,
                                                         unsigned R, unsigned C, unsigned lane) {
  const unsigned e_own = (lane >> 2) & 1u;  // also the word half this lane keeps (c & 1)
  const uint4 w = dropout_block_words(dp, b, h, R, C, dropout_t_lane(lane));
  // Halves (c & 1) of words x, y (key half hc = 0; r >> 3 = 0, 1) and of z, w (hc = 1).
  const unsigned keep_sel = e_own ? 0x7632u : 0x5410u, give_sel = e_own ? 0x5410u : 0x7632u;
  const unsigned mine0 = __byte_perm(w.x, w.y, keep_sel), mine1 = __byte_perm(w.z, w.w, keep_sel);
  const unsigned theirs0 = __shfl_xor_sync(0xffffffffu, __byte_perm(w.x, w.y, give_sel), 4);
  const unsigned theirs1 = __shfl_xor_sync(0xffffffffu, __byte_perm(w.z, w.w, give_sel), 4);
  // v[e][hc]: low half for r >> 3 = 0, high half for r >> 3 = 1.
  const unsigned v00 = e_own ? theirs0 : mine0, v01 = e_own ? theirs1 : mine1;
  const unsigned v10 = e_own ? mine0 : theirs0, v11 = e_own ? mine1 : theirs1;
  const unsigned t = dp.threshold;
  unsigned bits = 0;
#pragma unroll
  for (int n8 = 0; n8 < 2; ++n8) {
    const auto keep = [&](unsigned v) { return (n8 == 0 ? keep_lo(v, t) : keep_hi(v, t)) ? 1u : 0u; };
    bits |= keep(v00) << (4 * n8 + 0);
    bits |= keep(v10) << (4 * n8 + 1);
    bits |= keep(v01) << (4 * n8 + 2);
    bits |= keep(v11) << (4 * n8 + 3);
  }
  return bits;
}

}  // namespace cuflash
