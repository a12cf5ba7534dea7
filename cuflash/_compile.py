"""Compiling kernel variants with NVRTC, with no GPU needed, and loading them with CuPy.

One path serves both the compile check (CI, ``python -m cuflash check``) and run time:
``compile_variant`` calls CuPy's low-level NVRTC wrapper directly (CuPy's own
``compile_using_nvrtc`` asks the driver for a device, and its ``RawModule(code=...)``
picks ``-arch=sm_XX`` itself, so it cannot build the ``sm_90a`` target that wgmma
needs). The cubin goes to a disk cache keyed by the complete inlined source, the
options and the NVRTC version, and ``cupy.RawModule(path=...)`` loads it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from . import _toolchain
from ._source import load_source

__all__ = [
    "CompileError",
    "KernelVariant",
    "CompileResult",
    "FunctionReport",
    "compile_variant",
    "parse_ptxas_log",
    "get_function",
    "arch_for_capability",
]

log = logging.getLogger("cuflash")


class CompileError(RuntimeError):
    """NVRTC rejected a kernel variant; the message holds NVRTC's log."""


@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One compiled form of one entry file.

    entry:     file under kernels_cu/, e.g. "attn_fwd.cu"
    functions: the ``extern "C"`` kernels it defines
    macros:    ``-D`` macros (tile sizes, dtype, switches); Python is their one source
    hopper:    True when the variant uses sm_90a-only instructions (wgmma, setmaxnreg)
    """

    entry: str
    functions: tuple[str, ...]
    macros: tuple[tuple[str, str], ...] = ()
    hopper: bool = False

    @property
    def name(self) -> str:
        tail = ",".join(f"{k}={v}" for k, v in self.macros)
        return f"{self.entry}[{tail}]" if tail else self.entry

    def options(self, arch: str) -> tuple[str, ...]:
        opts = [
            f"--gpu-architecture={arch}",
            "--std=c++17",
            "--ptxas-options=-v",
            "--generate-line-info",
            "-DCUFLASH_NVRTC=1",
        ]
        opts += [f"-D{k}={v}" for k, v in self.macros]
        opts += [f"-I{d}" for d in _toolchain.include_dirs()]
        return tuple(opts)


@dataclasses.dataclass(frozen=True)
class FunctionReport:
    """ptxas's resource report for one kernel function."""

    function: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int


@dataclasses.dataclass(frozen=True)
class CompileResult:
    variant: KernelVariant
    arch: str
    cubin: bytes
    log: str
    seconds: float
    cached: bool
    reports: tuple[FunctionReport, ...]
    path: Path | None  # the cached cubin file, when the disk cache is on


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> list[FunctionReport]:
    """Registers, spills, stack and static shared memory per entry function from ``-v`` output."""
    reports: list[FunctionReport] = []
    fn = arch = None
    stack = spill_st = spill_ld = 0
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            fn, arch = m.group(1), m.group(2)
            stack = spill_st = spill_ld = 0
            continue
        m = _PROPS.search(line)
        if m and fn is not None:
            stack, spill_st, spill_ld = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and fn is not None:
            smem = int(m.group(2)) if m.group(2) else 0
            reports.append(FunctionReport(fn, arch or "?", int(m.group(1)), spill_st, spill_ld, stack, smem))
            fn = None
    return reports


def _cache_dir() -> Path:
    base = os.environ.get("CUFLASH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "cuflash"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def elf_size(image: bytes) -> int:
    """Bytes a 64-bit ELF image spans by its own header: the end of its section and program
    header tables, whichever is last (both sit at the end of an NVRTC cubin)."""
    if len(image) < 64 or image[:4] != b"\x7fELF" or image[4] != 2:
        raise CompileError("NVRTC returned something that is not a 64-bit ELF cubin")
    phoff, shoff = int.from_bytes(image[0x20:0x28], "little"), int.from_bytes(image[0x28:0x30], "little")
    phentsize, phnum, shentsize, shnum = (int.from_bytes(image[o:o + 2], "little") for o in (0x36, 0x38, 0x3A, 0x3C))
    return max(phoff + phentsize * phnum, shoff + shentsize * shnum)


def _nvrtc_compile(source: str, filename: str, options: tuple[str, ...]) -> tuple[bytes, str]:
    nvrtc = _toolchain.nvrtc_module()
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, list(options))
        except nvrtc.NVRTCError as e:
            raise CompileError(f"NVRTC failed on {filename}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        cubin = bytes(nvrtc.getCUBIN(prog))
        # CuPy's getCUBIN drops the last byte of the image, as it does the NUL that ends a PTX
        # string (seen with cupy 14.2 and NVRTC 13.5: the program header table ended 1 byte
        # past the data). The driver loads such a cubin, but cuobjdump rejects it; the missing
        # byte is the last of the last program header's alignment field (zero).
        missing = elf_size(cubin) - len(cubin)
        if missing > 0:
            cubin += b"\0" * missing
        return cubin, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def compile_variant(variant: KernelVariant, arch: str, *, use_cache: bool = True) -> CompileResult:
    """Compile ``variant`` for ``arch`` ("sm_80", "sm_90a", ...) to a cubin. Needs no GPU."""
    source = load_source(variant.entry)
    options = variant.options(arch)
    # the key covers every byte NVRTC sees: inlined source, options, compiler version
    key = hashlib.sha256(
        "\0".join((source, *options, repr(_toolchain.nvrtc_version()))).encode()
    ).hexdigest()[:40]
    cubin_path = _cache_dir() / f"{key}.cubin" if use_cache else None
    log_path = cubin_path.with_suffix(".log") if cubin_path else None
    t0 = time.perf_counter()
    if cubin_path is not None and cubin_path.is_file() and log_path.is_file():
        cubin, text, cached = cubin_path.read_bytes(), log_path.read_text(), True
    else:
        cubin, text = _nvrtc_compile(source, variant.entry, options)
        cached = False
        if cubin_path is not None:
            # write-then-rename so a concurrent reader never sees half a file
            for path, data in ((log_path, text.encode()), (cubin_path, cubin)):
                fd, tmp = tempfile.mkstemp(dir=path.parent)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
    seconds = time.perf_counter() - t0
    return CompileResult(variant, arch, cubin, text, seconds, cached, tuple(parse_ptxas_log(text)), cubin_path)


def arch_for_capability(major: int, minor: int, hopper: bool) -> str:
    """The NVRTC target for a device: sm_90a for Hopper-only variants, plain sm_XY otherwise.
    ValueError before compute capability 8.0: the kernels use cp.async and m16n8k16
    mma.sync (fp16 and bf16), which Ampere introduced."""
    if major < 8:
        raise ValueError(f"cuflash's kernels need a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper, "
                         f"...); this one is {major}.{minor}")
    if hopper:
        if (major, minor) != (9, 0):
            raise ValueError(f"a Hopper (sm_90a) kernel variant cannot run on compute capability {major}.{minor}")
        return "sm_90a"
    return f"sm_{major}{minor}"


_modules: dict[tuple[KernelVariant, int], object] = {}
_modules_lock = threading.Lock()
# (variant, function, device) -> [kernel, dynamic shared memory it has been opened up to]:
# a launch looks its kernel up here with no driver call (a new cupy Function per call, and
# a cuFuncGetAttribute for its shared-memory limit, cost microseconds every launch).
_kernels: dict[tuple[KernelVariant, str, int], list] = {}


def get_function(variant: KernelVariant, function: str, *, dynamic_smem: int = 0):
    """The CuPy kernel ``function`` of ``variant`` on the current device, compiled on first use.

    Thread-safe: one lock guards the per-(variant, device) module and kernel tables, so
    two threads asking for a new variant compile it once.
    """
    import cupy

    device_id = cupy.cuda.runtime.getDevice()
    entry = _kernels.get((variant, function, device_id))
    if entry is None or entry[1] < dynamic_smem:
        with _modules_lock:
            entry = _kernels.get((variant, function, device_id))
            if entry is None:
                module = _modules.get((variant, device_id))
                if module is None:
                    major, minor = (int(c) for c in cupy.cuda.Device(device_id).compute_capability)
                    arch = arch_for_capability(major, minor, variant.hopper)
                    result = compile_variant(variant, arch)
                    if not result.cached:
                        log.info("cuflash: compiled %s for %s in %.1f s", variant.name, arch, result.seconds)
                    module = cupy.RawModule(path=str(result.path))
                    _modules[(variant, device_id)] = module
                entry = [module.get_function(function), 48 * 1024]
                _kernels[(variant, function, device_id)] = entry
            if entry[1] < dynamic_smem:  # past 48 KB a kernel must opt in to more dynamic shared memory
                entry[0].max_dynamic_shared_size_bytes = dynamic_smem
                entry[1] = dynamic_smem
    return entry[0]

