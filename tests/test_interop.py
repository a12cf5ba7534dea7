"""Other libraries' arrays at the API boundary.

CPU part (runs in CI): which protocol an argument is taken through (DLPack before
__cuda_array_interface__), that refusals and foreign devices raise TypeError naming
the argument, and that the usual validation still names q/k/v/dout after conversion.
The GPU part (marked `gpu`) runs torch tensors through cuflash and back with no copy,
on torch's current stream; and JAX arrays outside jit when JAX is installed.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import cuflash
from cuflash import _interop, attention, attention_backward, attention_forward

SEED, OFFSET = 0xFEED_0000_0000_0001, 5


def _raises(exc, word, fn, *args, **kwargs):
    with pytest.raises(exc) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    print(f"{ei.type.__name__}: {msg}")
    assert re.search(word, msg), f"message does not name {word!r}: {msg}"
    return msg


def _qkv(B=1, Sq=6, Sk=9, H=2, Hk=1, D=8, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Sq, H, D)).astype(dtype), rng.standard_normal((B, Sk, Hk, D)).astype(dtype),
            rng.standard_normal((B, Sk, Hk, D)).astype(dtype))


# --------------------------------------------------------------------------- #
# Stand-ins for foreign arrays (no GPU needed)
# --------------------------------------------------------------------------- #


class DLPackOnly:
    """Offers DLPack on a chosen device; wraps a NumPy array as its 'memory'."""

    def __init__(self, array, device_type=2):
        self.array = array
        self.device_type = device_type

    def __dlpack__(self, *, stream=None, max_version=None, copy=None):
        raise AssertionError("the fake cupy module should have been used")

    def __dlpack_device__(self):
        return self.device_type, 0


class CAIOnly:
    """Offers only __cuda_array_interface__."""

    def __init__(self, array):
        self.array = array

    @property
    def __cuda_array_interface__(self):
        raise AssertionError("the fake cupy module should have been used")


class Both(DLPackOnly):
    """Offers both protocols; its __cuda_array_interface__ raises on access, as torch's
    does for a tensor that requires grad."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on a tensor that requires grad")


class FakeCupy:
    """Records which entry point converted what; 'converts' to the wrapped NumPy array,
    so the CPU reference path runs on the result."""

    def __init__(self, fail=None):
        self.calls = []
        self.fail = fail

    def from_dlpack(self, x):
        self.calls.append(("from_dlpack", x))
        if self.fail is not None:
            raise self.fail
        return x.array

    def asarray(self, x):
        self.calls.append(("asarray", x))
        if self.fail is not None:
            raise self.fail
        return x.array


@pytest.fixture
def fake_cupy(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setattr(_interop, "_cupy_for", lambda name, x: fake)
    return fake


# --------------------------------------------------------------------------- #
# CPU tests
# --------------------------------------------------------------------------- #


def test_cupy_and_numpy_arrays_pass_through(fake_cupy):
    q, _, _ = _qkv()
    assert _interop.as_array(q, "q") is q
    assert fake_cupy.calls == []


def test_unknown_objects_pass_through_and_validation_names_them():
    for obj in ([1.0], "q", 3.0, object()):
        assert _interop.as_array(obj, "q") is obj
    q, k, v = _qkv()
    _raises(TypeError, r"\bq\b.*CuPy or NumPy", attention, q.tolist(), k, v)
    _raises(TypeError, r"\bk\b.*DLPack", attention, q, object(), v)
    _raises(TypeError, r"\bv\b", attention, q, k, "v")
    _, ctx = attention_forward(q, k, v)
    _raises(TypeError, r"\bdout\b", attention_backward, q.tolist(), ctx)


def test_protocol_choice(fake_cupy):
    q, k, v = _qkv()
    a, b, c = DLPackOnly(q), CAIOnly(k), Both(v)
    assert _interop.as_array(a, "q") is q
    assert _interop.as_array(b, "k") is k
    assert _interop.as_array(c, "v") is v  # DLPack chosen; the raising property is never read
    assert [(name, obj) for name, obj in fake_cupy.calls] == [("from_dlpack", a), ("asarray", b), ("from_dlpack", c)]
    assert all(_interop.is_convertible(x) for x in (a, b, c))
    assert not any(_interop.is_convertible(x) for x in (q, [1], None))


def test_converted_arguments_run_and_match(fake_cupy):
    """The converted arrays go through the normal path: same result as passing them directly."""
    q, k, v = _qkv()
    dout = np.random.default_rng(1).standard_normal(q.shape)
    kw = dict(dropout_p=0.25, causal=True, seed=SEED, offset=OFFSET)
    out, ctx = attention_forward(DLPackOnly(q), CAIOnly(k), Both(v), **kw)
    out_ref, ctx_ref = attention_forward(q, k, v, **kw)
    np.testing.assert_array_equal(out, out_ref)
    assert ctx.q is q and ctx.k is k and ctx.v is v  # the converted arrays themselves, not copies
    for a, b in zip(attention_backward(DLPackOnly(dout), ctx), attention_backward(dout, ctx_ref)):
        np.testing.assert_array_equal(a, b)


def test_validation_after_conversion_names_argument(fake_cupy):
    q, k, v = _qkv()
    _raises(TypeError, r"\bk\b.*dtype", attention, DLPackOnly(q), DLPackOnly(k.astype(np.int32)), DLPackOnly(v))
    _raises(ValueError, r"\bv\b.*4 dimensions", attention, q, k, CAIOnly(v[0]))
    _raises(ValueError, r"\bq\b.*contiguous", attention, DLPackOnly(np.zeros((1, 4, 2, 16))[..., ::2]), k, v)
    _, ctx = attention_forward(q, k, v)
    _raises(ValueError, r"\bdout\b", attention_backward, DLPackOnly(np.zeros((1, 6, 2, 16))), ctx)
    _raises(TypeError, r"\bdout\b", attention_backward, CAIOnly(np.zeros(q.shape, np.float32)), ctx)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_foreign_refusal_becomes_type_error_naming_argument(monkeypatch, which):
    """An exporter that refuses (torch: 'Can't export tensors that require gradient')."""
    fake = FakeCupy(fail=RuntimeError("Can't export tensors that require gradient, use tensor.detach()"))
    monkeypatch.setattr(_interop, "_cupy_for", lambda name, x: fake)
    args = dict(zip("qkv", _qkv()))
    args[which] = DLPackOnly(args[which])
    msg = _raises(TypeError, rf"^{which}\b", attention, args["q"], args["k"], args["v"])
    assert "detach" in msg
    args[which] = CAIOnly(args[which].array)
    _raises(TypeError, rf"^{which}\b.*__cuda_array_interface__", attention, args["q"], args["k"], args["v"])


@pytest.mark.parametrize("device_type,word", [(1, "CPU"), (3, "pinned"), (10, "ROCm"), (99, "99")])
def test_dlpack_on_another_device_rejected(fake_cupy, device_type, word):
    q, k, v = _qkv()
    msg = _raises(TypeError, r"^k\b", attention, q, DLPackOnly(k, device_type=device_type), v)
    assert word in msg
    assert fake_cupy.calls == []
    _, ctx = attention_forward(q, k, v)
    _raises(TypeError, r"^dout\b", attention_backward, DLPackOnly(q, device_type=device_type), ctx)


def test_dlpack_device_failure_named(fake_cupy):
    class Broken(DLPackOnly):
        def __dlpack_device__(self):
            raise BufferError("no device")

    q, k, v = _qkv()
    _raises(TypeError, r"^v\b.*no device", attention, q, k, Broken(v))


@pytest.mark.skipif(cuflash.gpu_available(), reason="checks the message given where there is no GPU")
@pytest.mark.parametrize("wrap", [DLPackOnly, CAIOnly], ids=["dlpack", "cai"])
def test_gpu_array_without_gpu_named(wrap):
    q, k, v = _qkv()
    msg = _raises(TypeError, r"^q\b", attention, wrap(q), k, v)
    assert "GPU" in msg


def test_as_cupy_stream_rejects_non_streams():
    pytest.importorskip("cupy")
    for bad in ("stream", 1.5, None, True, object()):
        _raises(TypeError, "stream", cuflash.as_cupy_stream, bad)


# --------------------------------------------------------------------------- #
# GPU: torch
# --------------------------------------------------------------------------- #


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


def _host_bits(a):
    """A CuPy array's bytes on the host, for bitwise comparison of any dtype."""
    return np.ascontiguousarray(a.get()).view(np.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_torch_no_copy_roundtrip_on_torch_stream(cp, dtype_name, causal):
    torch = _torch_cuda()
    dt = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, H, Hk, Sq, Sk, D = 2, 4, 2, 200, 136, 64
    # SDPA layout (B, H, S, D); cuflash gets (B, S, H, D) views, last dim still contiguous
    qh = torch.randn(B, H, Sq, D, device="cuda", dtype=dt, generator=gen)
    kh, vh = (torch.randn(B, Hk, Sk, D, device="cuda", dtype=dt, generator=gen) for _ in range(2))
    doh = torch.randn(B, H, Sq, D, device="cuda", dtype=dt, generator=gen)
    q, k, v, dout = (t.transpose(1, 2) for t in (qh, kh, vh, doh))
    kw = dict(dropout_p=0.15, causal=causal, seed=SEED, offset=OFFSET, deterministic=True)

    side = torch.cuda.Stream()  # a non-default torch stream: cuflash must follow it
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cuflash.as_cupy_stream(torch.cuda.current_stream()):
        assert cp.cuda.get_current_stream().ptr == side.cuda_stream
        out, ctx = attention_forward(q, k, v, **kw)
        dq, dk, dv = attention_backward(dout, ctx)
        out_t, dq_t, dk_t, dv_t = (torch.from_dlpack(a) for a in (out, dq, dk, dv))
        loss = (out_t.float() * 2).sum()  # torch work on the same stream, ordered after cuflash
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    # inputs: no copy (same pointers and strides)
    for name, t, c in (("q", q, ctx.q), ("k", k, ctx.k), ("v", v, ctx.v)):
        assert isinstance(c, cp.ndarray), name
        assert c.data.ptr == t.data_ptr(), name
        assert c.strides == tuple(s * t.element_size() for s in t.stride()), name
        assert c.dtype.name == dtype_name, name
    # outputs: CuPy arrays, and torch sees the same memory
    for name, c, t, shape in (("out", out, out_t, q.shape), ("dq", dq, dq_t, q.shape),
                              ("dk", dk, dk_t, k.shape), ("dv", dv, dv_t, v.shape)):
        assert isinstance(c, cp.ndarray), name
        assert t.data_ptr() == c.data.ptr, name
        assert t.dtype == dt and tuple(t.shape) == tuple(shape), name
    assert torch.isfinite(loss)

    # the same call on CuPy copies of the inputs gives the same bits
    qc, kc, vc, doc = (cp.ascontiguousarray(cp.from_dlpack(t)) for t in (q, k, v, dout))
    assert qc.data.ptr != ctx.q.data.ptr
    out2, ctx2 = attention_forward(qc, kc, vc, **kw)
    grads2 = attention_backward(doc, ctx2)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, ctx.lse, dq, dk, dv), (out2, ctx2.lse, *grads2)):
        diff = int((_host_bits(a) != _host_bits(b)).sum())
        print(f"{dtype_name} causal={causal} {name}: {diff} differing bytes")
        assert diff == 0, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_torch_matches_sdpa_at_p0(cp, dtype_name):
    torch = _torch_cuda()
    dt = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(4)
    S, D = 173, 64
    qh, kh, vh = (torch.randn(2, 4, S, D, device="cuda", dtype=dt, generator=gen) for _ in range(3))
    for causal in (False, True):
        with cuflash.as_cupy_stream(torch.cuda.current_stream()):
            out = torch.from_dlpack(attention(*(t.transpose(1, 2) for t in (qh, kh, vh)), causal=causal))
        s = (qh.double() @ kh.double().transpose(-1, -2)) / np.sqrt(D)  # float64 reference, Sq == Sk
        if causal:
            s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device="cuda").tril(), float("-inf"))
        ref = torch.softmax(s, dim=-1) @ vh.double()
        sdpa = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
        err = (out.transpose(1, 2).double() - ref).abs().max().item()
        err_sdpa = (sdpa.double() - ref).abs().max().item()
        print(f"{dtype_name} causal={causal}: cuflash err {err:.2e}, torch SDPA err {err_sdpa:.2e} (vs float64)")
        assert err <= 2 * err_sdpa + 1e-4


@pytest.mark.gpu
def test_torch_refusals_name_argument(cp):
    torch = _torch_cuda()
    q = torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.float16)
    needs_grad = q.clone().requires_grad_()
    _raises(TypeError, r"^k\b", attention, q, needs_grad, q)
    _raises(TypeError, r"^v\b.*CPU", attention, q, q, q.cpu())
    out, ctx = attention_forward(q, q, q)
    assert isinstance(out, cp.ndarray)
    _raises(TypeError, r"^dout\b.*CPU", attention_backward, q.cpu(), ctx)
    _raises(TypeError, r"\bq\b.*dtype", attention, q.float(), q.float(), q.float())  # validation after conversion


@pytest.mark.gpu
def test_cuda_array_interface_only_object(cp):
    """Objects offering only __cuda_array_interface__ (Numba-style) are taken with cupy.asarray, no copy."""
    rng = np.random.default_rng(5)
    base = [cp.asarray(rng.standard_normal((1, 96, 2, 64)).astype(np.float16)) for _ in range(3)]

    class CAI:
        def __init__(self, a):
            self.a = a

        @property
        def __cuda_array_interface__(self):
            return self.a.__cuda_array_interface__

    wrapped = [CAI(a[:, ::2]) for a in base]  # strided views (seq stride 2)
    out, ctx = attention_forward(*wrapped, dropout_p=0.1, seed=1, offset=2)
    for w, c in zip(wrapped, (ctx.q, ctx.k, ctx.v)):
        assert c.data.ptr == w.a.data.ptr and c.strides == w.a.strides
    ref = attention(*(a[:, ::2] for a in base), dropout_p=0.1, seed=1, offset=2)
    assert bool((out.view(cp.uint16) == ref.view(cp.uint16)).all())


# --------------------------------------------------------------------------- #
# GPU: JAX (outside jit)
# --------------------------------------------------------------------------- #


@pytest.mark.gpu
def test_jax_arrays_outside_jit(cp):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory to CuPy
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        pytest.skip("JAX has no GPU backend here")
    rng = np.random.default_rng(6)
    host = [rng.standard_normal(s).astype(np.float16) for s in ((2, 80, 4, 64), (2, 112, 2, 64), (2, 112, 2, 64),
                                                                  (2, 80, 4, 64))]
    arrays = [jax.device_put(x, gpus[0]) for x in host]
    for a in arrays:
        a.block_until_ready()  # JAX runs on its own streams: make the inputs ready first
    kw = dict(dropout_p=0.2, causal=True, seed=SEED, offset=OFFSET, deterministic=True)
    out, ctx = attention_forward(*arrays[:3], **kw)
    for a, c in zip(arrays[:3], (ctx.q, ctx.k, ctx.v)):
        assert c.data.ptr == a.unsafe_buffer_pointer()
    grads = attention_backward(arrays[3], ctx)
    out_c, ctx_c = attention_forward(*(cp.asarray(x) for x in host[:3]), **kw)
    grads_c = attention_backward(cp.asarray(host[3]), ctx_c)
    for a, b in zip((out, *grads), (out_c, *grads_c)):
        assert np.array_equal(_host_bits(a), _host_bits(b))
    cp.cuda.get_current_stream().synchronize()  # JAX cannot wait on CuPy's stream: finish first
    out_j = jnp.from_dlpack(out)
    print(f"jax output shares cuflash's memory: {out_j.unsafe_buffer_pointer() == out.data.ptr}")
    assert np.array_equal(np.asarray(out_j).view(np.uint16), out.get().view(np.uint16))
