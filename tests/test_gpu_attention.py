"""GPU attention vs the float64 reference with the same dropout mask (FlashAttention-2's
rule: error vs fp64 at most 2x (3x for gradients) the error of a naive same-dtype
implementation), plus mask identity, determinism and edge cases. Outputs are poisoned."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import cuflash
from cuflash import _attn_gpu
from cuflash.reference import (attention_backward_ref, attention_forward_ref, naive_attention_backward,
                               naive_attention_forward)

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def poison(poison_outputs):
    """Outputs start as NaN (tests/conftest.py)."""


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def _maxerr(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


SEQS = [(1, 1), (17, 97), (97, 17), (128, 128), (200, 1025), (1025, 200), (2048, 2048), (113, 203)]
HEADS = [(2, 2), (4, 2), (4, 1)]
CASES = [
    (dt, d, causal, p, SEQS[i % len(SEQS)], HEADS[i % len(HEADS)])
    for i, (dt, d, causal, p) in enumerate(
        itertools.product(("float16", "bfloat16"), (32, 64, 80, 96, 128, 256), (False, True), (0.0, 0.17)))
]


def run_case(cp, dt, d, causal, p, seqs, heads, rng, deterministic=False, softmax_scale=None):
    Sq, Sk = seqs
    H, Hk = heads
    B = 1 if Sq * Sk > 1 << 20 else 2
    dtype = _dtype(dt)
    q = cp.asarray(rng.standard_normal((B, Sq, H, d)).astype(dtype))
    k = cp.asarray(rng.standard_normal((B, Sk, Hk, d)).astype(dtype))
    v = cp.asarray(rng.standard_normal((B, Sk, Hk, d)).astype(dtype))
    dout = cp.asarray(rng.standard_normal((B, Sq, H, d)).astype(dtype))
    seed = int(rng.integers(0, 2**63))
    out, ctx = cuflash.attention_forward(q, k, v, dropout_p=p, causal=causal, seed=seed, offset=3,
                                         deterministic=deterministic, softmax_scale=softmax_scale)
    dq, dk, dv = cuflash.attention_backward(dout, ctx)
    keep = None
    if p > 0:
        keep_gpu = cuflash.dropout_mask(B, H, Sq, Sk, dropout_p=p, seed=seed, offset=3, xp=cp)
        keep = cuflash.dropout_mask(B, H, Sq, Sk, dropout_p=p, seed=seed, offset=3, xp=np)
        assert bool((keep_gpu.get() == keep).all())
    ks = 1.0 / ctx.keep_prob
    qh, kh, vh, doh = (a.get() for a in (q, k, v, dout))
    sc = dict(causal=causal, softmax_scale=softmax_scale, keep_scale=ks)
    o_ref, lse_ref = attention_forward_ref(qh, kh, vh, keep=keep, **sc)
    g_ref = attention_backward_ref(doh, qh, kh, vh, o_ref, lse_ref, keep=keep, **sc)
    keep_c = None if keep is None else cp.asarray(keep)
    o_nv, _ = naive_attention_forward(q, k, v, keep=keep_c, **sc)
    g_nv = naive_attention_backward(dout, q, k, v, o_nv, keep=keep_c, **sc)
    res = {}
    for name, got, ref, nv, mult in [("out", out, o_ref, o_nv, 2), ("dq", dq, g_ref[0], g_nv[0], 3),
                                     ("dk", dk, g_ref[1], g_nv[1], 3), ("dv", dv, g_ref[2], g_nv[2], 3)]:
        e, en = _maxerr(got.get(), ref), _maxerr(nv.get(), ref)
        res[name] = (e, en)
        assert np.isfinite(e), f"{name}: non-finite (unwritten or NaN)"
        assert e <= mult * en + 1e-4, f"{name}: err {e:.3e} > {mult} x naive {en:.3e}"
    lse_g = ctx.lse.get()
    fin = np.isfinite(lse_ref)
    assert np.array_equal(np.isfinite(lse_g), fin)
    assert _maxerr(lse_g[fin], lse_ref[fin]) < 1e-3
    return res


@pytest.mark.parametrize("dt,d,causal,p,seqs,heads", CASES)
def test_attention_matches_reference(cp, dt, d, causal, p, seqs, heads):
    rng = np.random.default_rng(hash((dt, d, causal, p, seqs, heads)) % 2**32)
    res = run_case(cp, dt, d, causal, p, seqs, heads, rng)
    print({k: f"{e:.2e}/{n:.2e}" for k, (e, n) in res.items()})


def test_non_contiguous_packed_qkv(cp):
    rng = np.random.default_rng(5)
    qkv = cp.asarray(rng.standard_normal((2, 130, 3, 4, 64)).astype(np.float16))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    a, ctx = cuflash.attention_forward(q, k, v, dropout_p=0.1, causal=True, seed=1, offset=0)
    b, ctx2 = cuflash.attention_forward(*(cp.ascontiguousarray(x) for x in (q, k, v)), dropout_p=0.1,
                                        causal=True, seed=1, offset=0)
    assert bool((a == b).all())
    dout = cp.asarray(rng.standard_normal(a.shape).astype(np.float16))
    for g1, g2 in zip(cuflash.attention_backward(dout, ctx), cuflash.attention_backward(dout, ctx2)):
        assert bool((g1 == g2).all())


def test_fully_masked_rows_are_zero(cp):
    rng = np.random.default_rng(6)
    q = cp.asarray(rng.standard_normal((1, 300, 2, 64)).astype(np.float16))
    k = cp.asarray(rng.standard_normal((1, 100, 2, 64)).astype(np.float16))
    out, ctx = cuflash.attention_forward(q, k, k, causal=True, dropout_p=0.2, seed=3)
    o = out.get().astype(np.float32)
    assert np.isfinite(o).all() and (o[:, :199] == 0).all() and (o[:, 200:] != 0).any()
    assert np.isneginf(ctx.lse.get()[:, :, :199]).all()
    grads = cuflash.attention_backward(cp.ones_like(out), ctx)
    assert all(bool(cp.isfinite(g.astype(cp.float32)).all()) for g in grads)


def test_nan_propagates(cp):
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 64, 1, 64)).astype(np.float16)
    q[0, 5, 0, 3] = np.nan
    out = cuflash.attention(cp.asarray(q), cp.asarray(q), cp.asarray(q)).get()
    assert np.isnan(out[0, 5]).all()


@pytest.mark.parametrize("deterministic, causal", [(False, True), (True, True), (True, False)])
def test_bitwise_repeatable(cp, deterministic, causal):
    rng = np.random.default_rng(9)
    q, k, v, dout = (cp.asarray(rng.standard_normal((2, 1000, 4, 64)).astype(np.float16)) for _ in range(4))
    first = None
    for _ in range(100 if deterministic else 20):
        out, ctx = cuflash.attention_forward(q, k, v, dropout_p=0.1, causal=causal, seed=11, offset=2,
                                             deterministic=deterministic)
        dq, dk, dv = cuflash.attention_backward(dout, ctx)
        cur = [a.get() for a in (out, ctx.lse, dk, dv) + ((dq,) if deterministic else ())]
        if first is None:
            first = cur
        else:
            for a, b in zip(first, cur):
                assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_dropout_unbiased(cp):
    rng = np.random.default_rng(10)
    q, k, v = (cp.asarray(rng.standard_normal((1, 256, 2, 64)).astype(np.float16)) for _ in range(3))
    ref = cuflash.attention(q, k, v).astype(cp.float32)
    acc = cp.zeros_like(ref)
    n = 400
    for s in range(n):
        acc += cuflash.attention(q, k, v, dropout_p=0.3, seed=s, offset=0).astype(cp.float32)
    err = float(cp.abs(acc / n - ref).mean() / cp.abs(ref).mean())
    assert err < 0.05, err


@pytest.fixture(params=["default", "sm80", "long_tiles", "long_tiles_cp_async"])
def forward_path(request, monkeypatch):
    """Run a test on the default kernels (sm_90a wgmma forward and backward on an H100 for
    head dims 64/128), again with the sm_80 kernels forced, so an H100 checks both, with
    the Hopper forward's long-sequence tiles at every key length (the short test shapes
    would otherwise only reach its short-sequence tiles), and with those tiles loaded by
    cp.async where they load by TMA (the fallback for layouts TMA cannot read)."""
    if request.param.startswith("long_tiles"):
        from cuflash import _config

        monkeypatch.setattr(_config, "FWD_SHORT_KEYS", 0)
    if request.param == "long_tiles_cp_async":
        from cuflash import _tma

        monkeypatch.setattr(_tma, "tensor_map", lambda *a, **kw: None)
    if request.param == "sm80":
        monkeypatch.setattr(_attn_gpu, "use_hopper_forward", lambda d: False)
        monkeypatch.setattr(_attn_gpu, "use_hopper_backward", lambda d: False)
    return request.param


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_effective_mask_is_the_twin(cp, forward_path, dt, d):
    # q = 0 makes every visible score equal (P = 1/Sk) and v = identity (Sk = d) makes
    # out[i, j] = keep[i, j] * scale / Sk: the mask the forward applied, read back exactly.
    B, H, Sq, Sk = 2, 3, 300, d
    dtype = _dtype(dt)
    q = cp.zeros((B, Sq, H, d), dtype=dtype)
    v = cp.asarray(np.broadcast_to(np.eye(d, dtype=np.float32)[None, :, None, :], (B, Sk, H, d)).astype(dtype))
    out, ctx = cuflash.attention_forward(q, q[:, :Sk], v, dropout_p=0.3, seed=12345, offset=7)
    got = out.get().astype(np.float32).transpose(0, 2, 1, 3) != 0  # (B, H, Sq, Sk)
    want = cuflash.dropout_mask(B, H, Sq, Sk, dropout_p=0.3, seed=12345, offset=7, xp=np)
    print(forward_path, "mismatches:", int((got != want).sum()), "of", got.size)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("case", [
    ("float16", 64, False, 0.17, (200, 1025), (4, 2)),
    ("bfloat16", 64, True, 0.17, (1025, 200), (2, 2)),
    ("float16", 128, True, 0.0, (2048, 2048), (2, 2)),
    ("bfloat16", 128, False, 0.17, (113, 203), (4, 1)),
    ("float16", 128, True, 0.17, (97, 17), (2, 2)),
])
def test_both_forward_paths_match_reference(cp, forward_path, case):
    dt, d, causal, p, seqs, heads = case
    rng = np.random.default_rng(hash(case) % 2**32)
    res = run_case(cp, dt, d, causal, p, seqs, heads, rng)
    print(forward_path, {k: f"{e:.2e}/{n:.2e}" for k, (e, n) in res.items()})


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("scale", [-0.3, 0.0, 0.5])
def test_softmax_scale_any_sign(cp, forward_path, d, scale):
    # The kernels take the row max of unscaled scores and scale it; blocks with masked
    # scores, and every block under a negative scale, are scaled first instead. A zero
    # scale weighs every visible key alike. Causal with ragged lengths: masked blocks both
    # at the diagonal and at the key end.
    rng = np.random.default_rng(int(d + 1000 * scale) % 2**32)
    res = run_case(cp, "float16", d, True, 0.17, (200, 197), (2, 1), rng, softmax_scale=scale)
    print(forward_path, scale, {k: f"{e:.2e}/{n:.2e}" for k, (e, n) in res.items()})


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_row_max_growing_over_the_keys(cp, forward_path, d, causal):
    # Keys scaled up along the sequence: a row's max keeps growing, by far more than the lazy
    # row max's slack of 2^8 (softmax.cuh), so the Hopper forward must rescale in late blocks.
    rng = np.random.default_rng(d + causal)
    Sq, Sk, H = 300, 1100, 2
    q = rng.standard_normal((1, Sq, H, d)).astype(np.float16)
    ramp = np.linspace(0.2, 6.0, Sk, dtype=np.float32)[None, :, None, None]
    k = (rng.standard_normal((1, Sk, H, d)) * ramp).astype(np.float16)
    v = rng.standard_normal((1, Sk, H, d)).astype(np.float16)
    out, ctx = cuflash.attention_forward(*(cp.asarray(a) for a in (q, k, v)), dropout_p=0.17, causal=causal,
                                         seed=21, offset=4)
    keep = cuflash.dropout_mask(1, H, Sq, Sk, dropout_p=0.17, seed=21, offset=4, xp=np)
    sc = dict(causal=causal, keep=keep, keep_scale=1.0 / ctx.keep_prob)
    o_ref, lse_ref = attention_forward_ref(q, k, v, **sc)
    o_nv, _ = naive_attention_forward(*(cp.asarray(a) for a in (q, k, v)), causal=causal, keep=cp.asarray(keep),
                                      keep_scale=1.0 / ctx.keep_prob)
    e, en = _maxerr(out.get(), o_ref), _maxerr(o_nv.get(), o_ref)
    lse = ctx.lse.get()
    visible = np.isfinite(lse_ref)
    print(forward_path, f"out {e:.2e} (naive {en:.2e}), lse {np.abs(lse - lse_ref)[visible].max():.2e}")
    assert e <= 2 * en + 1e-5
    assert np.allclose(lse[visible], lse_ref[visible], rtol=0, atol=1e-3) and np.isneginf(lse[~visible]).all()


@pytest.mark.parametrize("case", [
    ("float16", 64, True, 0.17, (1025, 1025), (2, 2)),
    ("bfloat16", 128, False, 0.17, (200, 1025), (4, 2)),
    ("float16", 128, True, 0.17, (1025, 300), (2, 1)),  # queries that see no key
    ("float16", 64, False, 0.0, (1025, 130), (2, 2)),
    ("bfloat16", 128, True, 0.0, (130, 700), (4, 1)),
    ("float16", 96, True, 0.0, (300, 300), (2, 1)),
])
def test_deterministic_backward_matches_reference(cp, forward_path, case, monkeypatch):
    # Several dQ splits (a small resident-CTA count forces them), summed in order after the kernel.
    monkeypatch.setattr(_attn_gpu, "_resident_ctas", lambda fn, threads, smem: 64)
    dt, d, causal, p, seqs, heads = case
    rng = np.random.default_rng(hash(case) % 2**32)
    res = run_case(cp, dt, d, causal, p, seqs, heads, rng, deterministic=True)
    print(forward_path, {k: f"{e:.2e}/{n:.2e}" for k, (e, n) in res.items()})


def test_warmup_readies_what_the_forward_launches(cp, monkeypatch):
    # On Hopper the hd64 forward with dropout picks its tiles by key length: warmup must
    # ready each configuration, so neither a short nor a long call loads a kernel itself.
    from cuflash import _compile

    monkeypatch.setattr(_compile, "_kernels", {})
    monkeypatch.setattr(_compile, "_modules", {})
    n = cuflash.warmup(dtypes=("float16",), head_dims=(64,), causal=(True,), dropout=(True,), backward=False)
    assert n == (2 if _attn_gpu.use_hopper_forward(64) else 1)
    ready = set(_compile._kernels)
    rng = np.random.default_rng(5)
    for sk in (64, 4096):
        q = cp.asarray(rng.standard_normal((1, 64, 2, 64)).astype(np.float16))
        k = cp.asarray(rng.standard_normal((1, sk, 2, 64)).astype(np.float16))
        out = cuflash.attention(q, k, k, dropout_p=0.1, causal=True, seed=1, offset=0)
        assert bool(cp.isfinite(out).all())
    assert set(_compile._kernels) == ready


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
@pytest.mark.parametrize("d,causal,p,seqs,heads", [
    (64, False, 0.0, (1025, 4100), (2, 2)),
    (64, True, 0.1, (4100, 4100), (4, 2)),
    (40, True, 0.0, (300, 2500), (2, 1)),   # padded head dim: TMA zero-fills columns 40..63
    (64, False, 0.1, (97, 2049), (3, 3)),
    (64, True, 0.1, (1000, 1500), (2, 1)),  # the short-sequence tiles
    (128, False, 0.0, (1025, 2100), (2, 2)),
    (128, True, 0.1, (300, 700), (4, 2)),
    (120, False, 0.1, (64, 64), (1, 1)),
])
def test_tma_forward_is_bitwise_the_cp_async_one(cp, monkeypatch, dt, d, causal, p, seqs, heads):
    # The TMA loads change where the tiles come from, not one operation of the arithmetic: out
    # and lse must be bitwise those of the same tiles loaded by cp.async, tails included (TMA
    # zero-fills rows past Sq or Sk and columns past D, as cp.async's src-size 0 does).
    from cuflash import _config, _tma

    if not _attn_gpu.use_hopper_forward(_config.padded_head_dim(d)):
        pytest.skip("the TMA forward runs on sm_90 only")
    Sq, Sk = seqs
    H, Hk = heads
    rng = np.random.default_rng(Sq * 7 + Sk)
    dtype = _dtype(dt)
    q, k, v = (cp.asarray(rng.standard_normal((2, s, h, d)).astype(dtype)) for s, h in ((Sq, H), (Sk, Hk), (Sk, Hk)))
    tiles = _config.fwd_tiles(_config.padded_head_dim(d), True, p > 0, Sk, causal)
    assert tiles.tma, tiles
    kw = dict(dropout_p=p, causal=causal, seed=99, offset=5)
    out_tma, ctx_tma = cuflash.attention_forward(q, k, v, **kw)
    monkeypatch.setattr(_tma, "tensor_map", lambda *a, **kw: None)
    out_cp, ctx_cp = cuflash.attention_forward(q, k, v, **kw)
    assert np.array_equal(out_tma.get().view(np.uint16), out_cp.get().view(np.uint16))
    assert np.array_equal(ctx_tma.lse.get().view(np.uint32), ctx_cp.lse.get().view(np.uint32))
