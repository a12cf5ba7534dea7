"""Launch configuration, checked on the CPU: every tile configuration fits the shared
memory of the GPUs it is chosen for, and where the backward's cannot fit, it says so
before launching anything."""

import types

import pytest

from cuflash import _attn_gpu
from cuflash._config import HEAD_DIMS, SM90_BWD_HEAD_DIMS, SM90_FWD_HEAD_DIMS, fwd_tiles, hopper_fwd_tiles

# Dynamic shared memory one block may opt in to, and shared memory per SM, in bytes, by
# compute capability (CUDA C++ Programming Guide, technical specifications); the driver
# reserves 1 KB of each SM's shared memory per resident block.
SMEM_OPTIN = {"8.0": 166912, "8.6": 101376, "8.9": 101376, "9.0": 232448}
SMEM_PER_SM = {"8.0": 167936, "8.6": 102400, "8.9": 102400, "9.0": 233472}
RESERVED_PER_BLOCK = 1024


def _fake_device(monkeypatch, cc: str) -> None:
    info = types.SimpleNamespace(hopper=cc == "9.0", sm_count=132, smem_optin=SMEM_OPTIN[cc])
    monkeypatch.setattr(_attn_gpu, "_device", lambda: info)


def test_forward_tiles_fit_every_gpu():
    for d in HEAD_DIMS:  # the sm_80 forward runs everywhere
        smem = fwd_tiles(d).smem_bytes(d, "fwd")
        assert smem <= min(SMEM_OPTIN.values()), (d, smem)
    for d in SM90_FWD_HEAD_DIMS:
        for dropout in (False, True):
            for tiles in hopper_fwd_tiles(d, dropout, True) + hopper_fwd_tiles(d, dropout, False):
                smem = tiles.smem_bytes(d, "fwd_sm90")
                assert smem <= SMEM_OPTIN["9.0"], (d, dropout, tiles, smem)
                # the CTAs per SM the kernel is built for (__launch_bounds__) must fit too
                assert tiles.min_blocks * (smem + RESERVED_PER_BLOCK) <= SMEM_PER_SM["9.0"], (d, dropout, tiles)


@pytest.mark.parametrize("cc", sorted(SMEM_OPTIN))
def test_backward_tiles_fit_or_raise(monkeypatch, cc):
    _fake_device(monkeypatch, cc)
    small = SMEM_OPTIN[cc] < 128 * 1024
    for d in HEAD_DIMS:
        hopper = cc == "9.0" and d in SM90_BWD_HEAD_DIMS
        if small and d > 128:  # sm_80 backward, single stage: 121 KB at 192, 154 KB at 256
            with pytest.raises(ValueError, match=rf"head dim {d}: .* this GPU allows {SMEM_OPTIN[cc]}; .* up to 128"):
                _attn_gpu.backward_tiles(d, d, hopper)
            continue
        tiles, smem = _attn_gpu.backward_tiles(d, d, hopper)
        print(cc, d, "hopper" if hopper else "sm_80", tiles, smem)
        assert smem <= SMEM_OPTIN[cc]
        assert tiles.min_blocks * (smem + RESERVED_PER_BLOCK) <= SMEM_PER_SM[cc]
        # Q/dO double buffered wherever two stages fit
        assert tiles.stages == 2 or _attn_gpu.bwd_tiles(d).smem_bytes(d, "bwd") > SMEM_OPTIN[cc]


def test_backward_raises_before_launching(monkeypatch):
    # A head dim 256 backward on a 99 KB GPU: ValueError, and no kernel was looked up or
    # launched (not even the delta kernel that runs first).
    _fake_device(monkeypatch, "8.6")

    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was fetched for launch")

    monkeypatch.setattr(_attn_gpu, "get_function", no_launch)
    monkeypatch.setattr(_attn_gpu, "_empty", no_launch)
    array = types.SimpleNamespace  # the backward reads only the shapes before its check
    ctx = types.SimpleNamespace(q=array(shape=(1, 64, 2, 256)), k=array(shape=(1, 64, 2, 256)),
                                v=array(shape=(1, 64, 2, 256)), causal=False, threshold=0, deterministic=False)
    with pytest.raises(ValueError, match="head dim 256"):
        _attn_gpu.backward(None, ctx)


def test_warmup_takes_the_backward_s_tiles_and_its_error(monkeypatch):
    # warmup readies the backward kernel attention_backward would launch (the same tiles,
    # single-stage on a 99 KB GPU where two stages do not fit), and where there is none
    # (head dim 256 on a 99 KB GPU) it raises the backward's ValueError before compiling.
    from cuflash._config import bwd_variant

    _fake_device(monkeypatch, "8.6")
    fetched = []
    monkeypatch.setattr(_attn_gpu, "get_function", lambda variant, fn, **kw: fetched.append((variant, fn)))
    with pytest.raises(ValueError, match="head dim 256"):
        _attn_gpu.warmup(dtypes=("float16",), head_dims=(64, 256), causal=(True,), dropout=(False,))
    assert fetched == []
    for d in (64, 128):
        n = _attn_gpu.warmup(dtypes=("float16",), head_dims=(d,), causal=(True,), dropout=(False,))
        tiles, _ = _attn_gpu.backward_tiles(d, d, False)
        assert n == 2 and fetched[-1] == (bwd_variant("float16", d, True, False, tiles), "attn_bwd_kernel")
    assert _attn_gpu.warmup(dtypes=("float16",), head_dims=(256,), causal=(True,), dropout=(False,),
                            backward=False) == 1


def test_tma_box_layout():
    from cuflash._tma import box_layout

    # contiguous (B, S, H, D) fp16: dims reversed, byte strides of S, H, B, 64-column boxes
    assert box_layout((2, 300, 4, 64), (300 * 4 * 64 * 2, 4 * 64 * 2, 64 * 2, 2), 128) == (
        (64, 300, 4, 2), (512, 128, 300 * 512), (64, 128, 1, 1))
    # one slice of a packed (B, S, 3, H, D) qkv buffer: the seq stride spans all three
    assert box_layout((1, 17, 2, 40), (17 * 3 * 80 * 2, 3 * 80 * 2, 40 * 2, 2), 64) == (
        (40, 17, 2, 1), (480, 80, 16), (64, 64, 1, 1))  # batch of 1: its stride is never stepped
    assert box_layout((2, 8, 2, 64), (0, 256, 128, 2), 64) is None  # a broadcast batch: stride 0
    assert box_layout((1, 8, 2, 64), (0, 264, 128, 2), 64) is None  # seq stride not a multiple of 16 bytes
    assert box_layout((1, 8, 2, 64), (0, 256, 128, 4), 64) is None  # last dim not contiguous 16-bit
