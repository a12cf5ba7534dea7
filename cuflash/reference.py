"""Reference (non-fused) attention implementations used to check the kernels.

Two families live here:

* ``attention_forward_ref`` / ``attention_backward_ref``: float64 NumPy ground
  truth.  Every input is upcast to float64 first, so these are as exact as a
  straightforward implementation can be.

* ``naive_attention_forward`` / ``naive_attention_backward``: the "naive
  same-dtype implementation" of FlashAttention-2's tolerance rule (a kernel's
  error against the float64 truth should be within a small factor of the error
  of a plain implementation that materialises S and P in the input dtype).  They
  accept NumPy or CuPy arrays and keep every intermediate (S, P, dP, dS, ...) in
  the input dtype.

Conventions (shared with the rest of cuflash):

* q: (B, Sq, H, D); k, v: (B, Sk, Hk, D) with H % Hk == 0.  Query head h uses
  kv head h // (H // Hk) (GQA / MQA).
* out: (B, Sq, H, D); lse: (B, H, Sq), natural log-sum-exp of the scaled scores
  softmax_scale * q.k over the visible keys.
* softmax_scale defaults to 1 / sqrt(D).
* Causal masking is bottom-right aligned: query row i sees key column j iff
  j <= i + (Sk - Sq).  Rows that see no key ("fully masked rows") get out = 0,
  lse = -inf and zero gradients, without any NaN.  NaN / Inf in the inputs
  propagate.
* Dropout: ``keep`` is a boolean (B, H, Sq, Sk) mask (True = kept) and
  ``keep_scale`` = 1 / keep_probability.  It applies to the normalised
  probabilities: O = (P * keep * keep_scale) V.  lse is that of the un-dropped
  softmax.  ``keep=None`` means no dropout.

Paper names used below: S = q k^T (scores), P = softmax(scale * S),
m = row max, l = row sum of exp, lse = m + log(l), Z = dropped P,
delta = rowsum(dO * O).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "causal_mask",
    "attention_forward_ref",
    "attention_backward_ref",
    "naive_attention_forward",
    "naive_attention_backward",
]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _is_cupy(x: Any) -> bool:
    return type(x).__module__.startswith("cupy")


def _array_module(x: Any) -> ModuleType:
    """NumPy or CuPy, chosen from the type of ``x`` (CuPy imported lazily)."""
    if _is_cupy(x):
        import cupy  # noqa: PLC0415  (lazy: cupy may be unusable without a GPU)

        return cupy
    return np


def _to_f64_numpy(x: Any) -> np.ndarray:
    """Host float64 copy of a NumPy / CuPy array of any float dtype (incl. bf16)."""
    if _is_cupy(x):
        x = x.get()
    return np.asarray(x).astype(np.float64)


def _to_bool_numpy(x: Any) -> np.ndarray:
    if _is_cupy(x):
        x = x.get()
    return np.asarray(x).astype(bool)


def causal_mask(sq: int, sk: int, xp: ModuleType = np, diag: int | None = None) -> Any:
    """Causal visibility mask, bottom-right aligned by default.

    Returns a boolean array of shape (Sq, Sk) that is True where query row i may
    see key column j, i.e. j <= i + diag with diag = Sk - Sq unless given.  A block
    of a larger problem (context parallelism: rows from q_start, columns from
    k_start of a (Sq_total, Sk_total) problem) uses
    diag = q_start - k_start + Sk_total - Sq_total, the kernels' ``causal_diag``.
    """
    rows = xp.arange(sq)[:, None]
    cols = xp.arange(sk)[None, :]
    return cols <= rows + (sk - sq if diag is None else int(diag))


def _check_shapes(q: Any, k: Any, v: Any, keep: Any | None) -> tuple[int, int, int, int, int, int]:
    """Validate the layout; return (B, Sq, Sk, H, Hk, D)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-D (B, S, H, D); got {q.shape}, {k.shape}, {v.shape}")
    b, sq, h, d = q.shape
    bk, sk, hk, dk = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}")
    if bk != b or dk != d:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"number of query heads {h} must be a multiple of kv heads {hk}")
    if keep is not None and tuple(keep.shape) != (b, h, sq, sk):
        raise ValueError(f"keep must have shape {(b, h, sq, sk)}; got {tuple(keep.shape)}")
    return b, sq, sk, h, hk, d


def _resolve_scale(softmax_scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def _heads_first(x: Any, xp: ModuleType) -> Any:
    """(B, S, H, D) -> (B, H, S, D)."""
    return xp.swapaxes(x, 1, 2)


def _expand_kv(x: Any, groups: int, xp: ModuleType) -> Any:
    """(B, S, Hk, D) -> (B, H, S, D): query head h reads kv head h // groups."""
    x = xp.swapaxes(x, 1, 2)
    return xp.repeat(x, groups, axis=1) if groups > 1 else x


def _reduce_kv_grad(g: Any, hk: int) -> Any:
    """(B, H, Sk, D) gradient -> (B, Sk, Hk, D), summed over the query heads of a group."""
    b, h, sk, d = g.shape
    g = g.reshape(b, hk, h // hk, sk, d).sum(axis=2)
    return g.swapaxes(1, 2)


# --------------------------------------------------------------------------- #
# float64 ground truth
# --------------------------------------------------------------------------- #


def _pv_exact(z: np.ndarray, v: np.ndarray) -> np.ndarray:
    """O = Z V where zero weights contribute exactly nothing, even for non-finite V.

    z: (B, H, Sq, Sk), v: (B, H, Sk, D).  A plain matmul computes 0 * NaN = NaN,
    so a NaN / Inf in the value row of a masked (or dropped) key would leak into
    rows that never see that key.  Here such value rows are zeroed for the matmul
    and added back only where their weight is non-zero, so NaN / Inf propagate
    exactly to the rows that use them.
    """
    bad = ~np.isfinite(v).all(axis=-1)  # (B, H, Sk)
    if not bad.any():
        return np.matmul(z, v)
    o = np.matmul(z, np.where(bad[..., None], 0.0, v))
    with np.errstate(invalid="ignore"):
        for j in np.nonzero(bad.any(axis=(0, 1)))[0]:
            zj = z[..., :, j : j + 1]  # (B, H, Sq, 1)
            vj = v[..., j : j + 1, :]  # (B, H, 1, D)
            o = o + np.where((zj != 0) & bad[..., j, None, None], zj * vj, 0.0)
    return o


def _masked_scores_f64(
    q: np.ndarray, k: np.ndarray, causal: bool, scale: float, groups: int, diag: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """scale * S with invisible entries set to -inf.

    q: (B, Sq, H, D), k: (B, Sk, Hk, D) float64.  Returns (B, H, Sq, Sk) scores and
    the (Sq, Sk) visibility mask (None when not causal); diag as in ``causal_mask``.
    """
    qh = _heads_first(q, np)  # (B, H, Sq, D)
    kh = _expand_kv(k, groups, np)  # (B, H, Sk, D)
    s = np.matmul(qh, kh.swapaxes(-1, -2)) * scale  # (B, H, Sq, Sk)
    mask = None
    if causal:
        mask = causal_mask(q.shape[1], k.shape[1], diag=diag)
        s = np.where(mask, s, -np.inf)
    return s, mask


def attention_forward_ref(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    keep: Any | None = None,
    keep_scale: float = 1.0,
    causal_diag: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference attention forward.

    Args:
        q: (B, Sq, H, D), any float dtype (NumPy or CuPy; copied to host float64).
        k, v: (B, Sk, Hk, D), H % Hk == 0.
        causal: bottom-right aligned causal mask (j <= i + Sk - Sq).
        softmax_scale: defaults to 1 / sqrt(D).
        keep: optional bool (B, H, Sq, Sk) dropout keep mask.
        keep_scale: 1 / keep_probability, applied to kept probabilities.
        causal_diag: with causal, row i sees key j iff j <= i + causal_diag
            (default Sk - Sq; see ``causal_mask`` for a block of a larger problem).

    Returns:
        out: float64 (B, Sq, H, D); lse: float64 (B, H, Sq) of the un-dropped
        softmax (-inf on fully masked rows, whose out is 0).
    """
    _check_shapes(q, k, v, keep)
    q64, k64, v64 = _to_f64_numpy(q), _to_f64_numpy(k), _to_f64_numpy(v)
    b, sq, h, d = q64.shape
    hk = k64.shape[2]
    groups = h // hk
    scale = _resolve_scale(softmax_scale, d)

    s, _ = _masked_scores_f64(q64, k64, causal, scale, groups, causal_diag)  # (B, H, Sq, Sk)
    m = s.max(axis=-1, keepdims=True) if s.shape[-1] > 0 else np.full(s.shape[:-1] + (1,), -np.inf)
    # Fully masked rows have m = -inf; use 0 there so exp(-inf - 0) = 0 (no inf - inf).
    # NaN rows keep m = NaN and so propagate.
    m_safe = np.where(np.isneginf(m), 0.0, m)
    p_un = np.exp(s - m_safe)  # unnormalised P, (B, H, Sq, Sk)
    l = p_un.sum(axis=-1, keepdims=True)  # (B, H, Sq, 1)
    empty = l == 0.0  # only fully masked rows (otherwise the max entry contributes exp(0) = 1)
    p = p_un / np.where(empty, 1.0, l)
    lse = np.where(empty, -np.inf, m_safe + np.log(np.where(empty, 1.0, l)))[..., 0]

    if keep is not None:
        z = np.where(_to_bool_numpy(keep), p * float(keep_scale), 0.0)
    else:
        z = p
    vh = _expand_kv(v64, groups, np)  # (B, H, Sk, D)
    o = _pv_exact(z, vh)  # (B, H, Sq, D)
    return np.ascontiguousarray(o.swapaxes(1, 2)), np.ascontiguousarray(lse)


def attention_backward_ref(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    keep: Any | None = None,
    keep_scale: float = 1.0,
    causal_diag: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 hand-derived attention backward (FlashAttention formulation).

    Args:
        dout, out: (B, Sq, H, D).
        q: (B, Sq, H, D); k, v: (B, Sk, Hk, D).
        lse: (B, H, Sq) log-sum-exp of the scaled scores (as returned by the
            forward; -inf on fully masked rows).
        causal, softmax_scale, keep, keep_scale, causal_diag: as in
            ``attention_forward_ref``.

    For a block of keys of a larger problem (context parallelism), pass the lse and
    out of the whole rows (merged over every key block): the result is then this key
    block's exact share of dq and its exact dk, dv, because P = exp(scale*S - lse)
    and delta = rowsum(dO * O) only need those two row quantities.

    Returns:
        dq (B, Sq, H, D), dk (B, Sk, Hk, D), dv (B, Sk, Hk, D), float64.  dk / dv
        are summed over the H // Hk query heads sharing a kv head.
    """
    _check_shapes(q, k, v, keep)
    q64, k64, v64 = _to_f64_numpy(q), _to_f64_numpy(k), _to_f64_numpy(v)
    do64, o64, lse64 = _to_f64_numpy(dout), _to_f64_numpy(out), _to_f64_numpy(lse)
    b, sq, h, d = q64.shape
    hk = k64.shape[2]
    groups = h // hk
    if do64.shape != q64.shape or o64.shape != q64.shape:
        raise ValueError("dout and out must have the shape of q")
    if lse64.shape != (b, h, sq):
        raise ValueError(f"lse must have shape {(b, h, sq)}; got {lse64.shape}")
    scale = _resolve_scale(softmax_scale, d)

    s, mask = _masked_scores_f64(q64, k64, causal, scale, groups, causal_diag)  # scale*S, -inf where masked
    # P = exp(scale*S - lse).  On fully masked rows lse = -inf and every entry of s
    # is -inf: replace lse by 0 there so that P = exp(-inf) = 0 instead of NaN.
    lse_safe = np.where(np.isneginf(lse64), 0.0, lse64)[..., None]
    p = np.exp(s - lse_safe)  # (B, H, Sq, Sk)

    qh = _heads_first(q64, np)  # (B, H, Sq, D)
    kh = _expand_kv(k64, groups, np)  # (B, H, Sk, D)
    vh = _expand_kv(v64, groups, np)  # (B, H, Sk, D)
    doh = _heads_first(do64, np)  # (B, H, Sq, D)
    oh = _heads_first(o64, np)  # (B, H, Sq, D)

    # Multiplications by keep are written as np.where so that a NaN / Inf at a
    # dropped position does not turn into 0 * NaN = NaN.
    keep_b = _to_bool_numpy(keep) if keep is not None else None
    z = np.where(keep_b, p * float(keep_scale), 0.0) if keep_b is not None else p

    dv = np.matmul(z.swapaxes(-1, -2), doh)  # dV = Z^T dO, (B, H, Sk, D)
    dz = np.matmul(doh, vh.swapaxes(-1, -2))  # dZ = dO V^T, (B, H, Sq, Sk)
    # dP = dZ * keep * keep_scale
    dp = np.where(keep_b, dz * float(keep_scale), 0.0) if keep_b is not None else dz

    # Softmax backward needs, per row i, delta_i = sum_j P_ij dP_ij.  With dropout
    # this still equals rowsum(dO * O):
    #   sum_j P_ij dP_ij = sum_j P_ij keep_ij c dZ_ij            (c = keep_scale)
    #                    = sum_j Z_ij dZ_ij                       (Z = P * keep * c)
    #                    = sum_j Z_ij sum_d dO_id V_jd            (dZ = dO V^T)
    #                    = sum_d dO_id (sum_j Z_ij V_jd)
    #                    = sum_d dO_id O_id                       (O = Z V)
    # so the O(Sq*D) rowsum(dO * O) replaces the O(Sq*Sk) rowsum(P * dP).
    delta = (doh * oh).sum(axis=-1, keepdims=True)  # (B, H, Sq, 1)
    ds = p * (dp - delta)  # dS (w.r.t. scale*S), (B, H, Sq, Sk)
    if mask is not None:
        # Causally masked entries have P = 0 and dS = 0 exactly; force it so a
        # non-finite V / dO at a masked key cannot give 0 * NaN there.
        ds = np.where(mask, ds, 0.0)

    dq = scale * np.matmul(ds, kh)  # (B, H, Sq, D)
    dk_full = scale * np.matmul(ds.swapaxes(-1, -2), qh)  # (B, H, Sk, D)

    dq_out = np.ascontiguousarray(dq.swapaxes(1, 2))
    dk_out = np.ascontiguousarray(_reduce_kv_grad(dk_full, hk))
    dv_out = np.ascontiguousarray(_reduce_kv_grad(dv, hk))
    return dq_out, dk_out, dv_out


# --------------------------------------------------------------------------- #
# Naive same-dtype implementation (NumPy or CuPy)
# --------------------------------------------------------------------------- #


def _is_bf16(dtype: Any) -> bool:
    return np.dtype(dtype).name == "bfloat16"


def _mm(a: Any, b: Any, xp: ModuleType) -> Any:
    """Batched matmul whose result is rounded to the input dtype.

    float16 / float32 / float64 use the library matmul directly (its result is in
    the input dtype).  NumPy has no native bfloat16 matmul (ml_dtypes' bf16 either
    lacks one or promotes / is very slow), so for bfloat16 the product is computed
    in float32 and rounded back to bfloat16 immediately: one rounding per output
    element, i.e. the error of a bf16 GEMM with fp32 accumulation (what tensor
    cores do).
    """
    dt = a.dtype
    if _is_bf16(dt):
        return xp.matmul(a.astype(xp.float32), b.astype(xp.float32)).astype(dt)
    r = xp.matmul(a, b)
    return r if r.dtype == dt else r.astype(dt)


def _naive_probs(
    q: Any,
    k: Any,
    causal: bool,
    scale: float,
    groups: int,
    xp: ModuleType,
) -> tuple[Any, Any, Any]:
    """Materialise P = softmax(scale * S) in the input dtype.

    Returns P (B, H, Sq, Sk), lse (B, H, Sq) (both in q.dtype) and the boolean
    (B, H, Sq, 1) mask of fully masked rows.
    """
    dt = q.dtype
    qh = _heads_first(q, xp)
    kh = _expand_kv(k, groups, xp)
    s = _mm(qh, kh.swapaxes(-1, -2), xp)  # S, (B, H, Sq, Sk), in dt
    s = s * xp.asarray(scale, dtype=dt)  # scale * S, in dt
    neg_inf = xp.asarray(-np.inf, dtype=dt)
    zero = xp.asarray(0.0, dtype=dt)
    one = xp.asarray(1.0, dtype=dt)
    if causal:
        s = xp.where(causal_mask(q.shape[1], k.shape[1], xp), s, neg_inf)
    if s.shape[-1] > 0:
        m = s.max(axis=-1, keepdims=True)
    else:
        m = xp.full(s.shape[:-1] + (1,), -np.inf, dtype=dt)
    m_safe = xp.where(m == neg_inf, zero, m)
    p = xp.exp(s - m_safe)  # in dt
    l = p.sum(axis=-1, keepdims=True, dtype=dt)  # in dt
    empty = l == 0
    l_safe = xp.where(empty, one, l)
    p = p / l_safe  # in dt
    lse = xp.where(empty, neg_inf, m_safe + xp.log(l_safe))[..., 0]
    return p, lse, empty


def naive_attention_forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    keep: Any | None = None,
    keep_scale: float = 1.0,
    xp: ModuleType | None = None,
) -> tuple[Any, Any]:
    """Naive attention forward that keeps S and P in the input dtype.

    Works on NumPy or CuPy arrays (``xp`` defaults to the module of ``q``).  S is a
    same-dtype matmul, the softmax (max, exp, sum, divide) is computed and stored
    in the input dtype, dropout is applied in the input dtype, and O = Z V is a
    same-dtype matmul (bfloat16 matmuls: see ``_mm``).  Like any plain
    implementation (and a tiled kernel), a NaN / Inf in V at a masked or dropped
    key reaches the rows of its tile through 0 * NaN; the float64 reference does
    not do that.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hk, D); all the same float dtype.
        causal, softmax_scale, keep, keep_scale: as in ``attention_forward_ref``.

    Returns:
        out (B, Sq, H, D) and lse (B, H, Sq), both in the input dtype.
    """
    xp = _array_module(q) if xp is None else xp
    _check_shapes(q, k, v, keep)
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    h, d = q.shape[2], q.shape[3]
    groups = h // k.shape[2]
    scale = _resolve_scale(softmax_scale, d)

    p, lse, _ = _naive_probs(q, k, causal, scale, groups, xp)
    if keep is not None:
        z = p * xp.asarray(keep).astype(dt) * xp.asarray(keep_scale, dtype=dt)  # in dt
    else:
        z = p
    o = _mm(z, _expand_kv(v, groups, xp), xp)  # (B, H, Sq, D) in dt
    return xp.ascontiguousarray(o.swapaxes(1, 2)), xp.ascontiguousarray(lse)


def naive_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any | None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    keep: Any | None = None,
    keep_scale: float = 1.0,
    xp: ModuleType | None = None,
) -> tuple[Any, Any, Any]:
    """Naive attention backward with every intermediate in the input dtype.

    Recomputes P like ``naive_attention_forward`` and then follows the same
    formulas as ``attention_backward_ref`` (dV = Z^T dO, dZ = dO V^T,
    dP = dZ * keep * keep_scale, delta = rowsum(dO * O), dS = P * (dP - delta),
    dQ = scale dS K, dK = scale dS^T Q), each matmul / elementwise step rounded to
    the input dtype.  GQA dk / dv are summed over the query heads of a group in the
    input dtype.

    Args:
        dout: (B, Sq, H, D); q: (B, Sq, H, D); k, v: (B, Sk, Hk, D).
        out: (B, Sq, H, D) forward output used for delta; if None, it is
            recomputed with ``naive_attention_forward``.
        causal, softmax_scale, keep, keep_scale: as in ``attention_forward_ref``.

    Returns:
        dq (B, Sq, H, D), dk (B, Sk, Hk, D), dv (B, Sk, Hk, D) in the input dtype.
    """
    xp = _array_module(q) if xp is None else xp
    _check_shapes(q, k, v, keep)
    dt = q.dtype
    if k.dtype != dt or v.dtype != dt:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if out is None:
        out, _ = naive_attention_forward(
            q, k, v, causal=causal, softmax_scale=softmax_scale, keep=keep,
            keep_scale=keep_scale, xp=xp,
        )
    dout = dout.astype(dt, copy=False)
    out = out.astype(dt, copy=False)
    h, d = q.shape[2], q.shape[3]
    hk = k.shape[2]
    groups = h // hk
    scale = _resolve_scale(softmax_scale, d)
    scale_dt = xp.asarray(scale, dtype=dt)

    p, _, _ = _naive_probs(q, k, causal, scale, groups, xp)  # (B, H, Sq, Sk) in dt
    if keep is not None:
        drop = xp.asarray(keep).astype(dt) * xp.asarray(keep_scale, dtype=dt)
        z = p * drop
    else:
        drop = None
        z = p

    qh = _heads_first(q, xp)
    kh = _expand_kv(k, groups, xp)
    vh = _expand_kv(v, groups, xp)
    doh = _heads_first(dout, xp)
    oh = _heads_first(out, xp)

    dv = _mm(z.swapaxes(-1, -2), doh, xp)  # (B, H, Sk, D)
    dz = _mm(doh, vh.swapaxes(-1, -2), xp)  # (B, H, Sq, Sk)
    dp = dz * drop if drop is not None else dz
    delta = (doh * oh).sum(axis=-1, keepdims=True, dtype=dt)  # (B, H, Sq, 1)
    ds = p * (dp - delta)
    dq = _mm(ds, kh, xp) * scale_dt
    dk_full = _mm(ds.swapaxes(-1, -2), qh, xp) * scale_dt

    dq_out = xp.ascontiguousarray(dq.swapaxes(1, 2))
    dk_out = xp.ascontiguousarray(_reduce_kv_grad(dk_full, hk).astype(dt, copy=False))
    dv_out = xp.ascontiguousarray(_reduce_kv_grad(dv, hk).astype(dt, copy=False))
    return dq_out, dk_out, dv_out
