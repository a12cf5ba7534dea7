// Fused attention forward, Hopper path (sm_90a): wgmma on shared-memory operands.
//
//   q: (B, Sq, H, D)   k, v: (B, Sk, Hk, D)   out: (B, Sq, H, D)   lse: (B, H, Sq) fp32
//
// One CTA owns kBlockM = 64 * kWarpgroups query rows of one (b, h); warpgroup g owns rows
// 64g.. of them and warp w of that warpgroup rows 16w.. (the wgmma accumulator layout).
// Per key block, per warpgroup: S = Q K^T (wgmma, Q and K from shared memory), masking,
// online softmax, dropout in the accumulator fragment -- the very code of the sm_80 path,
// so the same mask bits -- then acc_o += P V (wgmma, P from registers, V read MN-major).
// K is double buffered and V double or triple buffered (kVStages): block n+1 streams in
// while block n computes, by TMA from a producer warpgroup (kTma) or by every thread's
// cp.async. Same arguments and results as attn_fwd.cu (kTma: and the three tensor maps).
#include "attn_config.cuh"
#include "copy_sm80.cuh"
#include "dropout.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "softmax.cuh"
#include "tma_sm90.cuh"
#include "wgmma_sm90.cuh"

using namespace cuflash;

constexpr int kWarpgroups = kWarps / 4;
constexpr int kNT = kBlockN / 8;   // n8 tiles of S per row
constexpr int kDT = kHeadDim / 8;  // n8 tiles of acc_o per row
constexpr int kKSteps = kBlockN / 16;  // k16 steps of P V
constexpr unsigned kTileQ = kBlockM * kHeadDim * 2;   // bytes of the Q tile
constexpr unsigned kTileKV = kBlockN * kHeadDim * 2;  // bytes of one K or V stage
constexpr unsigned kAtom = 1024;                      // bytes of one 8-row swizzle atom
static_assert(kWarps % 4 == 0 && kBlockM == 64 * kWarpgroups, "each warpgroup owns 64 query rows");
static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma N of P V, and whole 64-column swizzle chunks");
static_assert(kBlockN == 64 || kBlockN == 128, "wgmma N of Q K^T");
static_assert(kVStages == 2 || kVStages == 3, "V double or triple buffered");
// Three V stages let the loop wait for P V(nb) one step later (see the step below), with
// P(nb + 1) packed into a second buffer meanwhile.
constexpr bool kDeferPvWait = kVStages == 3;
constexpr int kPBuffers = kDeferPvWait ? 2 : 1;
// kTma: one more warpgroup (the producer; one lane of it works) loads Q, K and V by TMA into
// stages guarded by mbarriers (tma_sm90.cuh), and the kWarps compute warps never meet at a
// CTA barrier: each waits for the stage it reads and releases it once its wgmmas are done
// with it. Otherwise every thread copies its share by cp.async and the CTA meets at one
// barrier per key block. A whole warpgroup because registers are shared per scheduler: a
// ninth warp alone capped every thread at 168 (ptxas); with setmaxnreg the producer gives
// its registers to the compute warpgroups (128 x 24 + 256 x 240 <= 65536).
constexpr bool kTma = CUFLASH_FWD_TMA != 0;
constexpr int kLaunchThreads = kThreads + (kTma ? 128 : 0);
// setmaxnreg counts. A CTA starts with kLaunchRegs per thread (what __launch_bounds__ leaves
// each of its threads, as ptxas allocates it) and can only trade registers within that pool:
// setmaxnreg.inc waits until the pool has them, so asking for more than the producer frees
// hangs the CTA. The producer keeps 24; the compute warps take the rest (a multiple of 8):
// 240 with two compute warpgroups, 232 with one and two CTAs per SM.
constexpr int kProducerRegs = 24;
constexpr int kLaunchRegs = (65536 / (kLaunchThreads * kMinBlocks)) & ~7;
constexpr int kComputeRegsFit = ((kLaunchThreads * kLaunchRegs - 128 * kProducerRegs) / kThreads) & ~7;
constexpr int kComputeRegs = kComputeRegsFit < 256 ? kComputeRegsFit : 256;

extern "C" __global__ void __launch_bounds__(kLaunchThreads, kMinBlocks)
attn_fwd_kernel(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                elem_t* __restrict__ out, float* __restrict__ lse,
                STRIDE_ARGS(q), STRIDE_ARGS(k), STRIDE_ARGS(v), STRIDE_ARGS(o),
                int nheads, int group,  // group = H / Hk: query heads per kv head
                long long seqlen_q, long long seqlen_k, int head_dim,
                float scale_log2,  // softmax_scale * log2(e): scores in exp2 units
                SHARD_ARGS, RNG_ARGS
#if CUFLASH_FWD_TMA
                , const __grid_constant__ TensorMap tm_q, const __grid_constant__ TensorMap tm_k,
                const __grid_constant__ TensorMap tm_v  // cuflash/_tma.py: boxes of 64 columns x kBlockM or kBlockN rows
#endif
) {
  STRIDES(q);
  STRIDES(k);
  STRIDES(v);
  STRIDES(o);

  // Swizzle atoms must start on 1024-byte boundaries; the dynamic window is only promised
  // 16-byte alignment, so round up inside it (Python adds kAtom bytes of slack).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const unsigned raw_addr = smem_u32(smem_raw);
  unsigned char* sQ = smem_raw + (((raw_addr + kAtom - 1) & ~(kAtom - 1)) - raw_addr);
  unsigned char* sK = sQ + kTileQ;       // stage s (of 2) at sK + s * kTileKV
  unsigned char* sV = sK + 2 * kTileKV;  // stage s (of kVStages) at sV + s * kTileKV
  // kTma: the mbarriers, after the V stages: Q's, then K's and V's full and empty ones.
  const unsigned bars = smem_u32(sV + kVStages * kTileKV);
  const unsigned full_q = bars;
  auto full_k = [&](int st) { return bars + 8u * (1 + st); };
  auto empty_k = [&](int st) { return bars + 8u * (3 + st); };
  auto full_v = [&](int st) { return bars + 8u * (5 + st); };
  auto empty_v = [&](int st) { return bars + 8u * (5 + kVStages + st); };

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int wg = warp >> 2, wq = warp & 3;  // warpgroup, warp within it
  const int nq = static_cast<int>(gridDim.x);  // query blocks per (b, h)

  // This CTA's tile (query block of one (b, h); t = its linear index, (b, h)-major) and
  // how many key blocks it sees. n_blocks is at least 1, so a tile whose rows see no key
  // (causal, Sq > Sk) runs one fully masked block and stores zeros and lse = -inf, as the
  // softmax's finalize gives for a row without keys: the loop below has no zero-block case.
  // (The struct is the form of a persistent try that ran several tiles per CTA, BENCH.md
  // v15; the SASS measured is this code's, so it stays as measured.)
  struct Tile {
    long long m0;  // first query row
    int bh, b, h, hk, n_blocks;
    const elem_t *k_rows, *v_rows;  // key row 0 of this (b, h)'s kv head
  };
  auto tile_at = [&](int t) {
    Tile g;
    g.bh = t / nq;
    const int j = t - g.bh * nq;
    g.b = g.bh / nheads;
    g.h = g.bh - g.b * nheads;
    g.hk = g.h / group;
    int qb = j;
    if constexpr (kCausal) qb = nq - 1 - j;  // mask.cuh: forward_query_block
    g.m0 = static_cast<long long>(qb) * kBlockM;
    const long long key_end = visible_key_end<kCausal>(g.m0 + kBlockM, seqlen_k, causal_diag);
    const int n = static_cast<int>((key_end + kBlockN - 1) / kBlockN);
    g.n_blocks = n > 0 ? n : 1;
    g.k_rows = k + g.b * k_st.b + g.hk * k_st.h;
    g.v_rows = v + g.b * v_st.b + g.hk * v_st.h;
    return g;
  };

  const int first_tile = static_cast<int>(blockIdx.y * gridDim.x + blockIdx.x);

  Tile g = tile_at(first_tile);
  int nb = 0;       // the key block whose P V the loop's step issues
  int stage = 0;    // its K stage (block nb + 1's is stage ^ 1): alternates per block
  int v_stage = 0;  // its V stage with three of them, nb % 3 (with two: `stage`)

  float acc_o[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) acc_o[t][0] = acc_o[t][1] = acc_o[t][2] = acc_o[t][3] = 0.f;
  float(&acc_flat)[kDT * 4] = reinterpret_cast<float(&)[kDT * 4]>(acc_o);
  OnlineSoftmax<kNT> sm;

  auto load_q = [&](const Tile& t) {
    const int rows = block_rows<kBlockM>(seqlen_q, t.m0);
    load_tile_sw128_async<kBlockM, kHeadDim, kThreads, false>(sQ, q + t.b * q_st.b + t.h * q_st.h + t.m0 * q_st.s,
                                                              q_st.s, rows, head_dim);
  };
  auto load_k = [&](const Tile& t, int block, int st) {
    const long long n0 = static_cast<long long>(block) * kBlockN;
    load_tile_sw128_async<kBlockN, kHeadDim, kThreads, false>(sK + st * kTileKV, t.k_rows + n0 * k_st.s, k_st.s,
                                                              block_rows<kBlockN>(seqlen_k, n0), head_dim);
  };
  auto load_v = [&](const Tile& t, int block, int st) {
    const long long n0 = static_cast<long long>(block) * kBlockN;
    load_tile_sw128_async<kBlockN, kHeadDim, kThreads, false>(sV + st * kTileKV, t.v_rows + n0 * v_st.s, v_st.s,
                                                              block_rows<kBlockN>(seqlen_k, n0), head_dim);
  };
  if constexpr (kTma) {
    if (threadIdx.x == 0) {
      mbar_init(full_q, 1);
      for (int st = 0; st < 2; ++st) {
        mbar_init(full_k(st), 1);
        mbar_init(empty_k(st), kWarps);
      }
      for (int st = 0; st < kVStages; ++st) {
        mbar_init(full_v(st), 1);
        mbar_init(empty_v(st), kWarps);
      }
      mbar_fence_init();
    }
    __syncthreads();  // the barriers are initialized before any thread uses them (the only CTA barrier)
    if (warp >= kWarps) {
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
#if CUFLASH_FWD_TMA
      // The producer: one lane issues every copy of the tile, in the order the compute
      // warps need them: Q, K(0), then K(j + 1) before V(j). A refill waits until every
      // compute warp has released the stage's previous block.
      if (warp == kWarps && lane == 0) {
        mbar_arrive_expect_tx(full_q, kTileQ);
#pragma unroll
        for (int c = 0; c < kHeadDim / 64; ++c)
          tma_load_4d(smem_u32(sQ) + c * (kBlockM * 128), tm_q, 64 * c, static_cast<int>(g.m0), g.h, g.b, full_q);
        auto load_kv = [&](const TensorMap& map, unsigned char* base, int block, int st, unsigned full,
                           unsigned empty, int use) {
          if (use > 0) mbar_wait(empty, (use - 1) & 1);
          mbar_arrive_expect_tx(full, kTileKV);
#pragma unroll
          for (int c = 0; c < kHeadDim / 64; ++c)
            tma_load_4d(smem_u32(base + st * kTileKV) + c * (kBlockN * 128), map, 64 * c, block * kBlockN, g.hk, g.b,
                        full);
        };
        for (int j = 0; j <= g.n_blocks; ++j) {
          if (j < g.n_blocks) load_kv(tm_k, sK, j, j & 1, full_k(j & 1), empty_k(j & 1), j >> 1);
          if (j > 0) {
            const int jv = j - 1;
            load_kv(tm_v, sV, jv, jv % kVStages, full_v(jv % kVStages), empty_v(jv % kVStages), jv / kVStages);
          }
        }
      }
#endif
      return;  // the copies complete on the barriers; the compute warps keep the CTA alive
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kComputeRegs));
  } else {
    // Copies, oldest first: [Q, K(0)], [K(1)], [V(0)]; then per step one group
    // [K(nb + 2), V(nb + 1)] behind the step's barrier (see below).
    load_q(g);
    load_k(g, 0, 0);
    cp_async_commit();
    if (g.n_blocks > 1) load_k(g, 1, 1);
    cp_async_commit();
    load_v(g, 0, 0);
    cp_async_commit();
  }
  // A compute warp is done with a stage: its lane 0 arrives (the warp's wgmma wait is behind it).
  auto release = [&](unsigned empty) {
    if (lane == 0) mbar_arrive(empty);
  };

  const DropoutParams dp = make_dropout_params(seed, offset, rng_state, threshold, drop_scale);
  const int warp_row = wg * 64 + wq * 16;       // this warp's first row within the tile
  const int lane_row = warp_row + (lane >> 2);  // this thread's first row within the tile; second is +8

  // S = Q K^T of the block whose K sits in stage st, issued (not waited for): head-dim step
  // ks reads 32 bytes at (ks % 4) * 32 of 64-column chunk ks / 4 of Q and of K.
  const unsigned q_addr = smem_u32(sQ) + wg * 64 * 128;  // this warpgroup's rows of chunk 0
  auto issue_s = [&](float(&acc)[kNT * 4], int st) {
    const unsigned k_addr = smem_u32(sK + st * kTileKV);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      const unsigned long long da = sw128_desc(q_addr + (ks >> 2) * (kBlockM * 128) + (ks & 3) * 32, 16, kAtom);
      const unsigned long long db = sw128_desc(k_addr + (ks >> 2) * (kBlockN * 128) + (ks & 3) * 32, 16, kAtom);
      Wgmma<elem_t, kBlockN, 0>::ss(acc, da, db, ks > 0 ? 1 : 0);
    }
    wgmma_commit();
  };

  float s[kNT][4];  // scores of one key block, then its P
  float(&s_flat)[kNT * 4] = reinterpret_cast<float(&)[kNT * 4]>(s);
  float corr[2];        // acc_o rescale that the softmax of the newest block asks for
  bool rescale = false;  // whether it asks for one (softmax.cuh: lazy row max)
  // P of block nb as the A fragments of P V(nb), 4 registers per 16 keys; with kDeferPvWait
  // in buffer nb & 1, so P(nb + 1) is packed while P V(nb) still reads P(nb).
  unsigned pa[kPBuffers][kKSteps][4];

  // Scores of key block `block` of tile t (in s, wgmma done) -> P with masking, online
  // softmax and dropout.
  auto softmax_block = [&](const Tile& t, int block) {
    const long long n0 = static_cast<long long>(block) * kBlockN;
    // Masking: only blocks that cross the key end or the causal diagonal need it.
    const bool need_mask = (n0 + kBlockN > seqlen_k) || (kCausal && n0 + kBlockN - 1 > t.m0 + causal_diag);
    const float sc =
        prescale_scores<kCausal>(s, scale_log2, need_mask, t.m0 + lane_row, n0, lane, seqlen_k, causal_diag);
    rescale = sm.update_scores<true>(s, sc, corr);  // s becomes P (un-normalised, undropped)
    if constexpr (kDropout) {
      // One Philox call per thread per 16x16 block, drawn right before its keep bits are
      // applied: this runs while P V(block - 1) is on the tensor cores. (Drawing all of a
      // block's words while S ran held 32 more registers and spilled; H100, 2026-11-25:
      // this order was 3-15 % faster.)
      const unsigned R = static_cast<unsigned>((q_start + t.m0 + warp_row) >> 4);  // global 16-row block
      const unsigned C0 = static_cast<unsigned>((k_start + n0) >> 4);
#pragma unroll
      for (int c16 = 0; c16 < kNT / 2; ++c16) {
        const uint4 w = dropout_block_words(dp, t.b, t.h, R, C0 + c16, lane);
        apply_keep(s[2 * c16], w.x, w.y, threshold);      // n8 tile 0: rows 0-7, 8-15
        apply_keep(s[2 * c16 + 1], w.z, w.w, threshold);  // n8 tile 1
      }
    }
  };
  auto pack_p = [&](unsigned(&dst)[kKSteps][4]) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      dst[ks][0] = pack2<elem_t>(s[2 * ks][0], s[2 * ks][1]);
      dst[ks][1] = pack2<elem_t>(s[2 * ks][2], s[2 * ks][3]);
      dst[ks][2] = pack2<elem_t>(s[2 * ks + 1][0], s[2 * ks + 1][1]);
      dst[ks][3] = pack2<elem_t>(s[2 * ks + 1][2], s[2 * ks + 1][3]);
    }
  };

  if constexpr (kTma) {
    mbar_wait(full_q, 0);
    mbar_wait(full_k(0), 0);
  } else {
    cp_async_wait<2>();
    fence_proxy_async();
    __syncthreads();  // Q and K(0) visible to every warpgroup's wgmma
  }
  issue_s(s_flat, 0);
  wgmma_wait<0>();
  fence_operands(s_flat);
  if constexpr (kTma) release(empty_k(0));
  softmax_block(g, 0);
  pack_p(pa[0]);

  // One step per key block nb, per warpgroup (FlashAttention-3's intra-warpgroup overlap):
  // S(nb + 1) is issued, acc_o rescaled, P V(nb) issued; then the softmax and dropout
  // (Philox words included) of block nb + 1 run on the ALUs while P V(nb) runs on the
  // tensor cores. Each wgmma's accumulators are read only after a wait that ptxas can see
  // covers it (or it serializes every wgmma). By cp.async, one barrier per step: K(nb + 1)
  // and V(nb) both land before it, and K(nb + 2), V(nb + 1) stream in behind it for a whole
  // step. By TMA (kTma), the step waits for K(nb + 1) and V(nb) on their full barriers, and
  // the producer refills each stage as soon as every compute warp has released it.
  //
  // Where P V(nb) is waited for. A wait at the end of the step (before P(nb + 1) can be
  // packed over P(nb)) is one ptxas hoists to the top of the softmax: it has no inputs and
  // is modelled as free, so in every variant the softmax ran only after P V(nb) (SASS,
  // 2026-12-02; ncu sampled 10.3 % of the hd 64 forward's warps at it, p = 0.1, S = 4k).
  // With kDeferPvWait, P(nb + 1) goes to the other P buffer and P V(nb) is waited for in the
  // next step, behind S(nb + 2)'s issue; P V(nb) may then still read V(nb) at that step's
  // barrier, so V takes three stages. Without dropout that overlap won (H200, BENCH.md
  // v16). The dropout variants keep the wait at the end (so, hoisted): deferred, the extra
  // 32 registers of P spilled at hd 64 and it read 1-4 % slower, and with the softmax put
  // in a block of its own, which kept the wait after it, -4..+2 %. They are ALU-bound.
  //
  // has_next: whether block nb + 1 exists; buf: the P buffer P V(nb) reads (nb & 1). Both
  // are constants at every call, which NVVM inlines and folds, so the loop carries no
  // epilogue. (A generic lambda taking them as types compiled in NVRTC 13.5 but not in the
  // device's 13.0: "host functions are not allowed in JIT mode".)
  // Against the loop before v15 (one block lambda with the stage as nb & 1, the epilogue
  // after the loop, a zero-block case): 24-64 fewer loop instructions in every fp16 variant
  // (hd 64 causal with dropout on the short tiles 868 -> 838), and +3.7..+5.7 % on that
  // forward at S = 1k in four readings over three calls (H200, 2026-12-02, BENCH.md v15).
  auto step = [&](const bool has_next, const int buf) {
    const int v_cur = kVStages == 3 ? v_stage : stage;
    const int v_next = kVStages == 3 ? (v_stage == 2 ? 0 : v_stage + 1) : stage ^ 1;
    if constexpr (kTma) {  // K(nb + 1) and V(nb) have landed
      if (has_next) mbar_wait(full_k(stage ^ 1), ((nb + 1) >> 1) & 1);
      mbar_wait(full_v(v_cur), (nb / kVStages) & 1);
    } else {
      // In flight: K(nb + 1), V(nb); both are needed now.
      cp_async_wait<0>();
      fence_proxy_async();
      // K(nb + 1) and V(nb) visible to wgmma. Every warpgroup is done with S(nb) (waited for
      // in the last step) and with P V(nb - 1) (two stages: waited for in the last step) or
      // P V(nb - 2) (three: in the one before), so K stage `stage` and V stage v_next are free.
      __syncthreads();
      if (has_next) {
        if (nb + 2 < g.n_blocks) load_k(g, nb + 2, stage);
        load_v(g, nb + 1, v_next);
      }
      cp_async_commit();
    }
    if (has_next) issue_s(s_flat, stage ^ 1);  // s is free: P(nb) is in pa

    if constexpr (kDeferPvWait) {
      // P V(nb - 1) ran through the last step's softmax; retire it (S(nb + 1) stays in
      // flight) before acc_o is read, and with it P(nb - 1)'s buffer, packed over below.
      if (has_next) wgmma_wait<1>(); else wgmma_wait<0>();
      fence_operands(acc_flat);
      if (kTma && nb > 0) release(empty_v(v_cur == 0 ? kVStages - 1 : v_cur - 1));  // V(nb - 1)
    }
    // P V(nb - 1) has been waited for. Warp-uniform branch: most blocks after the first few
    // keep the row max and skip the kDT * 4 multiplies.
    if (rescale) OnlineSoftmax<kNT>::rescale(acc_o, corr);

    // acc_o += P V(nb): key step ks starts at row 16 ks; LBO steps to the next 64 head-dim columns.
    const unsigned v_addr = smem_u32(sV + v_cur * kTileKV);
    wgmma_fence();  // acc_o (rescaled) and pa were written by ordinary instructions
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      const unsigned long long db = sw128_desc(v_addr + ks * 16 * 128, kBlockN * 128, kAtom);
      Wgmma<elem_t, kHeadDim, 1>::rs(acc_flat, pa[kDeferPvWait ? buf : 0][ks], db, 1);
    }
    wgmma_commit();

    // Epilogue factors: out = acc_o * drop_scale / l_i; lse = (m_i + log2 l_i) * ln 2.
    float row_mul[2], row_lse[2];
    if (!has_next) sm.finalize(drop_scale, row_mul, row_lse);
    if (has_next) {
      wgmma_wait<1>();  // S(nb + 1) done; P V(nb) still running
      fence_operands(s_flat);
      if constexpr (kTma) release(empty_k(stage ^ 1));  // K(nb + 1)
      softmax_block(g, nb + 1);
    }
    if (!kDeferPvWait || !has_next) {
      wgmma_wait<0>();  // P V(nb) done: acc_o and pa are free again
      fence_operands(acc_flat);
      if constexpr (kTma) release(empty_v(v_cur));  // V(nb)
    }
    if (!has_next) {
      store_rows(acc_o, row_mul, row_lse, out + g.b * o_st.b + g.h * o_st.h, o_st.s,
                 lse + static_cast<long long>(g.bh) * seqlen_q, g.m0 + lane_row, seqlen_q, head_dim);
    }
    if (has_next) pack_p(pa[kDeferPvWait ? buf ^ 1 : 0]);
    ++nb;
    stage ^= 1;
    v_stage = v_next;
  };
  if constexpr (kDeferPvWait) {
    for (;;) {  // two steps per trip, so that each one's P buffer is a constant
      if (nb + 1 >= g.n_blocks) { step(false, 0); break; }
      step(true, 0);
      if (nb + 1 >= g.n_blocks) { step(false, 1); break; }
      step(true, 1);
    }
  } else {
    while (nb + 1 < g.n_blocks) step(true, 0);
    step(false, 0);
  }
  if constexpr (!kTma) cp_async_wait<0>();  // no copy may be left in flight at exit
}
