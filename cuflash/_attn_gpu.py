"""Raw launches of the attention kernels: grids, shared memory, scratch buffers. No checks
here (cuflash.api validates before calling); everything runs on CuPy's current stream."""

from __future__ import annotations

import math
import os

import numpy as np

from . import _tma
from ._compile import get_function
from ._config import (HEAD_DIMS, SM90_BWD_HEAD_DIMS, SM90_FWD_HEAD_DIMS, AttnTiles, bwd_tiles,
                      bwd_variant, cp_async_fallback, fwd_tiles, fwd_variant, hopper_fwd_tiles, padded_head_dim)
from ._validate import dtype_name
from .mask import keep_probability

_LOG2E = 1.0 / math.log(2.0)


def _empty(shape, dtype):
    """Every buffer a kernel must fully write comes from here (tests replace it with a
    NaN-poisoning allocator, so an element a kernel forgets fails the comparison)."""
    import cupy

    return cupy.empty(shape, dtype=dtype)


class _DeviceInfo:
    """What the launches need to know of a device, read once per device (cupy's
    Device.attributes asks the driver for every attribute on each call)."""

    def __init__(self, device_id: int):
        import cupy

        device = cupy.cuda.Device(device_id)
        attrs = device.attributes
        self.hopper = device.compute_capability == "90"
        self.sm_count = int(attrs["MultiProcessorCount"])
        self.smem_optin = int(attrs["MaxSharedMemoryPerBlockOptin"])  # bytes one block may opt in to


_device_info: dict[int, _DeviceInfo] = {}


def _device() -> _DeviceInfo:
    import cupy

    device_id = cupy.cuda.runtime.getDevice()
    info = _device_info.get(device_id)
    if info is None:
        info = _device_info[device_id] = _DeviceInfo(device_id)
    return info


def use_hopper_forward(padded_dim: int) -> bool:
    """Whether the forward runs the sm_90a wgmma kernel: on compute capability 9.0 for the
    head dims it is built for, unless CUFLASH_DISABLE_SM90=1 asks for the sm_80 kernel."""
    if os.environ.get("CUFLASH_DISABLE_SM90", "") == "1" or padded_dim not in SM90_FWD_HEAD_DIMS:
        return False
    return _device().hopper


def use_hopper_backward(padded_dim: int) -> bool:
    """Whether the backward runs the sm_90a wgmma kernel (same rule as use_hopper_forward)."""
    if os.environ.get("CUFLASH_DISABLE_SM90", "") == "1" or padded_dim not in SM90_BWD_HEAD_DIMS:
        return False
    return _device().hopper


_occupancy: dict[tuple[int, int, int], int] = {}


def _resident_ctas(fn, threads: int, smem: int) -> int:
    """How many CTAs of `fn` the whole device holds at once (occupancy x SM count)."""
    from cupy_backends.cuda.api import driver

    key = (fn.kernel.ptr, threads, smem)  # a kernel handle belongs to one device
    per_sm = _occupancy.get(key)
    if per_sm is None:
        per_sm = _occupancy[key] = max(1, driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, threads, smem))
    return per_sm * _device().sm_count


# deterministic=True keeps one fp32 dQ accumulator per split; past this many bytes of them
# the backward takes fewer splits (and less parallelism) rather than more memory.
DETERMINISTIC_DQ_BYTES = 4 << 30


def dq_splits(n_kblocks: int, bh: int, resident: int, dq_bytes: int) -> int:
    """Splits of a deterministic backward. CTA (split, b, h) walks key blocks in rounds of
    `splits` (forward, then backward: attn_bwd_aux.cuh walk_key_block); the run takes about
    ceil(splits * bh / resident) waves of ceil(n_kblocks / splits) key blocks. Take the
    fewest splits (each costs one fp32 dQ accumulator) within 5 % of the best such
    estimate, and at most DETERMINISTIC_DQ_BYTES of accumulators."""
    cap = max(1, min(n_kblocks, DETERMINISTIC_DQ_BYTES // max(dq_bytes, 1)))
    cost = {s: -(-s * bh // resident) * -(-n_kblocks // s) for s in range(1, cap + 1)}
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= 1.05 * best)


def _smem_limit() -> int:
    """Dynamic shared memory one block may opt in to on the current device (bytes)."""
    return _device().smem_optin


def backward_tiles(head_dim: int, padded_dim: int, hopper: bool) -> tuple[AttnTiles, int]:
    """(tiles, dynamic shared memory) of the main backward kernel on the current device.

    ValueError when even its single-stage tiles do not fit: on GPUs that give a block at
    most 99 KB (compute capability 8.6, 8.9, 12.x) the sm_80 backward needs 121 KB at
    padded head dim 192 and 154 KB at 256 (128 takes 88 KB)."""
    limit = _smem_limit()
    tiles = bwd_tiles(padded_dim, limit, hopper)
    smem = tiles.smem_bytes(padded_dim, "bwd_sm90" if hopper else "bwd")
    if smem > limit:
        fitting = [d for d in HEAD_DIMS if bwd_tiles(d, limit).smem_bytes(d, "bwd") <= limit]
        raise ValueError(f"head dim {head_dim}: the backward needs {smem} bytes of shared memory per block "
                         f"(padded head dim {padded_dim}) and this GPU allows {limit}; here it runs head dims "
                         f"up to {max(fitting, default=0)}")
    return tiles, smem


def _strides(a) -> tuple[np.int64, np.int64, np.int64]:
    """(batch, seq, head) strides in elements of a (B, S, H, D) array."""
    it = a.itemsize
    return np.int64(a.strides[0] // it), np.int64(a.strides[1] // it), np.int64(a.strides[2] // it)


def _dtype_name(a) -> str:
    return "bfloat16" if dtype_name(a.dtype) == "bfloat16" else "float16"


def _tail_args(*, q_start: int, k_start: int, causal_diag: int, seed: int, offset: int, rng_state, threshold: int):
    """The SHARD_ARGS and RNG_ARGS every attention kernel ends with (attn_config.cuh).

    q_start, k_start: global row / column of local (0, 0), multiples of 16 (dropout
    coordinates); causal_diag: local row i sees local key j iff j <= i + causal_diag;
    rng_state: None, or a device uint64 array (seed, offset) the kernel reads instead
    of the seed and offset values.
    """
    return (
        np.int64(q_start), np.int64(k_start), np.int64(causal_diag),
        np.uint64(seed), np.uint32(offset), rng_state if rng_state is not None else np.uintp(0),
        np.uint32(threshold), np.float32(1.0 / keep_probability(threshold)),
    )


def forward(prob, q, k, v, *, softmax_scale: float, causal: bool, seed: int, offset: int, threshold: int,
            rng_state=None, q_start: int = 0, k_start: int = 0, causal_diag: int | None = None):
    """out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) float32. causal_diag None: Sk - Sq."""
    import cupy

    B, Sq, H, D, Sk = prob.batch, prob.seqlen_q, prob.nheads, prob.head_dim, prob.seqlen_k
    d_pad = padded_head_dim(D)
    hopper = use_hopper_forward(d_pad)
    tiles = fwd_tiles(d_pad, hopper, threshold > 0, Sk, causal)
    maps = ()
    if tiles.tma:
        bf16 = _dtype_name(q) == "bfloat16"
        maps = (_tma.tensor_map(q, tiles.block_m, bf16), _tma.tensor_map(k, tiles.block_n, bf16),
                _tma.tensor_map(v, tiles.block_n, bf16))
        if any(m is None for m in maps):  # a layout TMA cannot read: the same tiles by cp.async
            tiles, maps = cp_async_fallback(tiles), ()
    variant = fwd_variant(_dtype_name(q), d_pad, causal, threshold > 0, hopper, tiles if hopper else None)
    smem = tiles.smem_bytes(d_pad, "fwd_sm90" if hopper else "fwd")
    fn = get_function(variant, "attn_fwd_kernel", dynamic_smem=smem)
    out = _empty((B, Sq, H, D), q.dtype)
    lse = _empty((B, H, Sq), cupy.float32)
    grid = (-(-Sq // tiles.block_m), B * H, 1)
    fn(grid, (tiles.threads,), (
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        np.int32(H), np.int32(H // prob.nheads_k), np.int64(Sq), np.int64(Sk), np.int32(D),
        np.float32(softmax_scale * _LOG2E),
        *_tail_args(q_start=q_start, k_start=k_start, causal_diag=Sk - Sq if causal_diag is None else causal_diag,
                    seed=seed, offset=offset, rng_state=rng_state, threshold=threshold),
        *maps,
    ), shared_mem=smem)
    return out, lse


def backward(dout, ctx):
    """(dq, dk, dv) in the inputs' dtypes; see cuflash.attention_backward."""
    import cupy

    q, k, v = ctx.q, ctx.k, ctx.v
    (B, Sq, H, D), (Sk, Hk) = q.shape, k.shape[1:3]  # validated by the forward
    group = H // Hk
    d_pad = padded_head_dim(D)
    hopper = use_hopper_backward(d_pad)
    tiles, smem = backward_tiles(D, d_pad, hopper)  # (raises before any launch when the GPU cannot fit them)
    variant = bwd_variant(_dtype_name(q), d_pad, ctx.causal, ctx.threshold > 0, tiles, hopper)
    tail = _tail_args(q_start=ctx.q_start, k_start=ctx.k_start,
                      causal_diag=Sk - Sq if ctx.causal_diag is None else ctx.causal_diag,
                      seed=ctx.seed or 0, offset=ctx.offset or 0, rng_state=ctx.rng_state, threshold=ctx.threshold)

    # delta = rowsum(dO * O), fp32 (B, H, Sq)
    delta = _empty((B, H, Sq), cupy.float32)
    rows = B * H * Sq
    get_function(variant, "attn_bwd_delta_kernel")(
        (-(-rows * 32 // 256),), (256,),
        (dout, ctx.out, delta, *_strides(dout), *_strides(ctx.out), np.int32(H), np.int64(Sq), np.int32(D),
         np.int64(rows)))

    dk = _empty((B, Sk, Hk, D), k.dtype)
    dv = _empty((B, Sk, Hk, D), v.dtype)
    if group > 1:
        dk_part = _empty((B, Sk, H, D), cupy.float32)
        dv_part = _empty((B, Sk, H, D), cupy.float32)
    else:
        dk_part = dv_part = None
    null = np.uintp(0)
    fn = get_function(variant, "attn_bwd_kernel", dynamic_smem=smem)
    threads = 32 * tiles.warps
    n_kblocks = -(-Sk // tiles.block_n)
    accum = B * H * Sq * d_pad  # elements of one dQ accumulator
    if ctx.deterministic:
        # One CTA per (split, b, h) walks its share of the key blocks; each split's
        # accumulator then has one writer per element (see attn_bwd.cu).
        splits = dq_splits(n_kblocks, B * H, _resident_ctas(fn, threads, smem), 4 * accum)
        workers, split_stride = splits, accum
    else:
        splits, workers, split_stride = 1, n_kblocks, 0  # one CTA per key block, atomics into one accumulator
    if ctx.deterministic and hopper:  # every split fully written by the kernel (attn_bwd_sm90.cu, dq_written)
        dq_accum = _empty((splits, B, H, Sq, d_pad), cupy.float32)
    else:
        dq_accum = cupy.zeros((splits, B, H, Sq, d_pad), dtype=cupy.float32)
    fn((workers, B * H, 1), (threads,), (
        q, k, v, dout, ctx.lse, delta, dq_accum, dk, dv,
        dk_part if dk_part is not None else null, dv_part if dv_part is not None else null,
        np.int64(split_stride),
        *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk),
        np.int32(H), np.int32(group), np.int64(Sq), np.int64(Sk), np.int32(D),
        np.float32(ctx.softmax_scale * _LOG2E), np.float32(ctx.softmax_scale), *tail,
    ), shared_mem=smem)

    dq = _empty((B, Sq, H, D), q.dtype)
    total = B * H * Sq * (D // 2)
    get_function(variant, "attn_bwd_dq_kernel")(
        (-(-total // 256),), (256,),
        (dq_accum, dq, *_strides(dq), np.int32(H), np.int64(Sq), np.int32(D), np.float32(ctx.softmax_scale),
         np.int64(total), np.int32(splits), np.int64(accum)))
    if group > 1:
        total = B * Sk * Hk * D
        get_function(variant, "attn_bwd_dkv_reduce_kernel")(
            (-(-total // 256),), (256,),
            (dk_part, dv_part, dk, dv, *_strides(dk), np.int32(H), np.int32(group), np.int64(Sk), np.int32(D),
             np.int64(total)))
    return dq, dk, dv


def warmup(dtypes=("float16", "bfloat16"), head_dims=(64, 128), causal=(False, True), dropout=(False, True),
           backward: bool = True) -> int:
    """Compile (or load from the disk cache) the chosen variants on the current device.

    head_dims are real head dims (padded as the kernels do). Returns the number of
    variants made ready. Logs one line per first compile through logging ("cuflash").
    With backward=True, a head dim whose backward this GPU cannot run (backward_tiles)
    raises ValueError before anything is compiled.
    """
    bwd = {}  # head dim -> (tiles, hopper) of its backward, and its ValueError, as attention_backward meets them
    for d in head_dims if backward else ():
        hop = use_hopper_backward(padded_head_dim(d))
        bwd[d] = backward_tiles(d, padded_head_dim(d), hop)[0], hop
    n = 0
    for dt in dtypes:
        for d in head_dims:
            for c in causal:
                for p in dropout:
                    dp = padded_head_dim(d)
                    hop = use_hopper_forward(dp)
                    for tiles in hopper_fwd_tiles(dp, p, c) if hop else (None,):  # every key-length config
                        get_function(fwd_variant(dt, dp, c, p, hop, tiles), "attn_fwd_kernel")
                        n += 1
                    if backward:
                        tiles, hop = bwd[d]
                        get_function(bwd_variant(dt, dp, c, p, tiles, hop), "attn_bwd_kernel")
                        n += 1
    return n
