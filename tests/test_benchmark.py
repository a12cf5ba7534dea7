"""examples/benchmark.py on the CPU: --repeats rotates the libraries and keeps medians (the
timings themselves need a GPU; here they are canned)."""

import itertools
import json
import sys

import pytest


@pytest.fixture
def bench(load_example):
    return load_example("benchmark")


def test_median_timings(bench):
    assert bench.median_timings([(3.0, 30.0, 1.0), (1.0, 10.0, 3.0), (2.0, 20.0, 2.0)]) == (2.0, 20.0, 2.0)
    assert bench.median_timings([None, None]) is None
    assert bench.median_timings([]) is None


def test_repeats_rotate_and_keep_medians(bench, tmp_path, monkeypatch, capsys):
    order = []
    cuflash_ms = itertools.cycle([2.0, 4.0, 3.0])  # forward ms of three repeats: the median is 3
    fa2_ms = itertools.cycle([1.0, 5.0, 2.0])

    def fake_cuflash(B, S, H, D, causal, p, dt, deterministic=False, backward=True):
        order.append("cuflash")
        t = next(cuflash_ms)
        return (t, t, 50.0), (2 * t, 2 * t, 60.0), None

    def fake_torch(B, S, H, D, causal, p, dt, backend):
        order.append(backend)
        if backend == "CUDNN_ATTENTION":
            return None, "not available"
        t = next(fa2_ms)
        return (t, t, 40.0), (2 * t, 2 * t, 40.0)

    monkeypatch.setattr(bench, "validate", lambda: None)
    monkeypatch.setattr(bench, "bench_cuflash", fake_cuflash)
    monkeypatch.setattr(bench, "bench_torch", fake_torch)
    monkeypatch.setitem(sys.modules, "torch", object())  # the peers are "importable"
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--seqlens", "1024", "--head-dims", "64", "--dtypes",
                                      "float16", "--ps", "0.1", "--repeats", "3", "--out", str(tmp_path)])
    bench.main()
    assert order[:9] == ["cuflash", "FLASH_ATTENTION", "CUDNN_ATTENTION",
                         "FLASH_ATTENTION", "CUDNN_ATTENTION", "cuflash",
                         "CUDNN_ATTENTION", "cuflash", "FLASH_ATTENTION"]
    rows = json.loads((tmp_path / "bench.json").read_text())
    full = next(r for r in rows if not r["causal"])
    flops = 4 * 16 * 32 * 1024 * 1024 * 64
    assert full["cuflash"]["fwd_ms"] == 3.0 and full["cuflash"]["fwd_tflops"] == pytest.approx(flops / 3.0 / 1e9)
    assert full["FLASH_ATTENTION"]["fwd_ms"] == 2.0
    assert full["CUDNN_ATTENTION"] == {"error": "not available"}
    capsys.readouterr()


def test_repeats_must_be_positive(bench, monkeypatch):
    monkeypatch.setattr(bench, "validate", lambda: None)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", "--repeats", "0"])
    with pytest.raises(SystemExit):
        bench.main()


def test_row_entry_takes_either_side_alone(bench):
    fwd_only = bench._row_entry(4e12, (2.0, 2.1, 50.0), None)
    assert fwd_only == {"fwd_ms": 2.0, "fwd_tflops": 2000.0, "fwd_call_ms": 2.1, "fwd_host_us": 50.0}
    bwd_only = bench._row_entry(4e12, None, (4.0, 4.1, 60.0))
    assert bwd_only == {"bwd_ms": 4.0, "bwd_tflops": 2500.0, "bwd_call_ms": 4.1, "bwd_host_us": 60.0}
