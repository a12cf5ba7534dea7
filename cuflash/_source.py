"""Loading kernel sources: one entry ``.cu`` with its ``#include "x.cuh"`` files inlined.

Why inline: NVRTC is handed a single source string, and every cache (cuflash's cubin
cache, CuPy's) is keyed by a hash of that string. A header edited on disk would not
change the hash of an entry file that merely ``#include``s it, so a stale cubin could
be served. Inlining puts every byte that reaches the compiler into the key.

``#line`` directives keep NVRTC's diagnostics pointing at the real file and line.
Quoted includes are resolved against ``kernels_cu/`` and inlined once each (the
headers use ``#pragma once``); angle-bracket includes (``<cuda_fp16.h>``) are left
for NVRTC's include path.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

__all__ = ["kernel_dir", "load_source"]

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$")


@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """The folder holding the ``.cu``/``.cuh`` sources.

    A source checkout (``PYTHONPATH=.`` or an editable install) has them at the top
    level as ``kernels_cu/``; a wheel installs them as ``cuflash/kernels_cu/``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "kernels_cu", here / "kernels_cu"):
        if (candidate / "philox.cuh").is_file():
            return candidate
    try:  # an editable install may map the data package elsewhere
        import importlib.resources

        found = Path(str(importlib.resources.files("cuflash.kernels_cu")))
        if (found / "philox.cuh").is_file():
            return found
    except (ImportError, TypeError):
        pass
    raise FileNotFoundError("cuflash cannot find its CUDA sources (kernels_cu/); reinstall the package")


def _inline(path: Path, root: Path, seen: set[Path], out: list[str]) -> None:
    rel = path.relative_to(root).as_posix()
    out.append(f'#line 1 "kernels_cu/{rel}"')
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if _PRAGMA_ONCE.match(line):
            out.append("")  # keep line numbering; the set `seen` does the work
            continue
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        target = (path.parent / m.group(1)).resolve()
        if not target.is_file():
            raise FileNotFoundError(f"kernels_cu/{rel}:{lineno}: cannot find included file {m.group(1)!r}")
        if target not in seen:
            seen.add(target)
            _inline(target, root, seen, out)
        out.append(f'#line {lineno + 1} "kernels_cu/{rel}"')


@functools.lru_cache(maxsize=None)
def load_source(entry: str) -> str:
    """The complete source of ``kernels_cu/<entry>`` with its quoted includes inlined."""
    root = kernel_dir()
    path = (root / entry).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source kernels_cu/{entry}")
    out: list[str] = []
    _inline(path, root, {path}, out)
    return "\n".join(out) + "\n"
