"""Ring attention over several GPUs, one process per GPU, with NCCL point-to-point transfers.

Layout: the sequence is cut into world_size chunks (2*world_size load-balanced) of equal
length, a multiple of 16; rank r holds the queries, keys and values of chunk r (chunks r
and 2*world_size-1-r, concatenated, load-balanced). ``cuflash.context_parallel.shard_sequence``
cuts a global tensor that way and ``unshard_sequence`` puts the parts back. Every rank
passes arrays of the same shapes.

Forward, on rank r (n ranks, K/V packed in one (2, B, Sk_local, Hk, D) buffer)::

    step t = 0 .. n-1:   kv holds the chunk(s) of rank (r - t) mod n
        comm stream:     send kv -> rank r+1, receive the next kv <- rank r-1   (t < n-1)
        compute stream:  attention_shard_forward(q part, kv part) for every pair that
                         causality does not hide, merged into float32 (out, lse)
        compute waits for the receive before step t+1 reads the other buffer

Two K/V buffers alternate; the transfer of step t runs on its own stream while the
kernels of step t run on the current stream. A receive into a buffer waits (an event on
the compute stream) until the kernels that read that buffer were issued before it.

Backward: each rank needs dq for its queries (summed over all key chunks: kept local, in
float32) and the dk, dv of every key chunk gather contributions from all ranks. The dk, dv
accumulator of a chunk travels with it around the ring, in float32::

    step t:   K/V of chunk c = (r - t) mod n arrive as in the forward; so does the
              accumulator (dk, dv) of chunk c, which ranks c .. r-1 have added to
              attention_shard_backward(dout, q, kv, with the merged out and lse) -> add to
              dq, and to the accumulator of chunk c; send it on at step t+1
    end:      one more hop returns each accumulator to its owner (rank c gets chunk c's)

The accumulator send of step t waits for that step's additions; the receive of the next
step's accumulator runs meanwhile, together with the K/V transfer, behind the kernels.
Per step a rank sends its K/V (fp16/bf16) and a float32 dk, dv buffer (twice the K/V
bytes): float32 keeps the n-fold sum as exact as the single-GPU kernel's.

The transport is an object with ``rank``, ``world_size``, ``start_exchange(sends, recvs)``
(send each buffer to rank+1 and receive each from rank-1, in order, after the compute
stream's work issued so far) and ``finish_exchange()`` (the compute stream waits for the
transfer). ``RingComm`` implements it with ``cupy.cuda.nccl``; the tests drive the same
schedule with NumPy arrays through an in-process stand-in.

NVLink multicast (NVLS) buys nothing for point-to-point transfers; ``RingComm.create`` sets
NCCL_NVLS_ENABLE=0 unless the environment already says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from . import _validate
from . import context_parallel as _cp

__all__ = [
    "nccl_available",
    "get_unique_id",
    "RingComm",
    "LocalComm",
    "RingContext",
    "ring_attention",
    "ring_attention_forward",
    "ring_attention_backward",
]

Array = Any


# --------------------------------------------------------------------------- #
# NCCL (imported lazily: cuflash must import without it)
# --------------------------------------------------------------------------- #


def _find_nccl_library() -> str | None:
    """libnccl.so.2 from the environment (CUFLASH_NCCL_LIBRARY) or a pip wheel
    (nvidia-nccl-cu*, e.g. installed alongside PyTorch), or None."""
    import sys

    explicit = os.environ.get("CUFLASH_NCCL_LIBRARY")
    if explicit:
        return explicit
    for base in sys.path:
        cand = os.path.join(base, "nvidia", "nccl", "lib", "libnccl.so.2")
        if os.path.exists(cand):
            return cand
    return None


def _nccl():
    """cupy_backends' NCCL module; ImportError saying what is missing when it cannot load."""
    import warnings

    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl is missing; the error below says it
            warnings.simplefilter("ignore")
            from cupy.cuda import nccl
    except ImportError as e:
        raise ImportError(f"cuflash.distributed needs CuPy: {e}") from e
    if getattr(nccl, "available", False):
        from cupy_backends.cuda.libs import nccl as lib

        return lib
    path = _find_nccl_library()
    if path is not None:
        import ctypes

        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # then the binding's own dlopen finds it
        try:
            from cupy_backends.cuda.libs import nccl as lib

            return lib
        except ImportError:
            pass
    raise ImportError(
        "cuflash.distributed needs NCCL through cupy.cuda.nccl, which could not load libnccl.so.2:"
        " install the nvidia-nccl-cu12/cu13 wheel matching your CuPy (or point CUFLASH_NCCL_LIBRARY"
        " at libnccl.so.2)")


def nccl_available() -> bool:
    """True when cupy.cuda.nccl can be used (CuPy and libnccl.so.2 both load)."""
    try:
        _nccl()
        return True
    except Exception:  # no CuPy, no NCCL, or no driver: all mean "not available"
        return False


def get_unique_id():
    """A new NCCL unique id (on one rank; hand it to every rank for RingComm.create)."""
    return _nccl().get_unique_id()


class RingComm:
    """The ring's transport: NCCL send/recv to rank+1 / from rank-1 on a dedicated stream.

    Create one per process with ``RingComm.create(unique_id, rank, world_size)`` (or wrap
    an existing ``cupy.cuda.nccl.NcclCommunicator``). Transfers run on ``self.stream``,
    ordered after the compute stream's work with events.
    """

    def __init__(self, nccl_comm, *, rank: int | None = None, world_size: int | None = None):
        import cupy

        self._lib = _nccl()
        self.nccl_comm = nccl_comm
        self.rank = int(nccl_comm.rank_id() if rank is None else rank)
        self.world_size = int(nccl_comm.size() if world_size is None else world_size)
        self.device_id = int(cupy.cuda.Device().id)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._done = None  # event recorded after the last exchange
        self._in_flight: tuple = ()  # keeps the buffers of the last exchange alive

    @classmethod
    def create(cls, unique_id, rank: int, world_size: int, device: int | None = None) -> RingComm:
        """Join the communicator of unique_id as rank (of world_size) on device (default:
        the current CuPy device). Sets NCCL_NVLS_ENABLE=0 unless already set."""
        import cupy

        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        lib = _nccl()
        if device is not None:
            cupy.cuda.Device(device).use()
        return cls(lib.NcclCommunicator(int(world_size), unique_id, int(rank)), rank=rank, world_size=world_size)

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    def start_exchange(self, sends, recvs) -> None:
        """Send each of sends to rank+1 and receive each of recvs from rank-1 (matched in
        order), on self.stream, after everything issued so far on the current stream."""
        import cupy

        for buf in list(sends) + list(recvs):
            if not buf.flags.c_contiguous:
                raise ValueError("ring transfer buffers must be C-contiguous")
        compute = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(compute)
        self.stream.wait_event(ready)  # the buffers' last writers and readers were issued before
        lib = self._lib
        lib.groupStart()
        try:
            for buf in sends:
                self.nccl_comm.send(buf.data.ptr, buf.nbytes, lib.NCCL_UINT8, self.next, self.stream.ptr)
            for buf in recvs:
                self.nccl_comm.recv(buf.data.ptr, buf.nbytes, lib.NCCL_UINT8, self.prev, self.stream.ptr)
        finally:
            lib.groupEnd()
        self._done = cupy.cuda.Event(disable_timing=True)
        self._done.record(self.stream)
        self._in_flight = (tuple(sends), tuple(recvs))

    def finish_exchange(self) -> None:
        """The current stream waits for the last exchange (received data is then readable)."""
        import cupy

        if self._done is not None:
            cupy.cuda.get_current_stream().wait_event(self._done)
        self._in_flight = ()

    def destroy(self) -> None:
        """Free the NCCL communicator (after the last use)."""
        self.nccl_comm.destroy()


class LocalComm:
    """A ring of one rank (no NCCL): ring_attention on a single GPU, e.g. the 1-GPU
    baseline of a scaling measurement. A ring of one never exchanges anything."""

    rank = 0
    world_size = 1

    def start_exchange(self, sends, recvs) -> None:
        raise RuntimeError("a LocalComm ring has one rank and nothing to exchange")

    def finish_exchange(self) -> None:
        raise RuntimeError("a LocalComm ring has one rank and nothing to exchange")


# --------------------------------------------------------------------------- #
# Ring attention
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class RingContext:
    """What ring_attention_backward needs: this rank's inputs, its rows' merged out and lse
    (B, H, Sq_local) float32, the transport and the forward's settings."""

    q: Array
    k: Array
    v: Array
    out: Array
    lse: Array
    comm: Any
    causal: bool
    dropout_p: float
    softmax_scale: float | None
    seed: int | None
    offset: int | None
    load_balanced: bool
    deterministic: bool


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where this rank's parts sit in the global problem."""

    n: int
    rank: int
    q_parts: tuple[tuple[int, int], ...]  # (local start, global start) of each query part
    cq: int  # rows per query part
    ck: int  # keys per key part
    sq_tot: int
    sk_tot: int
    load_balanced: bool

    def key_parts(self, src: int) -> tuple[tuple[int, int], ...]:
        """(local start in the K/V buffer, global start) of rank src's key parts."""
        ids = _cp.rank_chunk_ids(src, self.n, self.load_balanced)
        return tuple((i * self.ck, c * self.ck) for i, c in enumerate(ids))


def _layout(q, k, comm, load_balanced: bool) -> _Layout:
    n, rank = int(comm.world_size), int(comm.rank)
    if n < 1 or not 0 <= rank < n:
        raise ValueError(f"comm has rank {rank} of world_size {n}")
    m = 2 if load_balanced else 1
    lq, lk = q.shape[1], k.shape[1]
    for name, length in (("q", lq), ("k", lk)):
        if length % (16 * m):
            raise ValueError(
                f"{name}'s local sequence length must be a multiple of {16 * m} ({m} chunk(s) per rank whose"
                f" starts are multiples of 16), got {length}")
    cq, ck = lq // m, lk // m
    ids = _cp.rank_chunk_ids(rank, n, load_balanced)
    q_parts = tuple((i * cq, c * cq) for i, c in enumerate(ids))
    return _Layout(n, rank, q_parts, cq, ck, n * lq, n * lk, load_balanced)


def _check_comm(comm, q) -> None:
    for attr in ("rank", "world_size", "start_exchange", "finish_exchange"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm must be a RingComm (or provide {attr}), got {type(comm).__name__}")
    if _validate.array_module_name(q) == "cupy" and hasattr(comm, "device_id") and comm.device_id != q.device.id:
        raise ValueError(f"comm was created on device {comm.device_id} but q is on device {q.device.id}")


def _as_comm(comm):
    """A RingComm, wrapping a bare cupy NcclCommunicator if that is what was passed."""
    if hasattr(comm, "start_exchange"):
        return comm
    if type(comm).__name__ == "NcclCommunicator":
        return RingComm(comm)
    return comm


def _kv_buffer(k, v, xp):
    """K and V packed in one contiguous (2, B, Sk_local, Hk, D) buffer: one transfer per step."""
    buf = xp.empty((2,) + k.shape, dtype=k.dtype)
    buf[0] = k
    buf[1] = v
    return buf


def ring_attention_forward(
    q: Array,
    k: Array,
    v: Array,
    comm,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    seed: int | None = None,
    offset: int | None = None,
    load_balanced: bool = False,
    deterministic: bool = False,
) -> tuple[Array, RingContext]:
    """This rank's part of ring attention; returns ``(out, ctx)`` for ring_attention_backward.

    q: (B, Sq_local, H, D), k, v: (B, Sk_local, Hk, D): this rank's chunk(s) of the global
    problem (shard_sequence layout; Sq_total = world_size * Sq_local). Local lengths are
    multiples of 16 (32 load-balanced) and the same on every rank. comm: a RingComm (one
    per process and GPU) or a cupy NcclCommunicator. Every rank must call with the same
    shapes and settings. out: (B, Sq_local, H, D); ctx.lse (B, H, Sq_local) float32.
    causal: the global bottom-right mask; dropout: the global mask, the one
    cuflash.attention_forward draws on the whole problem with the same seed and offset,
    which must be given explicitly (every rank uses the same).
    """
    comm = _as_comm(comm)
    _check_comm(comm, q)
    prob = _validate.check_qkv(q, k, v)
    flags = _validate.check_flags(causal=causal, deterministic=deterministic, load_balanced=load_balanced)
    p, _ = _validate.check_dropout(dropout_p)
    seed, offset = _validate.check_seed_offset(seed, offset)
    if p > 0.0 and (seed is None or offset is None):
        raise TypeError("ring_attention with dropout_p > 0 needs explicit seed and offset (ints), the same on"
                        f" every rank, got seed={seed}, offset={offset}")
    lay = _layout(q, k, comm, flags["load_balanced"])
    xp = _cp._xp(prob.xp_name)
    B, Lq, H, D = q.shape
    shard_kw = dict(seqlen_q_total=lay.sq_tot, seqlen_k_total=lay.sk_tot, causal=flags["causal"], dropout_p=p,
                    softmax_scale=softmax_scale, seed=seed, offset=offset, deterministic=flags["deterministic"])

    acc = [(xp.zeros((B, lay.cq, H, D), np.float32), xp.full((B, H, lay.cq), -np.inf, np.float32))
           for _ in lay.q_parts]
    bufs = [_kv_buffer(k, v, xp)]
    if lay.n > 1:
        bufs.append(xp.empty_like(bufs[0]))
    for t in range(lay.n):
        src = (lay.rank - t) % lay.n
        cur = bufs[t % 2]
        if t < lay.n - 1:
            comm.start_exchange([cur], [bufs[(t + 1) % 2]])
        for i, (ql, qg) in enumerate(lay.q_parts):
            for kl, kg in lay.key_parts(src):
                if _cp.fully_masked((qg, qg + lay.cq), (kg, kg + lay.ck), lay.sq_tot, lay.sk_tot, flags["causal"]):
                    continue
                o, sctx = _cp.attention_shard_forward(
                    q[:, ql:ql + lay.cq], cur[0, :, kl:kl + lay.ck], cur[1, :, kl:kl + lay.ck],
                    q_start=qg, k_start=kg, **shard_kw)
                acc[i] = _cp.merge_attention([acc[i][0], o], [acc[i][1], sctx.lse], out_dtype=np.float32)
        if t < lay.n - 1:
            comm.finish_exchange()

    out = _cp._empty(xp, (B, Lq, H, D), q.dtype)
    lse = _cp._empty(xp, (B, H, Lq), np.float32)
    for (ql, _), (o32, l32) in zip(lay.q_parts, acc):
        out[:, ql:ql + lay.cq] = _cp._from_float(o32, q.dtype, xp)
        lse[:, :, ql:ql + lay.cq] = l32
    ctx = RingContext(q=q, k=k, v=v, out=out, lse=lse, comm=comm, causal=flags["causal"], dropout_p=p,
                      softmax_scale=softmax_scale, seed=seed, offset=offset, load_balanced=flags["load_balanced"],
                      deterministic=flags["deterministic"])
    return out, ctx


def ring_attention_backward(dout: Array, ctx: RingContext) -> tuple[Array, Array, Array]:
    """Gradients ``(dq, dk, dv)`` of this rank's q, k, v (local shapes), given dout =
    dL/dout (B, Sq_local, H, D) of this rank's rows. Every rank must call it. The dk, dv
    accumulators travel around the ring with K/V in float32 (module docstring)."""
    if not isinstance(ctx, RingContext):
        raise TypeError(f"ctx must be the RingContext from ring_attention_forward, got {type(ctx).__name__}")
    _cp._check_like("dout", dout, ctx.out, "out")
    if dout.strides[-1] != dout.itemsize:
        raise ValueError("dout's last dimension must be contiguous")
    q, k, v, comm = ctx.q, ctx.k, ctx.v, ctx.comm
    lay = _layout(q, k, comm, ctx.load_balanced)
    xp = _cp._xp(_validate.array_module_name(q))
    B, Lq, H, D = q.shape
    shard_kw = dict(seqlen_q_total=lay.sq_tot, seqlen_k_total=lay.sk_tot, causal=ctx.causal,
                    dropout_p=ctx.dropout_p, softmax_scale=ctx.softmax_scale, seed=ctx.seed, offset=ctx.offset,
                    deterministic=ctx.deterministic)
    # The kernels read lse densely: one contiguous copy per query part, made once.
    parts = [(ql, qg, ctx.out[:, ql:ql + lay.cq], xp.ascontiguousarray(ctx.lse[:, :, ql:ql + lay.cq]))
             for ql, qg in lay.q_parts]

    dq_acc = xp.zeros((B, Lq, H, D), np.float32)
    bufs = [_kv_buffer(k, v, xp)]
    dkv = [xp.empty((2,) + k.shape, np.float32)]  # the travelling (dk, dv) accumulators
    if lay.n > 1:
        bufs.append(xp.empty_like(bufs[0]))
        dkv.append(xp.empty_like(dkv[0]))
    for t in range(lay.n):
        src = (lay.rank - t) % lay.n
        cur = bufs[t % 2]
        sends, recvs = [], []
        if t < lay.n - 1:  # K/V of the next step
            sends.append(cur)
            recvs.append(bufs[(t + 1) % 2])
        if t > 0:  # pass on the accumulator of step t-1; receive the one of chunk src
            sends.append(dkv[(t - 1) % 2])
            recvs.append(dkv[t % 2])
        if sends:
            comm.start_exchange(sends, recvs)
        contrib = xp.zeros((2,) + k.shape, np.float32)  # this rank's share of chunk src's (dk, dv)
        for ql, qg, out_p, lse_p in parts:
            for kl, kg in lay.key_parts(src):
                if _cp.fully_masked((qg, qg + lay.cq), (kg, kg + lay.ck), lay.sq_tot, lay.sk_tot, ctx.causal):
                    continue
                sctx = _cp.make_shard_context(
                    q[:, ql:ql + lay.cq], cur[0, :, kl:kl + lay.ck], cur[1, :, kl:kl + lay.ck], out_p, lse_p,
                    q_start=qg, k_start=kg, **shard_kw)
                dq, dk, dv = _cp.attention_shard_backward(dout[:, ql:ql + lay.cq], sctx)
                dq_acc[:, ql:ql + lay.cq] += _cp._to_float(dq, np.float32, xp)
                contrib[0, :, kl:kl + lay.ck] += _cp._to_float(dk, np.float32, xp)
                contrib[1, :, kl:kl + lay.ck] += _cp._to_float(dv, np.float32, xp)
        if sends:
            comm.finish_exchange()
        if t == 0:
            dkv[0][...] = contrib  # chunk r's accumulator starts here
        else:
            dkv[t % 2] += contrib
    if lay.n > 1:  # one more hop: every accumulator back to its owner
        comm.start_exchange([dkv[(lay.n - 1) % 2]], [dkv[lay.n % 2]])
        comm.finish_exchange()
    final = dkv[lay.n % 2] if lay.n > 1 else dkv[0]
    return (_cp._from_float(dq_acc, q.dtype, xp), _cp._from_float(final[0], k.dtype, xp),
            _cp._from_float(final[1], v.dtype, xp))


def ring_attention(q: Array, k: Array, v: Array, comm, **kwargs) -> Array:
    """Output only: ``ring_attention_forward(q, k, v, comm, **kwargs)[0]``."""
    return ring_attention_forward(q, k, v, comm, **kwargs)[0]
