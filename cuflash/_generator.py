"""The global dropout generator used when a call passes ``seed=None``.

It holds a 64-bit seed and a 32-bit offset. Each call that draws from it takes the
current (seed, offset) and advances the offset by one, so consecutive calls get
fresh, independent masks (the offset is a Philox counter word, see cuflash.mask).
When the offset wraps past 2**32 - 1 the seed moves on by one.
"""

from __future__ import annotations

import os
import threading

from . import mask as _mask

__all__ = ["manual_seed", "initial_seed", "next_seed_offset", "get_state", "set_state"]

_lock = threading.Lock()
_seed = int.from_bytes(os.urandom(8), "little")  # random per process until manual_seed()
_offset = 0


def manual_seed(seed: int) -> None:
    """Seed the global dropout generator (offset restarts at 0). seed: int in [0, 2**64)."""
    from ._validate import check_seed_offset

    if seed is None:
        raise TypeError("seed must be an integer in [0, 2**64), got None")
    s, _ = check_seed_offset(seed, None)
    global _seed, _offset
    with _lock:
        _seed, _offset = s, 0


def initial_seed() -> int:
    """The global generator's current seed."""
    return _seed


def get_state() -> tuple[int, int]:
    """(seed, offset) of the global generator: the values the next call will use."""
    with _lock:
        return _seed, _offset


def set_state(state: tuple[int, int]) -> None:
    """Restore a state returned by get_state()."""
    from ._validate import check_seed_offset

    if not isinstance(state, tuple) or len(state) != 2 or None in state:
        raise TypeError(f"state must be a (seed, offset) tuple of integers, got {state!r}")
    s, o = check_seed_offset(*state)
    global _seed, _offset
    with _lock:
        _seed, _offset = s, o


def next_seed_offset() -> tuple[int, int]:
    """Take (seed, offset) for one call and advance the offset."""
    global _seed, _offset
    with _lock:
        s, o = _seed, _offset
        _offset += 1
        if _offset >= _mask.MAX_OFFSET:
            _seed, _offset = (_seed + 1) % (1 << 64), 0
        return s, o
