"""The public API: attention forward/backward with exact Philox dropout, on CuPy or NumPy arrays.

CuPy arrays run the fused kernels on the current CuPy device and stream; NumPy arrays
run the float64 reference (``cuflash.reference``) on the CPU with the very same mask,
so a result can be debugged or compared without a GPU. Other libraries' GPU arrays
(torch, JAX, Numba: anything with DLPack or ``__cuda_array_interface__``) are wrapped
as CuPy arrays without a copy (cuflash._interop) and run the kernels; results are CuPy
arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import _generator, _interop, _validate
from . import mask as _mask
from . import reference as _reference

__all__ = ["AttentionContext", "attention", "attention_forward", "attention_backward", "dropout_mask"]

Array = Any  # cupy.ndarray or numpy.ndarray (inputs: also DLPack / __cuda_array_interface__ GPU arrays)


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What attention_backward needs, and what the forward decided.

    q, k, v, out: the forward's inputs and output (references, not copies)
    lse:          float32 (B, H, Sq), natural-log logsumexp of the scaled scores per row
                  (-inf for a row that sees no key)
    softmax_scale, causal, deterministic: as used
    dropout_p:    the probability asked for
    keep_prob:    the realized keep probability (65536 - threshold) / 65536
    seed, offset: the Philox key and counter word the mask was drawn with (with p == 0
                  nothing is drawn: they are recorded as given, possibly None). None
                  when a DeviceGenerator supplied them: see rng_state, get_seed_offset()
    q_start, k_start, causal_diag: where this call sits in a larger problem (context
                  parallelism); the defaults describe a whole problem
    rng_state:    None, or a cupy uint64 array (2,) = [seed, offset] in device memory
                  that the kernels read instead of seed/offset (the snapshot a
                  DeviceGenerator took for this call; a replayed CUDA graph refills it)
    """

    q: Array
    k: Array
    v: Array
    out: Array
    lse: Array
    softmax_scale: float
    causal: bool
    deterministic: bool
    dropout_p: float
    keep_prob: float
    threshold: int
    seed: int | None
    offset: int | None
    # Where this call sits in a larger problem (context parallelism) and where its
    # Philox (seed, offset) came from; the defaults describe a whole problem drawn
    # with the seed and offset above.
    q_start: int = 0
    k_start: int = 0
    causal_diag: int | None = None  # local row i sees local key j iff j <= i + causal_diag; None: Sk - Sq
    rng_state: Any = None  # device uint64 (seed, offset) the kernels read instead of seed/offset

    def get_seed_offset(self) -> tuple[int | None, int | None]:
        """(seed, offset) the mask was drawn with, as ints.

        With a DeviceGenerator they are read from ``rng_state`` (a 16-byte copy to the
        host on the current stream, which waits for it: not inside a graph capture; after
        a graph replay it gives that replay's values). Otherwise ``(seed, offset)``.
        """
        if self.rng_state is not None:
            seed, offset = (int(x) for x in self.rng_state.get())
            return seed, offset
        return self.seed, self.offset

    @property
    def dropout_p_effective(self) -> float:
        """The drop probability actually applied: threshold / 65536."""
        return 1.0 - self.keep_prob

    @property
    def dropout_scale(self) -> float:
        """Factor applied to kept probabilities: 1 / keep_prob."""
        return 1.0 / self.keep_prob


def _check_generator(generator, seed, offset, xp_name: str) -> None:
    """generator: None or a DeviceGenerator, exclusive with seed/offset, for CuPy arrays only."""
    if generator is None:
        return
    if not isinstance(generator, _generator.DeviceGenerator):
        raise TypeError(f"generator must be a cuflash.DeviceGenerator or None, got {type(generator).__name__}")
    if seed is not None or offset is not None:
        given = ", ".join(f"{n}={v!r}" for n, v in (("seed", seed), ("offset", offset)) if v is not None)
        raise ValueError(f"generator and seed/offset are mutually exclusive: got a generator and {given}")
    if xp_name != "cupy":
        raise TypeError(
            "generator (a DeviceGenerator, whose state is in GPU memory) needs GPU arrays; for NumPy arrays pass "
            "seed and offset, e.g. seed, offset = generator.get_state()"
        )


def _resolve_rng(p: float, seed, offset) -> tuple[int | None, int | None]:
    seed, offset = _validate.check_seed_offset(seed, offset)
    if p == 0.0:
        return seed, offset
    if seed is None and offset is None:
        return _generator.next_seed_offset()
    if seed is None:
        return _generator.initial_seed(), offset
    return seed, 0 if offset is None else offset


def attention_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    deterministic: bool = False,
    generator: _generator.DeviceGenerator | None = None,
) -> tuple[Array, AttentionContext]:
    """Attention forward; returns ``(out, ctx)`` for attention_backward.

    q: (B, Sq, H, D); k, v: (B, Sk, Hk, D) with H % Hk == 0 (GQA/MQA), D a multiple of
    8 up to 256, last dim contiguous (other strides free: slices of a packed qkv buffer
    are fine). CuPy arrays: float16 or bfloat16 (ml_dtypes), run on the GPU. NumPy
    arrays: also float32/float64, run by the float64 CPU reference. Other GPU arrays
    offering DLPack (torch CUDA tensors, JAX arrays) or ``__cuda_array_interface__``
    (Numba) are wrapped as CuPy arrays over the same memory, no copy: e.g. a torch
    (B, H, S, D) tensor passes as ``t.transpose(1, 2)``. torch tensors that require
    grad must be passed ``.detach()``-ed (torch refuses to export them).
    out: (B, Sq, H, D) in q's dtype, a CuPy array on the GPU path.

    Streams: the kernels run on CuPy's current stream. With another library's arrays,
    run on its stream (``with cuflash.as_cupy_stream(torch.cuda.current_stream()):``)
    or order the streams yourself.

    causal: mask aligned bottom-right, query row i sees key j iff j <= i + Sk - Sq
    (rows that see no key give 0)::

        Sq=3, Sk=5     Sq=5, Sk=3
        x x x . .      . . .
        x x x x .      . . .
        x x x x x      x . .
                       x x .
                       x x x

    dropout_p: drop probability in [0, 1), applied to the softmax probabilities; the
    mask is the pure function of (seed, offset, b, h, i, j) that cuflash.dropout_mask
    returns, and kept values are scaled by 1 / ctx.keep_prob.
    seed, offset: Philox key (int < 2**64) and counter word (int < 2**32). With both
    None the global generator (cuflash.manual_seed) supplies them and advances.
    generator: a cuflash.DeviceGenerator instead of seed/offset (passing both raises
    ValueError), GPU arrays only: with dropout_p > 0 a kernel on the current stream
    snapshots its device state for this call (ctx.rng_state; ctx.seed and ctx.offset
    are None, ctx.get_seed_offset() reads the values) and advances it, with no host
    synchronization, so forward and backward can be captured in a CUDA graph and every
    replay draws the next mask. With dropout_p == 0 it is left untouched.
    softmax_scale: defaults to 1 / sqrt(D).
    deterministic: make the backward bitwise reproducible run to run.
    """
    q, k, v = _interop.as_array(q, "q"), _interop.as_array(k, "k"), _interop.as_array(v, "v")
    prob = _validate.check_qkv(q, k, v)
    flags = _validate.check_flags(causal=causal, deterministic=deterministic)
    p, threshold = _validate.check_dropout(dropout_p)
    scale = _validate.check_scale(softmax_scale, prob.head_dim)
    if p > 0.0:
        _validate.check_mask_shape(prob.batch, prob.nheads)
    _check_generator(generator, seed, offset, prob.xp_name)
    if generator is None:
        seed, offset = _resolve_rng(p, seed, offset)
    elif q.device.id != generator.device_id:
        raise ValueError(f"generator's state is on device {generator.device_id} but q is on device {q.device.id}")
    keep_prob = _mask.keep_probability(threshold)
    rng_state = None

    if prob.xp_name == "cupy":
        from . import _attn_gpu

        if generator is not None and threshold > 0:
            rng_state = generator.draw()
        out, lse = _attn_gpu.forward(
            prob, q, k, v, softmax_scale=scale, causal=flags["causal"],
            seed=seed or 0, offset=offset or 0, threshold=threshold, rng_state=rng_state,
        )
    else:
        keep = None
        if threshold > 0:
            keep = _mask.dropout_mask_numpy(
                prob.batch, prob.nheads, prob.seqlen_q, prob.seqlen_k,
                threshold=threshold, seed=seed, offset=offset,
            )
        out64, lse64 = _reference.attention_forward_ref(
            q, k, v, causal=flags["causal"], softmax_scale=scale, keep=keep, keep_scale=1.0 / keep_prob
        )
        out, lse = out64.astype(q.dtype), lse64.astype(np.float32)

    ctx = AttentionContext(
        q=q, k=k, v=v, out=out, lse=lse, softmax_scale=scale, causal=flags["causal"],
        deterministic=flags["deterministic"], dropout_p=p, keep_prob=keep_prob, threshold=threshold,
        seed=seed, offset=offset, rng_state=rng_state,
    )
    return out, ctx


def attention_backward(dout: Array, ctx: AttentionContext) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of the forward recorded in ``ctx``, given dout = dL/dout.

    dout: (B, Sq, H, D), same device and dtype as the forward's out, last dim
    contiguous: a CuPy array, or (GPU path) any DLPack / __cuda_array_interface__ GPU
    array, wrapped without a copy. NumPy for a NumPy forward.
    dq has q's shape; dk, dv have k's and v's shape (summed over the query heads that
    share a kv head under GQA), CuPy arrays on the GPU path. Dropout regenerates the
    forward's mask from (ctx.seed, ctx.offset), or from ctx.rng_state (read on the
    device) when a DeviceGenerator drew it; nothing of size Sq x Sk was stored. Runs on
    CuPy's current stream, which must be ordered after the forward's.

    Raises ValueError, before launching anything, where the GPU cannot give the kernel
    its shared memory: head dims above 128 on GPUs with 99 KB per block (compute
    capability 8.6, 8.9, 12.x), whose forward still runs them.
    """
    if not isinstance(ctx, AttentionContext):
        raise TypeError(f"ctx must be the AttentionContext from attention_forward, got {type(ctx).__name__}")
    dout = _interop.as_array(dout, "dout")
    mod = _validate.array_module_name(dout)
    if mod is None:
        raise TypeError(f"dout must be a CuPy or NumPy array, or a GPU array with DLPack or "
                        f"__cuda_array_interface__, got {type(dout).__name__}")
    if mod != _validate.array_module_name(ctx.out):
        raise TypeError(f"dout is a {mod} array but the forward ran on {_validate.array_module_name(ctx.out)} arrays")
    if dout.shape != ctx.out.shape:
        raise ValueError(f"dout must have out's shape {ctx.out.shape}, got {dout.shape}")
    if dout.dtype != ctx.out.dtype:
        raise TypeError(f"dout must have out's dtype {ctx.out.dtype.name}, got {dout.dtype.name}")
    if dout.strides[-1] != dout.itemsize:
        raise ValueError("dout's last dimension must be contiguous")
    if mod == "cupy" and dout.device.id != ctx.out.device.id:
        raise ValueError(f"dout is on device {dout.device.id} but the forward ran on device {ctx.out.device.id}")

    if mod == "cupy":
        from . import _attn_gpu

        return _attn_gpu.backward(dout, ctx)

    prob = _validate.check_qkv(ctx.q, ctx.k, ctx.v)
    keep = None
    if ctx.threshold > 0:
        keep = _mask.dropout_mask_numpy(
            prob.batch, prob.nheads, prob.seqlen_q, prob.seqlen_k,
            threshold=ctx.threshold, seed=ctx.seed, offset=ctx.offset,
        )
    dq, dk, dv = _reference.attention_backward_ref(
        dout, ctx.q, ctx.k, ctx.v, ctx.out, ctx.lse, causal=ctx.causal,
        softmax_scale=ctx.softmax_scale, keep=keep, keep_scale=1.0 / ctx.keep_prob,
    )
    return dq.astype(ctx.q.dtype), dk.astype(ctx.k.dtype), dv.astype(ctx.v.dtype)


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    dropout_p: float = 0.0,
    causal: bool = False,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    deterministic: bool = False,
    generator: _generator.DeviceGenerator | None = None,
) -> Array:
    """Attention output only: ``attention_forward(...)[0]``. Shapes as there."""
    out, _ = attention_forward(
        q, k, v, dropout_p=dropout_p, causal=causal, softmax_scale=softmax_scale,
        seed=seed, offset=offset, deterministic=deterministic, generator=generator,
    )
    return out


def dropout_mask(
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    dropout_p: float,
    seed: int,
    offset: int,
    xp=None,
) -> Array:
    """The keep mask the attention kernels apply: bool (batch, nheads, seqlen_q, seqlen_k), True = kept.

    xp: cupy (made on the GPU by the same device functions the kernels call) or numpy
    (the NumPy twin); default cupy when a GPU is present, else numpy. Both give the
    same bits.
    """
    for name, val in (("batch", batch), ("nheads", nheads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(val).__name__}")
        if val < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if seqlen_k >= _mask.MAX_SEQLEN_K:
        raise ValueError(f"seqlen_k must be below 2**31, got {seqlen_k}")
    _validate.check_mask_shape(int(batch), int(nheads))
    _, threshold = _validate.check_dropout(dropout_p)
    if seed is None or offset is None:
        raise TypeError("dropout_mask needs explicit seed and offset (ints), e.g. ctx.seed and ctx.offset")
    seed, offset = _validate.check_seed_offset(seed, offset)
    if xp is None:
        from . import gpu_available

        if gpu_available():
            import cupy as xp
        else:
            xp = np
    name = getattr(xp, "__name__", "")
    if name == "numpy":
        return _mask.dropout_mask_numpy(
            int(batch), int(nheads), int(seqlen_q), int(seqlen_k), threshold=threshold, seed=seed, offset=offset
        )
    if name != "cupy":
        raise TypeError(f"xp must be the numpy or cupy module, got {xp!r}")
    from . import _mask_gpu

    return _mask_gpu.dropout_mask(int(batch), int(nheads), int(seqlen_q), int(seqlen_k),
                                  threshold=threshold, seed=seed, offset=offset)
