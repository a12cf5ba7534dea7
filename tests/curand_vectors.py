"""Run curand's own Philox4x32-10 on a GPU for the cases in cuflash.rng.curand_vector_cases().

    PYTHONPATH=. python tests/curand_vectors.py [--write]   # on a GPU host

Without --write it only returns the vectors (tests/test_gpu_mask.py uses it to compare
curand on the device with the stored file and with the NumPy twin); with --write it
stores them as tests/data/curand_philox_vectors.json, the file CI checks the twin against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data" / "curand_philox_vectors.json"


def generate() -> dict:
    import cupy

    from cuflash._compile import get_function
    from cuflash._config import CURAND_VECTORS_VARIANT
    from cuflash.rng import curand_vector_cases

    cases = curand_vector_cases()
    count = max(c[3] for c in cases)
    flat = cupy.asarray(np.array([[s, sub, off] for s, sub, off, _ in cases], dtype=np.uint64))
    out = cupy.zeros((len(cases), count, 4), dtype=cupy.uint32)
    fn = get_function(CURAND_VECTORS_VARIANT, "curand_philox_stream")
    fn(((len(cases) + 63) // 64,), (64,), (flat, np.int32(len(cases)), np.int32(count), out))
    words = out.get()
    import cupy.cuda.runtime as rt

    return {
        "generator": "curand Philox4_32_10: curand_init(seed, subsequence, offset) then `count` curand4() calls",
        "device": rt.getDeviceProperties(0)["name"].decode(),
        "curand_header_from": "nvidia-curand wheel / CUDA toolkit headers via cuflash._toolchain",
        "cases": [
            {"seed": s, "subsequence": sub, "offset": off, "count": n, "words": words[i, :n].tolist()}
            for i, (s, sub, off, n) in enumerate(cases)
        ],
    }


if __name__ == "__main__":
    data = generate()
    if "--write" in sys.argv:
        DATA.parent.mkdir(parents=True, exist_ok=True)
        DATA.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {len(data['cases'])} cases to {DATA}")
    else:
        print(json.dumps(data)[:400])
