"""Tests of the public API on NumPy arrays (the CPU reference path): cuflash.attention,
attention_forward, attention_backward, the global dropout generator and argument
validation. No GPU needed.
"""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import AttentionContext, attention, attention_backward, attention_forward
from cuflash.mask import drop_threshold, keep_probability
from cuflash.reference import attention_backward_ref, attention_forward_ref, causal_mask

SEED = 0xC0FFEE_0000_1234_5
OFFSET = 41


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


@pytest.fixture(autouse=True)
def _restore_generator():
    """Tests touch the global generator: leave it as they found it."""
    state = cuflash.get_state()
    yield
    cuflash.set_state(state)


def _qkv(B=1, Sq=5, Sk=7, H=2, Hk=2, D=16, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Sq, H, D)).astype(dtype)
    k = rng.standard_normal((B, Sk, Hk, D)).astype(dtype)
    v = rng.standard_normal((B, Sk, Hk, D)).astype(dtype)
    return q, k, v


def _keep(q, k, p, seed, offset):
    B, Sq, H, _ = q.shape
    return cuflash.dropout_mask(B, H, Sq, k.shape[1], dropout_p=p, seed=seed, offset=offset, xp=np)


def _einsum_forward(q, k, v, *, causal, scale, keep, keep_prob):
    """Independent float64 forward (einsum, explicit GQA head map, explicit dropout)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    hmap = np.arange(H) // (H // Hk)
    kk, vv = k[:, :, hmap], v[:, :, hmap]  # (B, Sk, H, D)
    s = np.einsum("bihd,bjhd->bhij", q, kk) * scale
    if causal:
        vis = np.arange(Sk)[None, :] <= np.arange(Sq)[:, None] + (Sk - Sq)
        s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    p = e / np.where(l == 0, 1.0, l)
    lse = np.where(l[..., 0] == 0, -np.inf, m[..., 0] + np.log(np.where(l[..., 0] == 0, 1.0, l[..., 0])))
    if keep is not None:
        p = p * keep / keep_prob
    out = np.einsum("bhij,bjhd->bihd", p, vv)
    return out, lse


def _assert_close(name, got, want, rtol, atol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    finite = np.isfinite(want) & np.isfinite(got)
    err = np.abs(got[finite] - want[finite]).max() if finite.any() else 0.0
    print(f"{name}: max abs err {err:.3e}")
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=name)


def _raises(exc, word, fn, *args, **kwargs):
    with pytest.raises(exc) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    print(f"{ei.type.__name__}: {msg}")
    assert re.search(word, msg), f"message does not name {word!r}: {msg}"
    return msg


CONFIGS = [
    # B, Sq, Sk, H, Hk, D, causal
    (1, 5, 7, 2, 2, 16, False),
    (2, 7, 5, 2, 2, 8, False),
    (1, 5, 7, 2, 2, 16, True),
    (1, 7, 5, 4, 2, 8, True),  # Sq > Sk causal: fully masked rows
    (2, 9, 9, 4, 2, 16, True),
    (1, 6, 17, 4, 1, 8, False),
    (1, 17, 6, 4, 1, 24, True),
    (1, 33, 18, 4, 4, 8, False),
]


# --------------------------------------------------------------------------- #
# Forward
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16], ids=["f64", "f32", "f16", "bf16"]
)
def test_forward_output_and_ctx_fields(dtype):
    q, k, v = _qkv(B=2, Sq=5, Sk=7, H=4, Hk=2, D=16, dtype=dtype)
    p = 0.17
    out, ctx = attention_forward(q, k, v, dropout_p=p, seed=SEED, offset=OFFSET)
    assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype) and out.shape == (2, 5, 4, 16)
    assert isinstance(ctx, AttentionContext)
    assert ctx.out is out and ctx.q is q and ctx.k is k and ctx.v is v
    assert isinstance(ctx.lse, np.ndarray) and ctx.lse.dtype == np.float32 and ctx.lse.shape == (2, 4, 5)
    t = drop_threshold(p)
    assert ctx.threshold == t == 11141
    assert ctx.dropout_p == p
    assert ctx.keep_prob == keep_probability(t) == (65536 - t) / 65536
    assert ctx.dropout_p_effective == t / 65536
    assert math.isclose(ctx.dropout_scale, 65536 / (65536 - t), rel_tol=1e-15)
    assert ctx.seed == SEED and ctx.offset == OFFSET
    assert ctx.softmax_scale == 1.0 / math.sqrt(16)
    assert ctx.causal is False and ctx.deterministic is False
    assert np.isfinite(out.astype(np.float64)).all()


def test_forward_ctx_flags_and_scale_recorded():
    q, k, v = _qkv()
    _, ctx = attention_forward(q, k, v, causal=np.bool_(True), deterministic=True, softmax_scale=0.3)
    assert ctx.causal is True and ctx.deterministic is True
    assert ctx.softmax_scale == 0.3
    assert ctx.threshold == 0 and ctx.keep_prob == 1.0 and ctx.dropout_p_effective == 0.0


@pytest.mark.parametrize("p", [0.0, 0.17, 0.5])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "B{}_Sq{}_Sk{}_H{}_Hk{}_D{}_c{}".format(*c))
def test_forward_matches_reference(cfg, p):
    B, Sq, Sk, H, Hk, D, causal = cfg
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D, seed=Sq * 100 + Sk)
    out, ctx = attention_forward(q, k, v, dropout_p=p, causal=causal, seed=SEED, offset=OFFSET)
    keep = _keep(q, k, p, SEED, OFFSET) if p > 0 else None
    kp = keep_probability(drop_threshold(p))
    out_ref, lse_ref = attention_forward_ref(
        q, k, v, causal=causal, keep=keep, keep_scale=1.0 / kp
    )
    _assert_close("out vs reference", out, out_ref, 1e-12, 1e-12)
    _assert_close("lse vs reference", ctx.lse, lse_ref.astype(np.float32), 0, 0)
    # and against an independent einsum implementation
    out_e, lse_e = _einsum_forward(q, k, v, causal=causal, scale=1 / math.sqrt(D), keep=keep, keep_prob=kp)
    _assert_close("out vs einsum", out, out_e, 1e-12, 1e-12)
    _assert_close("lse vs einsum", ctx.lse, lse_e, 1e-6, 1e-6)
    # attention() is attention_forward()[0]
    np.testing.assert_array_equal(
        attention(q, k, v, dropout_p=p, causal=causal, seed=SEED, offset=OFFSET), out
    )


def test_forward_custom_softmax_scale():
    q, k, v = _qkv(1, 6, 9, 2, 1, 8)
    out, ctx = attention_forward(q, k, v, softmax_scale=0.05, dropout_p=0.3, seed=3, offset=4)
    keep = _keep(q, k, 0.3, 3, 4)
    out_e, _ = _einsum_forward(q, k, v, causal=False, scale=0.05, keep=keep, keep_prob=ctx.keep_prob)
    _assert_close("out", out, out_e, 1e-12, 1e-12)


def test_dropout_changes_output_and_is_reproducible():
    q, k, v = _qkv(1, 16, 16, 2, 2, 8)
    base = attention(q, k, v)
    a = attention(q, k, v, dropout_p=0.5, seed=SEED, offset=OFFSET)
    b = attention(q, k, v, dropout_p=0.5, seed=SEED, offset=OFFSET)
    c = attention(q, k, v, dropout_p=0.5, seed=SEED, offset=OFFSET + 1)
    d = attention(q, k, v, dropout_p=0.5, seed=SEED + 1, offset=OFFSET)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, base)
    assert not np.allclose(a, c)
    assert not np.allclose(a, d)


def test_float32_and_half_inputs_accepted_on_cpu():
    q, k, v = _qkv(1, 5, 7, 2, 1, 8)
    out64 = attention(q, k, v, dropout_p=0.2, seed=1, offset=2, causal=True)
    for dt, tol in ((np.float32, 1e-6), (np.float16, 2e-2), (ml_dtypes.bfloat16, 1e-1)):
        qq, kk, vv = (x.astype(dt) for x in (q, k, v))
        out = attention(qq, kk, vv, dropout_p=0.2, seed=1, offset=2, causal=True)
        assert out.dtype == np.dtype(dt)
        _assert_close(f"{np.dtype(dt).name} vs f64", out, out64, tol, tol)


# --------------------------------------------------------------------------- #
# Backward
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "B{}_Sq{}_Sk{}_H{}_Hk{}_D{}_c{}".format(*c))
def test_backward_matches_reference(cfg, p):
    B, Sq, Sk, H, Hk, D, causal = cfg
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D, seed=Sq * 31 + Sk)
    dout = np.random.default_rng(99).standard_normal(q.shape)
    out, ctx = attention_forward(q, k, v, dropout_p=p, causal=causal, seed=SEED, offset=OFFSET)
    dq, dk, dv = attention_backward(dout, ctx)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == np.float64
    keep = _keep(q, k, p, SEED, OFFSET) if p > 0 else None
    kp = keep_probability(drop_threshold(p))
    out_ref, lse_ref = attention_forward_ref(q, k, v, causal=causal, keep=keep, keep_scale=1 / kp)
    dq_r, dk_r, dv_r = attention_backward_ref(
        dout, q, k, v, out_ref, lse_ref, causal=causal, keep=keep, keep_scale=1 / kp
    )
    # exact: the reference backward fed what the forward recorded (out, float32 lse)
    g_ctx = attention_backward_ref(
        dout, q, k, v, ctx.out, ctx.lse, causal=causal, keep=keep, keep_scale=1 / kp
    )
    for n, a, b in zip("qkv", (dq, dk, dv), g_ctx):
        _assert_close(f"d{n} vs reference(ctx.out, ctx.lse)", a, b, 1e-12, 1e-12)
    # all-float64 reference: ctx.lse is float32 (documented), so P = exp(s - lse) carries
    # ~1e-7 relative error into dq, dk; dv too through P
    for n, a, b in zip("qkv", (dq, dk, dv), (dq_r, dk_r, dv_r)):
        _assert_close(f"d{n} vs float64 reference", a, b, 2e-6, 2e-6)


@pytest.mark.parametrize(
    "cfg", [(1, 3, 5, 2, 1, 8, True, 0.3), (1, 4, 3, 2, 2, 8, False, 0.5), (2, 3, 3, 2, 2, 8, True, 0.0)]
)
def test_backward_finite_differences(cfg):
    """The gradient of sum(out * dout), with the forward's dropout mask, by central differences."""
    B, Sq, Sk, H, Hk, D, causal, p = cfg
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D, seed=5)
    dout = np.random.default_rng(6).standard_normal(q.shape)
    kw = dict(dropout_p=p, causal=causal, seed=SEED, offset=OFFSET)
    _, ctx = attention_forward(q, k, v, **kw)
    grads = attention_backward(dout, ctx)

    def loss(qq, kk, vv):
        return float((attention(qq, kk, vv, **kw) * dout).sum())

    eps = 1e-6
    for name, x, g in zip("qkv", (q, k, v), grads):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            args = [q.copy(), k.copy(), v.copy()]
            xi = args["qkv".index(name)]
            xi[idx] = orig + eps
            lp = loss(*args)
            xi[idx] = orig - eps
            lm = loss(*args)
            num[idx] = (lp - lm) / (2 * eps)
        _assert_close(f"d{name} vs finite differences", g, num, 1e-5, 1e-6)


def test_backward_uses_ctx_mask_not_generator_state():
    """The backward regenerates the forward's mask from ctx even after the generator moved on."""
    cuflash.manual_seed(123)
    q, k, v = _qkv(1, 8, 8, 2, 2, 8)
    dout = np.random.default_rng(1).standard_normal(q.shape)
    _, ctx = attention_forward(q, k, v, dropout_p=0.4)
    g1 = attention_backward(dout, ctx)
    attention(q, k, v, dropout_p=0.4)  # advance the generator
    cuflash.manual_seed(999)
    g2 = attention_backward(dout, ctx)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)
    keep = _keep(q, k, 0.4, 123, 0)
    ref = attention_backward_ref(dout, q, k, v, ctx.out, ctx.lse, keep=keep, keep_scale=1 / ctx.keep_prob)
    for n, a, b in zip("qkv", g1, ref):
        _assert_close(f"d{n}", a, b, 1e-12, 1e-12)
    # a different mask gives different gradients (so the check above is not vacuous)
    other = attention_backward_ref(dout, q, k, v, ctx.out, ctx.lse, keep=_keep(q, k, 0.4, 123, 1),
                                   keep_scale=1 / ctx.keep_prob)
    assert not np.allclose(g1[2], other[2])


def test_backward_float32_dtypes():
    q, k, v = _qkv(1, 5, 6, 4, 2, 8, dtype=np.float32)
    dout = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    _, ctx = attention_forward(q, k, v, dropout_p=0.1, seed=1, offset=1)
    dq, dk, dv = attention_backward(dout, ctx)
    assert dq.dtype == dk.dtype == dv.dtype == np.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


# --------------------------------------------------------------------------- #
# Global generator
# --------------------------------------------------------------------------- #


def test_generator_consecutive_calls_and_reseed():
    q, k, v = _qkv(1, 16, 16, 2, 2, 8)
    cuflash.manual_seed(2024)
    assert cuflash.get_state() == (2024, 0) and cuflash.initial_seed() == 2024
    out1, c1 = attention_forward(q, k, v, dropout_p=0.5)
    out2, c2 = attention_forward(q, k, v, dropout_p=0.5)
    assert c1.seed == c2.seed == 2024
    assert c1.offset == 0 and c2.offset == c1.offset + 1
    assert cuflash.get_state() == (2024, 2)
    m1, m2 = _keep(q, k, 0.5, c1.seed, c1.offset), _keep(q, k, 0.5, c2.seed, c2.offset)
    assert not np.array_equal(m1, m2)
    assert not np.array_equal(out1, out2)
    # same as passing the seed/offset explicitly
    np.testing.assert_array_equal(out2, attention(q, k, v, dropout_p=0.5, seed=2024, offset=1))
    cuflash.manual_seed(2024)
    out1b, c1b = attention_forward(q, k, v, dropout_p=0.5)
    assert (c1b.seed, c1b.offset) == (2024, 0)
    np.testing.assert_array_equal(out1b, out1)
    np.testing.assert_array_equal(c1b.lse, c1.lse)


def test_generator_get_set_state_roundtrip():
    q, k, v = _qkv(1, 8, 8, 1, 1, 8)
    cuflash.manual_seed(5)
    attention(q, k, v, dropout_p=0.3)
    st = cuflash.get_state()
    a = attention(q, k, v, dropout_p=0.3)
    attention(q, k, v, dropout_p=0.3)
    cuflash.set_state(st)
    np.testing.assert_array_equal(attention(q, k, v, dropout_p=0.3), a)


def test_explicit_seed_offset_none_gives_offset_zero_and_does_not_advance():
    q, k, v = _qkv()
    cuflash.manual_seed(7)
    _, ctx = attention_forward(q, k, v, dropout_p=0.2, seed=11)
    assert (ctx.seed, ctx.offset) == (11, 0)
    assert cuflash.get_state() == (7, 0)
    out_a = attention(q, k, v, dropout_p=0.2, seed=11)
    np.testing.assert_array_equal(out_a, attention(q, k, v, dropout_p=0.2, seed=11, offset=0))


def test_explicit_offset_seed_none_uses_generator_seed():
    q, k, v = _qkv()
    cuflash.manual_seed(77)
    _, ctx = attention_forward(q, k, v, dropout_p=0.2, offset=9)
    assert (ctx.seed, ctx.offset) == (77, 9)
    assert cuflash.get_state() == (77, 0)


def test_p_zero_does_not_advance_generator():
    q, k, v = _qkv()
    cuflash.manual_seed(8)
    _, ctx = attention_forward(q, k, v, dropout_p=0.0)
    attention(q, k, v)
    assert cuflash.get_state() == (8, 0)
    assert ctx.seed is None and ctx.offset is None
    assert ctx.threshold == 0 and ctx.keep_prob == 1.0


def test_p_zero_records_seed_offset_as_given():
    q, k, v = _qkv()
    _, ctx = attention_forward(q, k, v, dropout_p=0.0, seed=5)
    assert (ctx.seed, ctx.offset) == (5, None)


def test_generator_offset_wraps_into_seed():
    q, k, v = _qkv(1, 4, 4, 1, 1, 8)
    cuflash.set_state((10, (1 << 32) - 1))
    _, ctx = attention_forward(q, k, v, dropout_p=0.1)
    assert (ctx.seed, ctx.offset) == (10, (1 << 32) - 1)
    assert cuflash.get_state() == (11, 0)
    cuflash.set_state(((1 << 64) - 1, (1 << 32) - 1))
    attention(q, k, v, dropout_p=0.1)
    assert cuflash.get_state() == (0, 0)


def test_failed_validation_does_not_advance_generator():
    q, k, v = _qkv()
    cuflash.manual_seed(3)
    with pytest.raises(TypeError):
        attention(q, k, v, dropout_p=0.5, causal=1)
    with pytest.raises(ValueError):
        attention(q, k, v, dropout_p=0.5, softmax_scale=float("nan"))
    with pytest.raises(ValueError):
        attention(q[..., :4], k[..., :4], v[..., :4], dropout_p=0.5)
    assert cuflash.get_state() == (3, 0)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1 << 64, ValueError), (1.5, TypeError), ("1", TypeError)])
def test_manual_seed_validates(bad, exc):
    _raises(exc, "seed", cuflash.manual_seed, bad)


def test_manual_seed_none_rejected():
    with pytest.raises(TypeError, match="seed"):
        cuflash.manual_seed(None)


def test_set_state_none_rejected():
    with pytest.raises(TypeError):
        cuflash.set_state((1, None))
    with pytest.raises(TypeError):
        cuflash.set_state((None, 0))


def test_set_state_validates_ranges():
    _raises(ValueError, "offset", cuflash.set_state, (1, 1 << 32))
    _raises(ValueError, "seed", cuflash.set_state, (-1, 0))


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #


def test_int32_rejected_names_argument():
    q, k, v = _qkv()
    _raises(TypeError, r"\bq\b.*dtype|dtype.*\bq\b", attention, q.astype(np.int32), k, v)
    _raises(TypeError, r"\bv\b.*dtype|dtype.*\bv\b", attention, q, k, v.astype(np.int32))
    _raises(TypeError, r"\bk\b.*dtype|dtype.*\bk\b", attention, q, k.astype(np.float64).astype(np.int64), v)


def test_mixed_float_dtypes_rejected():
    q, k, v = _qkv()
    _raises(TypeError, "dtype", attention, q, k.astype(np.float32), v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_rank_not_4(which):
    args = dict(zip("qkv", _qkv()))
    args[which] = args[which][0]
    _raises(ValueError, rf"\b{which}\b.*4 dimensions", attention, args["q"], args["k"], args["v"])


def test_mismatched_batch():
    q, _, _ = _qkv(B=2)
    _, k, v = _qkv(B=3)
    _raises(ValueError, "batch", attention, q, k, v)


def test_k_v_shape_mismatch():
    q, k, v = _qkv(Sk=7)
    _raises(ValueError, r"\bk\b.*\bv\b.*shape", attention, q, k, v[:, :6])


def test_head_dim_mismatch():
    q, _, _ = _qkv(D=8)
    _, k, v = _qkv(D=16)
    _raises(ValueError, "head dim", attention, q, k, v)


def test_heads_not_multiple():
    q, k, v = _qkv(H=3, Hk=2)
    _raises(ValueError, "heads", attention, q, k, v)


@pytest.mark.parametrize("D", [4, 12, 20, 264])
def test_head_dim_not_multiple_of_8_or_too_big(D):
    q, k, v = _qkv(1, 3, 3, 1, 1, D)
    _raises(ValueError, "head dim", attention, q, k, v)


def test_head_dim_256_ok():
    q, k, v = _qkv(1, 2, 3, 1, 1, 256)
    out = attention(q, k, v)
    out_e, _ = _einsum_forward(q, k, v, causal=False, scale=1 / 16, keep=None, keep_prob=1.0)
    _assert_close("D=256", out, out_e, 1e-12, 1e-12)


@pytest.mark.parametrize("shape_q,shape_kv", [
    ((1, 0, 2, 8), (1, 3, 2, 8)),
    ((1, 3, 2, 8), (1, 0, 2, 8)),
    ((0, 3, 2, 8), (0, 3, 2, 8)),
    ((1, 3, 0, 8), (1, 3, 2, 8)),
    ((1, 3, 2, 8), (1, 3, 0, 8)),
])
def test_zero_size_dim(shape_q, shape_kv):
    q = np.zeros(shape_q)
    k = np.zeros(shape_kv)
    _raises(ValueError, "dimension", attention, q, k, k.copy())


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_dim_not_contiguous(which):
    args = dict(zip("qkv", _qkv(D=16)))
    for n in "qkv":
        args[n] = args[n][..., ::2] if n == which else np.ascontiguousarray(args[n][..., ::2])
    _raises(ValueError, rf"\b{which}\b.*contiguous", attention, args["q"], args["k"], args["v"])


def test_negative_strides_rejected():
    q, k, v = _qkv()
    _raises(ValueError, r"\bq\b.*strides", attention, q[:, ::-1], k, v)


@pytest.mark.parametrize("p,exc", [
    (-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (0.999995, ValueError), (float("nan"), ValueError),
    ("0.1", TypeError), (None, TypeError), (True, TypeError), (np.bool_(False), TypeError), (1j, TypeError),
])
def test_bad_dropout_p(p, exc):
    q, k, v = _qkv()
    _raises(exc, "dropout_p", attention, q, k, v, dropout_p=p, seed=1, offset=0)


def test_dropout_p_numpy_float_ok():
    q, k, v = _qkv()
    a = attention(q, k, v, dropout_p=np.float32(0.5), seed=1, offset=0)
    b = attention(q, k, v, dropout_p=0.5, seed=1, offset=0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("s,exc", [
    (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
    ("0.1", TypeError), (True, TypeError), ([0.1], TypeError),
])
def test_bad_softmax_scale(s, exc):
    q, k, v = _qkv()
    _raises(exc, "softmax_scale", attention, q, k, v, softmax_scale=s)


@pytest.mark.parametrize("kw,exc,word", [
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1 << 64), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(offset=1 << 32), ValueError, "offset"),
    (dict(offset=-1), ValueError, "offset"),
    (dict(offset=2.0), TypeError, "offset"),
    (dict(seed=1, offset=1 << 32), ValueError, "offset"),
])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_bad_seed_offset(kw, exc, word, p):
    q, k, v = _qkv()
    _raises(exc, word, attention, q, k, v, dropout_p=p, **kw)


def test_seed_offset_extremes_ok():
    q, k, v = _qkv()
    _, ctx = attention_forward(q, k, v, dropout_p=0.5, seed=(1 << 64) - 1, offset=(1 << 32) - 1)
    assert (ctx.seed, ctx.offset) == ((1 << 64) - 1, (1 << 32) - 1)
    _, ctx = attention_forward(q, k, v, dropout_p=0.5, seed=np.uint64((1 << 64) - 1), offset=np.uint32(5))
    assert (ctx.seed, ctx.offset) == ((1 << 64) - 1, 5) and type(ctx.seed) is int


@pytest.mark.parametrize("name,val", [("causal", 1), ("causal", "yes"), ("causal", None),
                                      ("deterministic", 0), ("deterministic", "no")])
def test_flags_must_be_bool(name, val):
    q, k, v = _qkv()
    _raises(TypeError, name, attention, q, k, v, **{name: val})


def test_non_array_inputs():
    q, k, v = _qkv()
    _raises(TypeError, r"\bq\b", attention, q.tolist(), k, v)
    _raises(TypeError, r"\bk\b", attention, q, k.tolist(), v)
    _raises(TypeError, r"\bv\b", attention, q, k, v.tolist())
    _raises(TypeError, r"\bv\b", attention, q, k, 3.0)


def test_too_many_heads_or_batch_with_dropout():
    q = np.zeros((1, 1, 1 << 16, 8), dtype=np.float32)
    k = np.zeros((1, 1, 1, 8), dtype=np.float32)
    _raises(ValueError, "heads", attention, q, k, k, dropout_p=0.1, seed=0, offset=0)
    qb = np.zeros((1 << 16, 1, 1, 8), dtype=np.float32)
    kb = np.zeros((1 << 16, 1, 1, 8), dtype=np.float32)
    _raises(ValueError, "batch", attention, qb, kb, kb, dropout_p=0.1, seed=0, offset=0)


def _fwd_for_backward():
    q, k, v = _qkv(1, 4, 5, 2, 1, 8)
    out, ctx = attention_forward(q, k, v, dropout_p=0.2, seed=1, offset=2)
    return out, ctx


def test_backward_dout_wrong_shape():
    out, ctx = _fwd_for_backward()
    _raises(ValueError, "dout", attention_backward, np.zeros(out.shape[:-1] + (16,)), ctx)
    _raises(ValueError, "dout", attention_backward, np.zeros(out.shape[1:]), ctx)


def test_backward_dout_wrong_dtype():
    out, ctx = _fwd_for_backward()
    _raises(TypeError, "dout", attention_backward, np.zeros(out.shape, np.float32), ctx)
    _raises(TypeError, "dout", attention_backward, np.zeros(out.shape, np.int64), ctx)


def test_backward_dout_not_array():
    out, ctx = _fwd_for_backward()
    _raises(TypeError, "dout", attention_backward, np.zeros(out.shape).tolist(), ctx)


def test_backward_dout_last_dim_not_contiguous():
    out, ctx = _fwd_for_backward()
    big = np.zeros(out.shape[:-1] + (2 * out.shape[-1],))
    _raises(ValueError, "dout", attention_backward, big[..., ::2], ctx)


def test_backward_ctx_not_context():
    out, ctx = _fwd_for_backward()
    _raises(TypeError, "ctx", attention_backward, np.zeros(out.shape), (out, ctx.lse))
    _raises(TypeError, "ctx", attention_backward, np.zeros(out.shape), None)
    _raises(TypeError, "ctx", attention_backward, np.zeros(out.shape), dict(vars(ctx)))


def test_backward_non_contiguous_dout_ok():
    out, ctx = _fwd_for_backward()
    rng = np.random.default_rng(0)
    big = rng.standard_normal((out.shape[0], out.shape[1] * 2) + out.shape[2:])
    d_view = big[:, ::2]
    for a, b in zip(attention_backward(d_view, ctx), attention_backward(np.ascontiguousarray(d_view), ctx)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- #
# Layouts and edge cases
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("causal", [False, True])
def test_packed_qkv_views(causal):
    B, S, H, D = 2, 9, 2, 16
    buf = np.random.default_rng(3).standard_normal((B, S, 3, H, D))
    q, k, v = buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]
    assert not q.flags.c_contiguous
    qc, kc, vc = (np.ascontiguousarray(x) for x in (q, k, v))
    kw = dict(dropout_p=0.3, causal=causal, seed=SEED, offset=OFFSET)
    out, ctx = attention_forward(q, k, v, **kw)
    outc, ctxc = attention_forward(qc, kc, vc, **kw)
    _assert_close("out packed vs contiguous", out, outc, 1e-13, 1e-13)
    np.testing.assert_array_equal(ctx.lse, ctxc.lse)
    dout = np.random.default_rng(4).standard_normal(out.shape)
    for n, a, b in zip("qkv", attention_backward(dout, ctx), attention_backward(dout, ctxc)):
        _assert_close(f"d{n} packed vs contiguous", a, b, 1e-12, 1e-12)


def test_transposed_view_inputs():
    """(B, H, S, D) buffers viewed as (B, S, H, D): free strides, contiguous last dim."""
    rng = np.random.default_rng(8)
    qh, kh, vh = (rng.standard_normal((1, 2, 6, 8)) for _ in range(3))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qh, kh, vh))
    a = attention(q, k, v, dropout_p=0.2, seed=1, offset=1, causal=True)
    b = attention(*(np.ascontiguousarray(x) for x in (q, k, v)), dropout_p=0.2, seed=1, offset=1, causal=True)
    _assert_close("transposed views", a, b, 1e-13, 1e-13)


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("Hk", [2, 1])
def test_fully_masked_rows(p, Hk):
    B, Sq, Sk, H, D = 1, 9, 4, 2, 8
    q, k, v = _qkv(B, Sq, Sk, H, Hk, D)
    out, ctx = attention_forward(q, k, v, causal=True, dropout_p=p, seed=SEED, offset=OFFSET)
    n_empty = Sq - Sk  # row i sees j <= i - 5: rows 0..4 see nothing
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[:, :n_empty], 0.0)
    assert np.isneginf(ctx.lse[:, :, :n_empty]).all()
    assert np.isfinite(ctx.lse[:, :, n_empty:]).all()
    assert (np.abs(out[:, n_empty:]) > 0).any()
    dout = np.random.default_rng(1).standard_normal(out.shape)
    dq, dk, dv = attention_backward(dout, ctx)
    for g in (dq, dk, dv):
        assert not np.isnan(g).any() and np.isfinite(g).all()
    np.testing.assert_array_equal(dq[:, :n_empty], 0.0)
    # last row sees every key: its lse is that of the full row
    s = np.einsum("bhd,bjhd->bhj", q[:, -1], k[:, :, np.arange(H) // (H // Hk)]) / math.sqrt(D)
    lse_last = np.log(np.exp(s).sum(-1))
    _assert_close("lse of last row", ctx.lse[:, :, -1], lse_last, 1e-6, 1e-6)


def test_causal_mask_convention():
    """Changing k/v at a key invisible to row i does not change row i (bottom-right alignment)."""
    q, k, v = _qkv(1, 3, 5, 1, 1, 8)
    out = attention(q, k, v, causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[:, 4] += 10.0
    v2[:, 4] += 10.0
    out2 = attention(q, k2, v2, causal=True)
    vis = causal_mask(3, 5)
    assert not vis[1, 4] and vis[2, 4]
    np.testing.assert_array_equal(out2[:, :2], out[:, :2])  # rows 0, 1 do not see key 4
    assert not np.allclose(out2[:, 2], out[:, 2])
