"""Taking other libraries' GPU arrays zero-copy, and running on their streams.

cuflash computes on CuPy arrays. At the API boundary, an argument that is neither a
CuPy nor a NumPy array but exposes DLPack (``__dlpack__`` and ``__dlpack_device__``:
torch CUDA tensors, JAX arrays, ...) or ``__cuda_array_interface__`` (Numba device
arrays, ...) is wrapped as a CuPy array over the same memory; nothing is copied and
the results are CuPy arrays (``torch.from_dlpack(out)`` and the like take them back
zero-copy).

DLPack is preferred when an object offers both: it carries bfloat16 (CuPy >= 14 maps
it to ``ml_dtypes.bfloat16``), and its stream handshake is a device-side wait: CuPy
hands the producer its current stream and the producer makes the data ready on it.
For ``__cuda_array_interface__`` CuPy instead synchronizes the producer's stream from
the host when the interface names one (torch's does), which a CUDA graph capture does
not allow.

Streams: cuflash launches on CuPy's *current* stream. Run it on the stream the other
library uses, or order the two yourself::

    with cuflash.as_cupy_stream(torch.cuda.current_stream()):
        out, ctx = cuflash.attention_forward(q, k, v)
"""

from __future__ import annotations

from typing import Any

from ._validate import array_module_name

__all__ = ["as_array", "as_cupy_stream"]

# DLPack device types (dlpack.h, DLDeviceType) that CuPy can wrap.
_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_CUDA_MANAGED = 13
_KDL_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA pinned host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI",
              10: "ROCm", 11: "ROCm pinned host", 12: "external DMA", 13: "CUDA managed", 14: "oneAPI"}


def _type_name(x) -> str:
    t = type(x)
    return f"{t.__module__}.{t.__qualname__}"


def _has_dlpack(x) -> bool:
    # Look the protocol up on the type: some exporters raise on instance attribute
    # access (torch's __cuda_array_interface__ raises RuntimeError for a tensor that
    # requires grad), and hasattr only swallows AttributeError.
    t = type(x)
    return hasattr(t, "__dlpack__") and hasattr(t, "__dlpack_device__")


def _has_cai(x) -> bool:
    return hasattr(type(x), "__cuda_array_interface__")


def is_convertible(x) -> bool:
    """True when ``x`` is not a CuPy/NumPy array but offers DLPack or __cuda_array_interface__."""
    return array_module_name(x) is None and (_has_dlpack(x) or _has_cai(x))


def _cupy_for(name: str, x):
    """The cupy module, or a TypeError naming the argument when there is no GPU to wrap x on."""
    from . import gpu_available

    if not gpu_available():
        raise TypeError(
            f"{name} is a GPU array ({_type_name(x)}), which needs CuPy and a CUDA GPU; none is available here "
            "(pass NumPy arrays for the CPU reference)"
        )
    import cupy

    return cupy


def as_array(x, name: str) -> Any:
    """``x`` as a CuPy or NumPy array, for the argument called ``name``.

    CuPy and NumPy arrays, and objects offering neither protocol, come back unchanged
    (the validation that follows names the argument if they are not usable). A GPU
    object offering DLPack is wrapped with ``cupy.from_dlpack``, else one offering
    ``__cuda_array_interface__`` with ``cupy.asarray``: same memory, shape, strides and
    dtype. A DLPack object on another device (e.g. a CPU tensor) or one its library
    refuses to export (e.g. a torch tensor that requires grad) raises TypeError naming
    ``name``.
    """
    if array_module_name(x) is not None:
        return x
    if _has_dlpack(x):
        try:
            dev_type, _ = x.__dlpack_device__()
        except Exception as e:  # the exporter's own refusal, reported against the argument
            raise TypeError(f"{name} ({_type_name(x)}): __dlpack_device__() failed: {e}") from e
        dev_type = int(dev_type)
        if dev_type not in (_KDL_CUDA, _KDL_CUDA_MANAGED):
            where = _KDL_NAMES.get(dev_type, f"DLPack device type {dev_type}")
            hint = " (use a NumPy array for the CPU reference)" if dev_type == _KDL_CPU else ""
            raise TypeError(
                f"{name} is a {_type_name(x)} on a {where} device; cuflash takes CUDA device arrays zero-copy{hint}"
            )
        cupy = _cupy_for(name, x)
        try:
            return cupy.from_dlpack(x)
        except Exception as e:
            raise TypeError(f"{name}: cupy.from_dlpack could not wrap {_type_name(x)} zero-copy: {e}") from e
    if _has_cai(x):
        cupy = _cupy_for(name, x)
        try:
            return cupy.asarray(x)
        except Exception as e:
            raise TypeError(f"{name}: cupy.asarray could not wrap {_type_name(x)} "
                            f"(__cuda_array_interface__) zero-copy: {e}") from e
    return x


class _StreamHandle:
    """A raw cudaStream_t behind the CUDA stream protocol, keeping its owner alive."""

    def __init__(self, ptr: int, owner) -> None:
        self._ptr = ptr
        self._owner = owner

    def __cuda_stream__(self) -> tuple[int, int]:
        return 0, self._ptr


def as_cupy_stream(stream) -> Any:
    """A CuPy stream for another library's CUDA stream, to run cuflash on it.

    stream: a ``cupy.cuda.Stream`` (returned as is); an object implementing the CUDA
    stream protocol (``__cuda_stream__``); an object with an integer ``cuda_stream``
    attribute (``torch.cuda.Stream``); or a raw ``cudaStream_t`` as an int. The result
    is a context manager that makes the stream CuPy's current one::

        with cuflash.as_cupy_stream(torch.cuda.current_stream()):
            out, ctx = cuflash.attention_forward(q, k, v)   # q, k, v: torch tensors

    The stream is not owned: it must outlive the returned object's use.
    """
    import cupy

    if isinstance(stream, (cupy.cuda.Stream, cupy.cuda.ExternalStream)):
        return stream
    if isinstance(stream, bool):
        raise TypeError("stream must be a CUDA stream object or an int cudaStream_t, got bool")
    if hasattr(type(stream), "__cuda_stream__"):
        handle = stream
    elif isinstance(getattr(stream, "cuda_stream", None), int):
        handle = _StreamHandle(stream.cuda_stream, stream)
    elif isinstance(stream, int):
        handle = _StreamHandle(stream, None)
    else:
        raise TypeError(
            "stream must be a cupy.cuda.Stream, an object with __cuda_stream__ or an int cuda_stream attribute "
            f"(torch.cuda.Stream), or an int cudaStream_t; got {_type_name(stream)}"
        )
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:  # CuPy >= 14
        return from_external(handle)
    _, ptr = handle.__cuda_stream__()
    return cupy.cuda.ExternalStream(ptr)
