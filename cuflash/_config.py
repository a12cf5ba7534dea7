"""Every kernel variant cuflash can launch, and the tile configuration behind each.

This module is the one place tile sizes and compile-time switches live. Kernels read
them as ``-D`` macros into ``constexpr`` values; nothing in ``kernels_cu/`` restates
a tile size.
"""

from __future__ import annotations

from ._compile import KernelVariant

import dataclasses
import functools

__all__ = [
    "MASK_VARIANT",
    "CURAND_VECTORS_VARIANT",
    "HEAD_DIMS",
    "DTYPES",
    "AttnTiles",
    "padded_head_dim",
    "FWD_SHORT_KEYS",
    "fwd_tiles",
    "hopper_fwd_tiles",
    "cp_async_fallback",
    "hopper_fwd_builds",
    "SM90_FWD_HEAD_DIMS",
    "SM90_BWD_HEAD_DIMS",
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
    functions=("dropout_mask_kernel", "dropout_mask_elementwise_kernel", "dropout_mask_transposed_kernel"),
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
    stages: int = 1  # backward: shared-memory stages of Q and dO (2: block m+1 loads while m computes)
    min_blocks: int = 1  # Hopper kernels: CTAs per SM they are built for (__launch_bounds__ caps registers)
    v_stages: int = 2  # Hopper forward: shared-memory stages of V (3: P V waited for one step later)
    tma: bool = False  # Hopper forward: a producer warpgroup loads by TMA into mbarrier-guarded stages

    @property
    def threads(self) -> int:
        """Threads a CTA launches with: `warps` compute warps, plus the producer warpgroup (tma)."""
        return 32 * (self.warps + 4 * self.tma)

    def smem_bytes(self, head_dim: int, kind: str) -> int:
        """Dynamic shared memory of a forward or backward CTA (mirrors the kernels' carve-up)."""
        if kind == "fwd_sm90":  # sQ, two stages of sK, v_stages of sV (128-byte swizzled), 1 KB alignment slack
            # (tma: then 8 bytes per mbarrier, Q's and two per K and V stage)
            bars = 8 * (1 + 2 * (2 + self.v_stages)) if self.tma else 0
            return 2 * head_dim * (self.block_m + (2 + self.v_stages) * self.block_n) + 1024 + bars
        if kind == "bwd_sm90":  # sK, sV, two stages of (sQ, sdO), sdS^T, sP^T, two stages of lse and delta, slack
            return 2 * head_dim * (2 * self.block_n + 4 * self.block_m) + 4 * self.block_n * self.block_m \
                + 16 * self.block_m + 1024
        ld = head_dim + 8  # kSmemPad: 16 bytes per row keep ldmatrix rows in distinct banks
        if kind == "fwd":  # sQ, sK, sV
            return 2 * ld * (self.block_m + 2 * self.block_n)
        # sK, sV, `stages` x (sQ, sdO), then sP and sdS (block_m x (block_n + 8)), then lse and delta
        return (2 * ld * (2 * self.block_n + 2 * self.stages * self.block_m)
                + 2 * 2 * self.block_m * (self.block_n + 8) + 8 * self.block_m)


# Head dims the Hopper (sm_90a, wgmma) forward and backward are built for; others use the
# sm_80 kernels.
SM90_FWD_HEAD_DIMS = (64, 128)
SM90_BWD_HEAD_DIMS = (64, 128)


# Key lengths up to this run the hd 64 Hopper forward with dropout on the short-sequence
# tiles, and the causal hd 64 one without dropout by cp.async (fwd_tiles).
FWD_SHORT_KEYS = 2048

# Every Hopper forward tiling loads by TMA (a producer warpgroup, mbarrier-guarded stages:
# attn_fwd_sm90.cu) except the one below. H200 fp16, 2026-12-02, forward TFLOP/s against the
# same tiles by cp.async, three alternating runs (BENCH.md v17): p = 0 hd 64 +10..+29 %,
# hd 128 +29..+35 % (full) and +4..+34 % (causal); p = 0.1 hd 64 +0.5..+6 %, hd 128
# -0.2..+11 %. The exception, hd 64 causal without dropout at S = 1k and 2k, read -10 % and
# -4 % (a 128-query CTA sees few 128-key blocks there, and without dropout each is short).


def fwd_tiles(head_dim: int, hopper: bool = False, dropout: bool = False, seqlen_k: int | None = None,
              causal: bool = False) -> AttnTiles:
    """Forward tiles; seqlen_k (None: long) picks the short-sequence tiles where they differ,
    and with causal the cp.async loads where TMA lost (above)."""
    short = seqlen_k is not None and seqlen_k <= FWD_SHORT_KEYS
    if hopper and head_dim == 64 and dropout and short:
        # one warpgroup per CTA, three CTAs per SM (ptxas: 144-148 registers by cp.async; by
        # TMA the compute warpgroup holds 136 of the pool, no spills, and read +1.5..+6.2 % at
        # S = 1k-2k, BENCH.md v17):
        # with few key blocks per CTA its prologue and epilogue weigh, and the other CTAs'
        # main loops run beside them. H200 p=0.1, 2026-12-02, TFLOP/s against 128x64 with
        # two warpgroups, two CTAs per SM (fp16 / bf16): S=1k 209 / 209 vs 207 / 209 (full),
        # 178 / 178 vs 162 / 163 (causal); S=2k 216 / 217 vs 217 / 217, 196 / 196 vs
        # 186 / 187. (The same tiles built for four CTAs per SM, 124 registers: 204-210
        # full, 174-190 causal. Against 128x128, 2026-12-01, 128x64 had read S=1k 206 vs 191
        # full, 159 vs 147 causal, and equal or worse from 4k on.)
        return AttnTiles(block_m=64, block_n=64, warps=4, min_blocks=3, tma=True)
    if hopper and head_dim == 128 and dropout:
        # one warpgroup per CTA, two CTAs per SM: they drift apart, so one's Philox and
        # softmax work overlaps the other's wgmma. H100 fp16 S=4k, 2026-11-25: 238 (full) /
        # 219 (causal) TFLOP/s vs 222 / 191 for 128x128 with two warpgroups in lockstep.
        # min_blocks=2 is what two CTAs per SM fit anyway; it also starts each thread at the
        # 128 registers that setmaxnreg trades for 232 in the compute warpgroup (TMA).
        return AttnTiles(block_m=64, block_n=64, warps=4, min_blocks=2, tma=True)
    if hopper:
        # two warpgroups x 64 query rows share each K/V block of 128 keys (wgmma n128).
        # H100 fp16 S=4k, 2026-11-25: hd128 p=0 395 TFLOP/s vs 325 with 64-key blocks; hd64
        # p=0.1 174 vs 150 (64x64, one warpgroup) and 157 (64x128).
        # Without dropout, three V stages let the kernel wait for P V a step later, so it
        # overlaps the softmax (attn_fwd_sm90.cu). H200, 2026-12-02, against two stages, p=0,
        # fp16 and bf16 over two calls: hd 64 +2.0..+7.5 %, hd 128 full +0.6..+4.8 %, causal
        # -2.3..+3.3 %. With dropout it read -4..+1 % at hd 64 (255 registers, 8-12 B spilled)
        # and is not taken there.
        return AttnTiles(block_m=128, block_n=128, warps=8, v_stages=2 if dropout else 3,
                         tma=not (head_dim == 64 and causal and not dropout and short))
    # each warp owns 16 query rows; head dims past 128 take 32-key blocks so acc_o
    # (head_dim / 2 floats per thread) and S (block_n / 2) stay in registers
    return AttnTiles(block_m=64, block_n=64 if head_dim <= 128 else 32, warps=4)


def bwd_tiles(head_dim: int, smem_limit: int | None = None, hopper: bool = False) -> AttnTiles:
    """Backward tiles; Q/dO double buffered unless that passes smem_limit (bytes per block).
    hopper: the sm_90a kernel (head dims in SM90_BWD_HEAD_DIMS)."""
    if hopper:
        # two warpgroups x 64 keys share each Q/dO block (wgmma m64 over keys, n = block_m
        # over queries); dK and dV of 64 keys x head_dim stay in each warpgroup's registers.
        # hd 64 takes 128 queries per block: twice the wgmma work per barrier
        return AttnTiles(block_m=128 if head_dim == 64 else 64, block_n=128, warps=8, stages=2)
    tiles = _bwd_tiles(head_dim, stages=2)
    if smem_limit is not None and tiles.smem_bytes(head_dim, "bwd") > smem_limit:
        tiles = _bwd_tiles(head_dim, stages=1)
    return tiles


def _bwd_tiles(head_dim: int, stages: int) -> AttnTiles:
    # 4 row slices of 16, two warps per slice splitting the keys of S/dP and the columns of
    # dK/dV/dQ: with 4 warps the hd 64..128 kernels sat at 255 registers and spilled 36-152 B
    # (ptxas, 2026-11-25); with 8 they take 127-167 at hd 64 (hd 128: 255, 8-16 B spilled)
    return AttnTiles(block_m=64, block_n=64, warps=4 if head_dim <= 32 else 8, stages=stages)


def _attn_macros(dtype: str, head_dim: int, causal: bool, dropout: bool, tiles: AttnTiles):
    return (
        ("CUFLASH_DTYPE_BF16", "1" if dtype == "bfloat16" else "0"),
        ("CUFLASH_HEAD_DIM", str(head_dim)),
        ("CUFLASH_BLOCK_M", str(tiles.block_m)),
        ("CUFLASH_BLOCK_N", str(tiles.block_n)),
        ("CUFLASH_WARPS", str(tiles.warps)),
        ("CUFLASH_CAUSAL", "1" if causal else "0"),
        ("CUFLASH_DROPOUT", "1" if dropout else "0"),
        ("CUFLASH_Q_STAGES", str(tiles.stages)),
        ("CUFLASH_MIN_BLOCKS", str(tiles.min_blocks)),
        ("CUFLASH_V_STAGES", str(tiles.v_stages)),
        ("CUFLASH_FWD_TMA", "1" if tiles.tma else "0"),
    )


def hopper_fwd_tiles(head_dim: int, dropout: bool, causal: bool = False) -> tuple[AttnTiles, ...]:
    """Every tile configuration the Hopper forward picks for a head dim (by key length)."""
    return tuple(dict.fromkeys((fwd_tiles(head_dim, True, dropout, None, causal),
                                fwd_tiles(head_dim, True, dropout, 1, causal))))


def cp_async_fallback(tiles: AttnTiles) -> AttnTiles:
    """The same tiles loaded by cp.async: what a TMA configuration runs on the layouts TMA
    cannot read (_tma.box_layout)."""
    return dataclasses.replace(tiles, tma=False)


def hopper_fwd_builds(head_dim: int, dropout: bool, causal: bool) -> tuple[AttnTiles, ...]:
    """Every tiling a Hopper forward variant may launch: hopper_fwd_tiles and the cp.async
    fallbacks of those that load by TMA (what the compile checks build)."""
    picked = hopper_fwd_tiles(head_dim, dropout, causal)
    return tuple(dict.fromkeys(picked + tuple(cp_async_fallback(t) for t in picked if t.tma)))


@functools.lru_cache(maxsize=None)  # one object per variant: launches look kernels up by it
def fwd_variant(dtype: str, head_dim: int, causal: bool, dropout: bool, hopper: bool = False,
                tiles: AttnTiles | None = None) -> KernelVariant:
    """The forward kernel for a padded head dim (one of HEAD_DIMS); hopper: the sm_90a
    wgmma kernel (head dims in SM90_FWD_HEAD_DIMS only) on `tiles`, one of
    hopper_fwd_tiles (default: the long-sequence ones). The sm_80 kernel has one tiling."""
    if hopper:
        if head_dim not in SM90_FWD_HEAD_DIMS:
            raise ValueError(f"the sm_90a forward is built for head dims {SM90_FWD_HEAD_DIMS}, not {head_dim}")
        tiles = tiles or fwd_tiles(head_dim, True, dropout)
        return KernelVariant("attn_fwd_sm90.cu", ("attn_fwd_kernel",),
                             _attn_macros(dtype, head_dim, causal, dropout, tiles), hopper=True)
    return KernelVariant("attn_fwd.cu", ("attn_fwd_kernel",),
                         _attn_macros(dtype, head_dim, causal, dropout, fwd_tiles(head_dim)))


@functools.lru_cache(maxsize=None)
def bwd_variant(dtype: str, head_dim: int, causal: bool, dropout: bool, tiles: AttnTiles | None = None,
                hopper: bool = False) -> KernelVariant:
    """The backward kernels (main, delta, dq cast, GQA dk/dv reduce) for a padded head dim;
    hopper: the sm_90a wgmma main kernel (head dims in SM90_BWD_HEAD_DIMS only)."""
    functions = ("attn_bwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkv_reduce_kernel")
    if hopper:
        if head_dim not in SM90_BWD_HEAD_DIMS:
            raise ValueError(f"the sm_90a backward is built for head dims {SM90_BWD_HEAD_DIMS}, not {head_dim}")
        return KernelVariant("attn_bwd_sm90.cu", functions,
                             _attn_macros(dtype, head_dim, causal, dropout, bwd_tiles(head_dim, hopper=True)),
                             hopper=True)
    return KernelVariant(
        "attn_bwd.cu",
        functions,
        _attn_macros(dtype, head_dim, causal, dropout, tiles or bwd_tiles(head_dim)),
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
    hopper = [
        fwd_variant(dtype, d, causal, dropout, hopper=True, tiles=tiles)
        for dtype in DTYPES
        for d in SM90_FWD_HEAD_DIMS
        for causal in (False, True)
        for dropout in (False, True)
        for tiles in hopper_fwd_builds(d, dropout, causal)
    ] + [
        bwd_variant(dtype, d, causal, dropout, hopper=True)
        for dtype in DTYPES
        for d in SM90_BWD_HEAD_DIMS
        for causal in (False, True)
        for dropout in (False, True)
    ]
    single_stage = [  # the backward on GPUs whose shared memory cannot double buffer Q/dO
        bwd_variant(dtype, d, causal, dropout, _bwd_tiles(d, stages=1))
        for dtype in DTYPES
        for d in HEAD_DIMS
        for causal in (False, True)
        for dropout in (False, True)
    ]
    return [MASK_VARIANT, CURAND_VECTORS_VARIANT, *attn, *hopper, *single_stage]
