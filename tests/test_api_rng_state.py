"""CPU tests of the device-generator API: DeviceGenerator's argument checks, the
generator= argument of attention_forward (type, exclusion with seed/offset, NumPy
arrays rejected), the advance rule both generators share, and ctx.get_seed_offset().
No GPU needed; tests/test_gpu_streams_graphs.py runs the generator on a GPU.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

import cuflash
from cuflash import DeviceGenerator, attention, attention_forward
from cuflash._generator import advance

MAX_OFFSET = 1 << 32
MAX_SEED = 1 << 64


@pytest.fixture(autouse=True)
def _restore_generator():
    state = cuflash.get_state()
    yield
    cuflash.set_state(state)


def _qkv(B=1, Sq=5, Sk=7, H=2, Hk=2, D=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Sq, H, D)), rng.standard_normal((B, Sk, Hk, D)),
            rng.standard_normal((B, Sk, Hk, D)))


def _raises(exc, word, fn, *args, **kwargs):
    with pytest.raises(exc) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    print(f"{ei.type.__name__}: {msg}")
    assert re.search(word, msg), f"message does not name {word!r}: {msg}"
    return msg


def _unbuilt_generator() -> DeviceGenerator:
    """A DeviceGenerator instance without device state (no GPU here): enough for checks
    that reject it before its state is touched."""
    return DeviceGenerator.__new__(DeviceGenerator)


# --------------------------------------------------------------------------- #
# DeviceGenerator arguments
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kw,exc,word", [
    (dict(seed=None), TypeError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=MAX_SEED), ValueError, "seed"),
    (dict(seed=1.0), TypeError, "seed"),
    (dict(seed="1"), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed=1, offset=None), TypeError, "offset"),
    (dict(seed=1, offset=-1), ValueError, "offset"),
    (dict(seed=1, offset=MAX_OFFSET), ValueError, "offset"),
    (dict(seed=1, offset=2.0), TypeError, "offset"),
    (dict(seed=1, offset=np.bool_(True)), TypeError, "offset"),
])
def test_device_generator_validates_arguments(kw, exc, word):
    _raises(exc, word, DeviceGenerator, **kw)


def test_device_generator_seed_is_required():
    with pytest.raises(TypeError):
        DeviceGenerator()


@pytest.mark.skipif(cuflash.gpu_available(), reason="checks the message given where there is no GPU")
def test_device_generator_needs_a_gpu():
    _raises(RuntimeError, "GPU", DeviceGenerator, 5, 3)
    _raises(RuntimeError, "GPU", DeviceGenerator, np.uint64(MAX_SEED - 1), np.uint32(MAX_OFFSET - 1))


# --------------------------------------------------------------------------- #
# attention_forward(..., generator=)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("bad", [42, "gen", (1, 2), np.array([1, 2], dtype=np.uint64)])
def test_generator_must_be_device_generator(bad):
    q, k, v = _qkv()
    _raises(TypeError, "generator", attention_forward, q, k, v, dropout_p=0.1, generator=bad)
    _raises(TypeError, "generator", attention, q, k, v, dropout_p=0.1, generator=bad)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("kw,words", [
    (dict(seed=1), ["seed"]),
    (dict(offset=0), ["offset"]),
    (dict(seed=1, offset=2), ["seed", "offset"]),
])
def test_generator_excludes_seed_and_offset(kw, words, p):
    q, k, v = _qkv()
    gen = _unbuilt_generator()
    msg = _raises(ValueError, "mutually exclusive", attention_forward, q, k, v, dropout_p=p, generator=gen, **kw)
    for w in words:
        assert re.search(rf"\b{w}\b", msg), msg
    _raises(ValueError, words[0], attention, q, k, v, dropout_p=p, generator=gen, **kw)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_generator_rejected_for_numpy_arrays(p):
    q, k, v = _qkv()
    msg = _raises(TypeError, "generator", attention_forward, q, k, v, dropout_p=p, generator=_unbuilt_generator())
    assert "NumPy" in msg and "get_state" in msg


def test_generator_errors_do_not_advance_global_generator():
    q, k, v = _qkv()
    cuflash.manual_seed(17)
    with pytest.raises(ValueError):
        attention(q, k, v, dropout_p=0.5, generator=_unbuilt_generator(), seed=3)
    with pytest.raises(TypeError):
        attention(q, k, v, dropout_p=0.5, generator=_unbuilt_generator())
    with pytest.raises(TypeError):
        attention(q, k, v, dropout_p=0.5, generator=7)
    assert cuflash.get_state() == (17, 0)


def test_argument_errors_come_before_generator_errors():
    """A bad q is reported as such even when the generator is wrong too."""
    q, k, v = _qkv()
    _raises(TypeError, r"\bq\b", attention_forward, q.astype(np.int32), k, v, generator=7)
    _raises(TypeError, "dropout_p", attention_forward, q, k, v, dropout_p="x", generator=_unbuilt_generator())


def test_generator_none_is_the_default_path():
    q, k, v = _qkv()
    a, ctx = attention_forward(q, k, v, dropout_p=0.3, seed=9, offset=4, generator=None)
    np.testing.assert_array_equal(a, attention(q, k, v, dropout_p=0.3, seed=9, offset=4))
    assert ctx.rng_state is None


# --------------------------------------------------------------------------- #
# The advance rule and ctx.get_seed_offset()
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("state,after", [
    ((0, 0), (0, 1)),
    ((5, 41), (5, 42)),
    ((5, MAX_OFFSET - 2), (5, MAX_OFFSET - 1)),
    ((5, MAX_OFFSET - 1), (6, 0)),
    ((MAX_SEED - 1, MAX_OFFSET - 1), (0, 0)),
])
def test_advance_rule(state, after):
    assert advance(*state) == after


def test_global_generator_follows_advance():
    cuflash.set_state((MAX_SEED - 1, MAX_OFFSET - 2))
    q, k, v = _qkv()
    seen = []
    for _ in range(3):
        _, ctx = attention_forward(q, k, v, dropout_p=0.2)
        seen.append((ctx.seed, ctx.offset))
    assert seen == [(MAX_SEED - 1, MAX_OFFSET - 2), (MAX_SEED - 1, MAX_OFFSET - 1), (0, 0)]
    assert cuflash.get_state() == advance(0, 0)


def test_get_seed_offset_without_device_state():
    q, k, v = _qkv()
    _, ctx = attention_forward(q, k, v, dropout_p=0.3, seed=11, offset=12)
    assert ctx.get_seed_offset() == (11, 12)
    _, ctx = attention_forward(q, k, v)
    assert ctx.get_seed_offset() == (None, None)


class _FakeDeviceArray:
    """Stands in for a cupy uint64 (2,) array: .get() gives the host copy."""

    def __init__(self, values):
        self._values = np.asarray(values, dtype=np.uint64)

    def get(self):
        return self._values.copy()


def test_get_seed_offset_reads_rng_state():
    q, k, v = _qkv()
    _, ctx = attention_forward(q, k, v, dropout_p=0.3, seed=1, offset=2)
    dev = dataclasses.replace(ctx, seed=None, offset=None, rng_state=_FakeDeviceArray([MAX_SEED - 1, 77]))
    got = dev.get_seed_offset()
    assert got == (MAX_SEED - 1, 77) and all(type(x) is int for x in got)
