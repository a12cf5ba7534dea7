"""cuflash: FlashAttention for CuPy with exactly reproducible Philox dropout.

Public API (see each docstring for shapes):
    attention(q, k, v, *, dropout_p, causal, softmax_scale, seed, offset, deterministic, generator) -> out
    attention_forward(...) -> (out, ctx);  attention_backward(dout, ctx) -> (dq, dk, dv)
    dropout_mask(batch, nheads, seqlen_q, seqlen_k, *, dropout_p, seed, offset, xp=None)
    manual_seed(n);  warmup(...);  gpu_available()
    DeviceGenerator(seed, offset=0): (seed, offset) state in GPU memory, for CUDA graphs
    as_cupy_stream(stream): run cuflash on another library's CUDA stream (torch, ...)
q, k, v and dout may be CuPy or NumPy arrays, or any GPU array with DLPack or
__cuda_array_interface__ (torch, JAX, Numba), taken without a copy.
Context parallelism: merge_attention(outs, lses), attention_shard_forward/backward (one
block of a larger problem, global causal and dropout coordinates), ring_attention_simulated
(one GPU), cuflash.distributed.ring_attention (NCCL, one process per GPU).
Submodules: cuflash.reference (float64 CPU reference), cuflash.rng (NumPy Philox twin),
cuflash.mask (the mask definition in NumPy).
"""

from __future__ import annotations

import functools

from ._generator import DeviceGenerator, get_state, initial_seed, manual_seed, set_state
from ._interop import as_cupy_stream
from .api import AttentionContext, attention, attention_backward, attention_forward, dropout_mask
from . import context_parallel, distributed
from .context_parallel import (attention_shard_backward, attention_shard_forward, merge_attention,
                               merge_attention_backward, ring_attention_simulated)

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "attention_shard_backward",
    "attention_shard_forward",
    "context_parallel",
    "distributed",
    "merge_attention",
    "merge_attention_backward",
    "ring_attention_simulated",
    "DeviceGenerator",
    "as_cupy_stream",
    "attention",
    "attention_backward",
    "attention_forward",
    "dropout_mask",
    "get_state",
    "gpu_available",
    "initial_seed",
    "manual_seed",
    "set_state",
    "warmup",
]


@functools.lru_cache(maxsize=None)
def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, or no device: all mean "use the CPU path"
        return False


def warmup(*args, **kwargs):
    """Precompile kernel variants; see cuflash._attn_gpu.warmup for the arguments."""
    from ._attn_gpu import warmup as _warmup

    return _warmup(*args, **kwargs)
