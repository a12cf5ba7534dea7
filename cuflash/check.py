"""The compile check: build every kernel variant for sm_80 and sm_90a with NVRTC (no GPU
needed) and report registers, spills, stack and shared memory per kernel from ptxas.

    python -m cuflash check [--arch sm_80 --arch sm_90a] [--jobs N] [--filter attn_fwd]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

from ._compile import CompileError, CompileResult, KernelVariant, compile_variant
from ._config import CHECK_ARCHS, all_variants

__all__ = ["run_check", "main"]


def _one(job: tuple[KernelVariant, str]) -> CompileResult | str:
    variant, arch = job
    try:
        return compile_variant(variant, arch, use_cache=False)
    except CompileError as e:
        return f"{variant.name} for {arch}: {e}"


def run_check(archs=CHECK_ARCHS, jobs: int | None = None, name_filter: str = "", out=sys.stdout) -> int:
    """Compile every variant for every arch; print a table; return the number of failures.

    A variant that is Hopper-only (wgmma) is built for sm_90a alone.
    """
    work = [
        (v, a)
        for v in all_variants()
        if name_filter in v.name
        for a in archs
        if not (v.hopper and a != "sm_90a")
    ]
    jobs = jobs or max(1, os.cpu_count() or 1)
    t0 = time.perf_counter()
    failures: list[str] = []
    rows: list[tuple[str, ...]] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        for res in pool.map(_one, work):
            if isinstance(res, str):
                failures.append(res)
                continue
            for r in res.reports:
                flag = " SPILL" if (r.spill_stores or r.spill_loads) else ""
                rows.append((res.variant.name, r.function, res.arch, str(r.registers), str(r.spill_stores),
                             str(r.spill_loads), str(r.stack_bytes), str(r.smem_bytes), f"{res.seconds:.1f}{flag}"))
    head = ("variant", "kernel", "arch", "regs", "spill_st", "spill_ld", "stack", "smem", "secs")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)), file=out)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=out)
    for f in failures:
        print(f"FAILED {f}", file=out)
    print(f"{len(work) - len(failures)} of {len(work)} variant builds compiled in {time.perf_counter() - t0:.0f} s",
          file=out)
    return len(failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cuflash", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    chk = sub.add_parser("check", help="compile every kernel variant and print registers/spills")
    chk.add_argument("--arch", action="append", help="target(s), default: sm_80 and sm_90a")
    chk.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: all cores)")
    chk.add_argument("--filter", default="", help="only variants whose name contains this")
    args = parser.parse_args(argv)
    if args.cmd == "check":
        return 1 if run_check(tuple(args.arch or CHECK_ARCHS), args.jobs, args.filter) else 0
    return 2
