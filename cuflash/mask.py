"""The dropout mask, in NumPy: the twin of ``kernels_cu/dropout.cuh``.

Definition (the README gives it with a picture). For batch ``b``, query head ``h``,
query row ``i`` and key column ``j``::

    R, C  = i >> 4, j >> 4                    # 16x16 block of the score matrix
    r, c  = i & 15, j & 15                    # position inside the block
    lane  = (r & 7) * 4 + ((c & 7) >> 1)      # 0..31
    words = Philox4x32-10(counter=(32*C + lane, R, (b << 16) | h, offset),
                          key=(seed & 0xffffffff, seed >> 32))
          # = curand_init(seed, (offset << 32) | (b << 16) | h, 4*((R << 32) | (C << 5) | lane));
          #   curand4()
    u16   = (words[((c >> 3) << 1) | (r >> 3)] >> (16 * (c & 1))) & 0xffff
    keep  = u16 >= threshold,   threshold = round(dropout_p * 65536)

Kept values are scaled by ``65536 / (65536 - threshold)``, the inverse of the realized
keep probability, so dropout is unbiased for every ``p``; the effective drop
probability ``threshold / 65536`` is what ``ctx.dropout_p_effective`` reports.
"""

from __future__ import annotations

import numpy as np

from .rng import philox4x32_10

__all__ = [
    "DROPOUT_BITS",
    "MAX_BATCH",
    "MAX_HEADS",
    "MAX_OFFSET",
    "drop_threshold",
    "keep_probability",
    "dropout_mask_numpy",
]

DROPOUT_BITS = 16
_RANGE = 1 << DROPOUT_BITS
MAX_BATCH = 1 << 16  # b occupies bits 16..31 of counter word z
MAX_HEADS = 1 << 16  # h occupies bits 0..15 of counter word z
MAX_OFFSET = 1 << 32  # offset is counter word w
MAX_SEQLEN_K = 1 << 31  # 32*C + lane must fit counter word x

# Position of each element of a 16x16 block in the Philox output: which call (lane),
# which of its four words, which 16-bit half. Indexed [r, c].
_r = np.arange(16)[:, None]
_c = np.arange(16)[None, :]
_LANE = ((_r & 7) * 4 + ((_c & 7) >> 1)).astype(np.intp)
_WORD = (((_c >> 3) << 1) | (_r >> 3)).astype(np.intp) + 0 * _r
_SHIFT = (16 * (_c & 1)).astype(np.uint32) + 0 * _r.astype(np.uint32)


def drop_threshold(dropout_p: float) -> int:
    """The integer drop threshold ``round(p * 65536)``; raises ValueError if nothing would be kept."""
    t = int(round(float(dropout_p) * _RANGE))
    if t >= _RANGE:
        raise ValueError(
            f"dropout_p={dropout_p!r} is too close to 1: with 16-bit thresholds it drops every element"
            f" (accepted: 0 <= dropout_p <= {(_RANGE - 1) / _RANGE + 0.5 / _RANGE:.8f})"
        )
    return t


def keep_probability(threshold: int) -> float:
    """The realized keep probability ``(65536 - threshold) / 65536``."""
    return (_RANGE - threshold) / _RANGE


def dropout_mask_numpy(
    batch: int,
    nheads: int,
    seqlen_q: int,
    seqlen_k: int,
    *,
    threshold: int,
    seed: int,
    offset: int,
    row_start: int = 0,
    col_start: int = 0,
) -> np.ndarray:
    """keep(b, h, i, j) as a bool array (batch, nheads, seqlen_q, seqlen_k), True = kept.

    Rows are global rows ``row_start .. row_start + seqlen_q - 1`` and columns global
    columns ``col_start .. col_start + seqlen_k - 1`` (any non-negative starts), so the
    mask of one shard of a larger problem (context parallelism) is exactly the slice
    ``full[:, :, row_start:row_start + seqlen_q, col_start:col_start + seqlen_k]``.
    """
    if row_start < 0 or col_start < 0:
        raise ValueError(f"row_start and col_start must be >= 0, got {row_start} and {col_start}")
    if col_start + seqlen_k >= MAX_SEQLEN_K:
        raise ValueError(f"col_start + seqlen_k must be below 2**31, got {col_start + seqlen_k}")
    # Whole 16x16 blocks covering the requested window; the window is cut out at the end.
    r0, c0 = row_start >> 4, col_start >> 4
    n_r = ((row_start + seqlen_q + 15) >> 4) - r0
    n_c = ((col_start + seqlen_k + 15) >> 4) - c0
    dr, dc = row_start - 16 * r0, col_start - 16 * c0
    out = np.empty((batch, nheads, seqlen_q, seqlen_k), dtype=bool)
    key = np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], dtype=np.uint32)
    R = (r0 + np.arange(n_r, dtype=np.uint64)).astype(np.uint32)[:, None, None]
    C = (c0 + np.arange(n_c, dtype=np.uint64))[None, :, None]
    xw = (C * 32 + np.arange(32, dtype=np.uint64)[None, None, :]).astype(np.uint32)
    counter = np.empty((n_r, n_c, 32, 4), dtype=np.uint32)
    counter[..., 0] = xw
    counter[..., 1] = R
    counter[..., 3] = offset
    for b in range(batch):  # one (b, h) slice at a time keeps memory at O(Sq*Sk)
        for h in range(nheads):
            counter[..., 2] = (b << 16) | h
            words = philox4x32_10(counter, key)  # (n_r, n_c, 32, 4)
            vals = words[:, :, _LANE, _WORD]  # (n_r, n_c, 16, 16)
            keep = ((vals >> _SHIFT) & 0xFFFF) >= threshold
            full = keep.transpose(0, 2, 1, 3).reshape(n_r * 16, n_c * 16)
            out[b, h] = full[dr:dr + seqlen_q, dc:dc + seqlen_k]
    return out
