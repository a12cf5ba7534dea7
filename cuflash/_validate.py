"""Argument checks shared by the CPU and GPU paths, run before anything is launched.

Every failure is a TypeError (wrong kind of thing) or ValueError (right kind, bad
value) whose message names the argument and says what is accepted.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np

from . import mask as _mask

__all__ = ["Problem", "check_qkv", "check_dropout", "check_scale", "check_seed_offset", "array_module_name"]

MAX_HEAD_DIM = 256
_GPU_DTYPES = ("float16", "bfloat16")
_CPU_DTYPES = ("float16", "bfloat16", "float32", "float64")


def array_module_name(x) -> str | None:
    """'cupy' or 'numpy' for arrays of those libraries, else None."""
    if isinstance(x, np.ndarray):
        return "numpy"
    t = type(x)
    if t in _CUPY_TYPES:
        return "cupy"
    if t.__module__.startswith("cupy") and hasattr(x, "data") and hasattr(x, "device"):
        _CUPY_TYPES.add(t)  # each call asks again otherwise (a hot path: every launch checks its arrays)
        return "cupy"
    return None


_CUPY_TYPES: set[type] = set()
_DTYPE_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """dtype.name, memoised: numpy computes the name in Python on every access (several
    microseconds, and each attention call asks a few times)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes of one attention call. q (B, Sq, H, D); k, v (B, Sk, Hk, D)."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: np.dtype
    xp_name: str  # "cupy" or "numpy"


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_flags(**flags) -> dict[str, bool]:
    return {k: _check_bool(k, v) for k, v in flags.items()}


def check_qkv(q, k, v) -> Problem:
    """Validate q, k, v and return their Problem. See cuflash.attention for the rules."""
    names = {"q": q, "k": k, "v": v}
    mods = {n: array_module_name(a) for n, a in names.items()}
    for n, m in mods.items():
        if m is None:
            raise TypeError(
                f"{n} must be a CuPy or NumPy array, or a GPU array with DLPack or __cuda_array_interface__, "
                f"got {type(names[n]).__module__}.{type(names[n]).__name__}"
            )
    if len(set(mods.values())) != 1:
        raise TypeError(f"q, k, v must all be CuPy arrays (GPU) or all NumPy arrays (CPU reference), got {mods}")
    xp_name = mods["q"]
    for n, a in names.items():
        if a.ndim != 4:
            raise ValueError(f"{n} must have 4 dimensions ({'B, Sq, H, D' if n == 'q' else 'B, Sk, Hk, D'}), got shape {a.shape}")
    accepted = _GPU_DTYPES if xp_name == "cupy" else _CPU_DTYPES
    for n, a in names.items():
        if dtype_name(a.dtype) not in accepted:
            raise TypeError(
                f"{n} has dtype {a.dtype.name}; accepted: {', '.join(accepted)}"
                + (" (bfloat16 as ml_dtypes.bfloat16)" if "bfloat16" in accepted else "")
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype.name}, {k.dtype.name}, {v.dtype.name}")
    if xp_name == "cupy":
        devs = {n: a.device.id for n, a in names.items()}
        if len(set(devs.values())) != 1:
            raise ValueError(f"q, k, v must be on one device, got {devs}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    Bk, Sk, Hk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k has batch {Bk} but q has batch {B}")
    if Dk != D:
        raise ValueError(f"k and v have head dim {Dk} but q has {D}")
    if min(B, Sq, H, Sk, Hk, D) < 1:
        raise ValueError(f"every dimension must be >= 1, got q {q.shape}, k {k.shape}")
    if H % Hk != 0:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's and v's heads ({Hk}) for GQA/MQA")
    if D % 8 != 0 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {D}")
    for n, a in names.items():
        if a.strides[-1] != a.itemsize:
            raise ValueError(f"{n}'s last dimension must be contiguous (stride {a.itemsize} bytes), got {a.strides[-1]}")
        if any(s < 0 for s in a.strides) or any(s % a.itemsize for s in a.strides):
            raise ValueError(f"{n} must have non-negative strides in whole elements, got {a.strides}")
    if Sk >= _mask.MAX_SEQLEN_K:
        raise ValueError(f"seqlen_k must be below 2**31, got {Sk}")
    return Problem(B, Sq, Sk, H, Hk, D, q.dtype, xp_name)


def check_dropout(dropout_p) -> tuple[float, int]:
    """(p, threshold) for a dropout probability; p in [0, 1)."""
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return p, _mask.drop_threshold(p)


def check_scale(softmax_scale, head_dim: int) -> float:
    """softmax_scale, defaulting to 1/sqrt(head_dim); must be a finite real number."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    if not math.isfinite(s):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return s


def _check_uint(name: str, value, limit: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    v = int(value)
    if v < 0 or v >= limit:
        raise ValueError(f"{name} must be in [0, 2**{limit.bit_length() - 1}), got {v}")
    return v


def check_seed_offset(seed, offset) -> tuple[int | None, int | None]:
    s = None if seed is None else _check_uint("seed", seed, 1 << 64)
    o = None if offset is None else _check_uint("offset", offset, _mask.MAX_OFFSET)
    return s, o


def check_mask_shape(batch: int, nheads: int) -> None:
    if batch >= _mask.MAX_BATCH:
        raise ValueError(f"with dropout, batch must be below 2**16 (it is part of the Philox counter), got {batch}")
    if nheads >= _mask.MAX_HEADS:
        raise ValueError(f"with dropout, the number of heads must be below 2**16, got {nheads}")
