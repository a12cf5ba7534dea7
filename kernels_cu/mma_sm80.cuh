// Tensor-core and shared-memory fragment wrappers for sm_80+ (mma.sync m16n8k16, ldmatrix).
// One small function per instruction; the fragment layouts are the PTX ISA's
// ("Matrix Fragments for mma.m16n8k16"): in the 16x8 fp32 accumulator, lane t holds
// rows t/4 and t/4+8, columns 2(t%4) and 2(t%4)+1 -- the layout dropout.cuh builds on.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulate. a: 4 regs, b: 2 regs, d: 4 floats.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_ptr)));
}

// The same, each 8x8 matrix transposed on the way into registers.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* row_ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row_ptr)));
}

// Two floats -> one register of two 16-bit values (low half = first).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);

template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

// Warp GEMM on shared-memory operands: acc(16 x 8*NT) += A(16 x 16*KSTEPS) * B(16*KSTEPS x 8*NT).
//   A_KM = false: A stored [m][k] (row stride lda);  true: stored [k][m] (A^T in memory).
//   B_KN = false: B stored [n][k] (B^T in memory);   true: stored [k][n].
// a/b point at element (m0|k0) / (n0|k0) of the warp's tile; strides in elements.
template <typename T, int NT, int KSTEPS, bool A_KM, bool B_KN>
__device__ __forceinline__ void warp_gemm_ss(float (&acc)[NT][4], const T* a, int lda, const T* b, int ldb) {
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < KSTEPS; ++ks) {
    unsigned af[4];
    if (!A_KM) {  // matrices: (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
      ldmatrix_x4(af, a + (lane & 15) * lda + ks * 16 + (lane >> 4) * 8);
    } else {
      ldmatrix_x4_trans(af, a + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * lda + ((lane >> 3) & 1) * 8);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      unsigned bf[4];  // b0,b1 of n-tile nt, then of nt+1
      if (!B_KN) {
        ldmatrix_x4(bf, b + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * ldb + ks * 16 + ((lane >> 3) & 1) * 8);
      } else {
        ldmatrix_x4_trans(bf, b + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + nt * 8 + (lane >> 4) * 8);
      }
      mma_16816<T>(acc[nt], af, bf[0], bf[1]);
      mma_16816<T>(acc[nt + 1], af, bf[2], bf[3]);
    }
  }
}

}  // namespace cuflash
