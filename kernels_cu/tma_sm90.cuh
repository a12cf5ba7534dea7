// Hopper tensor-memory-accelerator loads (cp.async.bulk.tensor, sm_90a) and the shared-memory
// mbarriers that track them. PTX ISA: "Tensor Copy" (cp.async.bulk.tensor), "mbarrier". One
// small function per instruction.
//
// A tensor map (Python: cuflash/_tma.py) describes one (B, S, H, D) tensor as the 4-d box
// grid (D, S, H, B), 64 columns x ROWS rows per box, 128-byte swizzled: TMA writes a box as
// one 64-column chunk of the wgmma layout of wgmma_sm90.cuh (piece c of row r at slot
// c ^ (r % 8)), and zero-fills every element past the tensor's S or D, so tails and padded
// head dims need no code.
//
// Full barrier of a stage: one arrival (the producer's expect_tx) plus the copies' bytes.
// Empty barrier: one arrival per consumer warp once its wgmmas reading the stage are done.
// A barrier's phase flips each time it completes; the u-th use of a stage (u = 0, 1, ...)
// waits for parity u & 1 on its full barrier, and its refill waits for parity (u - 1) & 1 on
// its empty barrier.
#pragma once

namespace cuflash {

// The driver's CUtensorMap (cuda.h), passed by value as a __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the inits visible to the async proxy (the copies' complete_tx), before any use.
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// One arrival that also announces `bytes` of copies completing on this barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Spins until the phase of parity `parity` has completed (acquire: the copies' data, or the
// consumers' reads, are ordered before what follows).
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Box (c0 = first column, c1 = first row, c2 = head, c3 = batch) of `map` into shared memory
// at dst (1024-byte aligned), completing `bar`'s transaction count.
__device__ __forceinline__ void tma_load_4d(unsigned dst, const TensorMap& map, int c0, int c1, int c2, int c3,
                                            unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

}  // namespace cuflash
