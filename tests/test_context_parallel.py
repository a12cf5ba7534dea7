"""Context parallelism on the CPU (NumPy, float64): the shard mask is the global mask's
slice, merge_attention is the softmax over the union of the keys (and its backward the
exact vector-Jacobian product), shards merged over key chunks give the unsharded forward
and backward, and the ring schedules -- simulated, and the multi-GPU one driven through an
in-process transport that models asynchronous transfers -- give the unsharded result.
No GPU needed.
"""

from __future__ import annotations

import queue
import threading

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import context_parallel as cpar
from cuflash import distributed
from cuflash.mask import drop_threshold, dropout_mask_numpy, keep_probability
from cuflash.reference import attention_backward_ref, attention_forward_ref, causal_mask

SEED = 0x1234_5678_9ABC_DEF1
OFFSET = 17


def _qkv(B, Sq, Sk, H, Hk, D, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    k = rng.standard_normal((B, Sk, Hk, D)).astype(dtype)
    v = rng.standard_normal((B, Sk, Hk, D)).astype(dtype)
    dout = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    return q, k, v, dout


def _maxerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _unsharded(q, k, v, dout, *, causal, p):
    """cuflash on the whole problem (NumPy: the float64 reference with the global mask)."""
    out, ctx = cuflash.attention_forward(q, k, v, causal=causal, dropout_p=p, seed=SEED, offset=OFFSET)
    return out, ctx.lse, cuflash.attention_backward(dout, ctx)


# --------------------------------------------------------------------------- #
# The mask of a shard
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("row_start,col_start,sq,sk", [(0, 0, 70, 90), (16, 32, 40, 50), (48, 0, 22, 90),
                                                       (5, 19, 33, 17), (64, 80, 6, 10), (69, 89, 1, 1)])
def test_shard_mask_is_global_slice(row_start, col_start, sq, sk):
    t = drop_threshold(0.37)
    full = dropout_mask_numpy(2, 3, 70, 90, threshold=t, seed=SEED, offset=OFFSET)
    part = dropout_mask_numpy(2, 3, sq, sk, threshold=t, seed=SEED, offset=OFFSET, row_start=row_start,
                              col_start=col_start)
    np.testing.assert_array_equal(part, full[:, :, row_start:row_start + sq, col_start:col_start + sk])


def test_shard_mask_far_from_origin():
    """Block row/column counters past 2**16 rows: the window equals the matching slice of a
    larger window (no wrap-around in the counter arithmetic)."""
    t = drop_threshold(0.5)
    big = dropout_mask_numpy(1, 1, 64, 64, threshold=t, seed=SEED, offset=3, row_start=1 << 20,
                             col_start=(1 << 30) + 32)
    small = dropout_mask_numpy(1, 1, 16, 32, threshold=t, seed=SEED, offset=3, row_start=(1 << 20) + 16,
                               col_start=(1 << 30) + 64)
    np.testing.assert_array_equal(small, big[:, :, 16:32, 32:64])
    with pytest.raises(ValueError, match="col_start"):
        dropout_mask_numpy(1, 1, 1, 16, threshold=t, seed=1, offset=0, col_start=(1 << 31) - 8)


def test_default_mask_unchanged():
    t = drop_threshold(0.2)
    a = dropout_mask_numpy(1, 2, 33, 47, threshold=t, seed=SEED, offset=OFFSET)
    b = dropout_mask_numpy(1, 2, 33, 47, threshold=t, seed=SEED, offset=OFFSET, row_start=0, col_start=0)
    np.testing.assert_array_equal(a, b)


def test_reference_causal_diag():
    """causal_mask with a diagonal is the slice of the global bottom-right mask."""
    full = causal_mask(70, 90)
    for qs, ks, sq, sk in [(16, 32, 30, 40), (0, 48, 70, 42), (48, 0, 22, 16)]:
        diag = qs - ks + 90 - 70
        np.testing.assert_array_equal(causal_mask(sq, sk, diag=diag), full[qs:qs + sq, ks:ks + sk])
    np.testing.assert_array_equal(causal_mask(5, 7), causal_mask(5, 7, diag=2))


# --------------------------------------------------------------------------- #
# merge_attention
# --------------------------------------------------------------------------- #


def _random_cuts(rng, n, pieces):
    """Sorted cut points splitting range(n) into `pieces` non-empty parts."""
    inner = np.sort(rng.choice(np.arange(1, n), size=pieces - 1, replace=False))
    return [0, *inner.tolist(), n]


@pytest.mark.parametrize("causal,p,Sq,Sk,pieces", [(False, 0.0, 9, 31, 3), (True, 0.0, 40, 23, 4),
                                                   (True, 0.3, 23, 40, 5), (False, 0.25, 12, 12, 2)])
def test_merge_matches_full_softmax(causal, p, Sq, Sk, pieces):
    """Keys split at random points (any sizes); Sq > Sk causal leaves rows that see no key
    in some shards and rows that see none at all."""
    rng = np.random.default_rng(Sq * Sk + pieces)
    q, k, v, _ = _qkv(2, Sq, Sk, 4, 2, 16, seed=pieces)
    keep = dropout_mask_numpy(2, 4, Sq, Sk, threshold=drop_threshold(p), seed=SEED, offset=1) if p else None
    ks = 1.0 / keep_probability(drop_threshold(p))
    o_full, l_full = attention_forward_ref(q, k, v, causal=causal, keep=keep, keep_scale=ks)
    cuts = _random_cuts(rng, Sk, pieces)
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        kp = None if keep is None else keep[..., a:b]
        o, lse = attention_forward_ref(q, k[:, a:b], v[:, a:b], causal=causal, causal_diag=Sk - Sq - a, keep=kp,
                                       keep_scale=ks)
        outs.append(o)
        lses.append(lse)
    if causal:
        assert any(np.isneginf(x).any() for x in lses), "want rows that see nothing in some shard"
    out, lse = cpar.merge_attention(outs, lses)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    print("merge err", _maxerr(out, o_full))
    np.testing.assert_allclose(out, o_full, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(l_full))
    fin = np.isfinite(l_full)
    np.testing.assert_allclose(lse[fin], l_full[fin], rtol=0, atol=1e-12)
    assert np.isfinite(out).all()


def test_merge_rows_nobody_saw():
    """Every shard -inf: out 0 and lse -inf without NaN, even if the shards' outs hold NaN."""
    outs = [np.full((1, 3, 2, 8), np.nan, np.float32) for _ in range(3)]
    lses = [np.full((1, 2, 3), -np.inf, np.float32) for _ in range(3)]
    lses[1][0, 0, 1] = 0.5
    outs[1][0, 1, 0] = 2.0
    out, lse = cpar.merge_attention(outs, lses)
    assert np.isneginf(lse).sum() == 5 and lse[0, 0, 1] == np.float32(0.5)
    expect = np.zeros((1, 3, 2, 8), np.float32)
    expect[0, 1, 0] = 2.0
    np.testing.assert_array_equal(out, expect)


def test_merge_single_and_nan():
    rng = np.random.default_rng(3)
    o = rng.standard_normal((2, 5, 3, 8))
    lse = rng.standard_normal((2, 3, 5))
    out, l2 = cpar.merge_attention([o], [lse])
    np.testing.assert_allclose(out, o, atol=1e-15)
    np.testing.assert_allclose(l2, lse, atol=1e-15)
    lse_nan = lse.copy()
    lse_nan[0, 1, 2] = np.nan
    out, l2 = cpar.merge_attention([o, o], [lse_nan, lse])
    assert np.isnan(l2[0, 1, 2]) and np.isnan(out[0, 2, 1]).all()
    assert np.isfinite(np.delete(l2.reshape(-1), 0 * 15 + 1 * 5 + 2)).all()


def test_merge_dtypes():
    rng = np.random.default_rng(4)
    for dt in (np.float16, ml_dtypes.bfloat16, np.float32):
        outs = [rng.standard_normal((1, 33, 2, 16)).astype(dt) for _ in range(3)]
        lses = [rng.standard_normal((1, 2, 33)).astype(np.float32) for _ in range(3)]
        out, lse = cpar.merge_attention(outs, lses)
        assert out.dtype == np.dtype(dt) and lse.dtype == np.float32
        out32, _ = cpar.merge_attention(outs, lses, out_dtype=np.float32)
        assert out32.dtype == np.float32
        np.testing.assert_array_equal(out, out32.astype(dt))
        o64, _ = cpar.merge_attention([x.astype(np.float64) for x in outs], [x.astype(np.float64) for x in lses])
        assert _maxerr(out32, o64) < 1e-5
    mixed, _ = cpar.merge_attention([outs[0].astype(np.float32), outs[1].astype(np.float16)], lses[:2])
    assert mixed.dtype == np.float32


def test_bfloat16_rounding_matches_ml_dtypes():
    """The bit-level float32 -> bfloat16 rounding used for CuPy arrays equals ml_dtypes' cast."""
    rng = np.random.default_rng(5)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-45, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                  1.0 + 2 ** -8 + 2 ** -20], np.float32),
        np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F7FFFFF, 0x3F808000, 0x3F818000], np.uint32).view(np.float32),
    ])
    got = cpar._bf16_from_float32(x, np)
    want = x.astype(ml_dtypes.bfloat16)
    gb, wb = got.view(np.uint16), want.view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(gb[~nan], wb[~nan])
    assert np.isnan(got.astype(np.float32)[nan]).all()
    back = cpar._to_float(want, np.float32, np)
    np.testing.assert_array_equal(back[~nan], want.astype(np.float32)[~nan])


# --------------------------------------------------------------------------- #
# merge_attention_backward
# --------------------------------------------------------------------------- #


def test_merge_backward_finite_differences():
    rng = np.random.default_rng(7)
    n, shape = 3, (1, 4, 2, 5)
    outs = [rng.standard_normal(shape) for _ in range(n)]
    lses = [rng.standard_normal((1, 2, 4)) for _ in range(n)]
    lses[0][0, 1, 2] = -np.inf  # a shard that saw nothing in one row
    lses[1][0, 0, 3] = lses[2][0, 0, 3] = -np.inf
    g_out = rng.standard_normal(shape)
    g_lse = rng.standard_normal((1, 2, 4))

    def loss(os_, ls_):
        o, lse = cpar.merge_attention(os_, ls_)
        return float((o * g_out).sum() + np.where(np.isfinite(lse), lse * g_lse, 0.0).sum())

    out, lse = cpar.merge_attention(outs, lses)
    douts, dlses = cpar.merge_attention_backward(g_out, outs, lses, out, lse, dlse=g_lse)
    eps = 1e-6
    for i in range(n):
        num_o = np.zeros(shape)
        for idx in np.ndindex(shape):
            up = [x.copy() for x in outs]
            dn = [x.copy() for x in outs]
            up[i][idx] += eps
            dn[i][idx] -= eps
            num_o[idx] = (loss(up, lses) - loss(dn, lses)) / (2 * eps)
        np.testing.assert_allclose(douts[i], num_o, rtol=1e-6, atol=1e-8)
        num_l = np.zeros((1, 2, 4))
        for idx in np.ndindex(num_l.shape):
            if np.isneginf(lses[i][idx]):
                continue  # exp(-inf + eps) is still 0: the derivative there is 0
            up = [x.copy() for x in lses]
            dn = [x.copy() for x in lses]
            up[i][idx] += eps
            dn[i][idx] -= eps
            num_l[idx] = (loss(outs, up) - loss(outs, dn)) / (2 * eps)
        print(f"shard {i}: dlse err {_maxerr(dlses[i], num_l):.2e}")
        np.testing.assert_allclose(dlses[i], num_l, rtol=1e-6, atol=1e-8)
        assert (dlses[i][np.isneginf(lses[i])] == 0).all()


def test_merge_backward_without_dlse_and_empty_rows():
    outs = [np.full((1, 2, 1, 4), np.nan), np.ones((1, 2, 1, 4))]
    lses = [np.full((1, 1, 2), -np.inf), np.array([[[0.0, -np.inf]]])]
    out, lse = cpar.merge_attention(outs, lses)
    douts, dlses = cpar.merge_attention_backward(np.ones((1, 2, 1, 4)), outs, lses, out, lse)
    assert np.isfinite(np.concatenate([d.ravel() for d in douts[1:] + dlses])).all()
    np.testing.assert_array_equal(douts[1][0, 0], 1.0)
    np.testing.assert_array_equal(douts[1][0, 1], 0.0)
    np.testing.assert_array_equal(dlses[0], 0.0)


# --------------------------------------------------------------------------- #
# Shards vs the unsharded problem
# --------------------------------------------------------------------------- #


SHARD_CASES = [
    (96, 160, False, 0.0, 3, 2), (160, 96, True, 0.0, 2, 3), (130, 130, True, 0.2, 3, 3),
    (100, 200, True, 0.17, 2, 4), (200, 100, False, 0.3, 4, 2), (48, 48, True, 0.1, 1, 3),
]


@pytest.mark.parametrize("Sq,Sk,causal,p,nq,nk", SHARD_CASES)
def test_shards_merge_to_unsharded(Sq, Sk, causal, p, nq, nk):
    """Every (query chunk, key chunk) block through attention_shard_forward, merged per query
    chunk; the backward of each block with the merged out and lse, summed: equal to the
    unsharded forward and backward. Each block's own result equals the reference on that
    block with the global mask's slice."""
    q, k, v, dout = _qkv(2, Sq, Sk, 4, 2, 16, seed=Sq + Sk)
    out_u, lse_u, (dq_u, dk_u, dv_u) = _unsharded(q, k, v, dout, causal=causal, p=p)
    t = drop_threshold(p)
    keep = dropout_mask_numpy(2, 4, Sq, Sk, threshold=t, seed=SEED, offset=OFFSET) if p else None
    kw = dict(seqlen_q_total=Sq, seqlen_k_total=Sk, causal=causal, dropout_p=p, seed=SEED, offset=OFFSET)
    qb, kb = cpar.sequence_chunks(Sq, nq), cpar.sequence_chunks(Sk, nk)
    out = np.empty_like(out_u)
    lse = np.empty_like(lse_u)
    for qa, qe in qb:
        outs, lses = [], []
        for ka, ke in kb:
            o, ctx = cpar.attention_shard_forward(q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], q_start=qa, k_start=ka, **kw)
            assert ctx.causal_diag == qa - ka + Sk - Sq and (ctx.q_start, ctx.k_start) == (qa, ka)
            kp = None if keep is None else keep[:, :, qa:qe, ka:ke]
            o_ref, l_ref = attention_forward_ref(q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], causal=causal,
                                                 causal_diag=ctx.causal_diag, keep=kp, keep_scale=1 / ctx.keep_prob)
            np.testing.assert_allclose(o, o_ref, atol=1e-12)
            np.testing.assert_array_equal(np.isneginf(ctx.lse), np.isneginf(l_ref))
            outs.append(o)
            lses.append(ctx.lse)
        out[:, qa:qe], lse[:, :, qa:qe] = cpar.merge_attention(outs, lses)
    print("forward err", _maxerr(out, out_u))
    np.testing.assert_allclose(out, out_u, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_u))
    fin = np.isfinite(lse_u)
    np.testing.assert_allclose(lse[fin], lse_u[fin], atol=1e-5)

    dq, dk, dv = np.zeros_like(dq_u), np.zeros_like(dk_u), np.zeros_like(dv_u)
    for qa, qe in qb:
        for ka, ke in kb:
            _, ctx = cpar.attention_shard_forward(q[:, qa:qe], k[:, ka:ke], v[:, ka:ke], q_start=qa, k_start=ka, **kw)
            g = cpar.attention_shard_backward(dout[:, qa:qe], ctx, out=out[:, qa:qe], lse=lse[:, :, qa:qe])
            dq[:, qa:qe] += g[0]
            dk[:, ka:ke] += g[1]
            dv[:, ka:ke] += g[2]
    errs = [_maxerr(a, b) for a, b in ((dq, dq_u), (dk, dk_u), (dv, dv_u))]
    print("backward errs", errs)
    assert max(errs) < 1e-5  # the shards' lse are float32, as cuflash's (the float64 algebra: next test)


def test_shard_backward_equals_global_algebra_exactly():
    """With the float64 merged out and lse, one key block's backward equals the unsharded
    float64 backward restricted to that block's keys (dk, dv) to rounding."""
    q, k, v, dout = _qkv(1, 64, 96, 2, 2, 8, seed=11)
    keep = dropout_mask_numpy(1, 2, 64, 96, threshold=drop_threshold(0.25), seed=SEED, offset=2)
    ks = 1 / keep_probability(drop_threshold(0.25))
    o, lse = attention_forward_ref(q, k, v, causal=True, keep=keep, keep_scale=ks)
    g_full = attention_backward_ref(dout, q, k, v, o, lse, causal=True, keep=keep, keep_scale=ks)
    dq = np.zeros_like(q)
    for a, b in ((0, 32), (32, 80), (80, 96)):
        g = attention_backward_ref(dout, q, k[:, a:b], v[:, a:b], o, lse, causal=True, causal_diag=96 - 64 - a,
                                   keep=keep[..., a:b], keep_scale=ks)
        dq += g[0]
        np.testing.assert_allclose(g[1], g_full[1][:, a:b], atol=1e-12)
        np.testing.assert_allclose(g[2], g_full[2][:, a:b], atol=1e-12)
    np.testing.assert_allclose(dq, g_full[0], atol=1e-12)


def test_shard_of_whole_problem_equals_attention():
    q, k, v, dout = _qkv(1, 50, 70, 2, 1, 16, seed=2, dtype=np.float32)
    a, ctx_a = cuflash.attention_forward(q, k, v, causal=True, dropout_p=0.3, seed=5, offset=6)
    b, ctx_b = cpar.attention_shard_forward(q, k, v, q_start=0, k_start=0, seqlen_q_total=50, seqlen_k_total=70,
                                            causal=True, dropout_p=0.3, seed=5, offset=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ctx_a.lse, ctx_b.lse)
    for x, y in zip(cuflash.attention_backward(dout, ctx_a), cpar.attention_shard_backward(dout, ctx_b)):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------- #
# Ring attention simulated on one device
# --------------------------------------------------------------------------- #


RING_CASES = [
    # Sq, Sk, H, Hk, causal, p, n, load_balanced
    (128, 128, 2, 2, False, 0.0, 2, False), (200, 200, 4, 2, True, 0.0, 2, False),
    (200, 200, 2, 1, True, 0.17, 3, False), (257, 257, 2, 2, True, 0.2, 4, False),
    (256, 256, 4, 4, True, 0.17, 2, True), (300, 300, 2, 1, True, 0.1, 3, True),
    (256, 256, 2, 2, False, 0.3, 4, True), (150, 260, 2, 2, True, 0.2, 2, True),
    (260, 150, 2, 2, True, 0.2, 3, False), (64, 64, 2, 2, True, 0.5, 1, False),
]


@pytest.mark.parametrize("Sq,Sk,H,Hk,causal,p,n,lb", RING_CASES)
def test_ring_simulated_matches_unsharded(Sq, Sk, H, Hk, causal, p, n, lb):
    q, k, v, dout = _qkv(1, Sq, Sk, H, Hk, 16, seed=n + 7 * Sq)
    out_u, lse_u, (dq_u, dk_u, dv_u) = _unsharded(q, k, v, dout, causal=causal, p=p)
    r = cpar.ring_attention_simulated(q, k, v, n, causal=causal, dropout_p=p, seed=SEED, offset=OFFSET,
                                      load_balanced=lb, dout=dout)
    errs = {name: _maxerr(a, b) for name, a, b in (("out", r.out, out_u), ("dq", r.dq, dq_u), ("dk", r.dk, dk_u),
                                                   ("dv", r.dv, dv_u))}
    fin = np.isfinite(lse_u)
    errs["lse"] = _maxerr(r.lse[fin], lse_u[fin])
    print(f"{len(r.pairs)} shard launches; errs", {k_: f"{e:.1e}" for k_, e in errs.items()})
    np.testing.assert_array_equal(np.isneginf(r.lse), np.isneginf(lse_u))
    assert max(errs.values()) < 1e-5  # float32 lse
    assert r.out.dtype == q.dtype and r.lse.dtype == np.float32 and r.dk.shape == k.shape
    m = n * (2 if lb else 1)
    if not causal:
        assert len(r.pairs) == m * m
    elif m > 1:
        assert len(r.pairs) < m * m  # masked pairs skipped


def test_ring_load_balanced_evens_causal_work():
    """Causal, Sq == Sk: the load-balanced layout gives every rank the same number of
    block pairs; the plain layout gives rank r r+1 pairs."""
    q, k, v, _ = _qkv(1, 512, 512, 1, 1, 8)
    for n in (2, 4):
        plain = cpar.ring_attention_simulated(q, k, v, n, causal=True).pairs
        bal = cpar.ring_attention_simulated(q, k, v, n, causal=True, load_balanced=True).pairs
        per_plain = [sum(1 for x in plain if x[0] == r) for r in range(n)]
        per_bal = [sum(1 for x in bal if x[0] == r) for r in range(n)]
        assert per_plain == list(range(1, n + 1))
        assert len(set(per_bal)) == 1, per_bal


def test_ring_simulated_uses_generator_once():
    q, k, v, _ = _qkv(1, 64, 64, 2, 2, 8, dtype=np.float32)
    state = cuflash.get_state()
    try:
        cuflash.manual_seed(123)
        r = cpar.ring_attention_simulated(q, k, v, 2, dropout_p=0.2)
        assert (r.seed, r.offset) == (123, 0) and cuflash.get_state() == (123, 1)
        cuflash.manual_seed(123)
        out = cuflash.attention(q, k, v, dropout_p=0.2)
        assert _maxerr(out, r.out) < 1e-6
    finally:
        cuflash.set_state(state)


def _mask_probe(B, Sq, Sk, H, D, i0, j0, dtype=np.float64):
    """Inputs whose results spell out the dropout mask. q = 0 makes P uniform over the
    visible keys; v[j0 + d, d] = 1 makes out[i, d] = Z[i, j0 + d] and dout[i0 + d, d] = 1
    makes dv[j, d] = Z[i0 + d, j], Z = keep * P / keep_prob: nonzero exactly where kept and
    visible."""
    q = np.zeros((B, Sq, H, D), dtype)
    k = np.random.default_rng(0).standard_normal((B, Sk, H, D)).astype(dtype)
    v = np.zeros((B, Sk, H, D), dtype)
    dout = np.zeros((B, Sq, H, D), dtype)
    for d in range(D):
        if j0 + d < Sk:
            v[:, j0 + d, :, d] = 1
        if i0 + d < Sq:
            dout[:, i0 + d, :, d] = 1
    return q, k, v, dout


def _probe_expected(B, Sq, Sk, H, D, i0, j0, causal, p, seed, offset):
    """Expected nonzero patterns of out (B, Sq, H, D) and dv (B, Sk, H, D) for _mask_probe."""
    t = drop_threshold(p)
    vis = causal_mask(Sq, Sk) if causal else np.ones((Sq, Sk), bool)
    wq = min(D, Sk - j0)
    keep_c = dropout_mask_numpy(B, H, Sq, wq, threshold=t, seed=seed, offset=offset, col_start=j0)
    out_nz = np.zeros((B, Sq, H, D), bool)
    out_nz[..., :wq] = (keep_c & vis[None, None, :, j0:j0 + wq]).transpose(0, 2, 1, 3)
    wr = min(D, Sq - i0)
    keep_r = dropout_mask_numpy(B, H, wr, Sk, threshold=t, seed=seed, offset=offset, row_start=i0)
    dv_nz = np.zeros((B, Sk, H, D), bool)
    dv_nz[..., :wr] = (keep_r & vis[None, None, i0:i0 + wr, :]).transpose(0, 3, 1, 2)
    return out_nz, dv_nz


@pytest.mark.parametrize("causal,n,lb", [(False, 2, False), (True, 3, False), (True, 2, True)])
def test_ring_mask_probe(causal, n, lb):
    """The probe reads the applied mask back out of the ring's out and dv: it is the global
    mask around chunk boundaries."""
    B, S, H, D, p = 2, 192, 2, 32, 0.4
    for i0, j0 in ((48, 80), (0, 160)):
        q, k, v, dout = _mask_probe(B, S, S, H, D, i0, j0)
        r = cpar.ring_attention_simulated(q, k, v, n, causal=causal, dropout_p=p, seed=SEED, offset=9,
                                          load_balanced=lb, dout=dout)
        out_nz, dv_nz = _probe_expected(B, S, S, H, D, i0, j0, causal, p, SEED, 9)
        assert 0 < out_nz.sum() < out_nz.size
        np.testing.assert_array_equal(r.out != 0, out_nz)
        np.testing.assert_array_equal(r.dv != 0, dv_nz)


# --------------------------------------------------------------------------- #
# The multi-GPU schedule, driven through an in-process transport
# --------------------------------------------------------------------------- #


class _AsyncQueueRing:
    """Stand-in for RingComm that models asynchronous transfers: sends are snapshotted at
    start_exchange, receive buffers hold NaN until finish_exchange delivers, and a send
    buffer written between the two is reported (a real transfer could read it late)."""

    def __init__(self, rank, world_size, inboxes):
        self.rank, self.world_size, self.inboxes = rank, world_size, inboxes
        self.exchanges = 0
        self._pending = None

    def start_exchange(self, sends, recvs):
        assert self._pending is None, "start_exchange twice without finish_exchange"
        self.exchanges += 1
        snaps = [s.copy() for s in sends]
        for s in snaps:
            self.inboxes[(self.rank + 1) % self.world_size].put(s)
        for r in recvs:
            r[...] = np.nan
        self._pending = (list(sends), snaps, list(recvs))

    def finish_exchange(self):
        sends, snaps, recvs = self._pending
        self._pending = None
        for s, snap in zip(sends, snaps):
            assert np.array_equal(s, snap, equal_nan=True), "send buffer written while in flight"
        for r in recvs:
            got = self.inboxes[self.rank].get(timeout=60)
            assert got.shape == r.shape and got.dtype == r.dtype
            r[...] = got


def _run_ranks(n, fn):
    inboxes = [queue.Queue() for _ in range(n)]
    results, errors = [None] * n, []

    def work(rank):
        try:
            results[rank] = fn(_AsyncQueueRing(rank, n, inboxes))
        except BaseException as e:  # reported below, in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    if errors:
        raise errors[0]
    assert all(x is not None for x in results)
    return results


DIST_CASES = [(1, False, False, 0.0), (2, False, False, 0.2), (2, True, False, 0.17), (3, True, False, 0.0),
              (2, True, True, 0.2), (3, True, True, 0.1), (4, False, True, 0.3), (4, True, True, 0.0)]


@pytest.mark.parametrize("n,causal,lb,p", DIST_CASES)
def test_distributed_schedule_matches_unsharded(n, causal, lb, p):
    S = 64 * n
    q, k, v, dout = _qkv(1, S, S, 4, 2, 16, seed=n + 10 * lb)
    out_u, lse_u, (dq_u, dk_u, dv_u) = _unsharded(q, k, v, dout, causal=causal, p=p)

    def rank_work(comm):
        parts = [cpar.shard_sequence(x, comm.rank, n, load_balanced=lb) for x in (q, k, v, dout)]
        out, ctx = distributed.ring_attention_forward(*parts[:3], comm, causal=causal, dropout_p=p, seed=SEED,
                                                      offset=OFFSET, load_balanced=lb)
        grads = distributed.ring_attention_backward(parts[3], ctx)
        return out, ctx.lse, grads, comm.exchanges

    res = _run_ranks(n, rank_work)
    out = cpar.unshard_sequence([x[0] for x in res], load_balanced=lb)
    lse = cpar.unshard_sequence([x[1] for x in res], load_balanced=lb, axis=2)
    grads = [cpar.unshard_sequence([x[2][i] for x in res], load_balanced=lb) for i in range(3)]
    errs = [_maxerr(a, b) for a, b in ((out, out_u), *zip(grads, (dq_u, dk_u, dv_u)))]
    fin = np.isfinite(lse_u)
    print("errs out/dq/dk/dv", [f"{e:.1e}" for e in errs], "exchanges", [x[3] for x in res])
    assert max(errs) < 1e-5 and _maxerr(lse[fin], lse_u[fin]) < 2e-6
    # forward: n-1 K/V exchanges; backward: n in the loop (K/V and/or dk,dv) + the return hop
    assert all(x[3] == (0 if n == 1 else 2 * n) for x in res)


def test_distributed_mask_probe():
    n, S, H, D, p = 2, 128, 2, 32, 0.45
    i0, j0 = 40, 48
    q, k, v, dout = _mask_probe(1, S, S, H, D, i0, j0)

    def rank_work(comm):
        parts = [cpar.shard_sequence(x, comm.rank, n, load_balanced=True) for x in (q, k, v, dout)]
        out, ctx = distributed.ring_attention_forward(*parts[:3], comm, causal=True, dropout_p=p, seed=SEED,
                                                      offset=4, load_balanced=True)
        return out, distributed.ring_attention_backward(parts[3], ctx)[2]

    res = _run_ranks(n, rank_work)
    out = cpar.unshard_sequence([x[0] for x in res], load_balanced=True)
    dv = cpar.unshard_sequence([x[1] for x in res], load_balanced=True)
    out_nz, dv_nz = _probe_expected(1, S, S, H, D, i0, j0, True, p, SEED, 4)
    np.testing.assert_array_equal(out != 0, out_nz)
    np.testing.assert_array_equal(dv != 0, dv_nz)


# --------------------------------------------------------------------------- #
# Layout helpers
# --------------------------------------------------------------------------- #


def test_sequence_chunks():
    for S, m in [(200, 3), (256, 4), (16, 1), (17, 2), (1000, 8), (33, 3)]:
        b = cpar.sequence_chunks(S, m)
        assert len(b) == m and b[0][0] == 0 and b[-1][1] == S
        assert all(a % 16 == 0 and e > a for a, e in b)
        assert all(b[i][1] == b[i + 1][0] for i in range(m - 1))
    assert cpar.sequence_chunks(256, 4) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    with pytest.raises(ValueError, match="too short"):
        cpar.sequence_chunks(40, 4)


def test_shard_unshard_roundtrip():
    x = np.arange(2 * 192 * 3).reshape(2, 192, 3)
    for n, lb in [(1, False), (2, False), (3, True), (6, True), (4, False)]:
        parts = [cpar.shard_sequence(x, r, n, load_balanced=lb) for r in range(n)]
        np.testing.assert_array_equal(cpar.unshard_sequence(parts, load_balanced=lb), x)
    p1 = cpar.shard_sequence(x, 1, 3, load_balanced=True)  # chunks 1 and 4 of 6 (32 rows each)
    np.testing.assert_array_equal(p1, np.concatenate([x[:, 32:64], x[:, 128:160]], axis=1))
    assert cpar.rank_chunk_ids(0, 4, True) == (0, 7) and cpar.rank_chunk_ids(3, 4) == (3,)
    with pytest.raises(ValueError, match="multiple of 64"):
        cpar.shard_sequence(x[:, :100], 0, 2, load_balanced=True)


# --------------------------------------------------------------------------- #
# Validation: errors name the argument, before anything runs
# --------------------------------------------------------------------------- #


def _shard(**over):
    q, k, v, _ = _qkv(1, 32, 48, 2, 2, 16)
    kw = dict(q_start=16, k_start=32, seqlen_q_total=64, seqlen_k_total=96, causal=True, dropout_p=0.1, seed=1,
              offset=2)
    kw.update(over)
    return cpar.attention_shard_forward(q, k, v, **kw)


@pytest.mark.parametrize("over,exc,word", [
    (dict(q_start=8), ValueError, "q_start"), (dict(k_start=-16), ValueError, "k_start"),
    (dict(q_start=True), TypeError, "q_start"), (dict(k_start=16.0), TypeError, "k_start"),
    (dict(q_start=48), ValueError, "seqlen_q_total"), (dict(k_start=64), ValueError, "seqlen_k_total"),
    (dict(seqlen_q_total=0), ValueError, "seqlen_q_total"), (dict(seqlen_k_total="96"), TypeError, "seqlen_k_total"),
    (dict(seqlen_k_total=1 << 31), ValueError, "seqlen_k_total"), (dict(seed=None), TypeError, "seed"),
    (dict(offset=None), TypeError, "offset"), (dict(offset=1 << 32), ValueError, "offset"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"), (dict(causal=1), TypeError, "causal"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
])
def test_shard_validation(over, exc, word):
    with pytest.raises(exc, match=word):
        _shard(**over)


def test_shard_without_dropout_needs_no_seed():
    out, ctx = _shard(dropout_p=0.0, seed=None, offset=None)
    assert ctx.seed is None and out.shape == (1, 32, 2, 16)


def test_backward_and_merge_validation():
    out, ctx = _shard()
    dout = np.ones_like(out)
    with pytest.raises(ValueError, match="dout"):
        cpar.attention_shard_backward(dout[:, :16], ctx)
    with pytest.raises(TypeError, match="dout"):
        cpar.attention_shard_backward(dout.astype(np.float32), ctx)
    with pytest.raises(ValueError, match="lse"):
        cpar.attention_shard_backward(dout, ctx, lse=ctx.lse[..., :8])
    with pytest.raises(TypeError, match="lse"):
        cpar.attention_shard_backward(dout, ctx, lse=ctx.lse.astype(np.float16))
    with pytest.raises(TypeError, match="ctx"):
        cpar.attention_shard_backward(dout, None)
    with pytest.raises(ValueError, match="same length"):
        cpar.merge_attention([out, out], [ctx.lse])
    with pytest.raises(ValueError, match="at least one"):
        cpar.merge_attention([], [])
    with pytest.raises(ValueError, match=r"lses\[0\]"):
        cpar.merge_attention([out], [ctx.lse[:, :1]])
    with pytest.raises(ValueError, match=r"outs\[1\]"):
        cpar.merge_attention([out, out[:, :16]], [ctx.lse, ctx.lse])
    with pytest.raises(TypeError, match=r"lses\[1\]"):
        cpar.merge_attention([out, out], [ctx.lse, ctx.lse.astype(np.float16)])
    with pytest.raises(TypeError, match="outs"):
        cpar.merge_attention(out, ctx.lse)
    with pytest.raises(ValueError, match="out"):
        cpar.make_shard_context(ctx.q, ctx.k, ctx.v, out[:, :16], ctx.lse, q_start=16, k_start=32,
                                seqlen_q_total=64, seqlen_k_total=96)


def test_ring_validation():
    q, k, v, dout = _qkv(1, 64, 64, 2, 2, 16)
    with pytest.raises(ValueError, match="n_ranks"):
        cpar.ring_attention_simulated(q, k, v, 0)
    with pytest.raises(TypeError, match="load_balanced"):
        cpar.ring_attention_simulated(q, k, v, 2, load_balanced="yes")
    with pytest.raises(ValueError, match="too short"):
        cpar.ring_attention_simulated(q, k, v, 3, load_balanced=True)
    with pytest.raises(ValueError, match="dout"):
        cpar.ring_attention_simulated(q, k, v, 2, dout=dout[:, :32])

    comm = _AsyncQueueRing(0, 2, [queue.Queue(), queue.Queue()])
    with pytest.raises(TypeError, match="comm"):
        distributed.ring_attention_forward(q, k, v, object())
    with pytest.raises(TypeError, match="seed"):
        distributed.ring_attention_forward(q, k, v, comm, dropout_p=0.1)
    with pytest.raises(ValueError, match="multiple of 32"):
        distributed.ring_attention_forward(q[:, :48], k[:, :48], v[:, :48], comm, load_balanced=True)
    with pytest.raises(TypeError, match="ctx"):
        distributed.ring_attention_backward(dout, None)
    assert comm.exchanges == 0  # nothing was sent


def test_distributed_imports_without_nccl():
    """cuflash.distributed imports everywhere; NCCL is only needed by RingComm."""
    assert isinstance(distributed.nccl_available(), bool)
