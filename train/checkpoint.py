"""Checkpoints that cannot be half-written: a temporary directory, a sha256 manifest, a rename.

Layout under ``<run.dir>/checkpoints/``::

    ckpt-000120/            one complete checkpoint (the step is in the name)
        state.ckpt          Lightning's checkpoint: model, optimizer, scheduler, loops, data position
                            (a directory of shards under DeepSpeed or FSDP)
        rng-rank00000.pt    per-rank RNG states (python, numpy, torch, CUDA)
        config.yaml         the resolved run config
        meta.json           step, epoch, world size, strategy, kiban version, time
        manifest.json       sha256 and size of every file above; written last
    ckpt-000130.tmp/        a save in progress (or one killed mid-way): never read, removed later
    latest                  the name of the newest complete checkpoint (replaced atomically)
    best                    {"checkpoint", "monitor", "value"} of the best one

A save writes into ``ckpt-N.tmp/``, fsyncs every file, writes the manifest, renames the directory
to ``ckpt-N/`` (atomic on POSIX) and then moves the ``latest`` pointer with ``os.replace``. A crash
at any moment leaves either the old checkpoint set or the new one, never a torn one. Loading
verifies the manifest and refuses a checkpoint whose files do not match it, naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiban.atomic import staged_folder, write_atomic

__all__ = [
    "CheckpointError",
    "commit_checkpoint",
    "complete_checkpoints",
    "latest_checkpoint",
    "load_rng_state",
    "prepare_checkpoint",
    "prune_checkpoints",
    "read_pointer",
    "rng_file",
    "save_checkpoint",
    "save_rng_state",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_NAME = re.compile(r"^ckpt-(\d+)$")
# Test hook: "STEP:SECONDS" pauses the save of STEP after its files are written, before its
# manifest, so a test can SIGKILL a run in the middle of a save.
PAUSE_ENV = "KIBAN_TEST_PAUSE_IN_SAVE"


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded; the message names it and says why."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


# -- writing --------------------------------------------------------------------------------------


def prepare_checkpoint(root: Path, step: int) -> Path:
    """Create (empty) ``root/ckpt-<step>.tmp/`` and return it; a stale one from a crash is removed."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("ckpt-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{checkpoint_name(step)}.tmp"
    tmp.mkdir()
    return tmp


def commit_checkpoint(tmp: Path, *, step: int) -> Path:
    """Manifest, fsync, rename ``tmp`` into place, move ``latest``. Returns the final directory."""
    _pause_for_tests(step)
    final = tmp.with_name(checkpoint_name(step))
    # durable: other ranks wrote some of these files; they reach the disk before the manifest vouches
    # for them, and a checkpoint saved again at the same step (a resumed run's final save) replaces it
    with staged_folder(final, stage=tmp, durable=True):
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": 1,
            "step": step,
            "files": {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
        }
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n", durable=True)
    write_pointer(final.parent / "latest", final.name)
    return final


def save_checkpoint(
    root: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[str], None],
    files: Callable[[], Mapping[str, str]],
    write_state: Callable[[Path], None],
    committed: Callable[[Path], None] = lambda final: None,
) -> Path | None:
    """Save one checkpoint from every rank (a collective); returns the final directory on rank 0.

    The one save sequence of the Lightning callback and the raw DeepSpeed loop: rank 0 prepares
    ``ckpt-<step>.tmp/`` and writes the small text ``files()`` (name -> text: config.yaml,
    meta.json, ...); every rank then calls ``write_state(tmp)`` (the trainer's or engine's own
    save) and saves its RNG state; rank 0 commits (manifest, fsync, rename, ``latest``) and calls
    ``committed(final)`` (pruning, the ``best`` pointer). ``barrier(name)`` separates the phases.
    """
    tmp = root / f"{checkpoint_name(step)}.tmp"
    if rank == 0:
        prepare_checkpoint(root, step)
        for name, text in files().items():
            write_atomic(tmp / name, text)
    barrier("kiban-checkpoint-prepared")
    write_state(tmp)
    save_rng_state(tmp / rng_file(rank))
    barrier("kiban-checkpoint-written")
    final = None
    if rank == 0:
        final = commit_checkpoint(tmp, step=step)
        committed(final)
    barrier("kiban-checkpoint-committed")
    return final


def rng_file(rank: int) -> str:
    """The name of one rank's RNG-state file in a checkpoint."""
    return f"rng-rank{rank:05d}.pt"


def write_pointer(path: Path, text: str) -> None:
    """Replace a small pointer file atomically and durably."""
    write_atomic(path, text + "\n", durable=True)


def read_pointer(path: Path) -> str | None:
    """The stripped text of a pointer file, or None if there is none."""
    return path.read_text().strip() if path.is_file() else None


def prune_checkpoints(root: Path, *, keep_last: int, protect: set[str] = frozenset()) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, except the ``protect``ed names."""
    complete = complete_checkpoints(root)
    removed = []
    for _, path in complete[:-keep_last] if keep_last > 0 else complete:
        if path.name not in protect:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# -- reading --------------------------------------------------------------------------------------


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every renamed checkpoint (one with a manifest), oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir() and (path / MANIFEST).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint in ``root`` (verified), or None when there is none.

    The ``latest`` pointer is a hint: a checkpoint renamed just before a crash, whose pointer
    update was lost, is still found by the scan. A newest checkpoint that fails verification is
    refused — it is never silently skipped in favour of an older one.
    """
    complete = complete_checkpoints(root)
    if not complete:
        return None
    newest = complete[-1][1]
    pointer = read_pointer(root / "latest")
    if pointer and pointer != newest.name:
        log.warning(
            "checkpoint pointer %s names %s, but %s is newer and complete; using %s",
            root / "latest",
            pointer,
            newest.name,
            newest.name,
        )
    verify_checkpoint(newest)
    return newest


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the manifest or raise ``CheckpointError``."""
    manifest_file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_file.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}: it was never completed; refusing to load it"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST} is unreadable ({error}); refusing to load it"
        ) from None
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing; refusing to load it")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                "refusing to load it"
            )
    return manifest


# -- RNG state ------------------------------------------------------------------------------------


def save_rng_state(path: Path) -> None:
    """This process's python, numpy, torch (and CUDA) RNG states, as plain tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, path)


def load_rng_state(path: Path) -> None:
    """Restore the Python, NumPy, torch and CUDA RNG states that ``save_rng_state`` wrote to ``path``."""
    state = torch.load(path, weights_only=True)  # tensors and lists only: nothing unpickled beyond that
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, (tuple, list)) else value


# -- helpers --------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _pause_for_tests(step: int) -> None:
    value = os.environ.get(PAUSE_ENV)
    if value:
        at, _, seconds = value.partition(":")
        if int(at) == step:
            log.warning("%s: pausing %s s in the middle of saving step %d", PAUSE_ENV, seconds, step)
            time.sleep(float(seconds))
