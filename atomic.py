"""Files and folders that are never seen half-written: the one way kiban writes to disk.

    from kiban.atomic import staged_folder, write_atomic, write_json

    write_atomic(run / "config.yaml", text)                   # temporary sibling, then os.replace
    write_json(run / "metrics.json", metrics)                  # strict JSON: NaN/inf refused
    write_atomic(ckpt / "manifest.json", text, durable=True)   # fsync the file and its folder too
    with staged_folder(out / "model") as staging:              # build in a hidden sibling folder,
        model.save_pretrained(staging)                         # renamed into place on success

A reader (a second process, a crashed run's successor) sees the old file or the new one, never a
torn one: every write goes to a temporary sibling in the same folder (same filesystem, so the
rename is atomic on POSIX) and is renamed over the target. ``durable=True`` also fsyncs the data
and the folder, so the new name survives a power loss, not only a crash (checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "dumps_json",
    "fsync_dir",
    "fsync_file",
    "stale_stages",
    "staged_file",
    "staged_folder",
    "write_atomic",
    "write_json",
]

# mkstemp / mkdtemp create 0600 / 0700; what we write gets the modes a plain open() / mkdir()
# would give (0666 / 0777 less the umask), so a shared run folder stays readable by the group.
# The umask can only be read by setting it: once, at import, before any threads exist.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = False, encoding: str = "utf-8") -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename; returns the path.

    The parent folder is created. durable: fsync the file before the rename and the folder
    after it. Text is written as ``encoding`` bytes, with no newline translation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode(encoding) if isinstance(data, str) else bytes(data)
    handle, staged = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def dumps_json(value: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None) -> str:
    """Strict JSON text of ``value`` (ends with a newline); NaN and infinities raise ``ValueError``.

    Strict JSON is what every other tool reads (``NaN`` is not JSON): give an undefined number as
    ``None``. The error names where in ``value`` the bad number is.
    """
    found = _non_finite(value)
    if found is not None:
        raise ValueError(f"not strict JSON: {found[0]} is {found[1]!r} (write None for an undefined number)")
    return json.dumps(value, indent=indent, default=default, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(
    path: str | Path,
    value: Any,
    *,
    durable: bool = False,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """``write_atomic`` of ``dumps_json(value)``; a NaN or infinity anywhere raises, naming the file."""
    try:
        text = dumps_json(value, indent=indent, default=default)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return write_atomic(path, text, durable=durable)


@contextmanager
def staged_file(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """A temporary sibling path for a library that writes by path (``savefig``, ``write_h5ad``,
    ``np.savez``, ``safetensors``), renamed to ``path`` when the block succeeds.

    The temporary keeps ``path``'s suffix, since some writers add theirs to a name without it.
    On an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.fchmod(handle, 0o666 & ~_UMASK)
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
        if durable:
            fsync_file(staged)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextmanager
def staged_folder(
    target: str | Path, *, replace: bool = True, stage: str | Path | None = None, durable: bool = False
) -> Iterator[Path]:
    """Build a folder in a hidden sibling (``.NAME.XXXX.partial``) and rename it to ``target`` on success.

    replace: an existing ``target`` is removed first; False: only an empty one is (else
    ``FileExistsError``). stage: a given staging folder (created if missing) instead of a fresh
    one, for a build that resumes after an interruption. On an exception the staging folder is
    removed (unless it was given) and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if stage is None:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        staging.chmod(0o777 & ~_UMASK)
    else:
        staging = Path(stage)
        staging.mkdir(parents=True, exist_ok=True)
    try:
        yield staging
        if target.is_dir() and not target.is_symlink():
            if replace:
                shutil.rmtree(target)
            else:
                target.rmdir()  # OSError when not empty: never overwrite what the caller did not say to
        elif target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            target.unlink()
        if durable:
            for path in sorted(staging.rglob("*"), key=lambda p: -len(p.parts)):
                fsync_file(path) if path.is_file() else fsync_dir(path)
            fsync_dir(staging)
        os.rename(staging, target)
        if durable:
            fsync_dir(target.parent)
    except BaseException:
        if stage is None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def stale_stages(target: str | Path) -> list[Path]:
    """Staging folders of ``target`` that an interrupted ``staged_folder`` left behind."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.*.partial"))


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a new or renamed name in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _non_finite(value: Any, where: str = "value") -> tuple[str, float] | None:
    """(path, number) of the first NaN or infinity in ``value``, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def cache_root() -> Path | None:
    """The cache folder: ``$KIBAN_CACHE_DIR``, else ``$XDG_CACHE_HOME/kiban``, else ``~/.cache/kiban``.

    None when ``KIBAN_CACHE_DIR`` turns the cache off ("off", "0", "none" or empty).
    """
    root = os.environ.get("KIBAN_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "off", "0", "none"):
        return None
    if root is None:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiban"
    return Path(root)
