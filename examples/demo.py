"""cuflash demo: attention forward + backward with dropout, checked and timed.

    python examples/demo.py

On a GPU: checks a small problem against the float64 reference with the same mask,
checks the GPU mask against the NumPy twin, then times a large causal problem.
Without a GPU: says so in one line and runs the same checks through the CPU path.
"""

from __future__ import annotations

import time

import numpy as np

import cuflash
from cuflash.reference import attention_backward_ref, attention_forward_ref


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(xp, dtype, B=2, S=256, H=4, Hk=2, D=64, p=0.1) -> None:
    """Small problem vs the float64 reference with the same mask."""
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((B, S, h, D)).astype(np.float32) for h in (H, Hk, Hk)]
    q, k, v = (xp.asarray(x.astype(dtype)) for x in host)
    out, ctx = cuflash.attention_forward(q, k, v, dropout_p=p, causal=True, seed=1234, offset=0)
    dout = xp.asarray(rng.standard_normal(out.shape).astype(dtype))
    dq, dk, dv = cuflash.attention_backward(dout, ctx)
    keep = cuflash.dropout_mask(B, H, S, S, dropout_p=p, seed=ctx.seed, offset=ctx.offset, xp=np)
    to_np = (lambda a: a.get()) if xp is not np else (lambda a: a)
    qh, kh, vh = (to_np(a) for a in (q, k, v))
    o_ref, lse_ref = attention_forward_ref(qh, kh, vh, causal=True, keep=keep, keep_scale=1 / ctx.keep_prob)
    grads = attention_backward_ref(to_np(dout), qh, kh, vh, o_ref, lse_ref, causal=True, keep=keep,
                                   keep_scale=1 / ctx.keep_prob)
    print(f"  p={p} (effective {ctx.dropout_p_effective:.6f}), kept fraction {keep.mean():.4f}")
    if xp is not np:
        gpu_mask = cuflash.dropout_mask(B, H, S, S, dropout_p=p, seed=ctx.seed, offset=ctx.offset, xp=xp)
        print(f"  GPU mask == NumPy twin: {bool((gpu_mask.get() == keep).all())}")
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (o_ref, *grads)):
        print(f"  {name:4s} rel err vs float64 reference: {rel_err(to_np(got), ref):.2e}")


def timing_gpu(B=4, S=4096, H=16, D=128, p=0.1) -> None:
    import cupy as cp

    rng = cp.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, S, H, D), dtype=cp.float32).astype(cp.float16) for _ in range(3))
    dout = rng.standard_normal((B, S, H, D), dtype=cp.float32).astype(cp.float16)
    fwd_flops = 4 * B * H * S * S * D / 2  # causal halves the work

    def timed(fn, reps=10):
        fn()
        cp.cuda.Device().synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        times = []
        for _ in range(reps):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop))
        return float(np.median(times))

    t_f = timed(lambda: cuflash.attention_forward(q, k, v, dropout_p=p, causal=True))
    _, ctx = cuflash.attention_forward(q, k, v, dropout_p=p, causal=True)
    t_b = timed(lambda: cuflash.attention_backward(dout, ctx))
    print(f"  B={B} S={S} H={H} D={D} fp16 causal p={p}:")
    print(f"  forward  {t_f:7.2f} ms  {fwd_flops / t_f / 1e9:6.1f} TFLOP/s")
    print(f"  backward {t_b:7.2f} ms  {2.5 * fwd_flops / t_b / 1e9:6.1f} TFLOP/s")


def main() -> None:
    if cuflash.gpu_available():
        import cupy as cp

        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
        print(f"cuflash {cuflash.__version__} on {name}")
        print("checks (causal, GQA 4/2 heads, fp16):")
        check(cp, np.float16)
        print("timing:")
        timing_gpu()
    else:
        print("No CUDA GPU found: running the same demo through the CPU reference path (NumPy).")
        print("checks (causal, GQA 4/2 heads, fp16 inputs, float64 math):")
        t0 = time.perf_counter()
        check(np, np.float16, S=128)
        print(f"  CPU path forward+backward+reference took {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
