"""The shared store: PostgreSQL with pgvector, access groups enforced twice.

First line: every read carries ``groups && <caller's groups>`` in its WHERE clause, so the dense
search (exact ``<=>`` cosine order) and the full-text search (``tsvector @@ tsquery``, ranked by
``ts_rank`` with length normalisation) rank only the caller's chunks, before ``LIMIT``. Second
line: row-level security. Reads run inside a transaction as the role ``kiban_reader`` (``SET
LOCAL ROLE``) with the caller's groups in the setting ``kiban.groups``; the policies on both tables
show that role only rows whose groups overlap that setting, and an unset setting shows nothing. So a
query that forgot its filter still returns no other group's text.

The dense search is exact (no ANN index): an HNSW or IVF index with a WHERE clause filters after the
index scan and can return fewer than k rows, or none, for a small group; exact order has recall 1
and is fast enough at 10^5 chunks (benchmarks/index_stores.py).

Schema setup (tables, extension, role, grants, policies) runs on open under an advisory lock; it
needs a role allowed to create them (the owner of the database, or a DBA once beforehand).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np

from kiban.index.documents import Chunk, Document
from kiban.index.store import DocumentInfo, StoredChunk, query_terms

__all__ = ["PostgresStore", "READER_ROLE"]

READER_ROLE = "kiban_reader"

# the caller's groups as the RLS policies read them; NULL (no setting) matches no row
_CALLER_GROUPS = "string_to_array(nullif(current_setting('kiban.groups', true), ''), ',')"

_SCHEMA = f"""
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS kiban_meta(key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS kiban_documents(
    doc_id text PRIMARY KEY, content_hash text UNIQUE NOT NULL, title text NOT NULL, source text NOT NULL,
    chars integer NOT NULL, groups text[] NOT NULL, added_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS kiban_chunks(
    chunk_id text PRIMARY KEY, doc_id text NOT NULL REFERENCES kiban_documents ON DELETE CASCADE,
    seq integer NOT NULL, title text NOT NULL, section text NOT NULL, start_char integer NOT NULL,
    end_char integer NOT NULL, text text NOT NULL, groups text[] NOT NULL, embedding vector(%(dim)s) NOT NULL,
    tsv tsvector GENERATED ALWAYS AS
        (setweight(to_tsvector('english', title), 'A') || to_tsvector('english', text)) STORED);
CREATE INDEX IF NOT EXISTS kiban_chunks_doc ON kiban_chunks(doc_id);
CREATE INDEX IF NOT EXISTS kiban_chunks_groups ON kiban_chunks USING gin(groups);
CREATE INDEX IF NOT EXISTS kiban_chunks_tsv ON kiban_chunks USING gin(tsv);
CREATE INDEX IF NOT EXISTS kiban_documents_groups ON kiban_documents USING gin(groups);
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
        CREATE ROLE {READER_ROLE} NOLOGIN;
    END IF;
END $$;
GRANT SELECT ON kiban_documents, kiban_chunks TO {READER_ROLE};
ALTER TABLE kiban_documents ENABLE ROW LEVEL SECURITY;
ALTER TABLE kiban_chunks ENABLE ROW LEVEL SECURITY;
"""

_POLICIES = {
    "kiban_documents_by_group": "kiban_documents",
    "kiban_chunks_by_group": "kiban_chunks",
}


class PostgresStore:
    """The store in the PostgreSQL database at ``location`` (a ``postgresql://`` URL); see the module docstring."""

    def __init__(self, location: str, *, dim: int, embedder: str, create: bool = True) -> None:
        """Connect, set the schema up if it is missing, and refuse one made for another embedder or width."""
        self.dsn = location
        self.dim = int(dim)
        self._local = threading.local()
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('kiban index schema'))")
            cur.execute("SELECT to_regclass('kiban_meta') IS NOT NULL")
            exists = cur.fetchone()[0]
            if not exists and not create:
                raise FileNotFoundError(f"no index in the database {_safe(location)} (create one with 'kiban index add')")
            cur.execute(_SCHEMA % {"dim": self.dim})
            for policy, table in _POLICIES.items():
                cur.execute("SELECT 1 FROM pg_policies WHERE policyname = %s", (policy,))
                if cur.fetchone() is None:
                    cur.execute(
                        f"CREATE POLICY {policy} ON {table} FOR SELECT TO {READER_ROLE} "
                        f"USING (groups && {_CALLER_GROUPS})"
                    )
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            if not cur.fetchone()[0]:
                cur.execute(f"GRANT {READER_ROLE} TO CURRENT_USER")
            cur.execute("SELECT key, value FROM kiban_meta")
            meta = dict(cur.fetchall())
            if not meta:
                cur.execute("INSERT INTO kiban_meta VALUES ('embedder', %s), ('dim', %s)", (embedder, str(self.dim)))
            elif meta.get("embedder") != embedder or meta.get("dim") != str(self.dim):
                raise ValueError(
                    f"the index in {_safe(location)} holds vectors of {meta.get('embedder')} ({meta.get('dim')} wide), "
                    f"not {embedder} ({self.dim} wide)"
                )

    # -- connections ---------------------------------------------------------------------------

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            import psycopg

            conn = psycopg.connect(self.dsn, autocommit=True)
            self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self):
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    @contextmanager
    def _as_reader(self, groups: Sequence[str]):
        """A cursor in a transaction running as ``kiban_reader`` with the caller's groups set."""
        with self._transaction() as cur:
            cur.execute(f"SET LOCAL ROLE {READER_ROLE}")
            cur.execute("SELECT set_config('kiban.groups', %s, true)", (",".join(groups),))
            yield cur

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- writes --------------------------------------------------------------------------------

    def add(self, document: Document, chunks: Sequence[Chunk], vectors: np.ndarray) -> str:
        """See ``Store.add``."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(chunks), self.dim):
            raise ValueError(f"expected vectors of shape ({len(chunks)}, {self.dim}), got {vectors.shape}")
        groups = sorted(document.groups)
        with self._transaction() as cur:
            cur.execute(
                "SELECT doc_id, groups FROM kiban_documents WHERE content_hash = %s FOR UPDATE",
                (document.content_hash,),
            )
            row = cur.fetchone()
            if row is not None:
                if sorted(row[1]) == groups:
                    return "unchanged"
                cur.execute("UPDATE kiban_documents SET groups = %s WHERE doc_id = %s", (groups, row[0]))
                cur.execute("UPDATE kiban_chunks SET groups = %s WHERE doc_id = %s", (groups, row[0]))
                return "regrouped"
            cur.execute(
                "INSERT INTO kiban_documents(doc_id, content_hash, title, source, chars, groups) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (document.doc_id, document.content_hash, document.title, document.source, len(document.text), groups),
            )
            with cur.copy(
                "COPY kiban_chunks (chunk_id, doc_id, seq, title, section, start_char, end_char, text, groups, "
                "embedding) FROM STDIN"
            ) as copy:
                for chunk, vector in zip(chunks, vectors):
                    copy.write_row((
                        chunk.chunk_id, document.doc_id, chunk.seq, document.title, chunk.section, chunk.start,
                        chunk.end, chunk.text, groups, _vector_text(vector),
                    ))
            return "added"

    def remove(self, doc_id: str) -> bool:
        """See ``Store.remove``."""
        with self._transaction() as cur:
            cur.execute("DELETE FROM kiban_documents WHERE doc_id = %s", (doc_id,))
            return cur.rowcount > 0

    # -- reads ---------------------------------------------------------------------------------

    def find(self, content_hash: str) -> DocumentInfo | None:
        """See ``Store.find``."""
        with self._transaction() as cur:
            found = self._infos(cur, "WHERE d.content_hash = %s", (content_hash,))
        return found[0] if found else None

    def documents(self, *, groups: Sequence[str] | None) -> list[DocumentInfo]:
        """See ``Store.documents``; with groups, read as ``kiban_reader`` and list only the caller's groups."""
        if groups is None:
            with self._transaction() as cur:
                return self._infos(cur, "", ())
        if not groups:
            return []
        with self._as_reader(groups) as cur:
            infos = self._infos(cur, "WHERE d.groups && %s::text[]", (list(groups),))
        mine = set(groups)
        return [
            DocumentInfo(i.doc_id, i.title, i.source, tuple(g for g in i.groups if g in mine), i.chunks, i.chars)
            for i in infos
        ]

    @staticmethod
    def _infos(cur, where: str, bindings: tuple) -> list[DocumentInfo]:
        cur.execute(
            "SELECT d.doc_id, d.title, d.source, d.groups, "
            "(SELECT count(*) FROM kiban_chunks c WHERE c.doc_id = d.doc_id), d.chars "
            f"FROM kiban_documents d {where} ORDER BY d.added_at, d.doc_id",
            bindings,
        )
        return [
            DocumentInfo(doc_id, title, source, tuple(sorted(groups)), int(count), chars)
            for doc_id, title, source, groups, count, chars in cur.fetchall()
        ]

    def dense(self, vector: np.ndarray, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """See ``Store.dense``: exact cosine order over the caller's chunks only."""
        if not groups or k < 1:
            return []
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape != (self.dim,):
            raise ValueError(f"a query vector must have {self.dim} values, not {query.shape[0]}")
        with self._as_reader(groups) as cur:
            cur.execute(
                "SELECT chunk_id, embedding <=> %(q)s::vector AS distance FROM kiban_chunks "
                "WHERE groups && %(g)s::text[] ORDER BY distance, chunk_id LIMIT %(k)s",
                {"q": _vector_text(query), "g": list(groups), "k": int(k)},
            )
            return [(chunk_id, 1.0 - float(distance)) for chunk_id, distance in cur.fetchall()]

    def lexical(self, query: str, *, groups: Sequence[str], k: int) -> list[tuple[str, float]]:
        """See ``Store.lexical``: PostgreSQL full text (any of the query's words), over the caller's chunks only."""
        terms = query_terms(query)
        if not groups or not terms or k < 1:
            return []
        with self._as_reader(groups) as cur:
            cur.execute(
                "SELECT chunk_id, ts_rank(tsv, q, 1) AS score FROM kiban_chunks, to_tsquery('english', %(q)s) q "
                "WHERE tsv @@ q AND groups && %(g)s::text[] ORDER BY score DESC, chunk_id LIMIT %(k)s",
                {"q": " | ".join(terms), "g": list(groups), "k": int(k)},
            )
            return [(chunk_id, float(score)) for chunk_id, score in cur.fetchall()]

    def chunks(self, chunk_ids: Sequence[str], *, groups: Sequence[str]) -> dict[str, StoredChunk]:
        """See ``Store.chunks``."""
        if not chunk_ids or not groups:
            return {}
        with self._as_reader(groups) as cur:
            cur.execute(
                "SELECT c.chunk_id, c.doc_id, c.title, d.source, c.section, c.start_char, c.end_char, c.text "
                "FROM kiban_chunks c JOIN kiban_documents d ON d.doc_id = c.doc_id "
                "WHERE c.chunk_id = ANY(%s) AND c.groups && %s::text[]",
                (list(chunk_ids), list(groups)),
            )
            return {row[0]: StoredChunk(*row) for row in cur.fetchall()}


def _vector_text(vector: np.ndarray) -> str:
    """The text form pgvector reads, '[0.1, -0.2, ...]': a list's str is exactly that, formatted in C."""
    return str(np.asarray(vector, dtype=np.float32).astype(float).tolist())


def _safe(dsn: str) -> str:
    """The URL without its password (for messages)."""
    import re

    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
