"""Tests of cuflash.rng, the NumPy twin of curand's Philox4x32-10 (no GPU needed).

Layers checked:
* Random123 known-answer vectors of the raw block function;
* a slow pure-Python scalar model of curandStatePhilox4_32_10_t written
  line by line from curand_kernel.h / curand_philox4x32_x.h, compared
  against the vectorized implementation (random and edge-value draws);
* structural consistency (offsets, counts, broadcasting, 32/64-bit carries);
* bit-for-bit comparison against vectors produced by curand on a GPU
  (tests/data/curand_philox_vectors.json; skipped until that file exists).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from cuflash import rng
from cuflash.rng import (
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_W0,
    PHILOX_W1,
    curand_philox4,
    curand_vector_cases,
    philox4x32_10,
)

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
VECTORS_PATH = Path(__file__).parent / "data" / "curand_philox_vectors.json"


# ---------------------------------------------------------------------------
# Slow scalar reference model, transcribed from the curand headers.
# ---------------------------------------------------------------------------
def ref_mulhilo32(a: int, b: int) -> tuple[int, int]:
    """mulhilo32: returns (lo, hi) of the 64-bit product a*b."""
    product = a * b
    return product & M32, (product >> 32) & M32


def ref_round(ctr: list[int], key: list[int]) -> list[int]:
    """_philox4x32round."""
    lo0, hi0 = ref_mulhilo32(0xD2511F53, ctr[0])
    lo1, hi1 = ref_mulhilo32(0xCD9E8D57, ctr[2])
    return [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0]


def ref_philox(ctr: list[int], key: list[int]) -> list[int]:
    """curand_Philox4x32_10: 10 rounds, key bumped between rounds."""
    c, k = list(ctr), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
        c = ref_round(c, k)
    return c


@dataclass
class RefState:
    """curandStatePhilox4_32_10 (without the Box-Muller fields)."""

    ctr: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    output: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    key: list[int] = field(default_factory=lambda: [0, 0])
    STATE: int = 0


def ref_incr_n(s: RefState, n: int) -> None:
    """Philox_State_Incr(s, n), with its exact (quirky) carry logic."""
    nlo = n & M32
    nhi = (n >> 32) & M32
    s.ctr[0] = (s.ctr[0] + nlo) & M32
    if s.ctr[0] < nlo:
        nhi = (nhi + 1) & M32
    s.ctr[1] = (s.ctr[1] + nhi) & M32
    if nhi <= s.ctr[1]:
        return
    s.ctr[2] = (s.ctr[2] + 1) & M32
    if s.ctr[2]:
        return
    s.ctr[3] = (s.ctr[3] + 1) & M32


def ref_incr_hi(s: RefState, n: int) -> None:
    """Philox_State_Incr_hi(s, n)."""
    nlo = n & M32
    nhi = (n >> 32) & M32
    s.ctr[2] = (s.ctr[2] + nlo) & M32
    if s.ctr[2] < nlo:
        nhi = (nhi + 1) & M32
    s.ctr[3] = (s.ctr[3] + nhi) & M32


def ref_incr1(s: RefState) -> None:
    """Philox_State_Incr(s): 128-bit +1."""
    for i in range(4):
        s.ctr[i] = (s.ctr[i] + 1) & M32
        if s.ctr[i]:
            return


def ref_skipahead(n: int, s: RefState) -> None:
    """skipahead(n, state)."""
    s.STATE += n & 3
    n //= 4
    if s.STATE > 3:
        n += 1
        s.STATE -= 4
    ref_incr_n(s, n)
    s.output = ref_philox(s.ctr, s.key)


def ref_skipahead_sequence(n: int, s: RefState) -> None:
    """skipahead_sequence(n, state)."""
    ref_incr_hi(s, n)
    s.output = ref_philox(s.ctr, s.key)


def ref_curand_init(seed: int, subsequence: int, offset: int) -> RefState:
    """curand_init(seed, subsequence, offset, &state)."""
    s = RefState()
    s.key = [seed & M32, (seed >> 32) & M32]
    s.STATE = 0
    ref_skipahead_sequence(subsequence, s)
    ref_skipahead(offset, s)
    return s


def ref_curand(s: RefState) -> int:
    """curand(state): one 32-bit word."""
    ret = s.output[s.STATE]
    s.STATE += 1
    if s.STATE == 4:
        ref_incr1(s)
        s.output = ref_philox(s.ctr, s.key)
        s.STATE = 0
    return ret


def ref_curand4(s: RefState) -> list[int]:
    """curand4(state): four 32-bit words."""
    tmp = list(s.output)
    ref_incr1(s)
    s.output = ref_philox(s.ctr, s.key)
    out = s.output
    if s.STATE == 0:
        return tmp
    if s.STATE == 1:
        return [tmp[1], tmp[2], tmp[3], out[0]]
    if s.STATE == 2:
        return [tmp[2], tmp[3], out[0], out[1]]
    return [tmp[3], out[0], out[1], out[2]]


def ref_curand_philox4(seed: int, subsequence: int, offset: int, count: int) -> np.ndarray:
    """Scalar model of curand_philox4: (count, 4) uint32."""
    s = ref_curand_init(seed, subsequence, offset)
    return np.array([ref_curand4(s) for _ in range(count)], dtype=np.uint32)


def u32(*words: int) -> np.ndarray:
    return np.array(words, dtype=np.uint32)


EDGE64 = [
    0, 1, 2, 3, 4, 5, 7, 8,
    M32 - 1, M32, 1 << 32, (1 << 32) + 1,
    (1 << 34) - 4, (1 << 34) - 1, 1 << 34, (1 << 34) + 3,
    (1 << 32) * 4 - 1, 1 << 62, (1 << 63) - 1, 1 << 63, M64 - 4, M64 - 1, M64,
]


def random_u64(r: random.Random) -> int:
    """Random 64-bit value, biased towards edge cases and carry boundaries."""
    kind = r.randrange(5)
    if kind == 0:
        return r.choice(EDGE64)
    if kind == 1:
        return r.getrandbits(64)
    if kind == 2:
        return r.getrandbits(32)
    if kind == 3:
        return r.randrange(64)
    return (r.choice([1 << 32, 1 << 34, 1 << 64]) + r.randrange(-8, 8)) & M64


# ---------------------------------------------------------------------------
# Block function
# ---------------------------------------------------------------------------
def test_constants() -> None:
    assert PHILOX_M0 == 0xD2511F53
    assert PHILOX_M1 == 0xCD9E8D57
    assert PHILOX_W0 == 0x9E3779B9
    assert PHILOX_W1 == 0xBB67AE85


# Random123 kat_vectors, "philox4x32 10" lines: counter[4], key[2] -> output[4].
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_kat(counter, key, expected) -> None:
    out = philox4x32_10(u32(*counter), u32(*key))
    assert out.dtype == np.uint32 and out.shape == (4,)
    assert out.tolist() == list(expected)
    assert ref_philox(list(counter), list(key)) == list(expected)


def test_philox_kat_batched() -> None:
    ctr = np.array([c for c, _, _ in KAT], dtype=np.uint32)
    key = np.array([k for _, k, _ in KAT], dtype=np.uint32)
    exp = np.array([e for _, _, e in KAT], dtype=np.uint32)
    np.testing.assert_array_equal(philox4x32_10(ctr, key), exp)


def test_philox_matches_scalar_reference() -> None:
    g = np.random.default_rng(1)
    ctr = g.integers(0, 1 << 32, size=(200, 4), dtype=np.uint32)
    key = g.integers(0, 1 << 32, size=(200, 2), dtype=np.uint32)
    out = philox4x32_10(ctr, key)
    for c, k, o in zip(ctr.tolist(), key.tolist(), out.tolist()):
        assert o == ref_philox(c, k)


def test_philox_broadcasting_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    g = np.random.default_rng(2)
    ctr = g.integers(0, 1 << 32, size=(3, 1, 5, 4), dtype=np.uint32)
    key = g.integers(0, 1 << 32, size=(7, 1, 2), dtype=np.uint32)
    full = philox4x32_10(ctr, key)
    assert full.shape == (3, 7, 5, 4) and full.dtype == np.uint32
    for i, j, k in np.ndindex(3, 7, 5):
        assert full[i, j, k].tolist() == ref_philox(ctr[i, 0, k].tolist(), key[j, 0].tolist())
    # Small chunks (with a ragged last chunk) give the same answer.
    monkeypatch.setattr(rng, "_CHUNK_BLOCKS", 8)
    np.testing.assert_array_equal(philox4x32_10(ctr, key), full)
    # A single key broadcast against many counters.
    k0 = key[0, 0]
    np.testing.assert_array_equal(
        philox4x32_10(ctr, k0), philox4x32_10(ctr, np.broadcast_to(k0, (3, 1, 5, 2)).copy())
    )


def test_philox_input_validation() -> None:
    with pytest.raises(ValueError):
        philox4x32_10(u32(0, 0, 0), u32(0, 0))
    with pytest.raises(ValueError):
        philox4x32_10(u32(0, 0, 0, 0), u32(0))
    with pytest.raises(TypeError):
        philox4x32_10(np.zeros(4), u32(0, 0))
    with pytest.raises(ValueError):
        philox4x32_10(np.array([0, 0, 0, -1]), u32(0, 0))
    # Wider integer dtypes are fine when the values fit.
    assert philox4x32_10(np.array([0, 0, 0, 0], dtype=np.int64), [0, 0]).tolist() == list(KAT[0][2])
    assert philox4x32_10(np.zeros((0, 4), np.uint32), u32(0, 0)).shape == (0, 4)


# ---------------------------------------------------------------------------
# Scalar reference model self-checks (curand / curand4 relations)
# ---------------------------------------------------------------------------
def test_reference_curand4_equals_four_curand_calls() -> None:
    r = random.Random(3)
    for _ in range(50):
        seed, sub, off = random_u64(r), random_u64(r), random_u64(r)
        a = ref_curand_init(seed, sub, off)
        b = ref_curand_init(seed, sub, off)
        for _ in range(3):
            assert ref_curand4(a) == [ref_curand(b) for _ in range(4)]


# ---------------------------------------------------------------------------
# curand_philox4 vs. the scalar model
# ---------------------------------------------------------------------------
def test_matches_reference_random_draws() -> None:
    r = random.Random(12345)
    for _ in range(400):
        seed, sub, off = random_u64(r), random_u64(r), random_u64(r)
        count = r.randint(1, 6)
        got = curand_philox4(seed, sub, off, count)
        assert got.shape == (count, 4) and got.dtype == np.uint32
        np.testing.assert_array_equal(
            got, ref_curand_philox4(seed, sub, off, count), err_msg=f"{(seed, sub, off, count)}"
        )


def test_matches_reference_edge_grid() -> None:
    edges = [0, 1, 3, 4, 5, M32, 1 << 32, (1 << 34) - 1, (1 << 34) + 3, 1 << 63, M64]
    for seed in (0, M32, 1 << 32, M64):
        subs = [a for a in edges for _ in edges]
        offs = [b for _ in edges for b in edges]
        # One vectorized call (per-element STATE and counters) vs. scalar calls.
        got = curand_philox4(
            seed, np.array(subs, dtype=np.uint64), np.array(offs, dtype=np.uint64), 3
        )
        assert got.shape == (len(subs), 3, 4)
        for i in range(len(subs)):
            exp = ref_curand_philox4(seed, subs[i], offs[i], 3)
            np.testing.assert_array_equal(got[i], exp)


def test_batched_random_draws_match_reference() -> None:
    r = random.Random(777)
    n = 300
    seed = [random_u64(r) for _ in range(n)]
    sub = [random_u64(r) for _ in range(n)]
    off = [random_u64(r) for _ in range(n)]
    got = curand_philox4(
        np.array(seed, dtype=np.uint64), np.array(sub, dtype=np.uint64), np.array(off, dtype=np.uint64), 4
    )
    assert got.shape == (n, 4, 4)
    for i in range(n):
        np.testing.assert_array_equal(got[i], ref_curand_philox4(seed[i], sub[i], off[i], 4))


# ---------------------------------------------------------------------------
# Structural consistency
# ---------------------------------------------------------------------------
def _counter(n: int, sub: int) -> np.ndarray:
    return u32(n & M32, n >> 32, sub & M32, sub >> 32)


def _key(seed: int) -> np.ndarray:
    return u32(seed & M32, seed >> 32)


@pytest.mark.parametrize("seed", [0, 7, M32, 1 << 32, 0x0123456789ABCDEF, M64])
@pytest.mark.parametrize("sub", [0, 1, M32, 1 << 32, 1 << 63, M64])
@pytest.mark.parametrize("n", [0, 1, M32, 1 << 32, (1 << 62) - 1])
def test_aligned_offset_is_block_function(seed: int, sub: int, n: int) -> None:
    got = curand_philox4(seed, sub, 4 * n)
    assert got.shape == (1, 4)
    np.testing.assert_array_equal(got[0], philox4x32_10(_counter(n, sub), _key(seed)))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4, 6, (1 << 34) - 5, 12345678901, M64 - 20])
def test_count_equals_offset_steps(offset: int) -> None:
    seed, sub, count = 0xFEEDFACE12345678, 99, 5
    got = curand_philox4(seed, sub, offset, count)
    for k in range(count):
        np.testing.assert_array_equal(got[k], curand_philox4(seed, sub, offset + 4 * k)[0])


@pytest.mark.parametrize("base_n", [0, 10, (1 << 32) - 2, (1 << 62) - 3])
def test_unaligned_offset_is_shifted_window(base_n: int) -> None:
    seed, sub, count = 0xABCDEF, (1 << 32) + 5, 3
    blocks = np.stack([philox4x32_10(_counter(base_n + j, sub), _key(seed)) for j in range(count + 1)])
    stream = blocks.reshape(-1)
    for s in range(4):
        got = curand_philox4(seed, sub, 4 * base_n + s, count)
        np.testing.assert_array_equal(got.reshape(-1), stream[s : s + 4 * count])


def test_carry_across_32bit_counter_boundary() -> None:
    # n = offset/4 crosses 2**32 during the calls: counter x wraps, y increments.
    seed, sub = 5, 17
    got = curand_philox4(seed, sub, (1 << 34) - 8 + 1, 4)
    stream = np.concatenate(
        [philox4x32_10(_counter((1 << 32) - 2 + j, sub), _key(seed)) for j in range(5)]
    )
    np.testing.assert_array_equal(got.reshape(-1), stream[1:17])
    assert _counter((1 << 32) - 2 + 2, sub).tolist() == [0, 1, 17, 0]


@pytest.mark.parametrize("sub", [M32 - 1, M32, 1 << 32, (1 << 64) - 2, M64])
def test_subsequence_words(sub: int) -> None:
    # skipahead_sequence puts the subsequence in counter words (z, w).
    got = curand_philox4(3, sub, 9, 2)
    stream = np.concatenate([philox4x32_10(_counter(2 + j, sub), _key(3)) for j in range(3)])
    np.testing.assert_array_equal(got.reshape(-1), stream[1:9])


def test_full_64bit_values() -> None:
    got = curand_philox4(M64, M64, M64, 2)
    # offset 2**64-1: n = 2**62-1, STATE = 3.
    n = (1 << 62) - 1
    stream = np.concatenate([philox4x32_10(_counter(n + j, M64), u32(M32, M32)) for j in range(3)])
    np.testing.assert_array_equal(got.reshape(-1), stream[3:11])
    np.testing.assert_array_equal(got, ref_curand_philox4(M64, M64, M64, 2))
    # Seeds differing only in the high word give different streams.
    assert not np.array_equal(curand_philox4(1, 0, 0), curand_philox4(1 + (1 << 32), 0, 0))


def test_broadcasting_shapes() -> None:
    seed = np.array([[1], [1 << 40]], dtype=np.uint64)  # (2, 1)
    sub = [0, 1, M64]  # (3,) -- a list with an element > int64 max
    offset = np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.int64)[:, None, None]  # (7, 1, 1)
    got = curand_philox4(seed, sub, offset, 2)
    assert got.shape == (7, 2, 3, 2, 4)
    for i, j, k in np.ndindex(7, 2, 3):
        exp = curand_philox4(int(seed[j, 0]), sub[k], int(offset[i, 0, 0]), 2)
        np.testing.assert_array_equal(got[i, j, k], exp)
    assert curand_philox4(np.array(5), 0, 0, 3).shape == (3, 4)
    assert curand_philox4(np.zeros((0, 2), np.uint64), 0, 0).shape == (0, 2, 1, 4)


def test_numpy_integer_scalars_and_dtypes() -> None:
    exp = curand_philox4(123, 4, 7, 2)
    for t in (np.uint64, np.int64, np.uint32, np.int32, np.uint8):
        np.testing.assert_array_equal(curand_philox4(t(123), t(4), t(7), np.int64(2)), exp)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = np.array([1, 2, 2, M64], dtype=np.uint64)
    offs = np.array([0, 1, 6, M64], dtype=np.uint64)
    full = curand_philox4(seeds, 3, offs, 11)
    single = curand_philox4(9, 3, 2, 11)
    monkeypatch.setattr(rng, "_CHUNK_BLOCKS", 5)
    np.testing.assert_array_equal(curand_philox4(seeds, 3, offs, 11), full)
    np.testing.assert_array_equal(curand_philox4(9, 3, 2, 11), single)


# ---------------------------------------------------------------------------
# Internal carry helpers vs. the header's code (states curand_init cannot reach)
# ---------------------------------------------------------------------------
def _ref_state(ctr: list[int]) -> RefState:
    return RefState(ctr=list(ctr))


def _vec_ctr(ctr: list[int]) -> list[np.ndarray]:
    return [np.array([v], dtype=np.uint32) for v in ctr]


INCR_CASES = [
    ([M32, 0, 0, 0], (M32 << 32) | 1),  # nhi++ wraps to 0: carry into z is lost (quirk)
    ([M32, M32, M32, 0], 1),
    ([M32, M32, M32, M32], 1),
    ([0, 5, 0, 0], M32 << 32),
    ([0, M32, 7, 0], 1 << 32),
    ([0, 0, M32, 3], M64),
    ([123, 456, 789, 1011], 0),
    ([M32 - 2, 2, M32, M32], M64 - 5),
]


@pytest.mark.parametrize("ctr,n", INCR_CASES)
def test_state_incr_exact_carry_code(ctr: list[int], n: int) -> None:
    s = _ref_state(ctr)
    ref_incr_n(s, n)
    v = _vec_ctr(ctr)
    rng._state_incr(v, np.array([n], dtype=np.uint64))
    assert [int(a[0]) for a in v] == s.ctr


def test_state_incr_quirk_is_replicated() -> None:
    # x = 2**32-1, n = 0xFFFFFFFF_00000001: the true 64-bit sum would carry into
    # z, but curand's nhi++ wraps to 0 and "nhi <= y" returns early.
    v = _vec_ctr([M32, 0, 0, 0])
    rng._state_incr(v, np.array([(M32 << 32) | 1], dtype=np.uint64))
    assert [int(a[0]) for a in v] == [0, 0, 0, 0]


@pytest.mark.parametrize("ctr,n", INCR_CASES)
def test_state_incr_hi_exact_carry_code(ctr: list[int], n: int) -> None:
    s = _ref_state(ctr)
    ref_incr_hi(s, n)
    v = _vec_ctr(ctr)
    rng._state_incr_hi(v, np.array([n], dtype=np.uint64))
    assert [int(a[0]) for a in v] == s.ctr


@pytest.mark.parametrize(
    "ctr", [[M32 - 1, M32, M32, M32], [M32, M32, 0, 0], [M32, M32, M32, 4], [5, 0, 0, 0]]
)
def test_stream_128bit_increment(ctr: list[int]) -> None:
    # _curand_stream adds j to the 128-bit counter: same as j x Philox_State_Incr(s).
    key = (np.array([0xDEADBEEF], np.uint32), np.array([0x12345678], np.uint32))
    got = rng._curand_stream(_vec_ctr(ctr), key, 4)
    s = RefState(ctr=list(ctr), key=[0xDEADBEEF, 0x12345678])
    for j in range(4):
        assert got[0, j].tolist() == ref_philox(s.ctr, s.key)
        ref_incr1(s)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,pos", [("seed", 0), ("subsequence", 1), ("offset", 2)])
@pytest.mark.parametrize("bad", [-1, 1 << 64, np.array([0, -3]), [1, 1 << 64]])
def test_out_of_range_raises_value_error(name: str, pos: int, bad) -> None:
    args = [0, 0, 0]
    args[pos] = bad
    with pytest.raises(ValueError, match=name):
        curand_philox4(*args)


@pytest.mark.parametrize("name,pos", [("seed", 0), ("subsequence", 1), ("offset", 2)])
@pytest.mark.parametrize("bad", [1.0, "3", np.array([1.5]), True, None, [1, 2.5]])
def test_non_integer_raises_type_error(name: str, pos: int, bad) -> None:
    args = [0, 0, 0]
    args[pos] = bad
    with pytest.raises(TypeError, match=name):
        curand_philox4(*args)


def test_count_validation() -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="count"):
            curand_philox4(0, 0, 0, bad)
    for bad in (1.0, "2", True):
        with pytest.raises(TypeError, match="count"):
            curand_philox4(0, 0, 0, bad)


def test_incompatible_shapes_raise() -> None:
    with pytest.raises(ValueError):
        curand_philox4(np.zeros(2, np.uint64), np.zeros(3, np.uint64), 0)


# ---------------------------------------------------------------------------
# GPU reference vectors
# ---------------------------------------------------------------------------
def test_vector_cases_spec() -> None:
    cases = curand_vector_cases()
    assert cases == curand_vector_cases()  # deterministic
    assert 35 <= len(cases) <= 45
    assert len(set(cases)) == len(cases)
    for case in cases:
        assert len(case) == 4 and all(type(v) is int for v in case)
        seed, sub, off, count = case
        assert 0 <= seed <= M64 and 0 <= sub <= M64 and 0 <= off <= M64
        assert 1 <= count <= 5
    subs = {c[1] for c in cases}
    offs = {c[2] for c in cases}
    seeds = {c[0] for c in cases}
    assert {0, 1, M32, 1 << 32, 1 << 63, M64} <= subs
    assert {0, 1, 2, 3, 4, 5, (1 << 32) * 4 - 1, (1 << 34) + 3, M64} <= offs
    assert {0, M64} <= seeds and any(s > M32 for s in seeds)
    assert {c[3] for c in cases} == {1, 2, 3, 4, 5}
    # Each case also agrees with the scalar header model.
    for seed, sub, off, count in cases:
        np.testing.assert_array_equal(
            curand_philox4(seed, sub, off, count), ref_curand_philox4(seed, sub, off, count)
        )


def test_matches_curand_gpu_vectors() -> None:
    if not VECTORS_PATH.exists():
        pytest.skip(
            f"{VECTORS_PATH.relative_to(VECTORS_PATH.parents[2])} not generated yet "
            "(produced on a GPU from rng.curand_vector_cases())"
        )
    data = json.loads(VECTORS_PATH.read_text())
    assert "Philox4_32_10" in data["generator"]
    cases = data["cases"]
    assert cases, "vector file has no cases"
    for case in cases:
        seed, sub, off, count = (int(case[k]) for k in ("seed", "subsequence", "offset", "count"))
        expected = np.array(case["words"], dtype=np.uint32)
        assert expected.shape == (count, 4), f"malformed case {case}"
        got = curand_philox4(seed, sub, off, count)
        np.testing.assert_array_equal(
            got, expected, err_msg=f"seed={seed} subsequence={sub} offset={off} count={count}"
        )
