"""A throwaway local PostgreSQL (with pgvector) for tests, benchmarks and trying the shared store out.

    with local_postgres(tmp_path / "pg") as url:      # starts a server on a Unix socket in that folder
        store = open_store(create_database(url, "kiban_test"))
    # stopped, and its folder deleted, on leaving the block

It runs the PostgreSQL binaries of PyPI ``pgserver`` (a test dependency: Debian's PostgreSQL has
no pgvector). As root it runs the server as the system user ``pgserver``, which it creates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["create_database", "local_postgres"]


@contextmanager
def local_postgres(folder: str | Path) -> Iterator[str]:
    """Start PostgreSQL with its data in ``folder`` (created; its parent must exist); yield its URL; stop it."""
    try:
        import pgserver
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "a local PostgreSQL needs the test dependency pgserver (pip install -e '.[test]')"
        ) from error
    server = pgserver.get_server(Path(folder), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server at ``url``; the URL of the new database."""
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"database name {name!r}: use lower-case letters, digits and '_'")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return re.sub(r"(://[^/]*/)[^?]*", rf"\g<1>{name}", url, count=1)
