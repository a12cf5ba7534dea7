"""Launch of the dropout_mask() kernel (kernels_cu/dropout_mask.cu) on the current CuPy stream."""

from __future__ import annotations

import numpy as np

from ._compile import get_function
from ._config import MASK_VARIANT

_THREADS = 256


def dropout_mask(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, *, threshold: int, seed: int,
                 offset: int, elementwise: bool = False, transposed: bool = False):
    """bool (batch, nheads, seqlen_q, seqlen_k), True = kept. elementwise: the per-element path
    (the definition); transposed: the Hopper backward's route (dropout_mask.cu); neither: the
    forward kernels' route."""
    import cupy

    out = cupy.empty((batch, nheads, seqlen_q, seqlen_k), dtype=cupy.uint8)
    args = (out, np.int32(batch), np.int32(nheads), np.int64(seqlen_q), np.int32(seqlen_k),
            np.uint64(seed), np.uint32(offset), np.uint32(threshold))
    if elementwise:
        fn = get_function(MASK_VARIANT, "dropout_mask_elementwise_kernel")
        blocks = min(-(-out.size // _THREADS), 65536)
        fn((blocks,), (_THREADS,), args)
    elif transposed:
        fn = get_function(MASK_VARIANT, "dropout_mask_transposed_kernel")
        grid = (-(-seqlen_k // 16), -(-seqlen_q // 16), batch * nheads)
        if grid[1] > 65535 or grid[2] > 65535:
            raise ValueError(f"the transposed path takes at most 65535 row blocks and batch * nheads, got {grid}")
        fn(grid, (32,), args)
    else:
        fn = get_function(MASK_VARIANT, "dropout_mask_kernel")
        n_r, n_c = -(-seqlen_q // 16), -(-seqlen_k // 16)
        if n_r >= 1 << 31:
            raise ValueError(f"seqlen_q={seqlen_q} is too long for dropout_mask()")
        grid = (-(-(n_c * 32) // _THREADS), n_r, batch * nheads)
        if grid[1] > 65535 or grid[2] > 65535:
            return dropout_mask(batch, nheads, seqlen_q, seqlen_k, threshold=threshold, seed=seed,
                                offset=offset, elementwise=True)
        fn(grid, (_THREADS,), args)
    return out.view(cupy.bool_)
