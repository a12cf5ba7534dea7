"""Tests for cuflash.reference (CPU only, float64 ground truth and naive same-dtype)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from cuflash.reference import (
    attention_backward_ref,
    attention_forward_ref,
    causal_mask,
    naive_attention_backward,
    naive_attention_forward,
)

# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def _make_inputs(
    rng: np.random.Generator, b: int, sq: int, sk: int, h: int, hk: int, d: int,
    dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def _make_keep(rng: np.random.Generator, b: int, h: int, sq: int, sk: int, p_keep: float = 0.7):
    return rng.random((b, h, sq, sk)) < p_keep


def _loop_forward(q, k, v, *, causal, softmax_scale, keep, keep_scale):
    """Direct per-(b, h, i) implementation, independent of the vectorised code."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kvh = hi // (h // hk)
            for i in range(sq):
                cols = [j for j in range(sk) if (not causal) or j <= i + (sk - sq)]
                if not cols:
                    continue
                scores = np.array([scale * float(np.dot(q[bi, i, hi], k[bi, j, kvh])) for j in cols])
                mx = scores.max()
                e = np.exp(scores - mx)
                tot = e.sum()
                lse[bi, hi, i] = mx + math.log(tot)
                for c, j in enumerate(cols):
                    w = e[c] / tot
                    if keep is not None:
                        w = w * keep_scale if keep[bi, hi, i, j] else 0.0
                    out[bi, i, hi] += w * v[bi, j, kvh]
    return out, lse


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-300)
    return float(np.max(np.abs(a - b))) / denom if a.size else 0.0


# --------------------------------------------------------------------------- #
# Forward vs loop
# --------------------------------------------------------------------------- #

FWD_CASES = [
    # (b, sq, sk, h, hk, d, causal, dropout, softmax_scale)
    (2, 4, 4, 4, 4, 8, False, False, None),
    (2, 4, 4, 4, 4, 8, True, False, None),
    (1, 3, 7, 4, 2, 8, True, False, None),   # GQA, Sq < Sk
    (1, 7, 3, 4, 1, 8, True, False, None),   # MQA, Sq > Sk: fully masked rows
    (2, 6, 2, 4, 2, 4, True, True, 0.3),     # fully masked rows + dropout
    (1, 5, 9, 4, 1, 4, False, True, 0.7),    # MQA, Sq < Sk, dropout
    (2, 9, 5, 4, 2, 4, False, False, 1.3),   # Sq > Sk, not causal
    (1, 1, 1, 4, 2, 4, True, True, None),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,dropout,scale", FWD_CASES)
def test_forward_matches_loop(b, sq, sk, h, hk, d, causal, dropout, scale):
    rng = np.random.default_rng(1234 + sq * 31 + sk)
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    keep = _make_keep(rng, b, h, sq, sk) if dropout else None
    keep_scale = 1.0 / 0.7 if dropout else 1.0
    out, lse = attention_forward_ref(
        q, k, v, causal=causal, softmax_scale=scale, keep=keep, keep_scale=keep_scale
    )
    out_l, lse_l = _loop_forward(
        q, k, v, causal=causal, softmax_scale=scale, keep=keep, keep_scale=keep_scale
    )
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    err_o = float(np.max(np.abs(out - out_l)))
    fin = np.isfinite(lse_l)
    err_l = float(np.max(np.abs(lse[fin] - lse_l[fin]))) if fin.any() else 0.0
    print(f"max |out - loop| = {err_o:.3e}, max |lse - loop| = {err_l:.3e}")
    assert err_o < 1e-12
    assert err_l < 1e-12
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_l))


def test_causal_mask_bottom_right():
    m = causal_mask(2, 4)
    np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 1, 1]])
    m = causal_mask(4, 2)
    np.testing.assert_array_equal(m, [[0, 0], [0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(causal_mask(3, 3), np.tril(np.ones((3, 3), bool)))


def test_fully_masked_rows_forward():
    rng = np.random.default_rng(0)
    b, sq, sk, h, hk, d = 2, 5, 2, 2, 1, 4
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    out, lse = attention_forward_ref(q, k, v, causal=True)
    n_masked = sq - sk  # rows 0..sq-sk-1 see nothing
    print("lse[0,0] =", lse[0, 0])
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[:, :n_masked] == 0.0)
    assert np.all(np.isneginf(lse[:, :, :n_masked]))
    assert np.all(np.isfinite(lse[:, :, n_masked:]))


def test_default_scale_and_input_dtypes():
    rng = np.random.default_rng(5)
    q, k, v = _make_inputs(rng, 1, 3, 4, 2, 2, 16)
    out_a, lse_a = attention_forward_ref(q, k, v)
    out_b, lse_b = attention_forward_ref(q, k, v, softmax_scale=0.25)
    assert np.max(np.abs(out_a - out_b)) == 0.0 and np.max(np.abs(lse_a - lse_b)) == 0.0
    # Low-precision inputs are upcast exactly: same result as feeding the upcast arrays.
    for dt in (np.float16, np.float32, ml_dtypes.bfloat16):
        ql, kl, vl = q.astype(dt), k.astype(dt), v.astype(dt)
        o1, l1 = attention_forward_ref(ql, kl, vl, causal=True)
        o2, l2 = attention_forward_ref(
            ql.astype(np.float64), kl.astype(np.float64), vl.astype(np.float64), causal=True
        )
        assert o1.dtype == np.float64 and l1.dtype == np.float64
        assert np.array_equal(o1, o2) and np.array_equal(l1, l2)


def test_nan_propagates():
    rng = np.random.default_rng(3)
    b, sq, sk, h, hk, d = 1, 4, 4, 2, 1, 4
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    q[0, 1, 0, 2] = np.nan
    out, lse = attention_forward_ref(q, k, v, causal=True)
    print("out[0,1,0] =", out[0, 1, 0], "lse[0,0,1] =", lse[0, 0, 1])
    assert np.all(np.isnan(out[0, 1, 0])) and np.isnan(lse[0, 0, 1])
    nan_mask = np.zeros(out.shape, bool)
    nan_mask[0, 1, 0] = True
    assert not np.isnan(out[~nan_mask]).any()
    # Same for the naive implementation in float16.
    out16, lse16 = naive_attention_forward(
        q.astype(np.float16), k.astype(np.float16), v.astype(np.float16), causal=True
    )
    assert np.all(np.isnan(out16[0, 1, 0])) and np.isnan(lse16[0, 0, 1])
    # NaN in v reaches every row that sees (with non-zero weight) that key.
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    v[0, 2, 0, 1] = np.nan
    out, _ = attention_forward_ref(q, k, v, causal=True)
    print("rows that see key 2:", out[0, 2:, :, 1].ravel(), "rows that do not:", out[0, :2, :, 1].ravel())
    assert np.all(np.isnan(out[0, 2:, :, 1])) and not np.isnan(out[0, :2]).any()
    assert not np.isnan(out[0, 2:, :, [0, 2, 3]]).any()
    # Backward: rows 0..1 never see key 2, so their dq stays finite; rows 2.. are NaN.
    _, lse = attention_forward_ref(q, k, v, causal=True)
    dq, _, _ = attention_backward_ref(np.ones_like(out), q, k, v, out, lse, causal=True)
    assert not np.isnan(dq[0, :2]).any() and np.all(np.isnan(dq[0, 2:]))
    # NaN in a dropped position of v does not leak either (weight exactly 0).
    keep = np.ones((b, h, sq, sk), bool)
    keep[0, :, 3, 2] = False
    out, _ = attention_forward_ref(q, k, v, causal=True, keep=keep, keep_scale=1.0)
    assert not np.isnan(out[0, 3]).any() and np.all(np.isnan(out[0, 2, :, 1]))


def test_shape_validation():
    q = np.zeros((1, 2, 3, 4))
    k = np.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError):
        attention_forward_ref(q, k, k)
    with pytest.raises(ValueError):
        attention_forward_ref(q, np.zeros((1, 2, 3, 5)), np.zeros((1, 2, 3, 5)))
    with pytest.raises(ValueError):
        attention_forward_ref(q, q, q, keep=np.ones((1, 3, 2, 3), bool))


# --------------------------------------------------------------------------- #
# Backward vs central finite differences
# --------------------------------------------------------------------------- #


def _fd_grads(q, k, v, g, kw, eps=1e-6):
    """Central finite differences of L = sum(out * G) w.r.t. q, k, v."""
    grads = []
    for x in (q, k, v):
        gx = np.zeros_like(x)
        flat = x.reshape(-1)
        gflat = gx.reshape(-1)
        for idx in range(flat.size):
            orig = flat[idx]
            flat[idx] = orig + eps
            lp = float(np.sum(attention_forward_ref(q, k, v, **kw)[0] * g))
            flat[idx] = orig - eps
            lm = float(np.sum(attention_forward_ref(q, k, v, **kw)[0] * g))
            flat[idx] = orig
            gflat[idx] = (lp - lm) / (2 * eps)
        grads.append(gx)
    return grads


BWD_SHAPES = [(1, 1), (3, 5), (5, 3), (1, 5), (5, 1), (3, 3)]


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("sq,sk", BWD_SHAPES)
@pytest.mark.parametrize("hk", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_backward_finite_differences(b, sq, sk, hk, causal, dropout):
    h, d = 2, 4
    rng = np.random.default_rng(100 * b + 10 * sq + sk + 7 * hk + 3 * causal + dropout)
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    keep = _make_keep(rng, b, h, sq, sk, 0.6) if dropout else None
    kw = dict(causal=causal, softmax_scale=0.8, keep=keep, keep_scale=1.0 / 0.6 if dropout else 1.0)
    g = rng.standard_normal((b, sq, h, d))
    out, lse = attention_forward_ref(q, k, v, **kw)
    dq, dk, dv = attention_backward_ref(g, q, k, v, out, lse, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for name, ana, num in zip(("dq", "dk", "dv"), (dq, dk, dv), _fd_grads(q, k, v, g, kw)):
        assert not np.isnan(ana).any()
        scale_ref = max(float(np.max(np.abs(num))), 1e-3)
        err = float(np.max(np.abs(ana - num))) / scale_ref
        print(f"{name}: max rel err vs finite differences = {err:.3e}")
        assert err < 1e-6


def test_backward_fully_masked_rows_zero_grads():
    rng = np.random.default_rng(11)
    b, sq, sk, h, hk, d = 2, 6, 3, 4, 2, 4
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    keep = _make_keep(rng, b, h, sq, sk)
    kw = dict(causal=True, keep=keep, keep_scale=1 / 0.7)
    out, lse = attention_forward_ref(q, k, v, **kw)
    g = rng.standard_normal(out.shape)
    dq, dk, dv = attention_backward_ref(g, q, k, v, out, lse, **kw)
    n_masked = sq - sk
    for name, x in (("dq", dq), ("dk", dk), ("dv", dv)):
        print(name, "has NaN:", np.isnan(x).any())
        assert not np.isnan(x).any()
    print("max |dq| on masked rows:", np.max(np.abs(dq[:, :n_masked])))
    assert np.all(dq[:, :n_masked] == 0.0)
    assert np.any(dq[:, n_masked:] != 0.0)
    # A key no row sees gets no gradient either: with Sq - Sk = 3 every key is seen, so
    # use Sq = 2, Sk = 4 (causal: key 3 seen only by row 1) + a fully-masked-free check.
    q2, k2, v2 = _make_inputs(rng, 1, 2, 4, 2, 1, 4)
    o2, l2 = attention_forward_ref(q2, k2, v2, causal=True)
    dq2, dk2, dv2 = attention_backward_ref(np.ones_like(o2), q2, k2, v2, o2, l2, causal=True)
    assert not np.isnan(dq2).any() and not np.isnan(dk2).any() and not np.isnan(dv2).any()
    # Naive same-dtype backward: also zero / finite on fully masked rows.
    n_dq, n_dk, n_dv = naive_attention_backward(
        g.astype(np.float16), q.astype(np.float16), k.astype(np.float16), v.astype(np.float16),
        None, **kw,
    )
    assert not any(np.isnan(x).any() for x in (n_dq, n_dk, n_dv))
    assert np.all(n_dq[:, :n_masked] == 0)


def test_backward_gqa_equals_expanded_mha():
    """dk / dv for GQA equal the per-group sums of the MHA gradients with repeated k / v."""
    rng = np.random.default_rng(21)
    b, sq, sk, h, hk, d = 2, 4, 6, 4, 2, 4
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    g = rng.standard_normal((b, sq, h, d))
    out, lse = attention_forward_ref(q, k, v, causal=True)
    dq, dk, dv = attention_backward_ref(g, q, k, v, out, lse, causal=True)
    ke, ve = np.repeat(k, h // hk, axis=2), np.repeat(v, h // hk, axis=2)
    out_e, lse_e = attention_forward_ref(q, ke, ve, causal=True)
    dq_e, dk_e, dv_e = attention_backward_ref(g, q, ke, ve, out_e, lse_e, causal=True)
    dk_r = dk_e.reshape(b, sk, hk, h // hk, d).sum(3)
    dv_r = dv_e.reshape(b, sk, hk, h // hk, d).sum(3)
    errs = [float(np.max(np.abs(x - y))) for x, y in ((dq, dq_e), (dk, dk_r), (dv, dv_r))]
    print("GQA vs expanded MHA errors:", errs)
    assert max(errs) < 1e-13


# --------------------------------------------------------------------------- #
# Naive same-dtype implementation
# --------------------------------------------------------------------------- #

NAIVE_CASES = [
    # (b, sq, sk, h, hk, d, causal, dropout)
    (2, 64, 64, 4, 2, 32, False, False),
    (2, 64, 64, 4, 2, 32, True, True),
    (1, 48, 80, 4, 1, 32, True, False),
    (1, 80, 48, 4, 4, 32, True, True),   # fully masked rows
]


def _naive_vs_ref(dtype, case, seed=0):
    b, sq, sk, h, hk, d, causal, dropout = case
    rng = np.random.default_rng(seed)
    q, k, v = _make_inputs(rng, b, sq, sk, h, hk, d)
    g = rng.standard_normal((b, sq, h, d))
    keep = _make_keep(rng, b, h, sq, sk, 0.8) if dropout else None
    kw = dict(causal=causal, keep=keep, keep_scale=1.0 / 0.8 if dropout else 1.0)
    ql, kl, vl, gl = (x.astype(dtype) for x in (q, k, v, g))
    # Reference on the rounded inputs, so only the computation error is measured.
    out, lse = attention_forward_ref(ql, kl, vl, **kw)
    grads = attention_backward_ref(gl, ql, kl, vl, out, lse, **kw)
    n_out, n_lse = naive_attention_forward(ql, kl, vl, **kw)
    n_grads = naive_attention_backward(gl, ql, kl, vl, n_out, **kw)
    return (out, lse, *grads), (n_out, n_lse, *n_grads)


def _finite_rel_err(a, ref):
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(np.asarray(a, np.float64)), fin)
    return _rel_err(np.asarray(a, np.float64)[fin], ref[fin])


@pytest.mark.parametrize("case", NAIVE_CASES)
def test_naive_float16_close_to_reference(case):
    refs, naive = _naive_vs_ref(np.float16, case)
    names = ("out", "lse", "dq", "dk", "dv")
    errs = {}
    for name, r, n in zip(names, refs, naive):
        assert n.dtype == np.float16, (name, n.dtype)
        assert n.shape == r.shape
        assert not np.isnan(n).any()
        errs[name] = _finite_rel_err(n, r)
    print("float16 naive rel errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    for name, e in errs.items():
        assert e < 1e-2, name
    # It must actually carry low-precision rounding error (not be a float64 computation).
    assert errs["out"] > 1e-5 and errs["dq"] > 1e-5


@pytest.mark.parametrize("case", NAIVE_CASES[:2])
def test_naive_bfloat16_close_to_reference(case):
    refs, naive = _naive_vs_ref(ml_dtypes.bfloat16, case)
    names = ("out", "lse", "dq", "dk", "dv")
    errs = {}
    for name, r, n in zip(names, refs, naive):
        assert n.dtype == ml_dtypes.bfloat16, (name, n.dtype)
        errs[name] = _finite_rel_err(n, r)
    print("bfloat16 naive rel errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    for name, e in errs.items():
        assert e < 6e-2, name
    assert errs["out"] > 1e-4


@pytest.mark.parametrize("case", NAIVE_CASES)
def test_naive_float64_matches_reference(case):
    refs, naive = _naive_vs_ref(np.float64, case)
    errs = {}
    for name, r, n in zip(("out", "lse", "dq", "dk", "dv"), refs, naive):
        assert n.dtype == np.float64
        errs[name] = _finite_rel_err(n, r)
    print("float64 naive rel errors:", {k: f"{v:.2e}" for k, v in errs.items()})
    for name, e in errs.items():
        assert e < 1e-12, name


def test_naive_float32_dtype():
    rng = np.random.default_rng(2)
    q, k, v = _make_inputs(rng, 1, 8, 8, 2, 1, 8, np.float32)
    out, lse = naive_attention_forward(q, k, v, causal=True)
    grads = naive_attention_backward(np.ones_like(out), q, k, v, out, causal=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    assert all(x.dtype == np.float32 for x in grads)


@pytest.mark.gpu
def test_naive_cupy_matches_numpy():
    import cupy

    rng = np.random.default_rng(9)
    q, k, v = _make_inputs(rng, 2, 16, 24, 4, 2, 16, np.float16)
    g = rng.standard_normal(q.shape).astype(np.float16)
    keep = _make_keep(rng, 2, 4, 16, 24)
    kw = dict(causal=True, keep=keep, keep_scale=1 / 0.7)
    out, lse = naive_attention_forward(q, k, v, **kw)
    grads = naive_attention_backward(g, q, k, v, out, **kw)
    cq, ck, cv, cg = (cupy.asarray(x) for x in (q, k, v, g))
    c_out, c_lse = naive_attention_forward(cq, ck, cv, **kw)
    c_grads = naive_attention_backward(cg, cq, ck, cv, c_out, **kw)
    assert isinstance(c_out, cupy.ndarray) and c_out.dtype == np.float16
    for a, c in zip((out, *grads), (c_out, *c_grads)):
        err = _rel_err(cupy.asnumpy(c), a)
        print("cupy vs numpy naive rel err:", err)
        assert err < 1e-2
    # The float64 reference accepts cupy inputs too.
    o64, _ = attention_forward_ref(cq, ck, cv, **kw)
    assert _rel_err(o64, attention_forward_ref(q, k, v, **kw)[0]) == 0.0
