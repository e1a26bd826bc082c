"""The embedded store: one SQLite file with FTS5 for BM25 and sqlite-vec for vector search.

Why SQLite (+ sqlite-vec + FTS5) rather than LanceDB, for the default: one file, no server and no
background compaction; documents, groups, chunks, the BM25 index and the vectors change together
in one ACID transaction, so a search never sees half a document, and a ``kiban serve`` process sees
what ``kiban index add`` or ``remove`` committed on its very next query (WAL mode: readers never
block the writer). The group filter is SQL inside both searches: the FTS5 ``MATCH`` and the vec0
KNN both carry ``rowid IN (chunks of documents in the caller's groups)``, applied before BM25 or
distance ranking and before ``LIMIT``/``k``. sqlite-vec's KNN is exact (a scan), which keeps
recall at 1 and is fast enough at 10^5 chunks (benchmarks/index_stores.py). SQLite is reached
through ``apsw``, which ships a current SQLite with FTS5 and extension loading (the standard
library's ``sqlite3`` is often built without ``load_extension``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from kiban.index.documents import Chunk, Document
from kiban.index.store import DocumentInfo, StoredChunk, query_terms

__all__ = ["SqliteStore"]

FILE_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    doc_pk INTEGER PRIMARY KEY, doc_id TEXT UNIQUE NOT NULL, content_hash TEXT UNIQUE NOT NULL,
    title TEXT NOT NULL, source TEXT NOT NULL, chars INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS doc_groups(
    grp TEXT NOT NULL, doc_pk INTEGER NOT NULL, PRIMARY KEY(grp, doc_pk)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS doc_groups_doc ON doc_groups(doc_pk);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_pk INTEGER PRIMARY KEY, doc_pk INTEGER NOT NULL, seq INTEGER NOT NULL, section TEXT NOT NULL,
    start_char INTEGER NOT NULL, end_char INTEGER NOT NULL, text TEXT NOT NULL, UNIQUE(doc_pk, seq));
CREATE VIRTUAL TABLE IF NOT EXISTS chunk_text USING fts5(title, text, tokenize='porter unicode61');
"""

# chunk rowids of documents that share a group with the caller (the one JSON parameter: the groups)
_READABLE = (
    "SELECT c.chunk_pk FROM doc_groups g JOIN chunks c ON c.doc_pk = g.doc_pk "
    "WHERE g.grp IN (SELECT value FROM json_each(?))"
)


class SqliteStore:
    """The embedded store in folder ``location`` (file ``index.sqlite``); see the module docstring."""

    def __init__(self, location: str, *, dim: int, embedder: str, create: bool = True) -> None:
        """Open (or create) the store; refuse one made for another embedder or width."""
        self.folder = Path(location)
        self.path = self.folder / FILE_NAME
        if not self.path.is_file():
            if not create:
                raise FileNotFoundError(f"no index at {self.folder} (no {FILE_NAME}; create one with 'kiban index add')")
            self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._local = threading.local()
        self._connection().execute("PRAGMA journal_mode=WAL")  # persistent; not inside a transaction
        with self._transaction() as db:
            db.execute(_SCHEMA)
            db.execute(
                "CREATE VIRTUAL TABLE IF NOT EXISTS chunk_vectors USING "
                f"vec0(embedding float[{int(dim)}] distance_metric=cosine)"
            )
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if not meta:
                db.execute("INSERT INTO meta VALUES ('embedder', ?), ('dim', ?)", (embedder, str(dim)))
            elif meta.get("embedder") != embedder or meta.get("dim") != str(dim):
                raise ValueError(
                    f"the index at {self.folder} holds vectors of {meta.get('embedder')} ({meta.get('dim')} wide), "
                    f"not {embedder} ({dim} wide)"
                )

    # -- connections ---------------------------------------------------------------------------

    def _connection(self):
        db = getattr(self._local, "db", None)
        if db is None:
            import apsw
            import sqlite_vec

            db = apsw.Connection(str(self.path))
            db.enable_load_extension(True)
            db.load_extension(sqlite_vec.loadable_path())
            db.enable_load_extension(False)
            db.set_busy_timeout(30_000)
            # WAL with synchronous=NORMAL: a crash never corrupts the file, and commits skip an fsync each
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self):
        db = self._connection()
        with db:  # BEGIN ... COMMIT, or ROLLBACK on an exception
            yield db

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- writes --------------------------------------------------------------------------------

    def add(self, document: Document, chunks: Sequence[Chunk], vectors: np.ndarray) -> str:
        """See ``Store.add``."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"expected vectors of shape ({len(chunks)}, {self.dim}), got {vectors.shape}")
        with self._transaction() as db:
            row = db.execute(
                "SELECT doc_pk FROM documents WHERE content_hash = ?", (document.content_hash,)
            ).fetchone()
            if row is not None:
                (doc_pk,) = row
                stored = tuple(sorted(g for (g,) in db.execute("SELECT grp FROM doc_groups WHERE doc_pk = ?", (doc_pk,))))
                if stored == tuple(sorted(document.groups)):
                    return "unchanged"
                db.execute("DELETE FROM doc_groups WHERE doc_pk = ?", (doc_pk,))
                db.executemany("INSERT INTO doc_groups VALUES (?, ?)", [(g, doc_pk) for g in document.groups])
                return "regrouped"
            db.execute(
                "INSERT INTO documents(doc_id, content_hash, title, source, chars, added_at) VALUES (?, ?, ?, ?, ?, ?)",
                (document.doc_id, document.content_hash, document.title, document.source, len(document.text), time.time()),
            )
            doc_pk = db.last_insert_rowid()
            db.executemany("INSERT INTO doc_groups VALUES (?, ?)", [(g, doc_pk) for g in document.groups])
            first = (db.execute("SELECT coalesce(max(chunk_pk), 0) + 1 FROM chunks").fetchone())[0]
            pks = range(first, first + len(chunks))
            db.executemany(
                "INSERT INTO chunks(chunk_pk, doc_pk, seq, section, start_char, end_char, text) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(pk, doc_pk, c.seq, c.section, c.start, c.end, c.text) for pk, c in zip(pks, chunks)],
            )
            db.executemany(
                "INSERT INTO chunk_text(rowid, title, text) VALUES (?, ?, ?)",
                [(pk, document.title, c.text) for pk, c in zip(pks, chunks)],
            )
            db.executemany(
                "INSERT INTO chunk_vectors(rowid, embedding) VALUES (?, ?)",
                [(pk, v.tobytes()) for pk, v in zip(pks, vectors)],
            )
            return "added"

    def remove(self, doc_id: str) -> bool:
        """See ``Store.remove``."""
        with self._transaction() as db:
            row = db.execute("SELECT doc_pk FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
            if row is None:
                return False
            (doc_pk,) = row
            pks = [(pk,) for (pk,) in db.execute("SELECT chunk_pk FROM chunks WHERE doc_pk = ?", (doc_pk,))]
            db.executemany("DELETE FROM chunk_text WHERE rowid = ?", pks)
            db.executemany("DELETE FROM chunk_vectors WHERE rowid = ?", pks)
            db.execute("DELETE FROM chunks WHERE doc_pk = ?", (doc_pk,))
            db.execute("DELETE FROM doc_groups WHERE doc_pk = ?", (doc_pk,))
            db.execute("DELETE FROM documents WHERE doc_pk = ?", (doc_pk,))
            return True

    # -- reads ---------------------------------------------------------------------------------

    def find(self, content_hash: str) -> DocumentInfo | None:
        """See ``Store.find``."""
        found = self._infos("WHERE d.content_hash = ?", (content_hash,))
        return found[0] if found else None

    def documents(self, *, groups: Sequence[str] | None) -> list[DocumentInfo]:
        """See ``Store.documents``; only the caller's groups are listed on each document."""
        if groups is None:
            return self._infos("", ())
        infos = self._infos(
            "WHERE d.doc_pk IN (SELECT doc_pk FROM doc_groups WHERE grp IN (SELECT value FROM json_each(?)))",
            (json.dumps(list(groups)),),
        )
        mine = set(groups)
        return [
            DocumentInfo(i.doc_id, i.title, i.source, tuple(g for g in i.groups if g in mine), i.chunks, i.chars)
            for i in infos
        ]

    def _infos(self, where: str, bindings: tuple) -> list[DocumentInfo]:
        db = self._connection()
        rows = db.execute(
            "SELECT d.doc_id, d.title, d.source, d.chars, "
            "(SELECT json_group_array(grp) FROM doc_groups g WHERE g.doc_pk = d.doc_pk), "
            f"(SELECT count(*) FROM chunks c WHERE c.doc_pk = d.doc_pk) FROM documents d {where} ORDER BY d.doc_pk",
            bindings,
        ).fetchall()
        return [
            DocumentInfo(doc_id, title, source, tuple(sorted(json.loads(groups))), count, chars)
            for doc_id, title, source, chars, groups, count in rows
        ]

    def dense(self, vector: np.ndarray, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """See ``Store.dense``: an exact KNN over the caller's chunks only."""
        if not groups or k < 1:
            return []
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise ValueError(f"a query vector must have {self.dim} values, not {query.shape[0]}")
        rows = self._connection().execute(
            "SELECT d.doc_id || ':' || c.seq, knn.distance FROM ("
            "  SELECT rowid, distance FROM chunk_vectors"
            f"  WHERE embedding MATCH ? AND k = ? AND rowid IN ({_READABLE})"
            ") knn JOIN chunks c ON c.chunk_pk = knn.rowid JOIN documents d ON d.doc_pk = c.doc_pk "
            "ORDER BY knn.distance, c.chunk_pk",
            (query.tobytes(), min(int(k), 4096), json.dumps(list(groups))),
        ).fetchall()
        return [(chunk_id, 1.0 - float(distance)) for chunk_id, distance in rows]

    def lexical(self, query: str, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """See ``Store.lexical``: FTS5 BM25 (title weighted 2, text 1) over the caller's chunks only."""
        terms = query_terms(query)
        if not groups or not terms or k < 1:
            return []
        match = " OR ".join(f'"{term}"' for term in terms)
        rows = self._connection().execute(
            "SELECT d.doc_id || ':' || c.seq, -bm25(chunk_text, 2.0, 1.0) AS score FROM chunk_text "
            "JOIN chunks c ON c.chunk_pk = chunk_text.rowid JOIN documents d ON d.doc_pk = c.doc_pk "
            # EXISTS, not "rowid IN (...)": FTS5 would take that as one MATCH lookup per listed rowid
            "WHERE chunk_text MATCH ? AND EXISTS (SELECT 1 FROM doc_groups g WHERE g.doc_pk = c.doc_pk "
            "AND g.grp IN (SELECT value FROM json_each(?))) "
            "ORDER BY bm25(chunk_text, 2.0, 1.0), c.chunk_pk LIMIT ?",
            (match, json.dumps(list(groups)), int(k)),
        ).fetchall()
        return [(chunk_id, float(score)) for chunk_id, score in rows]

    def chunks(self, chunk_ids: Sequence[str], *, groups: Sequence[str]) -> dict[str, StoredChunk]:
        """See ``Store.chunks``."""
        if not chunk_ids or not groups:
            return {}
        wanted = []
        for chunk_id in chunk_ids:
            doc_id, _, seq = chunk_id.rpartition(":")
            if doc_id and seq.isdigit():
                wanted.append([doc_id, int(seq)])
        rows = self._connection().execute(
            "SELECT d.doc_id || ':' || c.seq, d.doc_id, d.title, d.source, c.section, c.start_char, c.end_char, c.text "
            "FROM json_each(?) w JOIN documents d ON d.doc_id = json_extract(w.value, '$[0]') "
            "JOIN chunks c ON c.doc_pk = d.doc_pk AND c.seq = json_extract(w.value, '$[1]') "
            "WHERE EXISTS (SELECT 1 FROM doc_groups g WHERE g.doc_pk = d.doc_pk "
            "AND g.grp IN (SELECT value FROM json_each(?)))",
            (json.dumps(wanted), json.dumps(list(groups))),
        ).fetchall()
        return {row[0]: StoredChunk(*row) for row in rows}
