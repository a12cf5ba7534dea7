// Fused attention backward, Hopper path (sm_90a): wgmma with the keys as the M dimension.
//
//   q, dout: (B, Sq, H, D)   k, v: (B, Sk, Hk, D)   lse, delta: (B, H, Sq) fp32
//   dq_accum: (splits, B, H, Sq, kHeadDim) fp32, zeroed (deterministic: not, see dq_written);
//   dk, dv (or, under GQA, the fp32 dk_part, dv_part) as in attn_bwd.cu, whose arguments,
//   launch (key blocks walked in rounds of gridDim.x; dQ splits when deterministic) and
//   results this kernel shares.
//
// A CTA owns kBlockN = 64 * kWarpgroups keys of one (b, h); warpgroup g owns keys 64g.. and
// keeps their dK and dV (64 x D each, fp32) in registers while it walks the query blocks
// (kBlockM = 64 or 128 rows) that see them. Per query block, per warpgroup:
//   S^T  = K Q^T, dP^T = V dO^T           wgmma; K, V, Q, dO from shared memory, K-major
//   P^T  = exp2(S^T * scale_log2 - lse * log2 e), masked; dropout keep bits of the
//          transposed fragment (dropout.cuh), drawn while the previous query block's dV, dK
//          and dQ are on the tensor cores (a key block's first query block: behind S^T, dP^T)
//   dS^T = P^T ∘ (dP^T∘keep·s − delta)
//   dV  += (P^T∘keep·s) dO                wgmma; A from registers (or, kPInSmem, staged in
//                                         shared memory like dS^T), dO read MN-major
//   dK  += dS^T Q                         wgmma; dS^T staged in shared memory (K-major A),
//                                         Q read MN-major
//   dQ  += dS K(:, chunk)                 wgmma; the same dS^T tile read as an MN-major A;
//                                         added to dq_accum by red.add.v2.f32 (or stored:
//                                         a deterministic split's first pass)
// dQ of a query block is one 64 x 64 tile (64 queries x 64 head-dim columns) per
// warpgroup (hd 128 x 64 queries, hd 64 x 128 queries), summed over all kBlockN keys, so
// each dQ element has one writer thread in the CTA.
#include "attn_bwd_aux.cuh"
#include "attn_config.cuh"
#include "copy_sm80.cuh"
#include "dropout.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "softmax.cuh"
#include "wgmma_sm90.cuh"

using namespace cuflash;

constexpr int kWarpgroups = kWarps / 4;
constexpr int kST = kBlockM / 8;       // n8 tiles of S^T per row (queries)
constexpr int kDT = kHeadDim / 8;      // n8 tiles of dK, dV per row (head dim)
constexpr int kQSteps = kBlockM / 16;  // k16 steps (queries) of dV += P^T dO and dK += dS^T Q
constexpr int kDQChunks = kHeadDim / 64;               // 64-column head-dim chunks of dQ
constexpr unsigned kTileQ = kBlockM * kHeadDim * 2;   // bytes of a Q or dO tile
constexpr unsigned kTileKV = kBlockN * kHeadDim * 2;  // bytes of the K or V tile
constexpr unsigned kTileS = kBlockN * kBlockM * 2;    // bytes of the dS^T tile
constexpr unsigned kAtom = 1024;                      // bytes of one 8-row swizzle atom
// P^T as the A of dV from shared memory instead of registers: with 128-query blocks its
// kBlockM / 4 registers of A fragments do not fit beside S^T, dP^T and dK, dV (ptxas spilled).
constexpr bool kPInSmem = kBlockM == 128;
// The order of a query block's wgmmas and copies, by head dim. hd 128: the next block's
// Q/dO copies are issued behind S^T and dP^T (the tensor cores start without waiting on
// their address arithmetic), and dQ goes first, in a commit group of its own, so its
// additions to dq_accum go out while dK and dV still run. hd 64: copies before S^T, dQ
// after dK and dV. H200 fp16, 2026-12-02, A/B against the hd 64 order, two calls, five runs
// (BENCH.md v11): hd 128 +2.5..+6.1 % (p=0), +0.1..+3.4 % (p=0.1). At hd 64 with dropout
// the copies behind lost 1..4 %; dQ first alone read -0.6..+0.8 % there (three runs,
// BENCH.md v12), so hd 64 keeps dQ last.
constexpr bool kHd128Order = kHeadDim == 128;
static_assert(kWarps % 4 == 0 && kBlockN == 64 * kWarpgroups, "each warpgroup owns 64 keys");
static_assert(kBlockM == 64 || kBlockM == 128, "the query block is wgmma N of S^T");
static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of dK, dV; whole 64-column swizzle chunks");
static_assert(kDQChunks * (kBlockM / 64) == kWarpgroups, "one 64 x 64 dQ tile per warpgroup");

// dst[0..1] += (a, b) in one vector reduction (sm_90), performed in L2.
__device__ __forceinline__ void red_add_v2(float* dst, float a, float b) {
  asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)
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

  // Swizzle atoms start on 1024-byte boundaries (Python adds kAtom bytes of slack).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const unsigned raw_addr = smem_u32(smem_raw);
  unsigned char* sK = smem_raw + (((raw_addr + kAtom - 1) & ~(kAtom - 1)) - raw_addr);
  unsigned char* sV = sK + kTileKV;
  unsigned char* sQ0 = sV + kTileKV;     // stage s: Q at sQ0 + 2 s kTileQ, dO right after
  unsigned char* sdS = sQ0 + 4 * kTileQ;  // dS^T, [key][query]
  unsigned char* sP = sdS + kTileS;        // P^T keep s, [key][query] (kPInSmem)
  float* sLse = reinterpret_cast<float*>(sP + kTileS);  // [stage][query]: the forward's lse, x log2(e) at the loop top
  float* sDelta = sLse + 2 * kBlockM;                     // [stage][query]

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
  const int bh = blockIdx.y, b = bh / nheads, h = bh % nheads, hk = h / group;
  const int n_mblocks = static_cast<int>((seqlen_q + kBlockM - 1) / kBlockM);
  const int n_kblocks = static_cast<int>((seqlen_k + kBlockN - 1) / kBlockN);
  const DropoutParams dp = make_dropout_params(seed, offset, rng_state, threshold, drop_scale);
  float* dq_split = dq_accum + blockIdx.x * dq_split_stride;

  const elem_t* q_base = q + b * q_st.b + h * q_st.h;
  const elem_t* do_base = dout + b * do_st.b + h * do_st.h;
  const elem_t* k_base = k + b * k_st.b + hk * k_st.h;
  const elem_t* v_base = v + b * v_st.b + hk * v_st.h;
  const float* lse_row = lse + static_cast<long long>(bh) * seqlen_q;
  const float* delta_row = delta + static_cast<long long>(bh) * seqlen_q;
  const int dq_chunk = wg % kDQChunks, dq_rows0 = 64 * (wg / kDQChunks);  // head-dim chunk, first query

  // This thread's part of the dQ tile of the query block at m0_ (rows_q_ rows) into its
  // split: added, or (store) written over. One writer thread per element within the CTA:
  // with a split per CTA (deterministic) the writes to an element happen in program order.
  // Row by row: the thread's eight writes to one row go out back to back, under one tail test.
  auto write_dq = [&](long long m0_, int rows_q_, const float(&acc)[32], bool store) {
    const int r0 = wq * 16 + (lane >> 2);  // this thread's rows r0 and r0 + 8 of the tile
    float* dq_rows = dq_split + (static_cast<long long>(bh) * seqlen_q + m0_ + dq_rows0 + r0) * kHeadDim +
                     dq_chunk * 64 + 2 * (lane & 3);
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      if (dq_rows0 + r0 + 8 * rh >= rows_q_) continue;  // tail rows of the last query block
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        float* dst = dq_rows + 8 * rh * kHeadDim + 8 * c;
        if (store) {
          *reinterpret_cast<float2*>(dst) = make_float2(acc[4 * c + 2 * rh], acc[4 * c + 2 * rh + 1]);
        } else {
          red_add_v2(dst, acc[4 * c + 2 * rh], acc[4 * c + 2 * rh + 1]);
        }
      }
    }
  };
  // A deterministic launch (dq_split_stride != 0: one CTA per split) gets no zeroed memory
  // (_attn_gpu.backward): the CTA's first key block stores its dQ tiles and zero-fills the
  // query blocks before its m_begin, so every element of the split is written before the
  // CTA's later key blocks add to it. (Python launches at most n_kblocks splits, so every CTA
  // has a first key block.) That saves the memset of the splits (up to
  // _attn_gpu.DETERMINISTIC_DQ_BYTES) and the DRAM reads of its zeros. H200 fp16, S = 1k-16k,
  // 2026-12-02: with p = 0 at hd 128 the deterministic cost read +3.0..+18.4 % with it,
  // +10.2..+25.6 % without (sweeps with peers, BENCH.md v11); at hd 64 the deterministic
  // backward ran -1.0..+7.0 % faster with it, the default one unchanged (-1.2..+1.2 %;
  // three alternating runs, BENCH.md v12). The default launch only adds.
  bool dq_written = dq_split_stride == 0;

  // Q, dO, lse and delta of query block mb into stage st. Rows past Sq are zero-filled:
  // their S and dP are then 0, P = exp2(0) is finite, and every product it enters (P^T dO,
  // dS^T Q with dS = P (0 - 0)) is zero, so the tail needs no extra masking.
  auto load_q_do = [&](int mb, int st) {
    const long long m0 = static_cast<long long>(mb) * kBlockM;
    const int rows_q = block_rows<kBlockM>(seqlen_q, m0);
    unsigned char* sq = sQ0 + 2 * st * kTileQ;
    load_tile_sw128_async<kBlockM, kHeadDim, kThreads>(sq, q_base + m0 * q_st.s, q_st.s, rows_q, head_dim);
    load_tile_sw128_async<kBlockM, kHeadDim, kThreads>(sq + kTileQ, do_base + m0 * do_st.s, do_st.s, rows_q,
                                                       head_dim);
    if (threadIdx.x < 2 * kBlockM) {
      const int r = threadIdx.x % kBlockM;
      const bool is_delta = threadIdx.x >= kBlockM;
      const float* src = is_delta ? delta_row : lse_row;
      cp_async_4((is_delta ? sDelta : sLse) + st * kBlockM + r, r < rows_q ? src + m0 + r : src, r < rows_q);
    }
  };

  for (int t = 0; t * static_cast<int>(gridDim.x) < n_kblocks; ++t) {
    const int nb = walk_key_block(t);
    if (nb >= n_kblocks) continue;  // the last round's tail (uniform across the CTA)
    const long long n0 = static_cast<long long>(nb) * kBlockN;
    const int rows_kv = block_rows<kBlockN>(seqlen_k, n0);
    const int m_begin = static_cast<int>(first_query_seeing<kCausal>(n0, causal_diag) / kBlockM);
    cp_async_wait<0>();  // a key block no query sees (a causal shard) leaves its K, V copies in flight
    __syncthreads();     // the previous key block's wgmmas, in every warpgroup, are done with sK, sV
    load_tile_sw128_async<kBlockN, kHeadDim, kThreads>(sK, k_base + n0 * k_st.s, k_st.s, rows_kv, head_dim);
    load_tile_sw128_async<kBlockN, kHeadDim, kThreads>(sV, v_base + n0 * v_st.s, v_st.s, rows_kv, head_dim);
    if (m_begin < n_mblocks) load_q_do(m_begin, 0);
    cp_async_commit();
    if (!dq_written) {  // the deterministic first pass: zeros for the query blocks this key block does not see
      float zeros[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) zeros[i] = 0.f;
      for (int mb = 0; mb < m_begin && mb < n_mblocks; ++mb) {
        const long long m0 = static_cast<long long>(mb) * kBlockM;
        write_dq(m0, block_rows<kBlockM>(seqlen_q, m0), zeros, true);
      }
    }

    float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
    for (int t = 0; t < kDT; ++t)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[t][e] = acc_dv[t][e] = 0.f;
    float(&dk_flat)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_dk);
    float(&dv_flat)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_dv);

    const long long key_w = n0 + wg * 64 + wq * 16;  // this warp's first key
    const long long key_lo = key_w + (lane >> 2);     // this thread's first key; second is +8
    const unsigned k_addr = smem_u32(sK) + wg * 64 * 128, v_addr = smem_u32(sV) + wg * 64 * 128;

    // Keep bits of this warp's 16 keys x kBlockM queries of query block mb (bit i % 32 of word
    // i / 32 <-> accumulator element i of s, kST * 4 = kBlockM / 2 of them): one Philox call
    // per thread per 16x16 block, four blocks per word. Read only under kDropout, after a draw.
    unsigned keep[kBlockM / 64];
    auto draw_keep = [&](int mb_) {
      const unsigned C = static_cast<unsigned>((k_start + key_w) >> 4);
      const unsigned R0 = static_cast<unsigned>((q_start + static_cast<long long>(mb_) * kBlockM) >> 4);
#pragma unroll
      for (int w = 0; w < kBlockM / 64; ++w) {
        keep[w] = 0;
        // Four independent Philox chains per word, interleaved: one call at a time left the
        // warps waiting on each round's IMAD latency (ncu: 29 % of stalls were fixed-latency
        // waits). H100, 2026-11-25, p=0.1: hd64 +6-11 %, hd128 +1-3 %, and ptxas spills less.
#pragma unroll
        for (int r16 = 0; r16 < 4; ++r16)
          keep[w] |= dropout_block_keep_t(dp, b, h, R0 + 4 * w + r16, C, lane) << (8 * r16);
      }
    };

    for (int mb = m_begin; mb < n_mblocks; ++mb) {
      const int st = (mb - m_begin) & 1;
      const long long m0 = static_cast<long long>(mb) * kBlockM;
      const int rows_q = block_rows<kBlockM>(seqlen_q, m0);
      cp_async_wait<0>();
      // lse in log2 units once per query, not once per score: the exp below reads it as is (the same
      // product, so P is bitwise unchanged). Thread r copied row r's lse itself, so after its own
      // wait it may rewrite it; the barrier below publishes it. v13: fewer FMULs in the S loop.
      if (threadIdx.x < kBlockM) sLse[st * kBlockM + threadIdx.x] *= kLog2e;
      fence_proxy_async();
      // Block mb's Q, dO, lse, delta (and K, V) are visible to every thread and to wgmma;
      // every warpgroup has waited for all its wgmmas of block mb-1, so stage st^1 and sdS are free.
      __syncthreads();
      if constexpr (!kHd128Order) {
        if (mb + 1 < n_mblocks) load_q_do(mb + 1, st ^ 1);
        cp_async_commit();
      }

      // S^T = K Q^T and dP^T = V dO^T: head-dim step ks reads 32 bytes at (ks % 4) * 32 of
      // 64-column chunk ks / 4 of each operand.
      const unsigned q_addr = smem_u32(sQ0 + 2 * st * kTileQ), do_addr = q_addr + kTileQ;
      float s[kST * 4], dps[kST * 4];
      // acc = A B^T over the head dim, A: this warpgroup's 64 keys of K or V, B: Q or dO.
      auto issue_t = [&](float(&acc)[kST * 4], unsigned a_addr, unsigned b_addr) {
#pragma unroll
        for (int ks = 0; ks < kHeadDim / 16; ++ks) {
          const unsigned aoff = (ks >> 2) * (kBlockN * 128) + (ks & 3) * 32;
          const unsigned boff = (ks >> 2) * (kBlockM * 128) + (ks & 3) * 32;
          Wgmma<elem_t, kBlockM, 0>::ss(acc, sw128_desc(a_addr + aoff, 16, kAtom), sw128_desc(b_addr + boff, 16, kAtom),
                                        ks > 0 ? 1 : 0);
        }
        wgmma_commit();
      };
      wgmma_fence();
      issue_t(s, k_addr, q_addr);
      issue_t(dps, v_addr, do_addr);
      if constexpr (kHd128Order) {  // into stage st^1, free since the barrier above
        if (mb + 1 < n_mblocks) load_q_do(mb + 1, st ^ 1);
        cp_async_commit();
      }

      // Keep bits of block mb: the first block of a key block draws them here, while S^T and
      // dP^T run; every later one had them drawn during the previous block's dV, dK, dQ wgmmas.
      if (kDropout && mb == m_begin) draw_keep(mb);

      wgmma_wait<1>();  // S^T done; dP^T may still run
      fence_operands(s);
      // Masking: only blocks that cross the key end or the causal diagonal need it.
      const bool need_mask = (n0 + kBlockN > seqlen_k) || (kCausal && n0 + kBlockN - 1 > m0 + causal_diag);
#pragma unroll
      for (int i = 0; i < kST * 4; ++i) {
        const int qc = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);  // query column of element i
        const long long j = key_lo + 8 * ((i >> 1) & 1);
        const float p = fast_exp2(fmaf(s[i], scale_log2, -sLse[st * kBlockM + qc]));
        s[i] = (need_mask && !score_visible<kCausal>(m0 + qc, j, seqlen_k, causal_diag)) ? 0.f : p;
      }

      wgmma_wait<0>();  // dP^T done
      fence_operands(dps);
      // dS^T = P^T (dP^T keep s - delta) into dps; P^T keep s into s. (Without dropout s = 1.
      // Taking s into dV once in the epilogue instead made ptxas spill 208 B, not 68, at hd 64.)
#pragma unroll
      for (int i = 0; i < kST * 4; ++i) {
        const int qc = 8 * (i >> 2) + 2 * (lane & 3) + (i & 1);
        if constexpr (kDropout) {
          // One select of the factor (1/(1-p) or 0) and two multiplies, not two selects: with the lse
          // change above, 3927 -> 3560 SASS instructions at hd 64 (v13). A NaN dP stays NaN when dropped.
          const float f = ((keep[i / 32] >> (i % 32)) & 1u) ? drop_scale : 0.f;
          dps[i] = s[i] * fmaf(dps[i], f, -sDelta[st * kBlockM + qc]);
          s[i] *= f;
        } else {
          dps[i] = s[i] * (dps[i] - sDelta[st * kBlockM + qc]);
        }
      }
      // P^T keep s as A fragments (16 keys x 16 queries per k step) or into shared memory;
      // dS^T into shared memory. Register x of step ks is n8 tile 2 ks + x / 2, key row + 8 (x % 2).
      unsigned pa[kPInSmem ? 1 : kQSteps][4];
#pragma unroll
      for (int ks = 0; ks < kQSteps; ++ks)
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int kr = wg * 64 + wq * 16 + (lane >> 2) + 8 * (x & 1);
          const int qc = 8 * (2 * ks + (x >> 1)) + 2 * (lane & 3);
          const unsigned p2 = pack2<elem_t>(s[8 * ks + 2 * x], s[8 * ks + 2 * x + 1]);
          if constexpr (kPInSmem) {
            *reinterpret_cast<unsigned*>(sP + tile_sw128_offset<kBlockN>(kr, qc)) = p2;
          } else {
            pa[ks][x] = p2;
          }
          *reinterpret_cast<unsigned*>(sdS + tile_sw128_offset<kBlockN>(kr, qc)) =
              pack2<elem_t>(dps[8 * ks + 2 * x], dps[8 * ks + 2 * x + 1]);
        }

      // dV += (P^T keep s) dO: query step ks starts at row 16 ks of dO; LBO steps to the
      // next 64 head-dim columns. From registers it starts now; from shared memory after the barrier.
      if constexpr (!kPInSmem) {
        wgmma_fence();  // pa and the accumulators were written by ordinary instructions
#pragma unroll
        for (int ks = 0; ks < kQSteps; ++ks)
          Wgmma<elem_t, kHeadDim, 1>::rs(dv_flat, pa[ks], sw128_desc(do_addr + ks * 16 * 128, kBlockM * 128, kAtom), 1);
        wgmma_commit();
      }

      fence_proxy_async();  // the dS^T (and P^T) stores, before wgmma reads them
      __syncthreads();  // dQ reads the dS^T rows of every warpgroup

      // dK += dS^T Q (and dV += P^T dO): A is this warpgroup's 64 rows of dS^T (P^T), K-major
      // (query step ks at byte 32 (ks % 4) of 64-column chunk ks / 4); B is Q (dO) read MN-major.
      const unsigned ds_addr = smem_u32(sdS);
      auto issue_dkv = [&] {
        if constexpr (kPInSmem) {
#pragma unroll
          for (int ks = 0; ks < kQSteps; ++ks)
            Wgmma<elem_t, kHeadDim, 1>::ss(
                dv_flat,
                sw128_desc(smem_u32(sP) + (ks >> 2) * (kBlockN * 128) + wg * 64 * 128 + (ks & 3) * 32, 16, kAtom),
                sw128_desc(do_addr + ks * 16 * 128, kBlockM * 128, kAtom), 1);
        }
#pragma unroll
        for (int ks = 0; ks < kQSteps; ++ks)
          Wgmma<elem_t, kHeadDim, 1>::ss(
              dk_flat, sw128_desc(ds_addr + (ks >> 2) * (kBlockN * 128) + wg * 64 * 128 + (ks & 3) * 32, 16, kAtom),
              sw128_desc(q_addr + ks * 16 * 128, kBlockM * 128, kAtom), 1);
        wgmma_commit();
      };
      // dQ tile = dS(queries dq_rows0.., keys) K(keys, chunk): key step ks starts at row
      // 16 ks of dS^T (A, MN-major, its 64-query chunk) and of K (B, MN-major).
      float acc_dq[32];
      auto issue_dq = [&] {
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks) {
          const unsigned row = 16 * ks * 128;
          Wgmma<elem_t, 64, 1, 1>::ss(
              acc_dq, sw128_desc(ds_addr + (dq_rows0 / 64) * (kBlockN * 128) + row, kBlockN * 128, kAtom),
              sw128_desc(smem_u32(sK) + dq_chunk * (kBlockN * 128) + row, kBlockN * 128, kAtom), ks > 0 ? 1 : 0);
        }
        wgmma_commit();
      };
      wgmma_fence();  // acc_dq's registers may have held values written by ordinary instructions
      if constexpr (kHd128Order) {
        issue_dq();
        issue_dkv();
      } else {
        issue_dkv();
        issue_dq();
      }
      // The next block's keep bits, on the ALUs while dV, dK and dQ are on the tensor cores:
      // S^T and dP^T alone are too short to hide a block's Philox calls at hd 64. (H200 fp16
      // p=0.1, 2026-12-02, against drawing them all behind S^T and dP^T: hd 64 +1.5..+4.7 %,
      // hd 128 -2.4..+1.4 %. Splitting them between the two windows did no better; also
      // issuing dV before dS^T is formed lost up to 13 %: BENCH.md v9.)
      if (kDropout && mb + 1 < n_mblocks) draw_keep(mb + 1);
      // dQ done (hd 128: dK and dV may still run); pa, sP, sdS stay in use until both are
      wgmma_wait<kHd128Order ? 1 : 0>();
      fence_operands(acc_dq);
      if constexpr (!kHd128Order) {
        fence_operands(dk_flat);
        fence_operands(dv_flat);
      }

      write_dq(m0, rows_q, acc_dq, !dq_written);
      if constexpr (kHd128Order) {
        wgmma_wait<0>();  // dK, dV: pa, sP, sdS may be overwritten next block
        fence_operands(dk_flat);
        fence_operands(dv_flat);
      }
    }

    // Epilogue: dK = softmax_scale * dS^T Q, dV as accumulated; zero when nothing saw these keys.
    store_dkv_rows<elem_t, kDT>(acc_dk, acc_dv, key_lo, 0, dk, dv, dk_part, dv_part, dkv_st, b, h, hk, nheads,
                                seqlen_k, head_dim, softmax_scale, 1.f);
    dq_written = true;
  }
  cp_async_wait<0>();  // no copy may be left in flight at exit
}
