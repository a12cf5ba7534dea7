"""A/B of cuflash source trees on one GPU: the benchmark's shapes, alternating runs.

    python examples/ab_trees.py OLD_TREE NEW_TREE [MORE...] [--runs 3] [--dims 64,128]
        [--seqlens 1024,4096,16384] [--ps 0,0.1] [--dtype float16] [--json FILE]

Each tree is a folder holding ``cuflash/`` and ``kernels_cu/`` (a checkout or a copy of
one). Timings from different processes, let alone different calls to a lent machine,
spread by several percent; trees timed in the same call, alternately, are comparable to
about 2 %. So each run times every tree once, in a fresh process with PYTHONPATH set to
that tree, and the order rotates from run to run. First every tree's kernels are
compiled (in parallel processes) so no run pays for a compile.

Prints forward, backward and ``deterministic=True`` backward TFLOP/s (means over the
runs) of every tree per shape, and each tree's change against the first one. Shapes are
benchmark.py's: 16k tokens at d_model 2048, full and causal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def shapes(args):
    for d in args.dims:
        for causal in (False, True):
            for p in args.ps:
                for s in args.seqlens:
                    yield d, causal, p, s


def worker(args) -> None:
    """Runs inside one tree's process: time every shape, print one JSON object."""
    sys.path.insert(0, str(HERE))
    import benchmark  # this script's sibling; it imports cuflash from PYTHONPATH

    import cuflash

    if args.warm:
        cuflash.warmup(dtypes=(args.dtype,), head_dims=tuple(args.dims), causal=(False, True),
                       dropout=tuple(sorted({p > 0 for p in args.ps})))
        return
    out = {}
    for d, causal, p, s in shapes(args):
        b, h, flops = benchmark.sweep_shape(s, d, causal)
        fwd, bwd, det = benchmark.bench_cuflash(b, s, h, d, causal, p, args.dtype, deterministic=True,
                                                backward=not args.forward_only)
        if args.forward_only:
            out[f"{d}|{int(causal)}|{p}|{s}"] = [benchmark._row_entry(flops, fwd, None)["fwd_tflops"]]
            continue
        e = benchmark._row_entry(flops, fwd, bwd)
        out[f"{d}|{int(causal)}|{p}|{s}"] = [e["fwd_tflops"], e["bwd_tflops"],
                                            benchmark._row_entry(flops, None, det)["bwd_tflops"]]
    print("AB_RESULT " + json.dumps(out), flush=True)


def run_tree(tree: Path, argv: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *argv], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{tree}: exit {r.returncode}\n{r.stderr[-4000:]}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dims", type=lambda t: [int(x) for x in t.split(",")], default=[64, 128])
    ap.add_argument("--seqlens", type=lambda t: [int(x) for x in t.split(",")], default=[1024, 4096, 16384])
    ap.add_argument("--ps", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.1])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--forward-only", action="store_true", help="time the forward alone (a third of the time)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if len(args.trees) < 2:
        ap.error("give at least two trees")
    for t in args.trees:
        if not (t / "cuflash").is_dir() or not (t / "kernels_cu").is_dir():
            ap.error(f"trees: {t} holds no cuflash/ and kernels_cu/")
    common = ["--dims", ",".join(map(str, args.dims)), "--seqlens", ",".join(map(str, args.seqlens)),
              "--ps", ",".join(map(str, args.ps)), "--dtype", args.dtype] + ["--forward-only"] * args.forward_only
    with ThreadPoolExecutor(len(args.trees)) as ex:  # compile every tree's kernels before timing any
        list(ex.map(lambda t: run_tree(t, common + ["--warm"]), args.trees))

    n = len(args.trees)
    runs: list[list[dict]] = [[] for _ in args.trees]
    for r in range(args.runs):
        for i in [(r + j) % n for j in range(n)]:  # rotate the order from run to run
            line = next(x for x in run_tree(args.trees[i], common).splitlines() if x.startswith("AB_RESULT "))
            runs[i].append(json.loads(line[len("AB_RESULT "):]))
            print(f"run {r} tree {i} done", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"trees": [str(t) for t in args.trees], "runs": runs}, indent=1))

    parts = 1 if args.forward_only else 3  # fwd, bwd, det
    mean = [{k: [sum(run[k][c] for run in tr) / len(tr) for c in range(parts)] for k in tr[0]} for tr in runs]
    names = [t.name or str(t) for t in args.trees]
    print(f"{args.dtype}, TFLOP/s means of {args.runs} alternating runs; +x % is against {names[0]}")
    head = "hd|causal|p|S".ljust(18) + "".join(f"{what + ' ' + nm:>22}"
                                             for what in ("fwd", "bwd", "det")[:parts] for nm in names)
    print(head)
    for k in mean[0]:
        cells = []
        for c in range(parts):
            base = mean[0][k][c]
            for i in range(n):
                v = mean[i][k][c]
                cells.append(f"{v:.1f}" if i == 0 else f"{v:.1f} ({100 * (v / base - 1):+.1f}%)")
        print(k.ljust(18) + "".join(f"{x:>22}" for x in cells))
    if args.forward_only:
        return
    print("deterministic=True cost (backward time, det / default - 1)")
    print("hd|causal|p|S".ljust(18) + "".join(f"{nm:>14}" for nm in names))
    for k in mean[0]:
        print(k.ljust(18) + "".join(f"{100 * (m[k][1] / m[k][2] - 1):>+13.1f}%" for m in mean))


if __name__ == "__main__":
    main()
