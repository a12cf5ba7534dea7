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

__all__ = ["manual_seed", "initial_seed", "next_seed_offset", "get_state", "set_state", "advance", "DeviceGenerator"]

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


def advance(seed: int, offset: int) -> tuple[int, int]:
    """The state after one draw from (seed, offset): offset + 1, or (seed + 1, 0) when the
    offset would reach 2**32 (the seed wraps at 2**64). DeviceGenerator's kernel does the same."""
    offset += 1
    if offset >= _mask.MAX_OFFSET:
        return (seed + 1) % (1 << 64), 0
    return seed, offset


def next_seed_offset() -> tuple[int, int]:
    """Take (seed, offset) for one call and advance the offset."""
    global _seed, _offset
    with _lock:
        s, o = _seed, _offset
        _seed, _offset = advance(s, o)
        return s, o


# --------------------------------------------------------------------------- #
# Device-side generator (CUDA graphs)
# --------------------------------------------------------------------------- #

# Two one-thread kernels on the generator's state, uint64[2] = {seed, offset} in device
# memory. They run on the current stream, read no host memory and allocate nothing, so
# a CUDA graph can capture them. (They are CuPy RawModule code rather than a
# kernels_cu/ entry: no tiles, no variants, nothing NVRTC needs beyond this string.)
_DEVICE_RNG_SOURCE = r"""
// state: uint64[2] {seed, offset}. Sets both words (DeviceGenerator.set_state).
extern "C" __global__ void cuflash_rng_set(unsigned long long* state, unsigned long long seed,
                                           unsigned long long offset) {
  state[0] = seed;
  state[1] = offset;
}

// snapshot <- state, then state advances by one draw: offset + 1, or (seed + 1, 0) when
// the offset would reach CUFLASH_MAX_OFFSET = 2^32 (cuflash._generator.advance; the seed
// wraps at 2^64 by unsigned overflow). Launched with one thread.
extern "C" __global__ void cuflash_rng_draw(unsigned long long* state, unsigned long long* snapshot) {
  const unsigned long long seed = state[0];
  const unsigned long long offset = state[1];
  snapshot[0] = seed;
  snapshot[1] = offset;
  if (offset + 1 >= CUFLASH_MAX_OFFSET) {
    state[0] = seed + 1;
    state[1] = 0;
  } else {
    state[1] = offset + 1;
  }
}
"""

_device_module = None
_device_module_lock = threading.Lock()


def _device_rng_function(name: str):
    """A kernel of _DEVICE_RNG_SOURCE (CuPy compiles it per device on first launch)."""
    global _device_module
    import cupy

    with _device_module_lock:
        if _device_module is None:
            _device_module = cupy.RawModule(code=_DEVICE_RNG_SOURCE,
                                            options=(f"-DCUFLASH_MAX_OFFSET={_mask.MAX_OFFSET}ull",))
        return _device_module.get_function(name)


def _check_state_args(seed, offset) -> tuple[int, int]:
    from ._validate import check_seed_offset

    if seed is None:
        raise TypeError("seed must be an integer in [0, 2**64), got None")
    if offset is None:
        raise TypeError("offset must be an integer in [0, 2**32), got None")
    return check_seed_offset(seed, offset)


class DeviceGenerator:
    """A dropout (seed, offset) generator whose state lives in GPU memory.

    Pass it to ``attention_forward(..., generator=gen)`` instead of seed/offset. Each
    call with ``dropout_p > 0`` launches one tiny kernel on the current stream that
    copies the state into a fresh 2-element snapshot (the (seed, offset) of that call:
    ``ctx.rng_state``, read by the forward and the backward kernels) and advances the
    state's offset by one, wrapping at 2**32 into seed + 1 like the global generator.
    Nothing is read back to the host, so a CUDA graph captured around forward and
    backward draws a fresh mask at every replay: replay k (from 0) uses the state
    advanced k times from where it stood at replay 0, e.g. ``(seed, offset + k)``.

    seed: int in [0, 2**64); offset: int in [0, 2**32). The state is allocated on the
    current CuPy device (needs CuPy and a CUDA GPU) and written on the current stream.

    ``state`` is the live uint64 array ``[seed, offset]``. ``get_state()`` copies it to
    the host on the current stream and waits (not inside a capture); ``set_state()``
    writes it with a one-thread kernel on the current stream (captured, it would write
    the same values at every replay). A generator's draws are ordered by the stream
    they run on: share one between streams only with the streams ordered.

    Capturing a step (CuPy)::

        gen = cuflash.DeviceGenerator(seed)
        pool = cupy.cuda.MemoryPool()              # the graph's memory, used by nothing else
        stream = cupy.cuda.Stream(non_blocking=True)
        with cupy.cuda.using_allocator(pool.malloc), stream:
            step()                                 # warm-up: compiles every kernel first
            stream.begin_capture()
            out, ctx = cuflash.attention_forward(q, k, v, dropout_p=0.1, generator=gen)
            dq, dk, dv = cuflash.attention_backward(dout, ctx)
            graph = stream.end_capture()
        graph.launch(stream)                       # each replay: the next (seed, offset)

    The private pool matters: the graph keeps writing every block it used, including
    scratch freed during the capture, which a shared pool would hand out again.
    """

    def __init__(self, seed: int, offset: int = 0) -> None:
        seed, offset = _check_state_args(seed, offset)
        from . import gpu_available

        if not gpu_available():
            raise RuntimeError("DeviceGenerator keeps its state in GPU memory and needs CuPy and a CUDA GPU; "
                               "none is available (pass seed/offset for the CPU reference)")
        import cupy

        self._state = cupy.empty(2, dtype=cupy.uint64)
        self.set_state(seed, offset)

    @property
    def state(self):
        """The live state: cupy uint64 array (2,) = [seed, offset] on this generator's device."""
        return self._state

    @property
    def device_id(self) -> int:
        """The CUDA device holding the state."""
        return self._state.device.id

    def get_state(self) -> tuple[int, int]:
        """(seed, offset) the next draw will use. Copies to the host on the current stream
        and waits for it (so it sees draws already queued on that stream)."""
        seed, offset = (int(x) for x in self._state.get())
        return seed, offset

    def set_state(self, seed: int, offset: int) -> None:
        """Set the state, in stream order on the current stream. seed < 2**64, offset < 2**32."""
        seed, offset = _check_state_args(seed, offset)
        import cupy
        import numpy as np

        with cupy.cuda.Device(self.device_id):
            _device_rng_function("cuflash_rng_set")((1,), (1,), (self._state, np.uint64(seed), np.uint64(offset)))

    def draw(self):
        """Snapshot and advance, on the current stream: a fresh cupy uint64 array (2,) =
        [seed, offset] for one call, taken from the memory pool. Capturable."""
        import cupy

        with cupy.cuda.Device(self.device_id):
            snapshot = cupy.empty(2, dtype=cupy.uint64)
            _device_rng_function("cuflash_rng_draw")((1,), (1,), (self._state, snapshot))
        return snapshot

    def __repr__(self) -> str:
        return f"DeviceGenerator(device={self.device_id})"
