"""Every kernel variant cuflash can launch, and the tile configuration behind each.

This module is the one place tile sizes and compile-time switches live. Kernels read
them as ``-D`` macros into ``constexpr`` values; nothing in ``kernels_cu/`` restates
a tile size.
"""

from __future__ import annotations

from ._compile import KernelVariant

__all__ = ["MASK_VARIANT", "CURAND_VECTORS_VARIANT", "all_variants", "CHECK_ARCHS"]

# Targets the compile check builds every variant for: Ampere-class code (sm_80, which
# also runs on sm_86/89/90) and Hopper's arch-specific target (wgmma, setmaxnreg).
CHECK_ARCHS = ("sm_80", "sm_90a")

MASK_VARIANT = KernelVariant(
    entry="dropout_mask.cu",
    functions=("dropout_mask_kernel", "dropout_mask_elementwise_kernel"),
)

CURAND_VECTORS_VARIANT = KernelVariant(
    entry="curand_vectors.cu",
    functions=("curand_philox_stream", "philox_block_pair"),
)


def all_variants() -> list[KernelVariant]:
    """Every variant the library (and its GPU tests) can launch."""
    return [MASK_VARIANT, CURAND_VECTORS_VARIANT]
