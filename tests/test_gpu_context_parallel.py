"""Context parallelism on one GPU: ring attention simulated with the shard kernels vs the
unsharded kernels, both measured against the float64 reference with the same global
dropout mask (the sharded error may be at most 2x (out) / 3x (gradients) the unsharded
error plus a few units of rounding of the result's size); the applied dropout mask read
back bit for bit through probe inputs; one shard vs the reference on its block; the CuPy
merge vs the NumPy merge. Kernel outputs are poisoned (NaN) as in test_gpu_attention.py.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from test_context_parallel import _mask_probe, _probe_expected

import cuflash
from cuflash import context_parallel as cpar
from cuflash.reference import attention_backward_ref, attention_forward_ref

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def poison(poison_outputs):
    """Outputs start as NaN (tests/conftest.py)."""


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


# Unit roundoff of the result's dtype, for the absolute slack of the comparisons.
_EPS = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _np(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _host64(a):
    return _np(a).astype(np.float64)


def _maxerr(a, b) -> float:
    a, b = _host64(a), _host64(b)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


SEQS = [(600, 600), (333, 777), (777, 333), (1024, 1024)]
HEADS = [(2, 2), (4, 2)]
LAYOUTS = [(2, False), (4, False), (2, True), (4, True)]
CASES = [
    (dt, d, causal, p, SEQS[i % 4], HEADS[i % 2], LAYOUTS[(i // 2) % 4])
    for i, (dt, d, causal, p) in enumerate(
        itertools.product(("float16", "bfloat16"), (64, 128), (False, True), (0.0, 0.17)))
]


@pytest.mark.parametrize("dt,d,causal,p,seqs,heads,layout", CASES)
def test_ring_simulated_matches_unsharded(cp, dt, d, causal, p, seqs, heads, layout):
    (Sq, Sk), (H, Hk), (n, lb) = seqs, heads, layout
    rng = np.random.default_rng(zlib.crc32(repr((dt, d, causal, p, seqs)).encode()))
    B = 1 if Sq * Sk > 1 << 19 else 2
    dtype = _dtype(dt)
    q, k, v = (cp.asarray(rng.standard_normal(s).astype(dtype)) for s in
               ((B, Sq, H, d), (B, Sk, Hk, d), (B, Sk, Hk, d)))
    dout = cp.asarray(rng.standard_normal((B, Sq, H, d)).astype(dtype))
    seed = int(rng.integers(0, 2**63))

    out_f, ctx_f = cuflash.attention_forward(q, k, v, dropout_p=p, causal=causal, seed=seed, offset=3)
    grads_f = cuflash.attention_backward(dout, ctx_f)
    ring = cpar.ring_attention_simulated(q, k, v, n, causal=causal, dropout_p=p, seed=seed, offset=3,
                                         load_balanced=lb, dout=dout)

    keep = None
    if p > 0:
        keep = _np(cuflash.dropout_mask(B, H, Sq, Sk, dropout_p=p, seed=seed, offset=3, xp=cp))
    ks = 1.0 / ctx_f.keep_prob
    qh, kh, vh, doh = (_np(a) for a in (q, k, v, dout))
    o_ref, lse_ref = attention_forward_ref(qh, kh, vh, causal=causal, keep=keep, keep_scale=ks)
    g_ref = attention_backward_ref(doh, qh, kh, vh, o_ref, lse_ref, causal=causal, keep=keep, keep_scale=ks)

    report, failures = {}, []
    for name, got, flat, ref, mult in [("out", ring.out, out_f, o_ref, 2), ("dq", ring.dq, grads_f[0], g_ref[0], 3),
                                       ("dk", ring.dk, grads_f[1], g_ref[1], 3),
                                       ("dv", ring.dv, grads_f[2], g_ref[2], 3)]:
        assert got.dtype == flat.dtype and got.shape == flat.shape, name
        e, ef = _maxerr(got, ref), _maxerr(flat, ref)
        slack = 4 * _EPS[dt] * float(np.max(np.abs(ref)))
        report[name] = f"{e:.2e} (flat {ef:.2e}, mean {float(np.mean(np.abs(_host64(got) - ref))):.1e})"
        if not (np.isfinite(e) and e <= mult * ef + slack):
            failures.append(f"{name}: err {e:.3e} > {mult} x flat {ef:.3e} + {slack:.1e}")
    lse_r, lse_f = _np(ring.lse), _np(ctx_f.lse)
    fin = np.isfinite(lse_ref)
    report["lse"] = f"{_maxerr(lse_r[fin], lse_ref[fin]):.2e} (flat {_maxerr(lse_f[fin], lse_ref[fin]):.2e})"
    print(f"n={n} lb={lb} launches={len(ring.pairs)}", report)
    assert not failures, failures
    assert np.array_equal(np.isfinite(lse_r), fin)
    assert _maxerr(lse_r[fin], lse_ref[fin]) < 1e-3


@pytest.mark.parametrize("dt,causal,n,lb", [("float16", False, 2, False), ("float16", True, 4, False),
                                            ("bfloat16", True, 2, True), ("float16", True, 4, True)])
def test_ring_dropout_mask_is_global_mask(cp, dt, causal, n, lb):
    """Probe inputs turn out and dv into pictures of the applied mask (test_context_parallel
    ._mask_probe): the ring's and the unsharded kernels' equal the global mask bit for bit,
    in windows that straddle chunk boundaries."""
    B, S, H, D, p, seed = 2, 512, 2, 64, 0.3, 0xABCDEF0123
    dtype = _dtype(dt)
    for i0, j0 in ((96, 100), (224, 232), (0, 448)):
        q, k, v, dout = (cp.asarray(a.astype(dtype)) for a in _mask_probe(B, S, S, H, D, i0, j0))
        ring = cpar.ring_attention_simulated(q, k, v, n, causal=causal, dropout_p=p, seed=seed, offset=5,
                                             load_balanced=lb, dout=dout)
        out_f, ctx = cuflash.attention_forward(q, k, v, causal=causal, dropout_p=p, seed=seed, offset=5)
        dv_f = cuflash.attention_backward(dout, ctx)[2]
        out_nz, dv_nz = _probe_expected(B, S, S, H, D, i0, j0, causal, p, seed, 5)
        for name, got, want in [("ring out", ring.out, out_nz), ("ring dv", ring.dv, dv_nz),
                                ("flat out", out_f, out_nz), ("flat dv", dv_f, dv_nz)]:
            g = _host64(got)
            assert np.isfinite(g).all(), name
            bad = int(((g != 0) != want).sum())
            print(f"window ({i0}, {j0}) {name}: {bad} mismatches of {want.size} ({int(want.sum())} kept)")
            assert bad == 0, name


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_one_shard_vs_reference(cp, dt):
    """Rows 32..231 and keys 160..459 of a causal (600, 700) problem with dropout: the shard
    kernels against the float64 reference on that block with the global mask's slice."""
    rng = np.random.default_rng(1)
    dtype = _dtype(dt)
    qa, ka, sq, sk, Sq, Sk, p = 32, 160, 200, 300, 600, 700, 0.2
    q, dout = (cp.asarray(rng.standard_normal((2, sq, 4, 64)).astype(dtype)) for _ in range(2))
    k, v = (cp.asarray(rng.standard_normal((2, sk, 2, 64)).astype(dtype)) for _ in range(2))
    kw = dict(q_start=qa, k_start=ka, seqlen_q_total=Sq, seqlen_k_total=Sk, causal=True, dropout_p=p, seed=77,
              offset=1)
    out, ctx = cpar.attention_shard_forward(q, k, v, **kw)
    grads = cpar.attention_shard_backward(dout, ctx)
    keep = _np(cuflash.dropout_mask(2, 4, Sq, Sk, dropout_p=p, seed=77, offset=1, xp=cp))[:, :, qa:qa + sq,
                                                                                         ka:ka + sk]
    qh, kh, vh, doh = (_np(a) for a in (q, k, v, dout))
    kwr = dict(causal=True, causal_diag=ctx.causal_diag, keep=keep, keep_scale=1 / ctx.keep_prob)
    o_ref, l_ref = attention_forward_ref(qh, kh, vh, **kwr)
    g_ref = attention_backward_ref(doh, qh, kh, vh, o_ref, l_ref, **kwr)
    lse = _np(ctx.lse)
    fin = np.isfinite(l_ref)
    assert (~fin).any() and fin.any()  # rows above the diagonal see no key of this block
    assert np.array_equal(np.isfinite(lse), fin) and _maxerr(lse[fin], l_ref[fin]) < 1e-3
    tol = 16 * _EPS[dt]  # a wrong mask or diagonal gives errors of order 0.1 and more
    for name, got, ref in [("out", out, o_ref), ("dq", grads[0], g_ref[0]), ("dk", grads[1], g_ref[1]),
                           ("dv", grads[2], g_ref[2])]:
        rel = _maxerr(got, ref) / float(np.max(np.abs(ref)))
        print(f"{name}: max err / max |ref| = {rel:.2e}")
        assert rel < tol, name
    assert (_host64(out)[~fin.transpose(0, 2, 1)] == 0).all()  # rows that see nothing: 0


def test_merge_cupy_matches_numpy(cp):
    rng = np.random.default_rng(2)
    for dt in ("float16", "bfloat16"):
        dtype = _dtype(dt)
        outs = [rng.standard_normal((2, 70, 3, 64)).astype(dtype) for _ in range(3)]
        lses = [(rng.standard_normal((2, 3, 70)) * 3).astype(np.float32) for _ in range(3)]
        lses[0][0, 1, :5] = -np.inf
        lses[1][0, 1, :3] = lses[2][0, 1, :3] = -np.inf  # rows 0..2 of that head: nobody saw a key
        o_np, l_np = cpar.merge_attention(outs, lses, out_dtype=np.float32)
        o_cp, l_cp = cpar.merge_attention([cp.asarray(x) for x in outs], [cp.asarray(x) for x in lses],
                                          out_dtype=np.float32)
        assert _maxerr(o_cp, o_np) < 1e-5 and np.array_equal(np.isneginf(_np(l_cp)), np.isneginf(l_np))
        o_cp16, _ = cpar.merge_attention([cp.asarray(x) for x in outs], [cp.asarray(x) for x in lses])
        assert o_cp16.dtype == dtype
        # The bit-level bfloat16 rounding on the GPU equals ml_dtypes' cast of the same float32.
        assert _maxerr(o_cp16, _np(o_cp).astype(dtype)) == 0.0
        dout = rng.standard_normal((2, 70, 3, 64)).astype(dtype)
        d_np = cpar.merge_attention_backward(dout, outs, lses, o_np, l_np)
        d_cp = cpar.merge_attention_backward(cp.asarray(dout), [cp.asarray(x) for x in outs],
                                             [cp.asarray(x) for x in lses], o_cp, l_cp)
        for a, b in zip(d_np[0] + d_np[1], d_cp[0] + d_cp[1]):
            assert _maxerr(b, a) <= 2 * _EPS[dt] * max(1.0, float(np.max(np.abs(_host64(a)))))
