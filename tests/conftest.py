"""Shared test setup: the `gpu` marker skips cleanly where no CUDA GPU is present.

Run everything where there is a GPU with:  python -m pytest tests
Only the GPU tests:                         python -m pytest -m gpu tests
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import cuflash


def pytest_collection_modifyitems(config, items):
    if cuflash.gpu_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine (GPU tests run on a GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def load_example():
    """load_example(stem): a fresh module object of examples/<stem>.py (the examples are
    scripts, not a package)."""

    def load(stem: str):
        path = Path(__file__).resolve().parents[1] / "examples" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(f"example_{stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture
def cp():
    import cupy

    return cupy


@pytest.fixture
def poison_outputs(monkeypatch):
    """Every buffer a kernel must fully write starts as NaN (0xFF bytes in every float
    format), so an element a kernel forgets fails the comparison."""
    import cupy

    from cuflash import _attn_gpu

    def poisoned(shape, dtype):
        a = cupy.empty(shape, dtype=dtype)
        a.view(cupy.uint8).fill(0xFF)
        return a

    monkeypatch.setattr(_attn_gpu, "_empty", poisoned)
