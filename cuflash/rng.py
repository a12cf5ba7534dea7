"""NumPy twin of curand's Philox4x32-10 generator, bit-identical to curand.

This module reproduces on the host, with vectorized NumPy code, exactly the
32-bit words that the CUDA device API (``curand_kernel.h`` /
``curand_philox4x32_x.h``) returns for a ``curandStatePhilox4_32_10_t``.  It is
used to rebuild dropout masks on the CPU (tests, reference implementations) that
match what a kernel calling ``curand_init`` + ``curand4`` produced.

curand semantics replicated here
--------------------------------
State: a 128-bit counter ``ctr = (x, y, z, w)`` (``x`` least significant), a
64-bit key ``key = (seed & 0xFFFFFFFF, seed >> 32)``, a word index ``STATE`` in
``0..3`` and a cached block ``output = philox(ctr, key)``.

``curand_init(seed, subsequence, offset)``:

1. ``ctr = 0``, ``key = seed``, ``STATE = 0``.
2. ``skipahead_sequence(subsequence)`` -> ``Philox_State_Incr_hi``: adds the
   64-bit ``subsequence`` into the high half ``(z, w)`` (carry from ``z`` into
   ``w``; the carry out of ``w`` is dropped).
3. ``skipahead(offset)``: ``STATE += offset & 3``; ``n = offset / 4``; if
   ``STATE > 3`` then ``n += 1`` and ``STATE -= 4``; then
   ``Philox_State_Incr(state, n)`` adds the 64-bit ``n`` into ``(x, y)`` with
   curand's own carry code::

       x += nlo;  if (x < nlo) nhi++;        // nhi++ may wrap to 0
       y += nhi;  if (nhi <= y) return;      // "no carry" test
       if (++z) return;  ++w;

   Finally ``output = philox(ctr, key)``.

So after ``curand_init`` the counter is ``(n_lo, n_hi, sub_lo, sub_hi)`` with
``n = offset >> 2`` and ``STATE = offset & 3`` (the ``n += 1`` branch and the
``nhi`` wrap-around quirk can never trigger from ``curand_init`` because
``STATE`` starts at 0 and ``n < 2**62``; they are still replicated verbatim).

``curand4()``: ``tmp = output``; ``Philox_State_Incr(state)`` (128-bit ``+1``
of the counter, wrapping at ``2**128``); ``output = philox(ctr, key)``; return
``tmp`` shifted by ``STATE`` words and completed from the new ``output``:
``STATE == 0 -> tmp``, ``1 -> (tmp.y, tmp.z, tmp.w, out.x)``,
``2 -> (tmp.z, tmp.w, out.x, out.y)``, ``3 -> (tmp.w, out.x, out.y, out.z)``.
``STATE`` is not modified.  Equivalently, if ``B_j = philox(C + j, key)`` is
the stream of blocks starting at the post-init counter ``C`` and ``W`` is the
concatenation of their words, call ``k`` returns ``W[4k + STATE : 4k + STATE + 4]``.

``philox(ctr, key)`` is 10 rounds of::

    lo0, hi0 = lo/hi(PHILOX_M0 * x);  lo1, hi1 = lo/hi(PHILOX_M1 * z)
    (x, y, z, w) = (hi1 ^ y ^ key.x, lo1, hi0 ^ w ^ key.y, lo0)

with the key bumped by ``(PHILOX_W0, PHILOX_W1)`` (mod ``2**32``) between
rounds.  This is the Random123 Philox4x32-10 block function, word for word.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

__all__ = [
    "PHILOX_M0",
    "PHILOX_M1",
    "PHILOX_W0",
    "PHILOX_W1",
    "philox4x32_10",
    "curand_philox4",
    "curand_vector_cases",
]

#: Multiplier applied to counter word x in each round (``PHILOX_M4x32_0``).
PHILOX_M0: int = 0xD2511F53
#: Multiplier applied to counter word z in each round (``PHILOX_M4x32_1``).
PHILOX_M1: int = 0xCD9E8D57
#: Weyl increment of key word x between rounds (``PHILOX_W32_0``).
PHILOX_W0: int = 0x9E3779B9
#: Weyl increment of key word y between rounds (``PHILOX_W32_1``).
PHILOX_W1: int = 0xBB67AE85

_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Number of Philox blocks processed per chunk: keeps the working set (four
# uint32 words + two uint64 products per block, ~32 B/block) cache friendly and
# bounds temporary memory independently of the problem size.
_CHUNK_BLOCKS = 1 << 16

_U32 = np.uint32
_U64 = np.uint64
_M0_U64 = np.uint64(PHILOX_M0)
_M1_U64 = np.uint64(PHILOX_M1)
_W0_U32 = np.uint32(PHILOX_W0)
_W1_U32 = np.uint32(PHILOX_W1)
_SHIFT32 = np.uint64(32)


# --------------------------------------------------------------------------
# Block function
# --------------------------------------------------------------------------
def _philox_rounds(
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    w: np.ndarray,
    kx: np.ndarray | int,
    ky: np.ndarray | int,
    p0: np.ndarray,
    p1: np.ndarray,
) -> None:
    """Run the 10 Philox rounds in place.

    Args:
        x, y, z, w: contiguous uint32 arrays of shape (n,), the counter words;
            overwritten with the output block.
        kx, ky: key words, either Python ints in [0, 2**32) (one key for all
            blocks) or uint32 arrays of shape (n,) (one key per block; these
            arrays are modified in place).
        p0, p1: uint64 scratch arrays of shape (n,).
    """
    scalar_key = isinstance(kx, int)
    for r in range(_ROUNDS):
        if r:
            if scalar_key:
                kx = (kx + PHILOX_W0) & _MASK32
                ky = (ky + PHILOX_W1) & _MASK32
            else:
                np.add(kx, _W0_U32, out=kx)
                np.add(ky, _W1_U32, out=ky)
        kx_r = _U32(kx) if scalar_key else kx
        ky_r = _U32(ky) if scalar_key else ky
        # 32x32 -> 64-bit products (lo0, hi0) = M0 * x, (lo1, hi1) = M1 * z.
        np.multiply(x, _M0_U64, out=p0)
        np.multiply(z, _M1_U64, out=p1)
        # x' = hi1 ^ y ^ key.x   (old x no longer needed)
        np.right_shift(p1, _SHIFT32, out=x, casting="unsafe")
        np.bitwise_xor(x, y, out=x)
        np.bitwise_xor(x, kx_r, out=x)
        # y' = lo1  (uint64 -> uint32 cast truncates modulo 2**32)
        np.copyto(y, p1, casting="unsafe")
        # z' = hi0 ^ w ^ key.y
        np.right_shift(p0, _SHIFT32, out=z, casting="unsafe")
        np.bitwise_xor(z, w, out=z)
        np.bitwise_xor(z, ky_r, out=z)
        # w' = lo0
        np.copyto(w, p0, casting="unsafe")


class _ChunkWorkspace:
    """Reusable per-chunk buffers (four uint32 words, two uint64 products)."""

    def __init__(self, n: int) -> None:
        self.words = [np.empty(n, dtype=_U32) for _ in range(4)]
        self.p = [np.empty(n, dtype=_U64) for _ in range(2)]

    def view(self, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Return the first ``n`` entries of every buffer."""
        return [b[:n] for b in self.words], [b[:n] for b in self.p]


def _as_uint32_words(a: Any, nwords: int, name: str) -> np.ndarray:
    """Validate ``a`` as an array (..., nwords) of values in [0, 2**32)."""
    arr = np.asarray(a)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] != nwords:
        raise ValueError(f"{name} must have shape (..., {nwords}), got {arr.shape}")
    if arr.dtype != _U32:
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _MASK32):
            raise ValueError(f"{name} values must be in [0, 2**32)")
        arr = arr.astype(_U32)
    return arr


def philox4x32_10(counter: Any, key: Any) -> np.ndarray:
    """Philox4x32-10 block function (Random123 / curand ``curand_Philox4x32_10``).

    Args:
        counter: uint32 array of shape (..., 4), words ``[x, y, z, w]``
            (``x`` least significant word of the 128-bit counter).
        key: uint32 array of shape (..., 2), words ``[x, y]`` (for curand:
            ``[seed & 0xFFFFFFFF, seed >> 32]``).

    The leading dimensions of ``counter`` and ``key`` are broadcast together.
    Other integer dtypes are accepted if every value fits in 32 bits.

    Returns:
        uint32 array of shape (*broadcast(counter.shape[:-1], key.shape[:-1]), 4).
    """
    ctr = _as_uint32_words(counter, 4, "counter")
    k = _as_uint32_words(key, 2, "key")
    lead = np.broadcast_shapes(ctr.shape[:-1], k.shape[:-1])
    n = int(np.prod(lead, dtype=np.int64))
    out = np.empty((n, 4), dtype=_U32)
    if n == 0:
        return out.reshape(*lead, 4)

    ctr_flat = np.broadcast_to(ctr, (*lead, 4)).reshape(n, 4)
    single_key = k.size == 2
    if single_key:
        key_x, key_y = int(k.reshape(2)[0]), int(k.reshape(2)[1])
        key_flat = None
    else:
        key_flat = np.broadcast_to(k, (*lead, 2)).reshape(n, 2)

    ws = _ChunkWorkspace(min(n, _CHUNK_BLOCKS))
    for start in range(0, n, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, n)
        (x, y, z, w), (p0, p1) = ws.view(stop - start)
        for dst, col in zip((x, y, z, w), range(4)):
            np.copyto(dst, ctr_flat[start:stop, col])
        if single_key:
            kx: np.ndarray | int = key_x
            ky: np.ndarray | int = key_y
        else:
            kx = np.array(key_flat[start:stop, 0], dtype=_U32)
            ky = np.array(key_flat[start:stop, 1], dtype=_U32)
        _philox_rounds(x, y, z, w, kx, ky, p0, p1)
        for col, src in enumerate((x, y, z, w)):
            out[start:stop, col] = src
    return out.reshape(*lead, 4)


# --------------------------------------------------------------------------
# curand state emulation
# --------------------------------------------------------------------------
def _as_uint64(value: Any, name: str) -> np.ndarray:
    """Validate a Python int / integer array as unsigned 64-bit values.

    Returns:
        uint64 array with the shape of ``value`` (0-d for scalars).

    Raises:
        TypeError: ``value`` is not an integer (bools and floats included).
        ValueError: a value is negative or ``>= 2**64``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if isinstance(value, int):
        if not 0 <= value <= _MASK64:
            raise ValueError(f"{name} must be in [0, 2**64), got {value}")
        return np.array(value, dtype=_U64)
    if isinstance(value, (np.ndarray, np.generic)):
        arr = np.asarray(value)
    else:
        # Sequences of Python ints: go through object dtype so that values
        # above 2**63 are not silently turned into float64 by NumPy.
        arr = np.array(value, dtype=object)
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            raise ValueError(f"{name} must be in [0, 2**64), got a negative value")
        return arr.astype(_U64)
    if arr.dtype == object:
        # e.g. lists mixing large (> int64) and other Python ints.
        flat = arr.reshape(-1)
        for v in flat:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must contain integers, got {type(v).__name__}")
            if not 0 <= int(v) <= _MASK64:
                raise ValueError(f"{name} must be in [0, 2**64), got {int(v)}")
        return np.array([int(v) for v in flat], dtype=_U64).reshape(arr.shape)
    raise TypeError(f"{name} must be an integer or integer array, got dtype {arr.dtype}")


def _split64(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split uint64 array (...) into (lo, hi) uint32 arrays (...)."""
    lo = (v & _U64(_MASK32)).astype(_U32)
    hi = (v >> _SHIFT32).astype(_U32)
    return lo, hi


def _state_incr_hi(
    ctr: list[np.ndarray], n: np.ndarray
) -> None:
    """Vectorized ``Philox_State_Incr_hi(s, n)``: 64-bit add of n into (z, w).

    Args:
        ctr: [x, y, z, w] uint32 arrays of a common shape S (modified in place).
        n: uint64 array of shape S.
    """
    nlo, nhi = _split64(n)
    z = ctr[2] + nlo
    nhi = nhi + (z < nlo).astype(_U32)
    ctr[2] = z
    ctr[3] = ctr[3] + nhi


def _state_incr(ctr: list[np.ndarray], n: np.ndarray) -> None:
    """Vectorized ``Philox_State_Incr(s, n)`` with curand's exact carry code.

    ``x += nlo; if (x < nlo) nhi++; y += nhi; if (nhi <= y) return;
    if (++z) return; ++w;`` -- all arithmetic modulo 2**32, so ``nhi++`` may
    wrap to 0 (and then the carry is lost), exactly as on the device.

    Args:
        ctr: [x, y, z, w] uint32 arrays of a common shape S (modified in place).
        n: uint64 array of shape S.
    """
    nlo, nhi = _split64(n)
    x = ctr[0] + nlo
    nhi = nhi + (x < nlo).astype(_U32)  # wraps modulo 2**32 like C
    y = ctr[1] + nhi
    go_on = ~(nhi <= y)
    z = ctr[2] + go_on.astype(_U32)
    go_on &= z == 0
    w = ctr[3] + go_on.astype(_U32)
    ctr[0], ctr[1], ctr[2], ctr[3] = x, y, z, w


def _curand_init(
    seed: np.ndarray, subsequence: np.ndarray, offset: np.ndarray
) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Vectorized ``curand_init`` (without computing the cached output block).

    Args:
        seed, subsequence, offset: uint64 arrays of a common shape S.

    Returns:
        (ctr, key, STATE): ctr = [x, y, z, w] uint32 arrays (S), key = (kx, ky)
        uint32 arrays (S), STATE uint32 array (S) with values in 0..3.
    """
    shape = seed.shape
    ctr = [np.zeros(shape, dtype=_U32) for _ in range(4)]
    key = _split64(seed)
    state = np.zeros(shape, dtype=_U32)
    # skipahead_sequence(subsequence)
    _state_incr_hi(ctr, subsequence)
    # skipahead(offset)
    state = state + (offset & _U64(3)).astype(_U32)
    n = offset >> _U64(2)
    over = state > 3
    n = n + over.astype(_U64)
    state = state - over.astype(_U32) * _U32(4)
    _state_incr(ctr, n)
    return ctr, key, state


def _curand_stream(
    ctr: list[np.ndarray],
    key: tuple[np.ndarray, np.ndarray],
    nblocks: int,
) -> np.ndarray:
    """Blocks ``philox(C + j, key)`` for j in [0, nblocks) (128-bit counter add).

    Adding j to the 128-bit counter (wrapping at 2**128) is the same as
    applying ``Philox_State_Incr(s)`` j times.

    Args:
        ctr: [x, y, z, w] uint32 arrays of shape (m,), the base counters C.
        key: (kx, ky) uint32 arrays of shape (m,).
        nblocks: number of consecutive blocks per base counter.

    Returns:
        uint32 array of shape (m, nblocks, 4).
    """
    m = ctr[0].shape[0]
    total = m * nblocks
    out = np.empty((total, 4), dtype=_U32)
    base_lo = ctr[0].astype(_U64) | (ctr[1].astype(_U64) << _SHIFT32)
    base_hi = ctr[2].astype(_U64) | (ctr[3].astype(_U64) << _SHIFT32)
    kx_all, ky_all = key
    single_key = m == 1 or (
        bool(np.all(kx_all == kx_all[0])) and bool(np.all(ky_all == ky_all[0]))
    )
    chunk = _CHUNK_BLOCKS
    ws = _ChunkWorkspace(min(total, chunk))
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        (x, y, z, w), (p0, p1) = ws.view(stop - start)
        idx = np.arange(start, stop, dtype=np.int64)
        row = idx // nblocks
        j = (idx - row * nblocks).astype(_U64)
        lo = base_lo[row] + j
        hi = base_hi[row] + (lo < j).astype(_U64)
        np.copyto(x, lo, casting="unsafe")
        np.right_shift(lo, _SHIFT32, out=y, casting="unsafe")
        np.copyto(z, hi, casting="unsafe")
        np.right_shift(hi, _SHIFT32, out=w, casting="unsafe")
        if single_key:
            kx: np.ndarray | int = int(kx_all[0])
            ky: np.ndarray | int = int(ky_all[0])
        else:
            kx = kx_all[row]
            ky = ky_all[row]
        _philox_rounds(x, y, z, w, kx, ky, p0, p1)
        for col, src in enumerate((x, y, z, w)):
            out[start:stop, col] = src
    return out.reshape(m, nblocks, 4)


def curand_philox4(
    seed: Any, subsequence: Any, offset: Any, count: int = 1
) -> np.ndarray:
    """Words returned by ``count`` successive ``curand4`` calls after ``curand_init``.

    Emulates, bit for bit::

        curandStatePhilox4_32_10_t s;
        curand_init(seed, subsequence, offset, &s);
        for (k = 0; k < count; ++k) words[k] = curand4(&s);

    Args:
        seed: Python int or integer array in [0, 2**64), shape broadcastable to S.
        subsequence: Python int or integer array in [0, 2**64), broadcastable to S.
        offset: Python int or integer array in [0, 2**64), broadcastable to S.
        count: number of ``curand4`` calls, >= 1.

    Returns:
        uint32 array of shape (*S, count, 4), S the broadcast shape of the
        three arguments; ``[..., k, :]`` is the uint4 ``(x, y, z, w)`` of call k.

    Raises:
        TypeError: an argument is not an integer / integer array.
        ValueError: a value is negative or >= 2**64, or ``count < 1``.
    """
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"count must be an integer, got {type(count).__name__}")
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    seed_a = _as_uint64(seed, "seed")
    sub_a = _as_uint64(subsequence, "subsequence")
    off_a = _as_uint64(offset, "offset")
    shape = np.broadcast_shapes(seed_a.shape, sub_a.shape, off_a.shape)
    m = int(np.prod(shape, dtype=np.int64))
    if m == 0:
        return np.empty((*shape, count, 4), dtype=_U32)
    seed_f, sub_f, off_f = (
        np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(m)
        for a in (seed_a, sub_a, off_a)
    )

    ctr, key, state = _curand_init(seed_f, sub_f, off_f)
    shifted = bool(np.any(state != 0))
    # With STATE == 0 the last block (the new `output` of the final call) is
    # never returned, so it need not be computed.
    nblocks = count + 1 if shifted else count
    blocks = _curand_stream(ctr, key, nblocks)  # (m, nblocks, 4)
    words = blocks.reshape(m, nblocks * 4)
    if not shifted:
        res = words
    elif bool(np.all(state == state[0])):
        s = int(state[0])
        res = np.ascontiguousarray(words[:, s : s + 4 * count])
    else:
        cols = state.astype(np.int64)[:, None] + np.arange(4 * count, dtype=np.int64)
        res = np.take_along_axis(words, cols, axis=1)
    return res.reshape(*shape, count, 4)


# --------------------------------------------------------------------------
# Cases for the GPU reference generator
# --------------------------------------------------------------------------
def curand_vector_cases() -> list[tuple[int, int, int, int]]:
    """(seed, subsequence, offset, count) cases for the curand GPU reference run.

    The lead runs these through ``curand_init`` + ``curand4`` on a GPU and
    stores the results in ``tests/data/curand_philox_vectors.json``; the tests
    then compare :func:`curand_philox4` against them.  The list is fixed
    (a seeded ``random.Random`` supplies the "random" entries), so it is the
    same on every call and every machine.

    Returns:
        about 40 tuples of Python ints, counts in 1..5.
    """
    m64 = _MASK64
    seeds = [0, 1, 42, 0x12345678, 0xFFFFFFFF, 1 << 32, 0xDEADBEEFCAFEBABE, 1 << 63, m64]
    subs = [0, 1, (1 << 32) - 1, 1 << 32, 1 << 63, m64]
    offsets = [0, 1, 2, 3, 4, 5, (1 << 32) * 4 - 1, (1 << 34) + 3, m64]

    cases: list[tuple[int, int, int, int]] = []
    # Every offset and every subsequence at least once, rotating through seeds
    # and counts 1..5.
    i = 0
    for off in offsets:
        cases.append((seeds[i % len(seeds)], 0, off, 1 + i % 5))
        i += 1
    for sub in subs:
        cases.append((seeds[i % len(seeds)], sub, 3, 1 + i % 5))
        i += 1
    # Extreme combinations.
    cases += [
        (m64, m64, m64, 5),
        (0, m64, (1 << 34) + 3, 4),
        (1 << 63, (1 << 32) - 1, (1 << 32) * 4 - 1, 3),
        (0xFFFFFFFF, 1 << 32, 2, 2),
        (1 << 32, 1 << 63, 5, 1),
    ]
    # Seeded pseudo-random cases (full 64-bit ranges and small values).
    rng = random.Random(0x5EED_C0FFEE)
    while len(cases) < 40:
        seed = rng.getrandbits(64)
        sub = rng.choice([rng.getrandbits(64), rng.getrandbits(32), rng.randrange(8)])
        off = rng.choice([rng.getrandbits(64), rng.getrandbits(36), rng.randrange(64)])
        cases.append((seed, sub, off, rng.randint(1, 5)))
    return cases
