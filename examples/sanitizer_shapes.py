"""Small forward + backward shapes to run under compute-sanitizer (GPU only).

    PYTHONPATH=. compute-sanitizer --tool memcheck --error-exitcode 9 python examples/sanitizer_shapes.py
    PYTHONPATH=. compute-sanitizer --tool racecheck --error-exitcode 9 python examples/sanitizer_shapes.py --quick

Covers the Hopper forward's tilings: by TMA, hd 64 with dropout on short keys (Sk <= 2048)
and long ones, hd 64 without dropout, hd 128 with and without, a head dim padded to 64
(40: TMA zero-fills its columns); by cp.async, hd 64 causal without dropout on short keys.
Also tails that are not multiples of any tile (97, 129, 200, 257, 1025, 2100, 2200), Sq !=
Sk with causal fully masked rows, GQA, deterministic and default backward, and head dims
96 and 256 on the sm_80 kernels. CuPy's memory pool is switched off, so each tensor
is its own cudaMalloc and memcheck sees every tensor's end. Prints one line per shape and
fails if any output or gradient is not finite.
"""

import sys

import cupy as cp

import cuflash

# (B, Sq, Sk, H, Hk, D, causal, dropout_p, deterministic)
CASES = [(1, 97, 200, 2, 1, 64, False, 0.17, False), (1, 200, 97, 2, 2, 128, True, 0.0, True),
         (1, 130, 130, 2, 2, 64, True, 0.17, True), (1, 1025, 1025, 1, 1, 64, False, 0.1, False),
         (1, 129, 2200, 1, 1, 64, False, 0.1, True), (1, 97, 2100, 2, 1, 64, False, 0.0, False),
         (1, 130, 2200, 2, 2, 40, True, 0.0, False), (1, 65, 2049, 2, 2, 128, False, 0.0, False)]
MORE = [(2, 129, 257, 4, 2, 128, False, 0.17, True), (1, 2100, 300, 1, 1, 64, True, 0.0, False),
        (1, 64, 64, 1, 1, 96, True, 0.17, True), (1, 33, 65, 2, 1, 256, False, 0.0, False)]


def main() -> int:
    if not cuflash.gpu_available():
        print("sanitizer_shapes: no CUDA GPU here; nothing to run")
        return 0
    cp.cuda.set_allocator(None)  # one cudaMalloc per array: memcheck then sees every tensor end
    rng = cp.random.default_rng(0)
    bad = 0
    for B, Sq, Sk, H, Hk, D, causal, p, det in CASES + ([] if "--quick" in sys.argv else MORE):
        q, do = (rng.standard_normal((B, Sq, H, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
        k, v = (rng.standard_normal((B, Sk, Hk, D), dtype=cp.float32).astype(cp.float16) for _ in range(2))
        out, ctx = cuflash.attention_forward(q, k, v, dropout_p=p, causal=causal, seed=3, deterministic=det)
        dq, dk, dv = cuflash.attention_backward(do, ctx)
        cp.cuda.Device().synchronize()
        ok = all(bool(cp.isfinite(x).all()) for x in (out, dq, dk, dv))
        bad += not ok
        print(f"B={B} Sq={Sq} Sk={Sk} H={H} Hk={Hk} D={D} causal={causal} p={p} deterministic={det}:",
              "finite" if ok else "NOT FINITE", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
