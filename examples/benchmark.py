"""cuflash benchmark: validate, then time forward/backward against torch SDPA peers.

    PYTHONPATH=. python examples/benchmark.py [--quick] [--out DIR]

Sweeps 16k tokens at d_model 2048 (batch = 16384 / seqlen, heads = 2048 / head_dim):
seqlen 512..16k x head dim 64/128 x causal x p {0, 0.1} x fp16/bf16. Times with CUDA
events (warm-up, median of repeats, inputs rotated over sets larger than L2) and
reports TFLOP/s (fwd = 4·B·H·Sq·Sk·D, halved when causal; bwd = 2.5 x fwd). When torch
is importable, times scaled_dot_product_attention with the FLASH_ATTENTION (FA2) and
CUDNN_ATTENTION backends on the same shapes in the same run. Writes bench.json and
bench.png. torch is never a dependency of cuflash.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np

import cuflash


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.float16


def median_ms(fn, sets, reps=10, warmup=3):
    import cupy as cp

    for i in range(warmup):
        fn(sets[i % len(sets)])
    cp.cuda.Device().synchronize()
    times = []
    for i in range(reps):
        s = sets[i % len(sets)]
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn(s)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def n_sets(bytes_per_set: int, l2_bytes: int = 50 << 20) -> int:
    return max(2, min(8, math.ceil(3 * l2_bytes / max(bytes_per_set, 1))))


def bench_cuflash(B, S, H, D, causal, p, dt):
    import cupy as cp

    rng = cp.random.default_rng(0)
    mk = lambda: rng.standard_normal((B, S, H, D), dtype=cp.float32).astype(_dtype(dt))  # noqa: E731
    sets = [tuple(mk() for _ in range(4)) for _ in range(n_sets(4 * B * S * H * D * 2))]
    ctxs = [cuflash.attention_forward(q, k, v, dropout_p=p, causal=causal, seed=1)[1] for q, k, v, _ in sets]
    fwd = median_ms(lambda s: cuflash.attention_forward(s[0], s[1], s[2], dropout_p=p, causal=causal), sets)
    pairs = list(zip(sets, ctxs))
    bwd = median_ms(lambda sc: cuflash.attention_backward(sc[0][3], sc[1]), pairs)
    return fwd, bwd


def bench_torch(B, S, H, D, causal, p, dt, backend_name):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    tdt = torch.float16 if dt == "float16" else torch.bfloat16
    mk = lambda: torch.randn(B, H, S, D, device="cuda", dtype=tdt, requires_grad=True)  # noqa: E731
    sets = [tuple(mk() for _ in range(3)) + (torch.randn(B, H, S, D, device="cuda", dtype=tdt),)
            for _ in range(n_sets(4 * B * S * H * D * 2))]
    F = torch.nn.functional

    def fwd(s):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(s[0], s[1], s[2], dropout_p=p, is_causal=causal)

    def tm(fn, items, reps=10):
        for i in range(3):
            fn(items[i % len(items)])
        torch.cuda.synchronize()
        ts = []
        for i in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(items[i % len(items)])
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        return float(np.median(ts))

    try:
        with torch.no_grad():
            t_f = tm(fwd, sets)
        outs = [(fwd(s), s) for s in sets]
        t_b = tm(lambda os: torch.autograd.grad(os[0], os[1][:3], os[1][3], retain_graph=True), outs)
        return t_f, t_b
    except RuntimeError as e:  # backend not available for this shape/dtype/dropout
        return None, str(e).splitlines()[0][:80]


def validate():
    """A quick correctness gate before timing (the full sweep is tests/test_gpu_attention.py)."""
    import cupy as cp

    from cuflash.reference import attention_forward_ref

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 300, 2, 128)).astype(np.float16) for _ in range(3))
    out, ctx = cuflash.attention_forward(*(cp.asarray(x) for x in (q, k, v)), dropout_p=0.1, causal=True, seed=5)
    keep = cuflash.dropout_mask(1, 2, 300, 300, dropout_p=0.1, seed=5, offset=ctx.offset, xp=np)
    ref, _ = attention_forward_ref(q, k, v, causal=True, keep=keep, keep_scale=1 / ctx.keep_prob)
    err = float(np.abs(out.get().astype(np.float64) - ref).max())
    assert err < 2e-2, err
    print(f"validated: max |out - fp64 ref| = {err:.2e} (same mask)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 1k/4k/16k, fp16 only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default: the sweep)")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    ap.add_argument("--dtypes", help="comma-separated: float16,bfloat16")
    ap.add_argument("--ps", default="0.0,0.1", help="comma-separated dropout probabilities")
    args = ap.parse_args()
    validate()
    try:
        if args.no_torch:
            raise ImportError
        import torch  # noqa: F401

        peers = ["FLASH_ATTENTION", "CUDNN_ATTENTION"]
    except ImportError:
        peers = []
    seqs = [1024, 4096, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    dtypes = ["float16"] if args.quick else ["float16", "bfloat16"]
    if args.seqlens:
        seqs = [int(x) for x in args.seqlens.split(",")]
    if args.dtypes:
        dtypes = args.dtypes.split(",")
    rows = []
    for dt in dtypes:
        for D in (int(x) for x in args.head_dims.split(",")):
            for causal in (False, True):
                for p in (float(x) for x in args.ps.split(",")):
                    for S in seqs:
                        B, H = 16384 // S, 2048 // D
                        flops = 4 * B * H * S * S * D / (2 if causal else 1)
                        row = dict(dtype=dt, head_dim=D, causal=causal, p=p, seqlen=S, batch=B, heads=H)
                        f, b = bench_cuflash(B, S, H, D, causal, p, dt)
                        row["cuflash"] = dict(fwd_ms=f, bwd_ms=b, fwd_tflops=flops / f / 1e9,
                                              bwd_tflops=2.5 * flops / b / 1e9)
                        for peer in peers:
                            f, b = bench_torch(B, S, H, D, causal, p, dt, peer)
                            row[peer] = (dict(fwd_ms=f, bwd_ms=b, fwd_tflops=flops / f / 1e9,
                                              bwd_tflops=2.5 * flops / b / 1e9) if f else dict(error=b))
                        rows.append(row)
                        line = (f"{dt:8s} d{D:<3d} {'causal' if causal else 'full  '} p={p:.1f} S={S:5d} | cuflash "
                                f"{row['cuflash']['fwd_tflops']:6.1f} / {row['cuflash']['bwd_tflops']:6.1f}")
                        for peer in peers:
                            r = row[peer]
                            line += (f" | {peer[:5]} {r['fwd_tflops']:6.1f} / {r['bwd_tflops']:6.1f}"
                                     if "error" not in r else f" | {peer[:5]} n/a")
                        print(line, flush=True)
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, kind in zip(axes, ("fwd", "bwd")):
            for name in ["cuflash", *peers]:
                sel = [r for r in rows if r["dtype"] == "float16" and r["head_dim"] == 128 and not r["causal"]
                       and r["p"] == 0.1 and "error" not in r.get(name, {"error": 1})]
                ax.plot([r["seqlen"] for r in sel], [r[name][f"{kind}_tflops"] for r in sel], "o-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{kind}, fp16, hd128, non-causal, p=0.1")
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench.png", dpi=100)
    except ImportError:
        pass
    print("TFLOP/s as fwd / bwd; wrote", out / "bench.json")


if __name__ == "__main__":
    main()
