"""Finding the CUDA pieces cuflash needs at run time, from the pip wheels.

cuflash compiles its kernels with NVRTC and needs three things that no system CUDA
toolkit has to provide:

* NVRTC itself (``libnvrtc``), which CuPy's ``cupy_backends.cuda.libs.nvrtc`` loads;
* the cudart headers (``cuda_fp16.h``, ``cuda_bf16.h``), from the ``nvidia-cuda-runtime``
  wheel, and the curand device headers (``curand_kernel.h``), from ``nvidia-curand``;
* ``nv/target``, which those headers include: it comes with CCCL, and CuPy bundles a copy.

CuPy 14 depends on ``cuda-pathfinder``, which knows where the wheels put their headers.
Every failure names the missing piece and the extra that installs it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os

__all__ = ["ToolchainError", "install_hint", "include_dirs", "nvrtc_module", "nvrtc_version"]


class ToolchainError(RuntimeError):
    """A CUDA piece that cuflash needs is not installed."""


def install_hint() -> str:
    """The pip command that installs the CUDA extra matching the CuPy that is present."""
    for dist, extra in (("cupy-cuda13x", "cuda13"), ("cupy-cuda12x", "cuda12")):
        try:
            importlib.metadata.version(dist)
            return f"pip install 'cuflash[{extra}]'"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "pip install 'cuflash[cuda13]'  (or 'cuflash[cuda12]' for CUDA 12 drivers)"


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ToolchainError(f"cuflash needs CuPy to compile kernels: {install_hint()}") from e
    return cupy


def _header_dir(component: str, probe: str) -> str:
    try:
        import cuda.pathfinder as pathfinder
    except ImportError as e:  # pragma: no cover - CuPy 14 depends on it
        raise ToolchainError(
            f"cuflash finds the CUDA headers through cuda-pathfinder, which is missing: {install_hint()}"
        ) from e
    try:
        found = pathfinder.find_nvidia_header_directory(component)
    except Exception:  # pathfinder raises its own types for unknown/missing pieces
        found = None
    if not found or not os.path.isfile(os.path.join(found, probe)):
        raise ToolchainError(
            f"cuflash needs the CUDA {component} headers ({probe}) and cannot find them: {install_hint()}"
        )
    return found


@functools.lru_cache(maxsize=None)
def include_dirs() -> tuple[str, ...]:
    """Include directories handed to NVRTC: cudart, curand and CCCL's ``nv/target``."""
    cupy = _cupy()
    dirs = [_header_dir("cudart", "cuda_fp16.h"), _header_dir("curand", "curand_kernel.h")]
    cccl = os.path.join(os.path.dirname(cupy.__file__), "_core", "include", "cupy", "_cccl", "libcudacxx")
    if not os.path.isfile(os.path.join(cccl, "nv", "target")):
        raise ToolchainError(
            "cuflash needs <nv/target> (CCCL), which CuPy >= 14 bundles; this CuPy has none: "
            + install_hint()
        )
    dirs.append(cccl)
    unique: list[str] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return tuple(unique)


@functools.lru_cache(maxsize=None)
def nvrtc_module():
    """CuPy's low-level NVRTC wrapper, checked to load (needs no GPU and no driver)."""
    _cupy()
    from cupy_backends.cuda.libs import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as e:
        raise ToolchainError(f"cuflash cannot load NVRTC (libnvrtc): {e}. Install it: {install_hint()}") from e
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    major, minor = nvrtc_module().getVersion()
    return int(major), int(minor)
