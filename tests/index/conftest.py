"""Fixtures for the index tests: the MiniLM embedder (loaded once), a local PostgreSQL per module,
and ``make_store`` giving a fresh store of each kind (a new folder, or a new database).
"""

from __future__ import annotations

import uuid

import pytest

from kiban.index import open_store
from kiban.index.embedding import SentenceEmbedder

STORES = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL with pgvector on a Unix socket, started for the module and stopped after it."""
    pytest.importorskip("pgserver")
    from kiban.index.pglocal import local_postgres

    with local_postgres(tmp_path_factory.mktemp("pg") / "data") as url:
        yield url


@pytest.fixture(params=STORES)
def make_store(request, tmp_path):
    """``make_store()`` -> a new empty store of the parametrised kind."""
    made = []

    def make():
        if request.param == "sqlite":
            store = open_store(str(tmp_path / f"index-{len(made)}"))
        else:
            from kiban.index.pglocal import create_database

            url = request.getfixturevalue("postgres_url")
            store = open_store(create_database(url, f"t_{uuid.uuid4().hex[:12]}"))
        made.append(store)
        return store

    make.kind = request.param
    yield make
    for store in made:
        store.close()

