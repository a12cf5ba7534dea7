"""Ring attention over N GPUs, one process per GPU: check it against one GPU, then time it.

    PYTHONPATH=. python examples/ring_attention_launch.py --nproc 2 --causal --dropout 0.1 --load-balanced
    PYTHONPATH=. python examples/ring_attention_launch.py --bench --nproc 2 --seqlen 262144 --heads 16 \\
        --head-dim 128 --causal --load-balanced
    PYTHONPATH=. python examples/ring_attention_launch.py --bench --scaling --seqlen 131072 --causal --load-balanced

Processes are started with multiprocessing's spawn method, rank r on GPU r; rank 0 makes
the NCCL unique id and hands it to the others through a queue. NCCL_NVLS_ENABLE=0 is set
before anything touches NCCL (NVLink multicast stays off). --nproc 1 runs the same code
on one GPU without NCCL (cuflash.distributed.LocalComm).

Check mode (default): every rank builds the same global inputs (numpy seed), takes its
shard (cuflash.context_parallel.shard_sequence), runs ring_attention_forward/backward;
rank 0 also runs cuflash.attention_forward/backward on the whole problem (one GPU, same
seed and offset). The parent compares both against the float64 reference with the global
dropout mask (ring error <= 2x (out) / 3x (gradients) the single-GPU error + 4 units of
rounding of the result's size), and reads the applied mask back through probe inputs
(q = 0, one-hot v / dout: out and dv are nonzero exactly where the mask keeps) in windows
straddling chunk boundaries, which must equal cuflash's mask bit for bit. Prints one line
per check and "ALL CHECKS PASSED" (exit 0) or "CHECK FAILED" (exit 1).

Bench mode: each rank makes only its shard on the GPU; forward and forward+backward timed
with CUDA events after warm-up, max over ranks; prints ms per step, tokens/s, TFLOP/s per
GPU (fwd = 4*B*H*S^2*D, halved causal; bwd = 2.5 x fwd), the memory CuPy's pool holds,
and what the S x S score matrix of a naive implementation would need. --scaling runs
nproc = 1, 2, 4, 8 (up to the GPUs present) at the same total sequence length.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import traceback

import numpy as np

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before any NCCL initialisation, inherited by the ranks


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float16)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _eps(name) -> float:
    return 2.0 ** -11 if name == "float16" else 2.0 ** -8


# --------------------------------------------------------------------------- #
# Probe inputs: the results spell out the dropout mask
# --------------------------------------------------------------------------- #


def mask_probe(B, S, H, D, i0, j0):
    """q = 0 makes P uniform over the visible keys; v[j0 + d, d] = 1 makes out[i, d] =
    Z[i, j0 + d] and dout[i0 + d, d] = 1 makes dv[j, d] = Z[i0 + d, j], where
    Z = keep * P / keep_prob: nonzero exactly where the mask keeps a visible score."""
    q = np.zeros((B, S, H, D))
    k = np.random.default_rng(0).standard_normal((B, S, H, D))
    v = np.zeros((B, S, H, D))
    dout = np.zeros((B, S, H, D))
    for d in range(D):
        if j0 + d < S:
            v[:, j0 + d, :, d] = 1
        if i0 + d < S:
            dout[:, i0 + d, :, d] = 1
    return q, k, v, dout


def probe_expected(B, S, H, D, i0, j0, causal, p, seed, offset):
    """Nonzero patterns of out (B, S, H, D) and dv (B, S, H, D) for mask_probe."""
    from cuflash.mask import drop_threshold, dropout_mask_numpy
    from cuflash.reference import causal_mask

    t = drop_threshold(p)
    vis = causal_mask(S, S) if causal else np.ones((S, S), bool)
    wq, wr = min(D, S - j0), min(D, S - i0)
    keep_c = dropout_mask_numpy(B, H, S, wq, threshold=t, seed=seed, offset=offset, col_start=j0)
    keep_r = dropout_mask_numpy(B, H, wr, S, threshold=t, seed=seed, offset=offset, row_start=i0)
    out_nz = np.zeros((B, S, H, D), bool)
    out_nz[..., :wq] = (keep_c & vis[None, None, :, j0:j0 + wq]).transpose(0, 2, 1, 3)
    dv_nz = np.zeros((B, S, H, D), bool)
    dv_nz[..., :wr] = (keep_r & vis[None, None, i0:i0 + wr, :]).transpose(0, 3, 1, 2)
    return out_nz, dv_nz


def probe_windows(S, n_chunks, D):
    """(i0, j0) windows that straddle chunk boundaries."""
    c = S // n_chunks
    a = max(0, c - D // 2)
    b = max(0, S - c - D // 2)
    return list(dict.fromkeys([(a, b), (b, a)]))


# --------------------------------------------------------------------------- #
# Rank processes
# --------------------------------------------------------------------------- #


def _ring_kwargs(args):
    return dict(causal=args.causal, dropout_p=args.dropout, seed=args.rng_seed, offset=args.rng_offset,
                load_balanced=args.load_balanced, deterministic=args.deterministic)


def _check_rank(rank, n, comm, args):
    import cupy as cp

    import cuflash
    from cuflash import distributed
    from cuflash.context_parallel import shard_sequence

    dtype = _dtype(args.dtype)
    B, S, H, Hk, D = args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(args.data_seed)  # the same global inputs on every rank
    full = [rng.standard_normal(s).astype(dtype) for s in ((B, S, H, D), (B, S, Hk, D), (B, S, Hk, D), (B, S, H, D))]
    lb = args.load_balanced
    q, k, v, dout = (cp.asarray(shard_sequence(x, rank, n, load_balanced=lb)) for x in full)
    out, ctx = distributed.ring_attention_forward(q, k, v, comm, **_ring_kwargs(args))
    dq, dk, dv = distributed.ring_attention_backward(dout, ctx)
    res = {"ring": {name: _host(a) for name, a in
                    (("out", out), ("lse", ctx.lse), ("dq", dq), ("dk", dk), ("dv", dv))}}
    if rank == 0:
        g = [cp.asarray(x) for x in full]
        out_f, ctx_f = cuflash.attention_forward(g[0], g[1], g[2], causal=args.causal, dropout_p=args.dropout,
                                                 seed=args.rng_seed, offset=args.rng_offset,
                                                 deterministic=args.deterministic)
        grads = cuflash.attention_backward(g[3], ctx_f)
        res["flat"] = {name: _host(a) for name, a in zip(("out", "lse", "dq", "dk", "dv"),
                                                        (out_f, ctx_f.lse, *grads))}
    if args.dropout > 0:
        res["probe"] = []
        for i0, j0 in probe_windows(S, n * (2 if lb else 1), D):
            pq, pk, pv, pdo = (cp.asarray(shard_sequence(x.astype(dtype), rank, n, load_balanced=lb))
                               for x in mask_probe(B, S, H, D, i0, j0))
            po, pctx = distributed.ring_attention_forward(pq, pk, pv, comm, **_ring_kwargs(args))
            pdv = distributed.ring_attention_backward(pdo, pctx)[2]
            res["probe"].append((i0, j0, _host(po), _host(pdv)))
    cp.cuda.Device().synchronize()
    return res


def _bench_rank(rank, n, comm, args, barrier):
    import cupy as cp

    from cuflash import distributed
    from cuflash.context_parallel import _from_float

    dtype = _dtype(args.dtype)
    B, S, H, Hk, D = args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim
    L = S // n
    gen = cp.random.default_rng(1000 + rank)

    def rand(shape):
        return _from_float(gen.standard_normal(shape, dtype=cp.float32), dtype, cp)

    q, dout = rand((B, L, H, D)), rand((B, L, H, D))
    k, v = rand((B, L, Hk, D)), rand((B, L, Hk, D))
    kw = _ring_kwargs(args)

    def forward():
        return distributed.ring_attention_forward(q, k, v, comm, **kw)

    def step():
        _, ctx = forward()
        distributed.ring_attention_backward(dout, ctx)

    for _ in range(args.warmup):
        step()
    cp.cuda.Device().synchronize()
    times = {}
    for name, fn in (("fwd", forward), ("step", step)):
        barrier.wait()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        for _ in range(args.iters):
            fn()
        b.record()
        b.synchronize()
        times[name] = cp.cuda.get_elapsed_time(a, b) / args.iters
    _, total = cp.cuda.Device().mem_info
    pool = cp.get_default_memory_pool().total_bytes()  # the pool keeps what it held at the peak
    return {"fwd_ms": times["fwd"], "step_ms": times["step"], "pool_gib": pool / 2**30, "device_gib": total / 2**30}


def _worker(rank, n, args, uid_queue, result_queue, barrier):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    try:
        import cupy as cp

        cp.cuda.Device(rank).use()
        from cuflash import distributed

        if n == 1:
            comm = distributed.LocalComm()
        else:
            if rank == 0:
                uid = distributed.get_unique_id()
                for _ in range(n - 1):
                    uid_queue.put(uid)
            else:
                uid = uid_queue.get(timeout=300)
            comm = distributed.RingComm.create(uid, rank, n)
        res = _bench_rank(rank, n, comm, args, barrier) if args.bench else _check_rank(rank, n, comm, args)
        result_queue.put((rank, "ok", res))
    except BaseException:  # the parent prints it and stops the other ranks
        result_queue.put((rank, "error", traceback.format_exc()))


def launch(n, args):
    """Run n ranks; return their results by rank (raises if one failed)."""
    ctx = mp.get_context("spawn")
    uid_queue, result_queue = ctx.Queue(), ctx.Queue()
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_worker, args=(r, n, args, uid_queue, result_queue, barrier), daemon=True)
             for r in range(n)]
    for p in procs:
        p.start()
    results, deadline = {}, time.time() + args.timeout
    try:
        while len(results) < n:
            try:
                rank, status, res = result_queue.get(timeout=max(1.0, deadline - time.time()))
            except Exception as e:
                raise RuntimeError(f"ranks {sorted(set(range(n)) - set(results))} gave no result in"
                                   f" {args.timeout} s") from e
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{res}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == n else 0.1)
        for p in procs:  # only our own rank processes, by handle
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [results[r] for r in range(n)]


# --------------------------------------------------------------------------- #
# Parent: checks and reports
# --------------------------------------------------------------------------- #


def run_check(args) -> bool:
    from cuflash.context_parallel import unshard_sequence
    from cuflash.mask import drop_threshold, dropout_mask_numpy, keep_probability
    from cuflash.reference import attention_backward_ref, attention_forward_ref

    n, lb = args.nproc, args.load_balanced
    B, S, H, Hk, D = args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim
    print(f"check: {n} rank(s), B={B} S={S} H={H} Hk={Hk} D={D} {args.dtype} causal={args.causal} "
          f"p={args.dropout} load_balanced={lb}", flush=True)
    res = launch(n, args)
    ring = {name: unshard_sequence([r["ring"][name] for r in res], load_balanced=lb, axis=2 if name == "lse" else 1)
            for name in ("out", "lse", "dq", "dk", "dv")}
    flat = res[0]["flat"]

    dtype = _dtype(args.dtype)
    rng = np.random.default_rng(args.data_seed)
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((B, S, H, D), (B, S, Hk, D), (B, S, Hk, D),
                                                                    (B, S, H, D)))
    t = drop_threshold(args.dropout)
    keep = dropout_mask_numpy(B, H, S, S, threshold=t, seed=args.rng_seed, offset=args.rng_offset) if t else None
    kw = dict(causal=args.causal, keep=keep, keep_scale=1.0 / keep_probability(t))
    o_ref, lse_ref = attention_forward_ref(q, k, v, **kw)
    g_ref = attention_backward_ref(dout, q, k, v, o_ref, lse_ref, **kw)

    ok = True
    for name, ref, mult in (("out", o_ref, 2), ("dq", g_ref[0], 3), ("dk", g_ref[1], 3), ("dv", g_ref[2], 3)):
        e = float(np.abs(ring[name].astype(np.float64) - ref).max())
        ef = float(np.abs(flat[name].astype(np.float64) - ref).max())
        slack = 4 * _eps(args.dtype) * float(np.abs(ref).max())
        good = bool(np.isfinite(e) and e <= mult * ef + slack)
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}: ring err {e:.3e}, single-GPU err {ef:.3e} "
              f"(bound {mult} x single + {slack:.1e})")
    fin = np.isfinite(lse_ref)
    same_inf = bool(np.array_equal(np.isfinite(ring["lse"]), fin))
    e_lse = float(np.abs(ring["lse"][fin] - lse_ref[fin]).max()) if fin.any() else 0.0
    good = same_inf and e_lse < 1e-3
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} lse: ring err {e_lse:.3e}, -inf rows match: {same_inf}")
    for idx, (i0, j0, _, _) in enumerate(res[0].get("probe", [])):
        po = unshard_sequence([r["probe"][idx][2] for r in res], load_balanced=lb)
        pdv = unshard_sequence([r["probe"][idx][3] for r in res], load_balanced=lb)
        out_nz, dv_nz = probe_expected(B, S, H, D, i0, j0, args.causal, args.dropout, args.rng_seed,
                                       args.rng_offset)
        bad_o = int(((po != 0) != out_nz).sum())
        bad_v = int(((pdv != 0) != dv_nz).sum())
        good = bad_o == 0 and bad_v == 0 and bool(np.isfinite(po.astype(np.float32)).all())
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} dropout mask, rows {i0}.. x cols {j0}.. : {bad_o} mismatches in out, "
              f"{bad_v} in dv ({int(out_nz.sum())} + {int(dv_nz.sum())} kept entries checked)")
    print("ALL CHECKS PASSED" if ok else "CHECK FAILED", flush=True)
    return ok


def _flops(args) -> float:
    f = 4.0 * args.batch * args.heads * args.seqlen ** 2 * args.head_dim
    return f / 2 if args.causal else f


def run_bench(args) -> None:
    import cupy as cp

    ngpu = cp.cuda.runtime.getDeviceCount()
    counts = [c for c in (1, 2, 4, 8) if c <= ngpu] if args.scaling else [args.nproc]
    m = 2 if args.load_balanced else 1
    naive = args.batch * args.heads * args.seqlen ** 2 * _dtype(args.dtype).itemsize
    print(f"bench: B={args.batch} S={args.seqlen} H={args.heads} Hk={args.kv_heads} D={args.head_dim} {args.dtype} "
          f"causal={args.causal} p={args.dropout} load_balanced={args.load_balanced}; a naive implementation's "
          f"S x S scores alone: {naive / 2**30:.0f} GiB", flush=True)
    print("| GPUs | fwd ms | fwd+bwd ms | tokens/s (fwd+bwd) | TFLOP/s per GPU (fwd+bwd) | pool GiB per GPU | "
          "scaling eff. |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for n in counts:
        if args.seqlen % (16 * m * n):
            print(f"| {n} | skipped: seqlen must be a multiple of {16 * m * n} |")
            continue
        res = launch(n, args)
        fwd = max(r["fwd_ms"] for r in res)
        step = max(r["step_ms"] for r in res)
        pool = max(r["pool_gib"] for r in res)
        tflops = 3.5 * _flops(args) / (step * 1e-3) / n / 1e12
        base = step if base is None and n == 1 else base
        eff = f"{base / (n * step):.2f}" if base else "-"
        print(f"| {n} | {fwd:.1f} | {step:.1f} | {args.batch * args.seqlen / (step * 1e-3):.3g} | {tflops:.0f} | "
              f"{pool:.1f} of {res[0]['device_gib']:.0f} | {eff} |", flush=True)
        if naive > res[0]["device_gib"] * 2**30 and n == counts[0]:
            print(f"(the naive S x S matrix, {naive / 2**30:.0f} GiB, does not fit one GPU's "
                  f"{res[0]['device_gib']:.0f} GiB)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None, help="ranks = GPUs (default: all GPUs)")
    ap.add_argument("--seqlen", type=int, default=1024, help="total sequence length S (queries = keys)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--load-balanced", action="store_true", help="rank r holds chunks r and 2n-1-r")
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--bench", action="store_true", help="time instead of checking")
    ap.add_argument("--scaling", action="store_true", help="with --bench: 1, 2, 4, 8 GPUs")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rng-seed", type=int, default=0x5EED_0F_D20F, help="dropout Philox seed")
    ap.add_argument("--rng-offset", type=int, default=7)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the ranks")
    args = ap.parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.nproc is None:
        import cupy as cp

        args.nproc = cp.cuda.runtime.getDeviceCount()
    if args.bench:
        run_bench(args)
        return 0
    return 0 if run_check(args) else 1


if __name__ == "__main__":
    sys.exit(main())
