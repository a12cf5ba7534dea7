"""GPU checks of the RNG and the mask: curand itself vs cuflash's inline Philox, the
stored vectors and the NumPy twin; the GPU mask vs the NumPy mask, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cuflash
from cuflash.mask import drop_threshold, dropout_mask_numpy
from cuflash.rng import curand_philox4, philox4x32_10

pytestmark = pytest.mark.gpu


def test_curand_stream_matches_twin_and_stored_file():
    import curand_vectors as cv

    data = cv.generate()
    for case in data["cases"]:
        twin = curand_philox4(case["seed"], case["subsequence"], case["offset"], case["count"])[..., :, :]
        np.testing.assert_array_equal(np.asarray(case["words"], dtype=np.uint32), twin.reshape(-1, 4),
                                      err_msg=str(case))
    if cv.DATA.is_file():
        stored = json.loads(cv.DATA.read_text())["cases"]
        assert [c["words"] for c in stored] == [c["words"] for c in data["cases"]]


def test_inline_philox_equals_curand_block_function(cp):
    from cuflash._compile import get_function
    from cuflash._config import CURAND_VECTORS_VARIANT

    rng = np.random.default_rng(7)
    n = 1 << 16
    ctr = rng.integers(0, 2**32, size=(n, 4), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    ctr[:4] = [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [1, 2, 3, 4], [0xFFFFFFFF, 0, 0xFFFFFFFF, 0]]
    a = cp.full((n, 4), 0xDEADBEEF, dtype=cp.uint32)
    b = cp.full((n, 4), 0xDEADBEEF, dtype=cp.uint32)
    fn = get_function(CURAND_VECTORS_VARIANT, "philox_block_pair")
    fn(((n + 255) // 256,), (256,), (cp.asarray(ctr), cp.asarray(key), np.int32(n), a, b))
    np.testing.assert_array_equal(a.get(), b.get())
    np.testing.assert_array_equal(a.get(), philox4x32_10(ctr, key))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 17, 97), (1, 2, 200, 1025), (3, 1, 1025, 33)])
@pytest.mark.parametrize("p", [0.0, 0.17, 0.5])
def test_gpu_mask_equals_numpy_twin(cp, shape, p):
    seed, offset = (2**64 - 1) - 12345, 4_000_000_000
    gpu = cuflash.dropout_mask(*shape, dropout_p=p, seed=seed, offset=offset, xp=cp)
    assert gpu.dtype == cp.bool_ and gpu.shape == shape
    ref = dropout_mask_numpy(*shape, threshold=drop_threshold(p), seed=seed, offset=offset)
    np.testing.assert_array_equal(gpu.get(), ref)


@pytest.mark.parametrize("p", [0.0, 0.3, 1 - 2**-16])
@pytest.mark.parametrize("shape", [(2, 3, 131, 75), (1, 2, 17, 300)])
def test_every_route_to_the_mask_equals_the_twin(cp, shape, p):
    """The forwards' accumulator fragment, the keep bits of the Hopper backward's transposed
    fragment, and the element-wise definition (kernels_cu/dropout_mask.cu) vs the NumPy twin."""
    from cuflash._mask_gpu import dropout_mask

    args = dict(threshold=drop_threshold(p), seed=(1 << 63) + 99, offset=5)
    ref = dropout_mask_numpy(*shape, **args)
    for route in ({}, {"elementwise": True}, {"transposed": True}):
        np.testing.assert_array_equal(dropout_mask(*shape, **args, **route).get(), ref, err_msg=str(route))


def test_gpu_mask_statistics(cp):
    m = cuflash.dropout_mask(4, 8, 1024, 1024, dropout_p=0.1, seed=1, offset=0, xp=cp)
    kept = float(m.mean())
    assert abs(kept - (1 - drop_threshold(0.1) / 65536)) < 0.002, kept
