"""cuflash benchmark: validate, then time forward/backward against torch SDPA peers.

    PYTHONPATH=. python examples/benchmark.py [--quick] [--out DIR]

Sweeps 16k tokens at d_model 2048 (batch = 16384 / seqlen, heads = 2048 / head_dim):
seqlen 512..16k x head dim 64/128 x causal x p {0, 0.1} x fp16/bf16. Times with CUDA
events (warm-up, median of repeats, inputs rotated over sets larger than L2) and
reports TFLOP/s (fwd = 4·B·H·Sq·Sk·D, halved when causal; bwd = 2.5 x fwd). When torch
is importable, times scaled_dot_product_attention with the FLASH_ATTENTION (FA2) and
CUDNN_ATTENTION backends on the same shapes in the same run. Writes bench.json and
bench.png. torch is never a dependency of cuflash.

``--repeats N`` times every library N times per row in rotating order and keeps the
medians: one reading per row spreads by several percent (BENCH.md v16).

Each repeat times a run of back-to-back calls between two events (enough calls for a
few milliseconds, each on the next input set), so the GPU time of a call is measured
and the host's launch work overlaps the previous call, as in a training step. The
json also keeps, per row and library, the time of a single call issued to an idle
GPU (``*_call_ms``: GPU time plus whatever host work precedes the launch) and the
host time to issue one call (``*_host_us``).
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


def timings(fn, items, new_event, elapsed_ms, reps=10, warmup=3, target_ms=5.0, max_inner=50):
    """(back-to-back ms per call, single-call ms, host us per call) of fn over items, rotated.

    new_event() makes a timing event with record() and synchronize() on the library's
    current stream; elapsed_ms(a, b) reads two of them. Single calls: event, call, event,
    each issued to an idle GPU. Back to back: `inner` calls between two events, inner
    chosen for about target_ms per repeat. Medians over `reps` repeats.
    """
    import time

    for i in range(warmup):
        fn(items[i % len(items)])
    single = []
    for i in range(reps):
        a, b = new_event(), new_event()
        a.record()
        fn(items[i % len(items)])
        b.record()
        b.synchronize()
        single.append(elapsed_ms(a, b))
    call_ms = float(np.median(single))
    inner = max(1, min(max_inner, math.ceil(target_ms / max(call_ms, 1e-3))))
    runs, host = [], []
    for r in range(reps):
        a, b = new_event(), new_event()
        a.record()
        t0 = time.perf_counter()
        for i in range(inner):
            fn(items[(r * inner + i) % len(items)])
        host.append((time.perf_counter() - t0) / inner * 1e6)
        b.record()
        b.synchronize()
        runs.append(elapsed_ms(a, b) / inner)
    return float(np.median(runs)), call_ms, float(np.median(host))


def cupy_timings(fn, items):
    import cupy as cp

    cp.cuda.Device().synchronize()
    return timings(fn, items, cp.cuda.Event, cp.cuda.get_elapsed_time)


def n_sets(bytes_per_set: int, l2_bytes: int = 50 << 20) -> int:
    return max(2, min(8, math.ceil(3 * l2_bytes / max(bytes_per_set, 1))))


def bench_cuflash(B, S, H, D, causal, p, dt, deterministic=False, backward=True):
    """Timings of the forward and the backward, and (deterministic) of the backward with
    deterministic=True on the same inputs, else None. backward=False: the forward's alone,
    the other two None."""
    import cupy as cp

    rng = cp.random.default_rng(0)
    mk = lambda: rng.standard_normal((B, S, H, D), dtype=cp.float32).astype(_dtype(dt))  # noqa: E731
    sets = [tuple(mk() for _ in range(4)) for _ in range(n_sets(4 * B * S * H * D * 2))]
    fwd = cupy_timings(lambda s: cuflash.attention_forward(s[0], s[1], s[2], dropout_p=p, causal=causal), sets)
    if not backward:
        return fwd, None, None

    def bwd(det):
        ctxs = [cuflash.attention_forward(q, k, v, dropout_p=p, causal=causal, seed=1, deterministic=det)[1]
                for q, k, v, _ in sets]
        return cupy_timings(lambda sc: cuflash.attention_backward(sc[0][3], sc[1]), list(zip(sets, ctxs)))

    return fwd, bwd(False), bwd(True) if deterministic else None


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

    def tm(fn, items):
        torch.cuda.synchronize()
        return timings(fn, items, lambda: torch.cuda.Event(enable_timing=True), lambda a, b: a.elapsed_time(b))

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


def sweep_shape(S: int, D: int, causal: bool) -> tuple[int, int, float]:
    """(batch, heads, forward FLOPs) of the sweep's shape at seqlen S, head dim D: 16k
    tokens at d_model 2048; fwd = 4·B·H·S²·D, halved when causal."""
    B, H = 16384 // S, 2048 // D
    return B, H, 4 * B * H * S * S * D / (2 if causal else 1)


def median_timings(runs):
    """Field-wise medians of several timings() results of one thing; None if there are none."""
    if not runs or runs[0] is None:
        return None
    return tuple(float(np.median([r[i] for r in runs])) for i in range(len(runs[0])))


def _row_entry(flops, fwd, bwd):
    """Timings -> the json fields of one library's row; TFLOP/s from the back-to-back times.
    fwd None: the backward's fields only; bwd None: the forward's only."""
    e = {}
    if bwd is not None:
        e.update(bwd_ms=bwd[0], bwd_tflops=2.5 * flops / bwd[0] / 1e9, bwd_call_ms=bwd[1], bwd_host_us=bwd[2])
    if fwd is not None:
        e.update(fwd_ms=fwd[0], fwd_tflops=flops / fwd[0] / 1e9, fwd_call_ms=fwd[1], fwd_host_us=fwd[2])
    return e


_SHORT = {"FLASH_ATTENTION": "FA2", "CUDNN_ATTENTION": "cuDNN"}


def markdown_table(rows, peers) -> str:
    """The rows as the markdown table of examples/BENCH.md (TFLOP/s; ratios to FA2)."""
    det = any("cuflash_det" in r for r in rows)
    head = ["dtype", "hd", "mask", "p", "seqlen", "cuflash fwd", "cuflash bwd"]
    for peer in peers:
        head += [f"{_SHORT[peer]} fwd", f"{_SHORT[peer]} bwd"]
    if "FLASH_ATTENTION" in peers:
        head += ["fwd vs FA2", "bwd vs FA2"]
    if det:
        head += ["det bwd cost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        dt = "fp16" if r["dtype"] == "float16" else "bf16"
        cells = [dt, r["head_dim"], "causal" if r["causal"] else "full", r["p"], r["seqlen"],
                 f"{r['cuflash']['fwd_tflops']:.0f}", f"{r['cuflash']['bwd_tflops']:.0f}"]
        for peer in peers:
            e = r[peer]
            cells += ["n/a", "n/a"] if "error" in e else [f"{e['fwd_tflops']:.0f}", f"{e['bwd_tflops']:.0f}"]
        if "FLASH_ATTENTION" in peers:
            e = r["FLASH_ATTENTION"]
            cells += (["n/a", "n/a"] if "error" in e else
                      [f"{r['cuflash']['fwd_tflops'] / e['fwd_tflops']:.2f}",
                       f"{r['cuflash']['bwd_tflops'] / e['bwd_tflops']:.2f}"])
        if det:
            cells.append(f"{100 * (r['cuflash_det']['bwd_ms'] / r['cuflash']['bwd_ms'] - 1):+.1f} %")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="seqlen 1k/4k/16k, fp16 only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--seqlens", help="comma-separated seqlens (default: the sweep)")
    ap.add_argument("--head-dims", default="64,128", help="comma-separated head dims")
    ap.add_argument("--dtypes", help="comma-separated: float16,bfloat16")
    ap.add_argument("--ps", default="0.0,0.1", help="comma-separated dropout probabilities")
    ap.add_argument("--deterministic", action="store_true",
                    help="also time cuflash's backward with deterministic=True (row key cuflash_det, bwd_* only)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every library this many times per row, in rotating order, and keep the medians "
                         "(one reading per row spreads by several percent)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
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
                        B, H, flops = sweep_shape(S, D, causal)
                        row = dict(dtype=dt, head_dim=D, causal=causal, p=p, seqlen=S, batch=B, heads=H)
                        libs = ["cuflash", *peers]
                        got: dict[str, list] = {name: [] for name in libs}
                        for r in range(args.repeats):
                            for name in libs[r % len(libs):] + libs[:r % len(libs)]:
                                got[name].append(bench_cuflash(B, S, H, D, causal, p, dt, args.deterministic)
                                                 if name == "cuflash" else bench_torch(B, S, H, D, causal, p, dt, name))
                        fwd, bwd, bwd_det = (median_timings([t[i] for t in got["cuflash"]]) for i in range(3))
                        row["cuflash"] = _row_entry(flops, fwd, bwd)
                        if bwd_det is not None:
                            row["cuflash_det"] = _row_entry(flops, None, bwd_det)  # backward only
                        for peer in peers:
                            ok = [t for t in got[peer] if t[0] is not None]  # (None, message): not available
                            row[peer] = (_row_entry(flops, *(median_timings([t[i] for t in ok]) for i in range(2)))
                                         if ok else dict(error=got[peer][0][1]))
                        rows.append(row)
                        line = (f"{dt:8s} d{D:<3d} {'causal' if causal else 'full  '} p={p:.1f} S={S:5d} | cuflash "
                                f"{row['cuflash']['fwd_tflops']:6.1f} / {row['cuflash']['bwd_tflops']:6.1f}")
                        if args.deterministic:
                            line += f" (det bwd {row['cuflash_det']['bwd_tflops']:6.1f})"
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
    table = markdown_table(rows, peers)
    (out / "bench.md").write_text(table + "\n")
    print(table)
    host_us = {name: [r[name]["fwd_host_us"] for r in rows if "fwd_host_us" in r.get(name, {})]
               for name in ["cuflash", *peers]}
    host = {name: np.median(v) for name, v in host_us.items() if v}  # a peer that never ran has none
    print("median host time to issue one forward call (us): " + ", ".join(f"{k} {v:.0f}" for k, v in host.items()))
    print("TFLOP/s from back-to-back calls; wrote", out / "bench.json", "and bench.md")


if __name__ == "__main__":
    main()
