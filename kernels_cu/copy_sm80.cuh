// Asynchronous global->shared copies (cp.async, sm_80+), 16 bytes per thread per call.
#pragma once

namespace cuflash {

// Copy 16 bytes, or write 16 zero bytes when !valid (src-size 0: src is then not read).
// The sm_80 loaders below still pass the tensor's base for such a piece: passing the
// piece's own address (which may lie past the tensor) moved ptxas's spills both ways in
// sm_80 variants (2026-12-02, not timed). The Hopper forward does pass it: wgmma_sm90.cuh.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))), "l"(gmem), "r"(valid ? 16 : 0));
}

// Copy 4 bytes (or write 4 zero bytes when !valid; src must still be mapped).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))), "l"(gmem), "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Load a (ROWS x D) tile of 16-bit elements into shared memory (row stride ld elements).
// Rows at or past `rows_valid` and columns at or past `d_valid` are zero-filled, so
// tails and padded head dims contribute nothing to the products.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, int ld, const T* gmem, long long row_stride,
                                                int rows_valid, int d_valid) {
  constexpr int kChunksPerRow = D / 8;  // 16-byte chunks
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % THREADS == 0, "every thread copies the same number of chunks");
  if constexpr (THREADS % kChunksPerRow == 0) {  // a thread keeps its column from step to step
    constexpr int kRowStep = THREADS / kChunksPerRow;  // rows between a thread's chunks
    const int row0 = threadIdx.x / kChunksPerRow, col = (threadIdx.x % kChunksPerRow) * 8;
    const T* src = gmem + row0 * row_stride + col;  // stepped by whole rows (see load_tile_sw128_async)
#pragma unroll
    for (int it = 0; it < kChunks / THREADS; ++it, src += kRowStep * row_stride) {
      const int row = row0 + it * kRowStep;
      const bool valid = row < rows_valid && col < d_valid;
      cp_async_16(smem + row * ld + col, valid ? src : gmem, valid);
    }
  } else {  // head dim 96: 12 chunks a row
#pragma unroll
    for (int it = 0; it < kChunks / THREADS; ++it) {
      const int c = it * THREADS + threadIdx.x;
      const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
      const bool valid = row < rows_valid && col < d_valid;
      cp_async_16(smem + row * ld + col, valid ? gmem + row * row_stride + col : gmem, valid);
    }
  }
}

}  // namespace cuflash
