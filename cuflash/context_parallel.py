"""Context parallelism: attention on one block of a larger score matrix, the exact merge of
partial results over key blocks, and a single-device simulation of ring attention.

A sequence too long for one device is split into chunks along the sequence. Each query
chunk needs every key chunk, so the result of a query chunk is computed one key chunk at a
time ("shards") and the partial results are merged:

* ``attention_shard_forward`` runs attention on rows ``q_start..`` and columns
  ``k_start..`` of a global (Sq_total, Sk_total) problem. The causal mask and the dropout
  mask are the global ones (the kernels get the global row and column of local (0, 0)), so
  the dropout mask of every shard is bit for bit the slice of the unsharded mask.
* ``merge_attention`` combines the partial ``(out_i, lse_i)`` of the key shards of one
  query chunk. With ``w_i = exp(lse_i - lse)`` and ``lse = log(sum_i exp(lse_i))``::

      out = sum_i w_i * out_i          (each out_i is normalized over its own keys)

  which is the softmax over the union of the keys, and with dropout as well (the mask is
  applied to the normalized probabilities, and ``w_i * P_i`` is the global probability).
* The backward of a key shard needs only two things of the whole row: its lse (P =
  exp(scale*S - lse)) and delta = rowsum(dO * O). So ``attention_shard_backward`` run with
  the *merged* out and lse in place of the shard's own gives this key shard's exact share
  of dq and its exact dk, dv; dq is the sum over the key shards. (``merge_attention_backward``,
  the vector-Jacobian product of the merge itself, is there for callers that need it; the
  attention backward does not.)

Ring layout (``ring_attention_simulated`` here, ``cuflash.distributed.ring_attention`` over
GPUs): n ranks; rank r holds query, key and value chunk r. At step t = 0..n-1 rank r works
on the key/value chunk of rank (r - t) mod n, then passes it to rank r + 1::

    step 0: rank0 K0  rank1 K1  rank2 K2
    step 1: rank0 K2  rank1 K0  rank2 K1
    step 2: rank0 K1  rank1 K2  rank2 K0

With causal masking rank r's queries see no key of a later chunk, so the last ranks work
much more than the first. The load-balanced layout cuts the sequence into 2n chunks and
gives rank r chunks r and 2n-1-r (one early, one late), which evens out the work::

    n = 2, chunks 0 1 2 3:   rank0 holds 0 and 3, rank1 holds 1 and 2

Pairs of (query chunk, key chunk) that causality masks entirely are skipped.

Arrays: q (B, Sq, H, D), k and v (B, Sk, Hk, D), out (B, Sq, H, D), lse (B, H, Sq) float32,
as in ``cuflash.attention_forward``. CuPy arrays (float16, bfloat16) run the GPU kernels;
NumPy arrays run the float64 reference with the same global masks.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _validate
from . import mask as _mask
from . import reference as _reference
from .api import AttentionContext, _resolve_rng

__all__ = [
    "attention_shard_forward",
    "attention_shard_backward",
    "make_shard_context",
    "merge_attention",
    "merge_attention_backward",
    "sequence_chunks",
    "rank_chunk_ids",
    "shard_sequence",
    "unshard_sequence",
    "fully_masked",
    "SimulatedRing",
    "ring_attention_simulated",
]

Array = Any  # cupy.ndarray or numpy.ndarray

_BLOCK = 16  # shard starts must be multiples of the 16x16 dropout block (mask.py)
_OUT_DTYPES = ("float16", "bfloat16", "float32", "float64")


# --------------------------------------------------------------------------- #
# Array helpers (NumPy or CuPy; bfloat16 handled through its bits)
# --------------------------------------------------------------------------- #


def _xp(name: str):
    if name == "cupy":
        import cupy

        return cupy
    return np


def _empty(xp, shape, dtype):
    """Outputs this module assembles itself: on the GPU through the kernels' allocator, so
    tests that poison it also catch an element this module forgets to write."""
    if xp is np:
        return np.empty(shape, dtype=dtype)
    from . import _attn_gpu

    return _attn_gpu._empty(shape, dtype)


def _is_bf16(dtype) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def _to_float(x: Array, dtype, xp) -> Array:
    """x as float32 or float64 (dtype). bfloat16 is widened through its bits (its 16 bits
    are the high half of a float32), which is exact and needs no bfloat16 support in CuPy."""
    if _is_bf16(x.dtype):
        bits = x.view(xp.uint16).astype(xp.uint32) << 16
        x = bits.view(xp.float32)
    return x.astype(dtype, copy=False)


def _bf16_from_float32(x32: Array, xp) -> Array:
    """Round float32 to bfloat16 (nearest, ties to even), through the bits: adding 0x7fff
    plus the lowest kept bit and truncating is round-to-nearest-even on the high half.
    NaN is kept a quiet NaN explicitly (the addition could carry a payload into the sign)."""
    import ml_dtypes

    x32 = xp.ascontiguousarray(x32, dtype=xp.float32)
    u = x32.view(xp.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    bits = xp.where(xp.isnan(x32), 0x7FC0, rounded).astype(xp.uint16)
    return bits.view(np.dtype(ml_dtypes.bfloat16))


def _from_float(x: Array, dtype, xp) -> Array:
    """x (float32/float64) cast to dtype (bfloat16 included, rounded to nearest even)."""
    dtype = np.dtype(dtype)
    if _is_bf16(dtype):
        if xp is np:
            return x.astype(dtype)
        return _bf16_from_float32(x.astype(xp.float32, copy=False), xp)
    return x.astype(dtype, copy=False)


def _rows_to_heads_last(w: Array) -> Array:
    """(B, H, Sq) -> (B, Sq, H, 1), to scale an out (B, Sq, H, D) row by row."""
    return w.transpose(0, 2, 1)[..., None]


# --------------------------------------------------------------------------- #
# Argument checks
# --------------------------------------------------------------------------- #


def _check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def _check_start(name: str, value) -> int:
    v = _check_int(name, value)
    if v % _BLOCK:
        raise ValueError(
            f"{name} must be a multiple of {_BLOCK} (the dropout mask's 16x16 blocks are laid out"
            f" from global row/column 0), got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class _ShardSetup:
    prob: _validate.Problem
    causal: bool
    deterministic: bool
    p: float
    threshold: int
    scale: float
    seed: int | None
    offset: int | None
    q_start: int
    k_start: int
    causal_diag: int


def _shard_setup(q, k, v, *, q_start, k_start, seqlen_q_total, seqlen_k_total, causal, dropout_p,
                 softmax_scale, seed, offset, deterministic, caller: str) -> _ShardSetup:
    """Validate a shard's arguments (errors name the argument), before anything runs."""
    prob = _validate.check_qkv(q, k, v)
    flags = _validate.check_flags(causal=causal, deterministic=deterministic)
    p, threshold = _validate.check_dropout(dropout_p)
    scale = _validate.check_scale(softmax_scale, prob.head_dim)
    seed, offset = _validate.check_seed_offset(seed, offset)
    if p > 0.0:
        _validate.check_mask_shape(prob.batch, prob.nheads)
        if seed is None or offset is None:
            raise TypeError(
                f"{caller} with dropout_p > 0 needs explicit seed and offset (ints): every shard of one"
                f" problem must draw its mask from the same Philox stream, got seed={seed}, offset={offset}")
    q_start = _check_start("q_start", q_start)
    k_start = _check_start("k_start", k_start)
    sq_tot = _check_int("seqlen_q_total", seqlen_q_total, minimum=1)
    sk_tot = _check_int("seqlen_k_total", seqlen_k_total, minimum=1)
    if sk_tot >= _mask.MAX_SEQLEN_K:
        raise ValueError(f"seqlen_k_total must be below 2**31, got {sk_tot}")
    if q_start + prob.seqlen_q > sq_tot:
        raise ValueError(f"q_start ({q_start}) + q's sequence length ({prob.seqlen_q}) exceeds"
                         f" seqlen_q_total ({sq_tot}): the shard must lie inside the problem")
    if k_start + prob.seqlen_k > sk_tot:
        raise ValueError(f"k_start ({k_start}) + k's sequence length ({prob.seqlen_k}) exceeds"
                         f" seqlen_k_total ({sk_tot}): the shard must lie inside the problem")
    # Global row I sees global key J iff J <= I + Sk_tot - Sq_tot; in local coordinates
    # (I = q_start + i, J = k_start + j) that is j <= i + causal_diag.
    diag = q_start - k_start + sk_tot - sq_tot
    return _ShardSetup(prob, flags["causal"], flags["deterministic"], p, threshold, scale, seed, offset,
                       q_start, k_start, diag)


def _check_like(name: str, x, like, what: str, *, dtypes=None) -> None:
    """x must be an array of like's library (and device), shape, and dtype (or one of dtypes)."""
    mod = _validate.array_module_name(x)
    want = _validate.array_module_name(like)
    if mod != want:
        raise TypeError(f"{name} must be a {want} array like {what}, got {type(x).__module__}.{type(x).__name__}")
    if x.shape != like.shape:
        raise ValueError(f"{name} must have {what}'s shape {like.shape}, got {x.shape}")
    ok = (x.dtype.name in dtypes) if dtypes else (x.dtype == like.dtype)
    if not ok:
        accepted = ", ".join(dtypes) if dtypes else like.dtype.name
        raise TypeError(f"{name} must have dtype {accepted}, got {x.dtype.name}")
    if mod == "cupy" and x.device.id != like.device.id:
        raise ValueError(f"{name} is on device {x.device.id} but {what} is on device {like.device.id}")


def _check_out_lse(out, lse, q) -> tuple[Array, Array]:
    """Validate the (merged) out (B, Sq, H, D) and lse (B, H, Sq) of q's rows; lse contiguous."""
    _check_like("out", out, q, "q")
    if out.strides[-1] != out.itemsize:
        raise ValueError("out's last dimension must be contiguous")
    B, Sq, H, _ = q.shape
    mod = _validate.array_module_name(q)
    if _validate.array_module_name(lse) != mod:
        raise TypeError(f"lse must be a {mod} array like q, got {type(lse).__module__}.{type(lse).__name__}")
    if lse.shape != (B, H, Sq):
        raise ValueError(f"lse must have shape (B, H, Sq) = {(B, H, Sq)}, got {lse.shape}")
    accepted = ("float32",) if mod == "cupy" else ("float32", "float64")
    if lse.dtype.name not in accepted:
        raise TypeError(f"lse must have dtype {' or '.join(accepted)}, got {lse.dtype.name}")
    if mod == "cupy" and lse.device.id != q.device.id:
        raise ValueError(f"lse is on device {lse.device.id} but q is on device {q.device.id}")
    # The kernels read lse as a dense (B, H, Sq) array: a slice of a longer lse is copied.
    return out, _xp(mod).ascontiguousarray(lse)


# --------------------------------------------------------------------------- #
# One block of the score matrix
# --------------------------------------------------------------------------- #


def _context(s: _ShardSetup, q, k, v, out, lse) -> AttentionContext:
    return AttentionContext(
        q=q, k=k, v=v, out=out, lse=lse, softmax_scale=s.scale, causal=s.causal,
        deterministic=s.deterministic, dropout_p=s.p, keep_prob=_mask.keep_probability(s.threshold),
        threshold=s.threshold, seed=s.seed, offset=s.offset,
        q_start=s.q_start, k_start=s.k_start, causal_diag=s.causal_diag,
    )


def _shard_keep(ctx: AttentionContext) -> np.ndarray | None:
    """The global dropout mask's slice for this shard (NumPy), or None without dropout."""
    if ctx.threshold == 0:
        return None
    B, Sq, H, _ = ctx.q.shape
    return _mask.dropout_mask_numpy(B, H, Sq, ctx.k.shape[1], threshold=ctx.threshold, seed=ctx.seed,
                                    offset=ctx.offset, row_start=ctx.q_start, col_start=ctx.k_start)


def attention_shard_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_start: int,
    k_start: int,
    seqlen_q_total: int,
    seqlen_k_total: int,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    deterministic: bool = False,
) -> tuple[Array, AttentionContext]:
    """Attention of query rows ``q_start..`` on key columns ``k_start..`` of a larger problem.

    q: (B, Sq, H, D), rows q_start .. q_start+Sq-1 of a problem of seqlen_q_total rows;
    k, v: (B, Sk, Hk, D), columns k_start .. k_start+Sk-1 of seqlen_k_total columns.
    q_start, k_start: multiples of 16, the shard inside the totals.
    Returns ``(out, ctx)``: out (B, Sq, H, D) normalized over this shard's keys only, and
    ctx.lse (B, H, Sq) float32 over those keys (a row that sees no key of this shard gives
    out 0 and lse -inf). Merge the shards of one query chunk with ``merge_attention``.

    causal: the global bottom-right mask, global row I sees key J iff
    J <= I + seqlen_k_total - seqlen_q_total (ctx.causal_diag is its local form).
    dropout_p, seed, offset: the global mask, keep(b, h, q_start + i, k_start + j), i.e.
    exactly the slice of ``cuflash.dropout_mask(B, H, seqlen_q_total, seqlen_k_total, ...)``;
    with dropout_p > 0 the seed and offset must be given (all shards share them).
    softmax_scale defaults to 1/sqrt(D); deterministic as in cuflash.attention_forward.
    """
    s = _shard_setup(q, k, v, q_start=q_start, k_start=k_start, seqlen_q_total=seqlen_q_total,
                     seqlen_k_total=seqlen_k_total, causal=causal, dropout_p=dropout_p,
                     softmax_scale=softmax_scale, seed=seed, offset=offset, deterministic=deterministic,
                     caller="attention_shard_forward")
    if s.prob.xp_name == "cupy":
        from . import _attn_gpu

        out, lse = _attn_gpu.forward(
            s.prob, q, k, v, softmax_scale=s.scale, causal=s.causal, seed=s.seed or 0, offset=s.offset or 0,
            threshold=s.threshold, q_start=s.q_start, k_start=s.k_start, causal_diag=s.causal_diag,
        )
        return out, _context(s, q, k, v, out, lse)
    ctx = _context(s, q, k, v, None, None)
    out64, lse64 = _reference.attention_forward_ref(
        q, k, v, causal=s.causal, causal_diag=s.causal_diag, softmax_scale=s.scale, keep=_shard_keep(ctx),
        keep_scale=1.0 / ctx.keep_prob,
    )
    out = out64.astype(q.dtype)
    return out, dataclasses.replace(ctx, out=out, lse=lse64.astype(np.float32))


def make_shard_context(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    *,
    q_start: int,
    k_start: int,
    seqlen_q_total: int,
    seqlen_k_total: int,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    deterministic: bool = False,
) -> AttentionContext:
    """The context ``attention_shard_backward`` needs, built without running the forward.

    Arguments as in ``attention_shard_forward``, plus out (B, Sq, H, D) in q's dtype and
    lse (B, H, Sq) float32 of q's rows -- normally the *merged* ones over all key shards,
    which makes the backward of this key shard exact (see the module docstring). A ring
    backward uses it for each key chunk as it arrives.
    """
    s = _shard_setup(q, k, v, q_start=q_start, k_start=k_start, seqlen_q_total=seqlen_q_total,
                     seqlen_k_total=seqlen_k_total, causal=causal, dropout_p=dropout_p,
                     softmax_scale=softmax_scale, seed=seed, offset=offset, deterministic=deterministic,
                     caller="make_shard_context")
    out, lse = _check_out_lse(out, lse, q)
    return _context(s, q, k, v, out, lse)


def attention_shard_backward(
    dout: Array, ctx: AttentionContext, *, out: Array | None = None, lse: Array | None = None
) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of one shard, given dout (B, Sq, H, D) = dL/dout of its rows.

    ctx: from ``attention_shard_forward`` or ``make_shard_context`` (or
    ``cuflash.attention_forward``). out, lse: the rows' merged out (B, Sq, H, D) and lse
    (B, H, Sq), replacing ctx's; pass them when ctx came from a shard forward, so that dq
    is this key shard's share of the full dq (sum it over the key shards) and dk, dv (B,
    Sk, Hk, D) are exact for this key shard. dout is the gradient of the merged out.
    The dropout mask is regenerated with the shard's global coordinates.
    """
    if not isinstance(ctx, AttentionContext):
        raise TypeError(f"ctx must be an AttentionContext (attention_shard_forward), got {type(ctx).__name__}")
    if out is not None or lse is not None:
        out, lse = _check_out_lse(ctx.out if out is None else out, ctx.lse if lse is None else lse, ctx.q)
        ctx = dataclasses.replace(ctx, out=out, lse=lse)
    mod = _validate.array_module_name(dout)
    if mod is None:
        raise TypeError(f"dout must be a CuPy or NumPy array, got {type(dout).__name__}")
    _check_like("dout", dout, ctx.out, "out")
    if dout.strides[-1] != dout.itemsize:
        raise ValueError("dout's last dimension must be contiguous")
    if mod == "cupy":
        from . import _attn_gpu

        return _attn_gpu.backward(dout, ctx)
    dq, dk, dv = _reference.attention_backward_ref(
        dout, ctx.q, ctx.k, ctx.v, ctx.out, ctx.lse, causal=ctx.causal, causal_diag=ctx.causal_diag,
        softmax_scale=ctx.softmax_scale, keep=_shard_keep(ctx), keep_scale=1.0 / ctx.keep_prob,
    )
    return dq.astype(ctx.q.dtype), dk.astype(ctx.k.dtype), dv.astype(ctx.v.dtype)


# --------------------------------------------------------------------------- #
# Merging partial results over key shards
# --------------------------------------------------------------------------- #


def _check_partials(outs, lses) -> tuple[Any, Any]:
    """Validate lists of outs (B, Sq, H, D) and lses (B, H, Sq); return (xp, compute dtype)."""
    if not isinstance(outs, Sequence) or not isinstance(lses, Sequence):
        raise TypeError("outs and lses must be sequences (lists or tuples) of arrays")
    if len(outs) == 0:
        raise ValueError("outs must hold at least one partial result")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have the same length, got {len(outs)} and {len(lses)}")
    mod = _validate.array_module_name(outs[0])
    if mod is None:
        raise TypeError(f"outs[0] must be a CuPy or NumPy array, got {type(outs[0]).__name__}")
    o0 = outs[0]
    if o0.ndim != 4:
        raise ValueError(f"outs[0] must have 4 dimensions (B, Sq, H, D), got shape {o0.shape}")
    B, Sq, H, _ = o0.shape
    for i, o in enumerate(outs):  # dtypes may differ (e.g. a float32 accumulator and a float16 shard)
        _check_like(f"outs[{i}]", o, o0, "outs[0]", dtypes=_OUT_DTYPES)
    l0 = lses[0]
    if _validate.array_module_name(l0) != mod:
        raise TypeError(f"lses[0] must be a {mod} array like outs[0], got {type(l0).__name__}")
    if l0.shape != (B, H, Sq):
        raise ValueError(f"lses[0] must have shape (B, H, Sq) = {(B, H, Sq)}, got {l0.shape}")
    if l0.dtype.name not in ("float32", "float64"):
        raise TypeError(f"lses[0] must have dtype float32 or float64, got {l0.dtype.name}")
    for i, lse in enumerate(lses):
        _check_like(f"lses[{i}]", lse, l0, "lses[0]", dtypes=("float32", "float64"))
    wide = any(x.dtype.name == "float64" for x in list(outs) + list(lses))
    return _xp(mod), np.float64 if wide else np.float32


def _merge_weights(lses, cd, xp) -> tuple[list, Array]:
    """w_i = exp(lse_i - lse) (B, H, Sq) and the merged lse, in dtype cd.

    Rows where every lse_i is -inf (no shard saw a key) get w_i = 0 and lse = -inf.
    """
    ls = [x.astype(cd, copy=False) for x in lses]
    m = ls[0]
    for x in ls[1:]:
        m = xp.maximum(m, x)  # propagates NaN
    # A row with every lse_i = -inf has m = -inf; subtract 0 there so exp(-inf - 0) = 0
    # instead of exp(-inf - (-inf)) = NaN.
    m_safe = xp.where(m == -np.inf, 0.0, m)
    e = [xp.exp(x - m_safe) for x in ls]  # in [0, 1], the largest is 1 unless the row is empty
    total = e[0]
    for x in e[1:]:
        total = total + x
    empty = total == 0
    total_safe = xp.where(empty, 1.0, total)
    lse = xp.where(empty, -np.inf, m_safe + xp.log(total_safe)).astype(cd, copy=False)
    return [x / total_safe for x in e], lse


def merge_attention(outs: Sequence[Array], lses: Sequence[Array], *, out_dtype=None) -> tuple[Array, Array]:
    """Combine partial attention results over disjoint key shards: ``(out, lse)``.

    outs: list of (B, Sq, H, D) float16/bfloat16/float32/float64, one per key shard, each
    normalized over its own keys; lses: list of (B, H, Sq) float32 (or float64) of those
    shards. Returns lse = log(sum_i exp(lse_i)) (B, H, Sq) in lses[0]'s dtype and
    out = sum_i exp(lse_i - lse) * out_i (B, Sq, H, D), computed in float32 (float64 when
    any input is float64) and returned in outs[0]'s dtype, or in out_dtype (e.g.
    numpy.float32 to keep an accumulator unrounded). A shard with lse_i = -inf adds nothing
    (even if its out holds NaN); a row no shard saw gives out 0 and lse -inf.
    NumPy or CuPy arrays (all of one library and device).
    """
    xp, cd = _check_partials(outs, lses)
    dtype = outs[0].dtype if out_dtype is None else np.dtype(out_dtype)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ws, lse = _merge_weights(lses, cd, xp)
        acc = None
        for w, o in zip(ws, outs):
            w4 = _rows_to_heads_last(w)
            # where, not w * o: a shard that saw nothing (w = 0) must not bring its NaN in.
            term = xp.where(w4 == 0, 0.0, w4 * _to_float(o, cd, xp)).astype(cd, copy=False)
            acc = term if acc is None else acc + term
    return _from_float(acc, dtype, xp), lse.astype(lses[0].dtype, copy=False)


def merge_attention_backward(
    dout: Array, outs: Sequence[Array], lses: Sequence[Array], out: Array, lse: Array, *, dlse: Array | None = None
) -> tuple[list, list]:
    """Vector-Jacobian product of ``merge_attention``: ``(douts, dlses)``.

    dout: (B, Sq, H, D) gradient of the merged out; outs, lses: the merge's inputs;
    out, lse: its outputs; dlse: optional (B, H, Sq) gradient of the merged lse.
    With w_i = exp(lse_i - lse) (so d lse / d lse_i = w_i and
    d w_j / d lse_i = w_j (delta_ij - w_i)):

        d out_i = w_i * dout
        d lse_i = w_i * (rowsum(dout * out_i) - rowsum(dout * out)) + w_i * dlse

    douts in each out_i's dtype, dlses in each lse_i's dtype, computed like merge_attention.
    For attention itself this is rarely needed: the backward of each key shard with the
    merged lse and out (``attention_shard_backward``) already gives exact gradients.
    """
    xp, cd = _check_partials(outs, lses)
    o0 = outs[0]
    _check_like("dout", dout, o0, "outs[0]", dtypes=_OUT_DTYPES)
    _check_like("out", out, o0, "outs[0]", dtypes=_OUT_DTYPES)
    _check_like("lse", lse, lses[0], "lses[0]", dtypes=("float32", "float64"))
    if dlse is not None:
        _check_like("dlse", dlse, lses[0], "lses[0]", dtypes=("float32", "float64"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lse_c = lse.astype(cd, copy=False)
        lse_safe = xp.where(lse_c == -np.inf, 0.0, lse_c)  # empty row: every w_i = exp(-inf) = 0
        do = _to_float(dout, cd, xp)
        delta = (do * _to_float(out, cd, xp)).sum(axis=-1).transpose(0, 2, 1)  # rowsum(dout*out), (B, H, Sq)
        douts, dlses = [], []
        for o, lse_i in zip(outs, lses):
            w = xp.exp(lse_i.astype(cd, copy=False) - lse_safe)  # (B, H, Sq)
            w4 = _rows_to_heads_last(w)
            douts.append(_from_float(w4 * do, o.dtype, xp))
            dot_i = (do * _to_float(o, cd, xp)).sum(axis=-1).transpose(0, 2, 1)
            g = dot_i - delta
            if dlse is not None:
                g = g + dlse.astype(cd, copy=False)
            # where: a shard with w = 0 gets exactly 0 even if its out held NaN.
            dlses.append(xp.where(w == 0, 0.0, w * g).astype(lse_i.dtype, copy=False))
    return douts, dlses


# --------------------------------------------------------------------------- #
# Sequence layout
# --------------------------------------------------------------------------- #


def sequence_chunks(seqlen: int, n_chunks: int) -> list[tuple[int, int]]:
    """Split range(seqlen) into n_chunks [start, end) ranges whose starts are multiples of 16.

    The 16-row blocks are shared out as evenly as possible (earlier chunks get the extra
    blocks); only the last chunk may end off a multiple of 16. seqlen = n_chunks * c with
    c a multiple of 16 gives n_chunks equal chunks of c.
    """
    seqlen = _check_int("seqlen", seqlen, minimum=1)
    n_chunks = _check_int("n_chunks", n_chunks, minimum=1)
    blocks = -(-seqlen // _BLOCK)
    if blocks < n_chunks:
        raise ValueError(f"seqlen={seqlen} is too short for {n_chunks} chunks of at least {_BLOCK} rows each")
    base, extra = divmod(blocks, n_chunks)
    bounds, start = [], 0
    for c in range(n_chunks):
        end = min(start + _BLOCK * (base + (1 if c < extra else 0)), seqlen)
        bounds.append((start, end))
        start = end
    return bounds


def rank_chunk_ids(rank: int, world_size: int, load_balanced: bool = False) -> tuple[int, ...]:
    """The sequence chunks rank holds: (rank,) of world_size chunks, or, load-balanced,
    (rank, 2*world_size - 1 - rank) of 2*world_size chunks."""
    world_size = _check_int("world_size", world_size, minimum=1)
    rank = _check_int("rank", rank)
    if rank >= world_size:
        raise ValueError(f"rank must be below world_size ({world_size}), got {rank}")
    return (rank, 2 * world_size - 1 - rank) if load_balanced else (rank,)


def _equal_chunk(seqlen: int, n_chunks: int, name: str) -> int:
    if seqlen % n_chunks or (seqlen // n_chunks) % _BLOCK:
        raise ValueError(f"{name} ({seqlen}) must split into {n_chunks} equal chunks whose length is a multiple"
                         f" of {_BLOCK} (a multiple of {n_chunks * _BLOCK})")
    return seqlen // n_chunks


def shard_sequence(x: Array, rank: int, world_size: int, *, load_balanced: bool = False, axis: int = 1) -> Array:
    """Rank's part of x along the sequence axis (default 1, as in (B, S, H, D)).

    The layout of ``cuflash.distributed.ring_attention``: S splits into world_size equal
    chunks (2*world_size, load-balanced) of a multiple of 16; rank holds chunk rank (or
    chunks rank and 2*world_size-1-rank, concatenated in that order). Returns a view
    without load balancing, a new array with it.
    """
    ids = rank_chunk_ids(rank, world_size, load_balanced)
    n_chunks = world_size * (2 if load_balanced else 1)
    c = _equal_chunk(x.shape[axis], n_chunks, "the sequence length")
    xp = _xp(_validate.array_module_name(x) or "numpy")
    parts = [x[(slice(None),) * axis + (slice(i * c, (i + 1) * c),)] for i in ids]
    return parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=axis)


def unshard_sequence(shards: Sequence[Array], *, load_balanced: bool = False, axis: int = 1) -> Array:
    """Inverse of shard_sequence: the ranks' parts (in rank order) back in global order."""
    n = len(shards)
    if n == 0:
        raise ValueError("shards must hold at least one array")
    xp = _xp(_validate.array_module_name(shards[0]) or "numpy")
    if not load_balanced:
        return xp.concatenate(list(shards), axis=axis)
    chunks: list = [None] * (2 * n)
    for r, s in enumerate(shards):
        half = s.shape[axis] // 2
        ids = rank_chunk_ids(r, n, True)
        chunks[ids[0]] = s[(slice(None),) * axis + (slice(0, half),)]
        chunks[ids[1]] = s[(slice(None),) * axis + (slice(half, None),)]
    return xp.concatenate(chunks, axis=axis)


def fully_masked(q_range: tuple[int, int], k_range: tuple[int, int], seqlen_q_total: int,
                 seqlen_k_total: int, causal: bool) -> bool:
    """True when causality hides every key of k_range [start, end) from every row of q_range:
    the first key lies after the last row's last visible key (Sk_total - Sq_total + row)."""
    return causal and k_range[0] > q_range[1] - 1 + seqlen_k_total - seqlen_q_total


# --------------------------------------------------------------------------- #
# Ring attention, simulated on one device
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class SimulatedRing:
    """Result of ring_attention_simulated, in global order.

    out (B, Sq, H, D) in q's dtype, lse (B, H, Sq) float32; dq, dk, dv in the inputs'
    shapes and dtypes when dout was given, else None. pairs: the (rank, step, q chunk,
    k chunk) shard launches of the forward, in order.
    """

    out: Array
    lse: Array
    dq: Array | None
    dk: Array | None
    dv: Array | None
    seed: int | None
    offset: int | None
    pairs: tuple[tuple[int, int, int, int], ...]


def ring_attention_simulated(
    q: Array,
    k: Array,
    v: Array,
    n_ranks: int,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    load_balanced: bool = False,
    deterministic: bool = False,
    dout: Array | None = None,
) -> SimulatedRing:
    """Ring attention over n_ranks simulated ranks on one device (or NumPy); forward, and
    the backward when dout is given.

    q: (B, Sq, H, D), k, v: (B, Sk, Hk, D), the whole problem; dout: (B, Sq, H, D) or None.
    Queries and keys are cut into n_ranks chunks (2*n_ranks load-balanced, see the module
    docstring; ``sequence_chunks`` gives the bounds, starts multiples of 16). Each rank
    runs ``attention_shard_forward`` on the key chunks in ring order and merges them into
    a float32 accumulator; the backward runs ``attention_shard_backward`` per pair with the
    merged out and lse, summing dq, dk, dv over pairs in float32. The result matches
    ``cuflash.attention_forward`` / ``attention_backward`` on the whole problem (same seed
    and offset: the same dropout mask bit for bit) up to rounding.
    seed, offset: as in cuflash.attention_forward (one draw of the global generator for
    the whole problem when both are None and dropout_p > 0).
    """
    prob = _validate.check_qkv(q, k, v)
    flags = _validate.check_flags(causal=causal, deterministic=deterministic, load_balanced=load_balanced)
    p, _ = _validate.check_dropout(dropout_p)
    n = _check_int("n_ranks", n_ranks, minimum=1)
    n_chunks = n * (2 if flags["load_balanced"] else 1)
    qb = sequence_chunks(prob.seqlen_q, n_chunks)
    kb = sequence_chunks(prob.seqlen_k, n_chunks)
    if dout is not None:
        _check_like("dout", dout, q, "q")
        if dout.strides[-1] != dout.itemsize:
            raise ValueError("dout's last dimension must be contiguous")
    seed, offset = _resolve_rng(p, seed, offset)  # one draw for every shard
    xp = _xp(prob.xp_name)
    B, Sq, H, D = q.shape
    Sk, Hk = prob.seqlen_k, prob.nheads_k
    common = dict(seqlen_q_total=Sq, seqlen_k_total=Sk, causal=flags["causal"], dropout_p=p,
                  softmax_scale=softmax_scale, seed=seed, offset=offset, deterministic=flags["deterministic"])
    owned = [rank_chunk_ids(r, n, flags["load_balanced"]) for r in range(n)]

    def schedule():
        """(rank, step, q chunk, k chunk) in ring order, fully masked pairs skipped."""
        for r in range(n):
            for t in range(n):
                for qc in owned[r]:
                    for kc in owned[(r - t) % n]:
                        if not fully_masked(qb[qc], kb[kc], Sq, Sk, flags["causal"]):
                            yield r, t, qc, kc

    pairs = tuple(schedule())
    out = _empty(xp, (B, Sq, H, D), q.dtype)
    lse = _empty(xp, (B, H, Sq), np.float32)
    # Accumulators: float32 (float64 for float64 inputs on the CPU path).
    ad = np.float64 if q.dtype.name == "float64" else np.float32
    acc: dict[int, tuple[Array, Array]] = {}
    for qc, (qa, qe) in enumerate(qb):  # nothing seen yet: out 0, lse -inf
        acc[qc] = (xp.zeros((B, qe - qa, H, D), ad), xp.full((B, H, qe - qa), -np.inf, ad))
    for _, _, qc, kc in pairs:
        (qa, qe), (ka, ke) = qb[qc], kb[kc]
        o, ctx = attention_shard_forward(q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], q_start=qa, k_start=ka, **common)
        acc[qc] = merge_attention([acc[qc][0], o], [acc[qc][1], ctx.lse], out_dtype=ad)
    for qc, (qa, qe) in enumerate(qb):
        out[:, qa:qe] = _from_float(acc[qc][0], q.dtype, xp)
        lse[:, :, qa:qe] = acc[qc][1]
    if dout is None:
        return SimulatedRing(out, lse, None, None, None, seed, offset, pairs)

    dq_acc = xp.zeros((B, Sq, H, D), ad)
    dk_acc = xp.zeros((B, Sk, Hk, D), ad)
    dv_acc = xp.zeros((B, Sk, Hk, D), ad)
    for _, _, qc, kc in pairs:
        (qa, qe), (ka, ke) = qb[qc], kb[kc]
        ctx = make_shard_context(q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], out[:, qa:qe], lse[:, :, qa:qe],
                                 q_start=qa, k_start=ka, **common)
        dq, dk, dv = attention_shard_backward(dout[:, qa:qe], ctx)
        dq_acc[:, qa:qe] += _to_float(dq, ad, xp)
        dk_acc[:, ka:ke] += _to_float(dk, ad, xp)
        dv_acc[:, ka:ke] += _to_float(dv, ad, xp)
    return SimulatedRing(out, lse, _from_float(dq_acc, q.dtype, xp), _from_float(dk_acc, k.dtype, xp),
                         _from_float(dv_acc, v.dtype, xp), seed, offset, pairs)
