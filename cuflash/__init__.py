"""cuflash: FlashAttention for CuPy with exactly reproducible Philox dropout.

Public API (see each docstring for shapes):
    attention(q, k, v, *, dropout_p, causal, softmax_scale, seed, offset, deterministic) -> out
    attention_forward(...) -> (out, ctx);  attention_backward(dout, ctx) -> (dq, dk, dv)
    dropout_mask(batch, nheads, seqlen_q, seqlen_k, *, dropout_p, seed, offset, xp=None)
    manual_seed(n);  warmup(...);  gpu_available()
Submodules: cuflash.reference (float64 CPU reference), cuflash.rng (NumPy Philox twin),
cuflash.mask (the mask definition in NumPy).
"""

from __future__ import annotations

import functools

from ._generator import get_state, initial_seed, manual_seed, set_state
from .api import AttentionContext, attention, attention_backward, attention_forward, dropout_mask

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
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
