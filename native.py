"""Small C++ kernels shipped as source, built on first use with the system compiler, loaded with ctypes.

kiban's data path has a few loops that numpy cannot vectorise well (per-row sorts of a few hundred
values, RDKit-free bookkeeping, reading RDKit's binary molecule pickle); those are written in C++
(``kiban/data/cell_tokens.cpp``, ``kiban/encoders/mol_graph.cpp``) with a plain C interface.
``load(source)`` compiles the file once into a shared library under ``$KIBAN_CACHE_DIR/native/``
(default ``$XDG_CACHE_HOME/kiban``, else ``~/.cache/kiban``; a temporary folder when the cache is
off) and returns it as a ``ctypes.CDLL``; later processes load the cached build (milliseconds).
The library's name is keyed by the source, the compiler's version and the machine's architecture,
so an edited source or another compiler never reads a stale build.
Builds are portable (no ``-march=native``): one cache folder can serve a cluster's nodes.

Kernels are optional: ``load`` returns None, with one warning per source and process, where no
compiler is found, the build fails, or ``KIBAN_NATIVE=off``; callers keep their numpy path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from kiban.atomic import cache_root, staged_file

__all__ = ["load"]

log = logging.getLogger(__name__)

# -ffp-contract=off: no fused multiply-adds, so every operation rounds as numpy's does
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def load(source: Path) -> ctypes.CDLL | None:
    """The built library of the C++ file ``source``, or None where it cannot be built (see above)."""
    if os.environ.get("KIBAN_NATIVE", "").strip().lower() in ("off", "0", "false", "no"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler found (g++, c++, clang++ or $CXX): %s runs its numpy path", source.name)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        identity = "\n".join([source.read_text(), compiler, version, platform.machine(), " ".join(FLAGS)])
        name = f"{source.stem}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
        root = cache_root()
        folder = root / "native" if root is not None else Path(tempfile.mkdtemp(prefix="kiban-native-"))
        library = folder / name
        if not library.is_file():
            # built under a temporary sibling name, then renamed: a concurrent process never loads half a file
            with staged_file(library) as staged:
                done = subprocess.run(
                    [compiler, *FLAGS, "-o", str(staged), str(source)],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                if done.returncode:
                    first = (done.stderr.strip().splitlines() or ["no output"])[0]
                    raise RuntimeError(f"{compiler} failed: {first}")
        return ctypes.CDLL(str(library))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("%s not built (%s): its numpy path is used", source.name, error)
        return None
