"""API keys and the principals they stand for: who is calling, and which document groups they may read.

The keys file has one key per line, optionally followed by ``name=`` and ``groups=`` fields::

    # key                              fields (optional)
    kiban-0f3c9a71d2e84b6f9c1d          name=alice groups=lab-a,lab-b
    kiban-7a1e55c0b9d24f0e8e3b          name=ci

A key without ``groups=`` may use every route but reads no documents (``/v1/search`` finds
nothing for it). ``KeyRing`` re-reads the file when it changes (its size, modification time or
inode), so a key added or revoked, or a group granted or taken away, counts from the next request
without a restart. A file that no longer parses refuses every key until it is fixed (fail closed),
and says why in the server log; no message ever shows a key.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from kiban.index.documents import check_groups

__all__ = ["KeyRing", "Principal", "read_keys_file"]

log = logging.getLogger(__name__)

MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class Principal:
    """The caller behind a key: a name (for logs and rate limits) and the document groups it may read."""

    name: str
    groups: tuple[str, ...] = ()


ANONYMOUS = Principal("anonymous")


def read_keys_file(path: str | Path) -> dict[str, Principal]:
    """Key -> principal, in file order; ValueError naming the line (never the key) for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"API keys file {path} does not exist")
    keys: dict[str, Principal] = {}
    short = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        key, fields = words[0], {}
        for word in words[1:]:
            if word.startswith("#"):
                break
            name, sep, value = word.partition("=")
            if not sep or name not in ("name", "groups") or name in fields:
                raise ValueError(
                    f"API keys file {path}, line {number}: after the key, only 'name=NAME' and "
                    "'groups=G1,G2' may follow (each once)"
                )
            fields[name] = value
        if len(key) < MIN_KEY_LENGTH:
            short.append(number)
            continue
        groups = check_groups(
            [g for g in fields.get("groups", "").split(",") if g], where=f"API keys file {path}, line {number}"
        )
        if key not in keys:
            keys[key] = Principal(fields.get("name") or f"key-{len(keys)}", groups)
    if short:
        raise ValueError(f"API keys file {path}: the key(s) on line(s) {short} are shorter than {MIN_KEY_LENGTH} characters")
    if not keys:
        raise ValueError(f"API keys file {path} holds no keys (one key per line)")
    return keys


class KeyRing:
    """Bearer keys -> principals; from a fixed tuple of keys, or from a keys file re-read when it changes.

    No keys and no file: authentication is off and every caller is ``anonymous`` (no groups).
    """

    def __init__(self, keys: tuple[str, ...] = (), *, path: str | Path | None = None) -> None:
        """Fixed ``keys`` (each a principal ``key-N`` without groups), or the keys file at ``path``."""
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._keys: list[tuple[bytes, Principal]] = [
            (key.encode(), Principal(f"key-{i}")) for i, key in enumerate(dict.fromkeys(keys))
        ]
        if self.path is not None:
            self._refresh()

    @property
    def enabled(self) -> bool:
        """Whether a key is needed."""
        return self.path is not None or bool(self._keys)

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        with self._lock:
            if stamp == self._stamp and stamp is not None:
                return
            try:
                keys = read_keys_file(self.path)
            except (OSError, ValueError) as error:
                if self._stamp is not None or not self._keys:
                    log.error("API keys file unusable, refusing every key until it is fixed: %s", error)
                self._keys, self._stamp = [], stamp
                return
            self._keys = [(key.encode(), principal) for key, principal in keys.items()]
            self._stamp = stamp
            log.info("API keys file %s read: %d keys", self.path, len(self._keys))

    def lookup(self, token: str | None) -> Principal | None:
        """The principal of bearer ``token``, or None; every key is compared (constant time per key)."""
        if not self.enabled:
            return ANONYMOUS
        if self.path is not None:
            self._refresh()
        if not token:
            return None
        given = token.encode()
        found = None
        for key, principal in self._keys:  # no early exit: timing tells nothing about which key matched
            if hmac.compare_digest(given, key):
                found = principal
        return found
