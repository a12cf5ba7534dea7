// Hopper warpgroup MMA (wgmma, sm_90a) and the 128-byte-swizzled shared-memory layout it reads.
// PTX ISA: "Asynchronous Warpgroup Level Matrix Multiply-Accumulate" (wgmma.mma_async,
// matrix descriptors, swizzle atoms). One small function per instruction.
//
// Shared-memory tile layout (tile_sw128_offset): a ROWS x D tile of 16-bit elements,
// D a multiple of 64, is stored as D/64 column chunks, each ROWS rows of 128 bytes;
// inside a chunk the 16-byte piece c of row r sits at slot c ^ (r % 8). Every 8 rows form
// one 1024-byte swizzle atom, so chunk bases must be 1024-byte aligned.
//   As a K-major operand (Q as A, K as B of S = Q K^T: rows = M or N, columns = K):
//     SBO = 1024 (next 8 rows), LBO unused; the k-th 16-column step starts 32*(k%4) bytes
//     into chunk k/4.
//   As an MN-major operand (V as B of O = P V: rows = K (keys), columns = N (head dim)):
//     SBO = 1024 (next 8 keys), LBO = ROWS*128 (next 64 head-dim columns); the k-th
//     16-key step starts at row 16k.
// Accumulators of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 and +8, and
// d[4t + e] is the same element as the m16n8 fragment f[t][e] of mma_sm80.cuh, so the
// softmax and dropout code of the sm_80 path applies unchanged.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "copy_sm80.cuh"

namespace cuflash {

// Byte offset of element (r, c) of a ROWS-row tile in the layout above.
template <int ROWS>
__device__ __forceinline__ unsigned tile_sw128_offset(int r, int c) {
  return static_cast<unsigned>((c >> 6) * ROWS * 128 + r * 128 + ((((c & 63) >> 3) ^ (r & 7)) << 4) + (c & 7) * 2);
}

// Load a ROWS x D tile (row stride `row_stride` elements in global memory) into that layout
// by cp.async, 16 bytes per thread per step; rows at or past rows_valid and columns at or
// past d_valid are zero-filled (tails, padded head dims).
// kSafeSrc: a zero-filled piece names the tile's base as its source instead of its own
// address, which may lie past the tensor. cp.async reads nothing at src-size 0 (memcheck
// clean either way, one cudaMalloc per tensor), so the select only shapes ptxas's code. The
// forward drops it: two SELs a piece, hd64 with dropout 824 -> 792 loop instructions, fewer
// registers in every variant, +1.1 % mean over the benchmark's fp16 rows (BENCH.md v14).
// The backward keeps it: without it ptxas spilled 20 B, not 8, at hd64 p = 0.1, and the
// A/B read -1..-3 % at hd64 and at hd128 with dropout (H200, 2026-12-02).
template <int ROWS, int D, int THREADS, bool kSafeSrc = true, typename T>
__device__ __forceinline__ void load_tile_sw128_async(unsigned char* smem, const T* gmem, long long row_stride,
                                                      int rows_valid, int d_valid) {
  static_assert(D % 64 == 0 && ROWS % 8 == 0, "whole 128-byte rows, whole swizzle atoms");
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  static_assert(ROWS * kPieces % THREADS == 0, "every thread copies the same number of pieces");
  static_assert(THREADS % kPieces == 0, "a thread keeps its column from step to step");
  constexpr int kRowStep = THREADS / kPieces;  // rows between a thread's pieces
  const int row0 = threadIdx.x / kPieces, col = (threadIdx.x % kPieces) * 8;
  // Stepped by whole rows, one 64-bit add a piece. Indexing each piece from gmem instead let
  // ptxas hoist one 64-bit address per piece out of the callers' loops: ptxas 13.0, fp16,
  // 2026-12-01, backward hd64 p=0.1 255 registers + 56 B spilled -> 255 + 0, hd128 p=0.1
  // 254 + 104 B -> 254 + 0; forward hd128 p=0.1 (64x64) 242 -> 184 registers.
  const T* src = gmem + row0 * row_stride + col;
#pragma unroll
  for (int it = 0; it < ROWS * kPieces / THREADS; ++it, src += kRowStep * row_stride) {
    const int row = row0 + it * kRowStep;
    const bool valid = row < rows_valid && col < d_valid;
    cp_async_16(smem + tile_sw128_offset<ROWS>(row, col), (!kSafeSrc || valid) ? src : gmem, valid);
  }
}

// Matrix descriptor: start address, leading/stride byte offsets (all >> 4), 128B swizzle.
__device__ __forceinline__ unsigned long long sw128_desc(unsigned smem_addr, unsigned lbo_bytes, unsigned sbo_bytes) {
  return static_cast<unsigned long long>((smem_addr & 0x3FFFF) >> 4) |
         (static_cast<unsigned long long>((lbo_bytes & 0x3FFFF) >> 4) << 16) |
         (static_cast<unsigned long long>((sbo_bytes & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Orders this thread's register and shared-memory writes before the next wgmma reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// The compiler sees a wgmma's accumulators written when it is issued, not when
// wgmma_wait returns: tie every register to this point so no read moves above the wait
// (and no write below a wgmma that is still reading).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Shared memory written through the generic proxy (st.shared, cp.async) becomes visible to
// wgmma, which reads through the async proxy, only after this fence (then a barrier).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <typename T>
struct WgmmaType;
template <>
struct WgmmaType<__half> {
  static constexpr bool kBf16 = false;
};
template <>
struct WgmmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};

// Accumulator operand lists: d[0..N/2) of one m64nNk16 wgmma, as "+f" operands %0.. and their PTX vector.
#define CUFLASH_WGMMA_D32 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define CUFLASH_WGMMA_DSTR32 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define CUFLASH_WGMMA_D64 \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define CUFLASH_WGMMA_DSTR64 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"

// d (64 x N, fp32) (+)= A (64 x 16) * B (16 x N). SS: A and B from shared memory
// (descriptors); RS: A from registers (the m16n8k16 A fragment of each warp's 16 rows).
// accumulate = 0 overwrites d. TRANS_B = 1 reads B MN-major (V), 0 K-major (K); TRANS_A
// likewise for a shared-memory A (1: the backward's dS, stored [key][query], as A of dS K).
#define CUFLASH_WGMMA_SS(N, NR, TY, IA, IB, IACC, ITA, ITB)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IACC ", 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " CUFLASH_WGMMA_DSTR##NR \
               ", %" IA ", %" IB ", p, 1, 1, %" ITA ", %" ITB ";\n}\n"                             \
               : CUFLASH_WGMMA_D##NR                                                              \
               : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TRANS_A), "n"(TRANS_B))
#define CUFLASH_WGMMA_RS(N, NR, TY, IA0, IA1, IA2, IA3, IB, IACC, ITB)                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IACC ", 0;\n"                                \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " " CUFLASH_WGMMA_DSTR##NR \
               ", {%" IA0 ", %" IA1 ", %" IA2 ", %" IA3 "}, %" IB ", p, 1, 1, %" ITB ";\n}\n"             \
               : CUFLASH_WGMMA_D##NR                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(TRANS_B))

template <typename T, int N, int TRANS_B, int TRANS_A = 0>
struct Wgmma;

template <typename T, int TRANS_B, int TRANS_A>
struct Wgmma<T, 64, TRANS_B, TRANS_A> {
  static __device__ __forceinline__ void ss(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b,
                                            int accumulate) {
    if constexpr (WgmmaType<T>::kBf16) {
      CUFLASH_WGMMA_SS(64, 32, "bf16", "32", "33", "34", "35", "36");
    } else {
      CUFLASH_WGMMA_SS(64, 32, "f16", "32", "33", "34", "35", "36");
    }
  }
  static __device__ __forceinline__ void rs(float (&d)[32], const unsigned (&a)[4], unsigned long long desc_b,
                                            int accumulate) {
    if constexpr (WgmmaType<T>::kBf16) {
      CUFLASH_WGMMA_RS(64, 32, "bf16", "32", "33", "34", "35", "36", "37", "38");
    } else {
      CUFLASH_WGMMA_RS(64, 32, "f16", "32", "33", "34", "35", "36", "37", "38");
    }
  }
};

template <typename T, int TRANS_B, int TRANS_A>
struct Wgmma<T, 128, TRANS_B, TRANS_A> {
  static __device__ __forceinline__ void ss(float (&d)[64], unsigned long long desc_a, unsigned long long desc_b,
                                            int accumulate) {
    if constexpr (WgmmaType<T>::kBf16) {
      CUFLASH_WGMMA_SS(128, 64, "bf16", "64", "65", "66", "67", "68");
    } else {
      CUFLASH_WGMMA_SS(128, 64, "f16", "64", "65", "66", "67", "68");
    }
  }
  static __device__ __forceinline__ void rs(float (&d)[64], const unsigned (&a)[4], unsigned long long desc_b,
                                            int accumulate) {
    if constexpr (WgmmaType<T>::kBf16) {
      CUFLASH_WGMMA_RS(128, 64, "bf16", "64", "65", "66", "67", "68", "69", "70");
    } else {
      CUFLASH_WGMMA_RS(128, 64, "f16", "64", "65", "66", "67", "68", "69", "70");
    }
  }
};

}  // namespace cuflash
