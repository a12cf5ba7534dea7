"""Every kernel variant cuflash can launch, and the tile configuration behind each.

This module is the one place tile sizes and compile-time switches live. Kernels read
them as ``-D`` macros into ``constexpr`` values; nothing in ``kernels_cu/`` restates
a tile size.
"""

from __future__ import annotations

from ._compile import KernelVariant

import dataclasses

__all__ = [
    "MASK_VARIANT",
    "CURAND_VECTORS_VARIANT",
    "HEAD_DIMS",
    "DTYPES",
    "AttnTiles",
    "padded_head_dim",
    "fwd_tiles",
    "bwd_tiles",
    "fwd_variant",
    "bwd_variant",
    "all_variants",
    "CHECK_ARCHS",
]

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


# Head dims the kernels are specialized for; any other multiple of 8 up to 256 runs on
# the next one up, its extra columns zero-filled on load and skipped on store.
HEAD_DIMS = (32, 64, 96, 128, 192, 256)
DTYPES = ("float16", "bfloat16")


def padded_head_dim(head_dim: int) -> int:
    for d in HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(f"head dim must be at most {HEAD_DIMS[-1]}, got {head_dim}")


@dataclasses.dataclass(frozen=True)
class AttnTiles:
    """CTA tile: block_m query rows x block_n key rows, `warps` warps."""

    block_m: int
    block_n: int
    warps: int

    def smem_bytes(self, head_dim: int, kind: str) -> int:
        """Dynamic shared memory of a forward or backward CTA (mirrors the kernels' carve-up)."""
        ld = head_dim + 8  # kSmemPad: 16 bytes per row keep ldmatrix rows in distinct banks
        if kind == "fwd":  # sQ, sK, sV
            return 2 * ld * (self.block_m + 2 * self.block_n)
        # sK, sV, sQ, sdO, then sP and sdS (block_m x (block_n + 8)), then lse and delta
        return 2 * ld * 2 * (self.block_m + self.block_n) + 2 * 2 * self.block_m * (self.block_n + 8) + 8 * self.block_m


def fwd_tiles(head_dim: int) -> AttnTiles:
    # each warp owns 16 query rows; head dims past 128 take 32-key blocks so acc_o
    # (head_dim / 2 floats per thread) and S (block_n / 2) stay in registers
    return AttnTiles(block_m=64, block_n=64 if head_dim <= 128 else 32, warps=4)


def bwd_tiles(head_dim: int) -> AttnTiles:
    # 4 row slices of 16; past head dim 128 two warps share a slice, splitting dK/dV/dQ
    # columns, so the dK and dV accumulators stay at <= 128 floats per thread
    return AttnTiles(block_m=64, block_n=64, warps=4 if head_dim <= 128 else 8)


def _attn_macros(dtype: str, head_dim: int, causal: bool, dropout: bool, tiles: AttnTiles):
    return (
        ("CUFLASH_DTYPE_BF16", "1" if dtype == "bfloat16" else "0"),
        ("CUFLASH_HEAD_DIM", str(head_dim)),
        ("CUFLASH_BLOCK_M", str(tiles.block_m)),
        ("CUFLASH_BLOCK_N", str(tiles.block_n)),
        ("CUFLASH_WARPS", str(tiles.warps)),
        ("CUFLASH_CAUSAL", "1" if causal else "0"),
        ("CUFLASH_DROPOUT", "1" if dropout else "0"),
    )


def fwd_variant(dtype: str, head_dim: int, causal: bool, dropout: bool) -> KernelVariant:
    """The forward kernel for a padded head dim (one of HEAD_DIMS)."""
    return KernelVariant("attn_fwd.cu", ("attn_fwd_kernel",),
                         _attn_macros(dtype, head_dim, causal, dropout, fwd_tiles(head_dim)))


def bwd_variant(dtype: str, head_dim: int, causal: bool, dropout: bool) -> KernelVariant:
    """The backward kernels (main, delta, dq cast, GQA dk/dv reduce) for a padded head dim."""
    return KernelVariant(
        "attn_bwd.cu",
        ("attn_bwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkv_reduce_kernel"),
        _attn_macros(dtype, head_dim, causal, dropout, bwd_tiles(head_dim)),
    )


def all_variants() -> list[KernelVariant]:
    """Every variant the library (and its GPU tests) can launch."""
    attn = [
        make(dtype, d, causal, dropout)
        for make in (fwd_variant, bwd_variant)
        for dtype in DTYPES
        for d in HEAD_DIMS
        for causal in (False, True)
        for dropout in (False, True)
    ]
    return [MASK_VARIANT, CURAND_VECTORS_VARIANT, *attn]
