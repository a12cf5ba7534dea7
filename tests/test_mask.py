"""Tests of the dropout mask definition (cuflash.mask) and cuflash.dropout_mask on NumPy.

The reference here is a slow scalar transcription of the definition in
kernels_cu/dropout.cuh / cuflash/mask.py, built on cuflash.rng.curand_philox4
(the curand_init + curand4 formulation), so it shares no code with the
vectorized mask builder beyond the (separately tested) Philox twin.
No GPU needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import cuflash
from cuflash import mask as cmask
from cuflash.mask import drop_threshold, dropout_mask_numpy, keep_probability
from cuflash.rng import curand_philox4

SEED64 = 0xDEADBEEF_12345679  # both key words nonzero, high bit set
OFFSET = 0x9ABC_0007


# --------------------------------------------------------------------------- #
# Scalar transcription of the documented definition
# --------------------------------------------------------------------------- #


def _u16_scalar(seed: int, offset: int, b: int, h: int, i: int, j: int) -> int:
    """The 16-bit random value of element (b, h, i, j), straight from dropout.cuh."""
    R, C = i >> 4, j >> 4
    r, c = i & 15, j & 15
    lane = (r & 7) * 4 + ((c & 7) >> 1)
    sub = (offset << 32) | (b << 16) | h
    off = 4 * ((R << 32) | (C << 5) | lane)
    words = curand_philox4(seed, sub, off)[0]  # one curand4(): (x, y, z, w)
    word = int(words[((c >> 3) << 1) | (r >> 3)])
    return (word >> (16 * (c & 1))) & 0xFFFF


def _u16_slow(B: int, H: int, Sq: int, Sk: int, seed: int, offset: int) -> np.ndarray:
    out = np.empty((B, H, Sq, Sk), dtype=np.int64)
    for b in range(B):
        for h in range(H):
            for i in range(Sq):
                for j in range(Sk):
                    out[b, h, i, j] = _u16_scalar(seed, offset, b, h, i, j)
    return out


def _report_mismatch(got: np.ndarray, want: np.ndarray) -> None:
    bad = np.argwhere(got != want)
    if bad.size:
        print(f"{len(bad)} mismatches of {got.size}; first (b, h, i, j): {bad[:8].tolist()}")


# --------------------------------------------------------------------------- #
# Definition
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "B,H,Sq,Sk",
    [(1, 1, 1, 1), (1, 2, 17, 33), (2, 1, 33, 17), (1, 1, 1, 33), (1, 1, 33, 1), (2, 3, 16, 16)],
)
def test_mask_matches_scalar_definition(B, H, Sq, Sk):
    u16 = _u16_slow(B, H, Sq, Sk, SEED64, OFFSET)
    for p in (0.1, 0.5, 0.9):
        t = drop_threshold(p)
        got = dropout_mask_numpy(B, H, Sq, Sk, threshold=t, seed=SEED64, offset=OFFSET)
        want = u16 >= t
        assert got.dtype == np.bool_ and got.shape == (B, H, Sq, Sk)
        _report_mismatch(got, want)
        np.testing.assert_array_equal(got, want)


def test_mask_matches_scalar_definition_large_indices():
    """Counter words of a nonzero block row R and column block C, high batch/head bits."""
    seed, offset = (1 << 64) - 1, (1 << 32) - 1
    Sq, Sk = 37, 70  # R up to 2, C up to 4
    t = drop_threshold(0.5)
    got = dropout_mask_numpy(1, 1, Sq, Sk, threshold=t, seed=seed, offset=offset)
    want = _u16_slow(1, 1, Sq, Sk, seed, offset) >= t
    _report_mismatch(got, want)
    np.testing.assert_array_equal(got, want)
    # b and h in the high ranges of their 16-bit fields: check a few elements of a
    # (3, 5) grid against the scalar model via the top-level dropout_mask
    got = cuflash.dropout_mask(3, 5, 18, 18, dropout_p=0.5, seed=seed, offset=offset, xp=np)
    for b, h, i, j in [(2, 4, 17, 17), (1, 3, 0, 9), (2, 0, 16, 1), (0, 4, 8, 8)]:
        assert got[b, h, i, j] == (_u16_scalar(seed, offset, b, h, i, j) >= t), (b, h, i, j)


def test_mask_u16_layout_within_block():
    """Every (r, c) position of a 16x16 block reads a distinct 16-bit half of the 32 calls' words."""
    # With 32 lanes x 4 words x 2 halves = 256 values per block, the map (r, c) -> (lane, word, half)
    # must be a bijection; check via the scalar model that the 256 values of a block are the
    # 256 halves of the 32 Philox outputs of that block.
    seed, offset = SEED64, OFFSET
    halves = []
    for lane in range(32):
        w = curand_philox4(seed, (offset << 32), 4 * lane)[0]
        for word in w:
            halves += [int(word) & 0xFFFF, int(word) >> 16]
    vals = [_u16_scalar(seed, offset, 0, 0, i, j) for i in range(16) for j in range(16)]
    assert sorted(vals) == sorted(halves)  # same multiset: every slot used exactly once


# --------------------------------------------------------------------------- #
# Tiling / shape independence
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("small", [(1, 1), (1, 17), (17, 1), (15, 16), (17, 33), (33, 17), (31, 47)])
def test_mask_is_corner_of_larger_mask(small):
    Sq, Sk = small
    t = drop_threshold(0.5)
    big = dropout_mask_numpy(1, 2, 64, 80, threshold=t, seed=SEED64, offset=OFFSET)
    m = dropout_mask_numpy(1, 2, Sq, Sk, threshold=t, seed=SEED64, offset=OFFSET)
    np.testing.assert_array_equal(m, big[:, :, :Sq, :Sk])


def test_mask_independent_of_batch_and_heads():
    t = drop_threshold(0.3)
    big = dropout_mask_numpy(3, 5, 19, 23, threshold=t, seed=SEED64, offset=OFFSET)
    for B, H in [(1, 1), (2, 3), (3, 1), (1, 5)]:
        m = dropout_mask_numpy(B, H, 19, 23, threshold=t, seed=SEED64, offset=OFFSET)
        np.testing.assert_array_equal(m, big[:B, :H])
    # and the (b, h) slice equals a single-slice call only for (0, 0): other slices differ
    one = dropout_mask_numpy(1, 1, 19, 23, threshold=t, seed=SEED64, offset=OFFSET)
    np.testing.assert_array_equal(one[0, 0], big[0, 0])


def test_public_dropout_mask_shape_independent():
    big = cuflash.dropout_mask(2, 3, 40, 50, dropout_p=0.2, seed=SEED64, offset=OFFSET, xp=np)
    small = cuflash.dropout_mask(1, 2, 5, 33, dropout_p=0.2, seed=SEED64, offset=OFFSET, xp=np)
    np.testing.assert_array_equal(small, big[:1, :2, :5, :33])


# --------------------------------------------------------------------------- #
# Different arguments, different masks
# --------------------------------------------------------------------------- #


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def test_mask_varies_with_each_argument():
    t = drop_threshold(0.5)
    kw = dict(threshold=t)
    base = dropout_mask_numpy(2, 2, 128, 128, seed=SEED64, offset=OFFSET, **kw)
    # equal args -> equal masks
    np.testing.assert_array_equal(base, dropout_mask_numpy(2, 2, 128, 128, seed=SEED64, offset=OFFSET, **kw))
    variants = {
        "offset+1": dropout_mask_numpy(2, 2, 128, 128, seed=SEED64, offset=OFFSET + 1, **kw)[0, 0],
        "offset 0": dropout_mask_numpy(2, 2, 128, 128, seed=SEED64, offset=0, **kw)[0, 0],
        "seed+1": dropout_mask_numpy(2, 2, 128, 128, seed=SEED64 + 1, offset=OFFSET, **kw)[0, 0],
        "seed high word": dropout_mask_numpy(2, 2, 128, 128, seed=SEED64 ^ (1 << 40), offset=OFFSET, **kw)[0, 0],
        "head 1": base[0, 1],
        "batch 1": base[1, 0],
        "batch 1 head 1": base[1, 1],
    }
    ref = base[0, 0]
    for name, m in variants.items():
        a = _agreement(ref, m)
        print(f"{name}: agreement with base {a:.4f}")
        # independent p=0.5 masks agree on ~half the elements (16384 elements: sd ~0.004)
        assert abs(a - 0.5) < 0.03, name
    # the two non-base slices of the same call also differ from each other
    assert abs(_agreement(base[0, 1], base[1, 0]) - 0.5) < 0.03


def test_mask_batch_head_not_aliased():
    """(b, h) are packed as (b << 16) | h: (0, 1) and (1, 0) must not alias."""
    t = drop_threshold(0.5)
    m = dropout_mask_numpy(2, 2, 32, 32, threshold=t, seed=7, offset=3)
    assert not np.array_equal(m[0, 1], m[1, 0])
    assert not np.array_equal(m[0, 0], m[1, 1])


# --------------------------------------------------------------------------- #
# Threshold and statistics
# --------------------------------------------------------------------------- #


def test_drop_threshold_and_keep_probability():
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.5) == 32768
    assert drop_threshold(0.1) == 6554  # 6553.6 rounds up
    assert drop_threshold(0.17) == 11141  # 11141.12 rounds down
    assert drop_threshold(3 / 65536) == 3
    assert drop_threshold(65535 / 65536) == 65535
    for t in (0, 1, 6554, 32768, 65535):
        assert keep_probability(t) == (65536 - t) / 65536
    assert keep_probability(0) == 1.0
    assert keep_probability(65535) == 1 / 65536


@pytest.mark.parametrize("p", [1.0, 0.99999, 0.999995, 1 - 1e-9])
def test_drop_threshold_too_close_to_one(p):
    if round(p * 65536) < 65536:  # 0.99999 -> 65535.3 -> kept
        assert drop_threshold(p) == 65535
        return
    with pytest.raises(ValueError, match="dropout_p"):
        drop_threshold(p)


@pytest.mark.parametrize("p", [0.1, 0.17, 0.5, 0.9])
def test_kept_fraction(p):
    t = drop_threshold(p)
    m = dropout_mask_numpy(2, 2, 1024, 1000, threshold=t, seed=SEED64, offset=OFFSET)  # ~4.1M elements
    frac = float(m.mean())
    kp = keep_probability(t)
    print(f"p={p}: threshold {t}, kept {frac:.5f}, keep_probability {kp:.5f}")
    assert abs(frac - kp) < 0.003
    assert abs(kp - (1 - p)) <= 0.5 / 65536 + 1e-15


def test_kept_fraction_per_block_position():
    """Each of the 256 (i & 15, j & 15) positions, i.e. each (lane, word, half) slot, is uniform."""
    t = drop_threshold(0.5)
    m = dropout_mask_numpy(1, 4, 512, 512, threshold=t, seed=SEED64, offset=OFFSET)  # 4096 samples/pos
    per_pos = m.reshape(4, 32, 16, 32, 16).mean(axis=(0, 1, 3))
    worst = float(np.abs(per_pos - 0.5).max())
    print(f"worst per-position kept fraction deviation: {worst:.4f}")
    assert worst < 0.04  # sd ~0.008 per position


def test_p_zero_keeps_everything():
    m = dropout_mask_numpy(2, 3, 33, 17, threshold=0, seed=SEED64, offset=OFFSET)
    assert m.all()
    m2 = cuflash.dropout_mask(2, 3, 33, 17, dropout_p=0.0, seed=1, offset=2, xp=np)
    assert m2.dtype == np.bool_ and m2.shape == (2, 3, 33, 17) and m2.all()


# --------------------------------------------------------------------------- #
# cuflash.dropout_mask (public)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("p", [0.0, 0.1, 0.17, 0.5, 0.9])
def test_public_dropout_mask_equals_numpy_twin(p):
    got = cuflash.dropout_mask(2, 3, 17, 33, dropout_p=p, seed=SEED64, offset=OFFSET, xp=np)
    want = dropout_mask_numpy(2, 3, 17, 33, threshold=drop_threshold(p), seed=SEED64, offset=OFFSET)
    assert isinstance(got, np.ndarray) and got.dtype == np.bool_ and got.shape == (2, 3, 17, 33)
    np.testing.assert_array_equal(got, want)


def test_public_dropout_mask_accepts_numpy_ints():
    got = cuflash.dropout_mask(
        np.int64(1), np.int32(2), np.int16(9), np.uint8(20),
        dropout_p=np.float32(0.5), seed=np.uint64(SEED64), offset=np.uint32(OFFSET), xp=np,
    )
    want = dropout_mask_numpy(1, 2, 9, 20, threshold=32768, seed=SEED64, offset=OFFSET)
    np.testing.assert_array_equal(got, want)


def test_public_dropout_mask_default_xp_without_gpu():
    if cuflash.gpu_available():
        pytest.skip("a GPU is present: default xp is cupy")
    got = cuflash.dropout_mask(1, 1, 5, 5, dropout_p=0.5, seed=1, offset=2)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, dropout_mask_numpy(1, 1, 5, 5, threshold=32768, seed=1, offset=2))


_GOOD = dict(batch=1, nheads=1, seqlen_q=4, seqlen_k=4)


def _call(**over):
    sizes = {k: over.pop(k, v) for k, v in _GOOD.items()}
    kw = dict(dropout_p=0.5, seed=1, offset=0, xp=np)
    kw.update(over)
    return cuflash.dropout_mask(sizes["batch"], sizes["nheads"], sizes["seqlen_q"], sizes["seqlen_k"], **kw)


@pytest.mark.parametrize(
    "over,exc,word",
    [
        (dict(batch=2.0), TypeError, "batch"),
        (dict(nheads="2"), TypeError, "nheads"),
        (dict(seqlen_q=True), TypeError, "seqlen_q"),
        (dict(seqlen_k=None), TypeError, "seqlen_k"),
        (dict(batch=0), ValueError, "batch"),
        (dict(nheads=0), ValueError, "nheads"),
        (dict(seqlen_q=0), ValueError, "seqlen_q"),
        (dict(seqlen_k=-3), ValueError, "seqlen_k"),
        (dict(seqlen_k=1 << 31), ValueError, "seqlen_k"),
        (dict(batch=1 << 16), ValueError, "batch"),
        (dict(nheads=1 << 16), ValueError, "heads"),
        (dict(seed=None), TypeError, "seed"),
        (dict(offset=None), TypeError, "offset"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=1 << 64), ValueError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
        (dict(offset=1 << 32), ValueError, "offset"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(xp="numpy"), TypeError, "xp"),
        (dict(xp=math), TypeError, "xp"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=0.999995), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(dropout_p=float("nan")), ValueError, "dropout_p"),
        (dict(dropout_p="0.1"), TypeError, "dropout_p"),
        (dict(dropout_p=True), TypeError, "dropout_p"),
    ],
)
def test_public_dropout_mask_bad_arguments(over, exc, word):
    with pytest.raises(exc) as ei:
        _call(**over)
    print(f"{over}: {ei.type.__name__}: {ei.value}")
    assert word in str(ei.value)


def test_public_dropout_mask_missing_seed_and_offset():
    with pytest.raises(TypeError, match="seed"):
        cuflash.dropout_mask(1, 1, 4, 4, dropout_p=0.5, offset=0, xp=np)
    with pytest.raises(TypeError, match="offset"):
        cuflash.dropout_mask(1, 1, 4, 4, dropout_p=0.5, seed=0, xp=np)


def test_mask_constants():
    assert cmask.MAX_BATCH == 1 << 16 and cmask.MAX_HEADS == 1 << 16
    assert cmask.MAX_OFFSET == 1 << 32 and cmask.MAX_SEQLEN_K == 1 << 31
    assert cmask.DROPOUT_BITS == 16
