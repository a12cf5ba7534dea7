"""Streams, threads and CUDA graphs on the GPU.

- Two threads, each on its own non-blocking stream, run forward + backward many times
  at once: every result equals the single-stream result bit for bit.
- Two threads compiling the same kernel variant for the first time at once: one
  compile, both results right.
- DeviceGenerator: its device state advances like the global generator; a forward +
  backward step captured in a CUDA graph draws (seed, offset + k) at replay k, bit for
  bit the same as an eager call with those explicit values, and a new mask each time.

Memory during capture: CuPy's pool is host-side bookkeeping (one arena of free blocks
per stream); taking a free block records nothing in the graph, and growing the pool
calls cudaMalloc, which CuPy's default (relaxed) capture mode allows. The catch is
afterwards: the graph keeps writing the blocks it used, including those freed during
the capture (the backward's scratch), and the pool would hand those out again. So the
step is warmed up (every kernel compiled) and captured inside
``cupy.cuda.using_allocator(graph_pool.malloc)`` with a MemoryPool of its own that
nothing else allocates from, as torch does with its private graph pools.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np
import pytest

import cuflash
from cuflash import DeviceGenerator, attention_backward, attention_forward
from cuflash._generator import advance

pytestmark = pytest.mark.gpu

P = 0.2
MAX_OFFSET = 1 << 32
MAX_SEED = 1 << 64


def _inputs(cp, seed, B=2, Sq=160, Sk=224, H=4, Hk=2, D=64):
    rng = np.random.default_rng(seed)
    shapes = ((B, Sq, H, D), (B, Sk, Hk, D), (B, Sk, Hk, D), (B, Sq, H, D))
    return tuple(cp.asarray(rng.standard_normal(s).astype(np.float16)) for s in shapes)


def _fwd_bwd(q, k, v, dout, *, causal, p=P, **rng):
    """One training step's attention: (out, lse, dq, dk, dv) and the ctx."""
    out, ctx = attention_forward(q, k, v, dropout_p=p, causal=causal, deterministic=True, **rng)
    dq, dk, dv = attention_backward(dout, ctx)
    return (out, ctx.lse, dq, dk, dv), ctx


NAMES = ("out", "lse", "dq", "dk", "dv")


def _host(arrays):
    return [np.ascontiguousarray(a.get()).view(np.uint8) for a in arrays]


def _assert_bitwise(tag, got, want):
    for name, a, b in zip(NAMES, got, want):
        diff = int((a != b).sum())
        if diff:
            print(f"{tag} {name}: {diff} differing bytes of {a.size}")
        assert diff == 0, f"{tag} {name}"


# --------------------------------------------------------------------------- #
# Threads and streams
# --------------------------------------------------------------------------- #


def test_two_threads_two_streams_bitwise(cp):
    iters = 25
    problems = [_inputs(cp, 11, Sq=384, Sk=384), _inputs(cp, 12, Sq=384, Sk=384)]
    settings = [dict(causal=False, seed=101, offset=0), dict(causal=True, seed=202, offset=7)]
    expected = [_host(_fwd_bwd(*pr, **st)[0]) for pr, st in zip(problems, settings)]
    cp.cuda.Device().synchronize()  # inputs ready before the non-blocking streams read them

    barrier = threading.Barrier(2)
    results: list = [None, None]
    errors: list = []

    def worker(i: int) -> None:
        try:
            stream = cp.cuda.Stream(non_blocking=True)
            with stream:
                barrier.wait()
                t0 = time.perf_counter()
                device_results = [_fwd_bwd(*problems[i], **settings[i])[0] for _ in range(iters)]
                host = [_host(r) for r in device_results]  # .get() on this stream, after all launches
                print(f"thread {i}: {iters} steps in {time.perf_counter() - t0:.3f} s")
            results[i] = host
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for it, got in enumerate(results[i]):
            _assert_bitwise(f"thread {i} step {it}", got, expected[i])


def test_first_compile_from_two_threads(cp, monkeypatch, tmp_path):
    """Both threads ask for a variant nobody has compiled yet: one compile, right results."""
    from cuflash import _compile

    monkeypatch.setattr(_compile, "_modules", {})  # empty in-memory module and kernel tables
    monkeypatch.setattr(_compile, "_kernels", {})
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))  # empty disk cache: a real NVRTC compile
    calls: collections.Counter = collections.Counter()
    calls_lock = threading.Lock()
    real_compile = _compile.compile_variant

    def counting_compile(variant, arch, **kw):
        with calls_lock:
            calls[variant.name] += 1
        return real_compile(variant, arch, **kw)

    monkeypatch.setattr(_compile, "compile_variant", counting_compile)

    q, k, v, _ = _inputs(cp, 13, Sq=200, Sk=200)
    cp.cuda.Device().synchronize()
    barrier = threading.Barrier(2)
    outs: list = [None, None]
    errors: list = []

    def worker(i: int) -> None:
        try:
            with cp.cuda.Stream(non_blocking=True):
                barrier.wait()
                outs[i] = np.ascontiguousarray(
                    cuflash.attention(q, k, v, dropout_p=P, causal=True, seed=5, offset=1).get()).view(np.uint8)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"first use from two threads: {time.perf_counter() - t0:.1f} s; compiles: {dict(calls)}")
    assert not errors, errors
    assert calls and all(n == 1 for n in calls.values()), dict(calls)
    again = np.ascontiguousarray(
        cuflash.attention(q, k, v, dropout_p=P, causal=True, seed=5, offset=1).get()).view(np.uint8)
    assert all(n == 1 for n in calls.values()), dict(calls)  # served from the module table
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], again)


# --------------------------------------------------------------------------- #
# DeviceGenerator, eager
# --------------------------------------------------------------------------- #


def test_device_generator_state_roundtrip(cp):
    gen = DeviceGenerator(MAX_SEED - 1, MAX_OFFSET - 2)
    assert gen.state.dtype == cp.uint64 and gen.state.shape == (2,)
    assert gen.device_id == cp.cuda.Device().id
    assert gen.get_state() == (MAX_SEED - 1, MAX_OFFSET - 2)
    expect = (MAX_SEED - 1, MAX_OFFSET - 2)
    for _ in range(3):  # crosses the offset wrap and the seed wrap
        snap = gen.draw()
        assert tuple(int(x) for x in snap.get()) == expect
        expect = advance(*expect)
        assert gen.get_state() == expect
    assert expect == (0, 1)  # (s, 2^32-2) -> (s, 2^32-1) -> (s+1 mod 2^64, 0) -> (0, 1)
    gen.set_state(7, 9)
    assert gen.get_state() == (7, 9)
    with pytest.raises(ValueError, match="offset"):
        gen.set_state(7, MAX_OFFSET)
    with pytest.raises(TypeError, match="seed"):
        gen.set_state(None, 0)
    assert gen.get_state() == (7, 9)
    # stream order: set, draw and read on one non-blocking stream
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gen.set_state(3, 4)
        snap = gen.draw()
        assert gen.get_state() == (3, 5)
        assert tuple(int(x) for x in snap.get()) == (3, 4)


@pytest.mark.parametrize("causal", [False, True])
def test_generator_eager_equals_explicit(cp, causal):
    q, k, v, dout = _inputs(cp, 21)
    host_state = cuflash.get_state()
    start = (0xABCD_EF01_2345_6789, MAX_OFFSET - 2)
    gen = DeviceGenerator(*start)
    used = start
    masks = []
    for i in range(3):
        got, ctx = _fwd_bwd(q, k, v, dout, causal=causal, generator=gen)
        assert ctx.seed is None and ctx.offset is None and ctx.rng_state is not None
        assert ctx.get_seed_offset() == used
        want, ctx_e = _fwd_bwd(q, k, v, dout, causal=causal, seed=used[0], offset=used[1])
        _assert_bitwise(f"call {i} {used}", _host(got), _host(want))
        masks.append(_host(got)[0])
        used = advance(*used)
        assert gen.get_state() == used
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    assert cuflash.get_state() == host_state  # the global generator was not touched
    # p == 0 draws nothing: no device state in ctx, the generator stays put
    _, ctx0 = _fwd_bwd(q, k, v, dout, causal=causal, p=0.0, generator=gen)
    assert ctx0.rng_state is None and ctx0.get_seed_offset() == (None, None)
    assert gen.get_state() == used


def test_generator_mutually_exclusive_on_gpu(cp):
    q, k, v, _ = _inputs(cp, 22)
    gen = DeviceGenerator(1)
    with pytest.raises(ValueError, match="seed"):
        attention_forward(q, k, v, dropout_p=P, generator=gen, seed=1)
    with pytest.raises(ValueError, match="offset"):
        attention_forward(q, k, v, dropout_p=P, generator=gen, offset=1)
    assert gen.get_state() == (1, 0)


# --------------------------------------------------------------------------- #
# CUDA graphs
# --------------------------------------------------------------------------- #


def _capture(cp, stream, fn):
    """Capture fn() on stream; returns (graph, fn's result)."""
    with stream:
        stream.begin_capture()
        try:
            result = fn()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:  # the capture is already broken; report the first error
                pass
            raise
        graph = stream.end_capture()
    return graph, result


@pytest.mark.parametrize("causal,offset0", [(False, 40), (True, MAX_OFFSET - 2)], ids=["plain", "causal-wrap"])
def test_graph_replays_draw_successive_offsets(cp, causal, offset0):
    replays = 4
    seed0 = 0x1234_5678_9ABC_DEF0
    q, k, v, dout = _inputs(cp, 31)
    capture_stream = cp.cuda.Stream(non_blocking=True)
    ref_stream = cp.cuda.Stream(non_blocking=True)
    graph_pool = cp.cuda.MemoryPool()  # the graph's memory: nothing else allocates from it
    gen = DeviceGenerator(seed0, offset0)
    cp.cuda.Device().synchronize()

    with cp.cuda.using_allocator(graph_pool.malloc):
        with capture_stream:
            # warm run: compiles the attention variants and the generator's kernels, and
            # leaves free blocks of every size the step allocates in the graph's pool
            warm = _fwd_bwd(q, k, v, dout, causal=causal, generator=DeviceGenerator(0))
            del warm
            capture_stream.synchronize()
        graph, (arrays, ctx) = _capture(cp, capture_stream,
                                        lambda: _fwd_bwd(q, k, v, dout, causal=causal, generator=gen))
    print(f"graph pool: {graph_pool.total_bytes()} bytes, {graph_pool.used_bytes()} in use by the graph's outputs")
    assert ctx.seed is None and ctx.offset is None and ctx.rng_state is not None
    assert gen.get_state() == (seed0, offset0)  # capturing ran nothing

    expect = (seed0, offset0)
    outs = []
    for i in range(replays):
        graph.launch(stream=capture_stream)
        capture_stream.synchronize()
        got = _host(arrays)
        assert ctx.get_seed_offset() == expect, f"replay {i}"
        with ref_stream:
            want = _host(_fwd_bwd(q, k, v, dout, causal=causal, seed=expect[0], offset=expect[1])[0])
        _assert_bitwise(f"replay {i} {expect}", got, want)
        outs.append(got[0])
        expect = advance(*expect)
        assert gen.get_state() == expect
    for i in range(replays):
        for j in range(i):
            assert not np.array_equal(outs[i], outs[j]), f"replays {j} and {i} drew the same mask"
    # replaying again after set_state repeats a step exactly
    gen.set_state(seed0, offset0)
    cp.cuda.Device().synchronize()
    graph.launch(stream=capture_stream)
    capture_stream.synchronize()
    assert np.array_equal(_host(arrays)[0], outs[0])
