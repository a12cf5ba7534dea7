"""Tensor maps for the Hopper forward's TMA loads (kernels_cu/tma_sm90.cuh).

A (B, S, H, D) array of 16-bit elements becomes the 4-d TMA grid (D, S, H, B), read in
boxes of 64 columns x `rows` rows with the 128-byte swizzle that wgmma reads; elements past
S or D come back as zeros. The map is encoded by the driver (cuTensorMapEncodeTiled, through
ctypes: CuPy does not wrap it) and passed to the kernel by value, as a 128-byte numpy
structured scalar, so CUDA graphs capture it like any other argument.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

# cuda.h enum values
_DTYPE_FLOAT16, _DTYPE_BFLOAT16 = 6, 9
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_128B = 2
_OOB_FILL_ZERO = 0

BOX_COLS = 64  # 64 16-bit elements: one 128-byte swizzle row
_MAP_DTYPE = np.dtype([("opaque", np.uint64, (16,))], align=True)  # CUtensorMap, 128 bytes


def box_layout(shape: tuple[int, int, int, int], strides_bytes: tuple[int, int, int, int], rows: int):
    """(dims, strides, box) of the TMA grid of a (B, S, H, D) array whose last dim is
    contiguous: dims (D, S, H, B), byte strides of S, H and B, box (64, rows, 1, 1). A
    dimension of extent 1 is never stepped, so its stride is set to a legal stand-in (the
    driver wants every stride a multiple of 16 below 2^40, and a broadcast view has 0).
    Returns None where TMA cannot take the array: a stride not a multiple of 16 bytes, or
    the last dim not contiguous 16-bit (tensor_map checks the base address)."""
    B, S, H, D = shape
    sb, ss, sh, sd = strides_bytes
    if sd != 2:
        return None
    strides = []
    for extent, stride in ((S, ss), (H, sh), (B, sb)):
        if extent == 1:
            stride = 16
        if stride % 16 or not 0 < stride < 1 << 40:
            return None
        strides.append(stride)
    return (D, S, H, B), tuple(strides), (BOX_COLS, rows, 1, 1)


@functools.lru_cache(maxsize=1)
def _encode_fn():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.lru_cache(maxsize=256)  # keyed by address, layout and box: no contents
def _encode(ptr: int, bf16: bool, dims, strides, box) -> np.void:
    buf = ctypes.create_string_buffer(128 + 64)  # the driver wants the map 64-byte aligned
    addr = (ctypes.addressof(buf) + 63) & ~63
    c_dims = (ctypes.c_uint64 * 4)(*dims)
    c_strides = (ctypes.c_uint64 * 3)(*strides)
    c_box = (ctypes.c_uint32 * 4)(*box)
    c_elem = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    err = _encode_fn()(addr, _DTYPE_BFLOAT16 if bf16 else _DTYPE_FLOAT16, 4, ptr, c_dims, c_strides, c_box, c_elem,
                       _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_128B, _OOB_FILL_ZERO)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {err} (dims {dims}, strides {strides}, "
                           f"box {box})")
    out = np.zeros((), dtype=_MAP_DTYPE)
    ctypes.memmove(out.ctypes.data, addr, 128)
    return out[()]


def tensor_map(a, rows: int, bf16: bool) -> np.void | None:
    """The tensor map of CuPy array `a` (B, S, H, D) for boxes of 64 x `rows`, or None when
    TMA cannot read it (box_layout)."""
    if a.data.ptr % 16:
        return None
    layout = box_layout(a.shape, a.strides, rows)
    if layout is None:
        return None
    return _encode(a.data.ptr, bf16, *layout)
