"""Index stores side by side at 100,000 chunks: ingestion rate and p50/p99 hybrid query latency.

The chunks are SYNTHETIC: 10,000 documents of 10 chunks, each chunk ~60 words drawn (Zipf) from a
5,000-word made-up vocabulary, with random unit vectors of MiniLM's width (384) in place of MiniLM
embeddings (embedding 10^5 real chunks takes hours on a 2-core machine). Each document belongs to
one of 10 groups. So ingestion measures the store (chunk rows, BM25/full-text index, vectors), not
the embedder; query latency is a whole hybrid search (dense KNN + lexical + RRF + fetching the
passages) as a caller with 2 of the 10 groups and as one with all 10, with the query vector given
(MiniLM's own time for one query is printed separately).

    .venv/bin/python benchmarks/index_stores.py [--chunks 100000] [--queries 100] [--stores sqlite,postgres]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from kiban.index import Chunk, Document, Retriever, Section, open_store

DIM = 384
GROUPS = [f"g{i}" for i in range(10)]


def _vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, rng.integers(4, 10))) for _ in range(size)]


def _corpus(n_chunks: int, *, per_doc: int, rng: np.random.Generator):
    vocabulary = np.array(_vocabulary(5000, rng))
    weights = 1.0 / np.arange(1, len(vocabulary) + 1)
    cumulative = np.cumsum(weights / weights.sum())
    for d in range(n_chunks // per_doc):
        words = vocabulary[np.minimum(np.searchsorted(cumulative, rng.random((per_doc, 60))), len(vocabulary) - 1)]
        texts = [" ".join(row) + "." for row in words]
        text, sections, chunks, at = "", [], [], 0
        for seq, passage in enumerate(texts):
            sections.append(Section(f"part {seq}", at, at + len(passage)))
            text += passage + "\n"
            at += len(passage) + 1
        doc = Document(title=f"synthetic {d}", source=f"synthetic#{d}", text=text, sections=tuple(sections),
                       groups=(GROUPS[d % len(GROUPS)],))
        for seq, section in enumerate(sections):
            chunks.append(Chunk(doc.doc_id, seq, section.title, section.start, section.end, text[section.start:section.end]))
        vectors = rng.standard_normal((per_doc, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield doc, chunks, vectors, vocabulary


def _run(location: str, *, n_chunks: int, n_queries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    store = open_store(location)
    corpus = list(_corpus(n_chunks, per_doc=10, rng=rng))  # made before the clock starts
    vocabulary = corpus[0][3]
    started, stored = time.perf_counter(), 0
    for doc, chunks, vectors, _ in corpus:
        store.add(doc, chunks, vectors)
        stored += len(chunks)
    ingest_s = time.perf_counter() - started
    del corpus
    queries = [" ".join(rng.choice(vocabulary[:2000], 6)) for _ in range(n_queries)]  # frequent words
    vectors = rng.standard_normal((n_queries, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    result = {"chunks": stored, "ingest_s": round(ingest_s, 1), "chunks_per_s": round(stored / ingest_s)}
    for label, groups in (("2_of_10_groups", GROUPS[:2]), ("all_10_groups", GROUPS)):
        position = {"i": 0}

        def given_vector(texts, position=position):
            vector = vectors[position["i"] % n_queries][None]
            return vector

        retriever = Retriever(store, given_vector)
        retriever.search(queries[0], groups=groups, k=10)  # warm caches and connections
        times = []
        for i, query in enumerate(queries):
            position["i"] = i
            t = time.perf_counter()
            hits = retriever.search(query, groups=groups, k=10)
            times.append(1000 * (time.perf_counter() - t))
            assert hits and all(set(groups) for _ in hits)
        result[label] = {"p50_ms": round(float(np.percentile(times, 50)), 1),
                         "p99_ms": round(float(np.percentile(times, 99)), 1)}
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"machine": f"{platform.node()}, {platform.machine()}", "chunks": args.chunks, "queries": args.queries}
    with tempfile.TemporaryDirectory() as folder:
        for kind in args.stores.split(","):
            if kind == "sqlite":
                report["sqlite"] = _run(str(Path(folder) / "index"), n_chunks=args.chunks, n_queries=args.queries,
                                        seed=args.seed)
            else:
                from kiban.index.pglocal import create_database, local_postgres

                with local_postgres(Path(folder) / "pg") as url:
                    report["postgres"] = _run(create_database(url, "bench"), n_chunks=args.chunks,
                                              n_queries=args.queries, seed=args.seed)
            print(json.dumps({kind: report[kind]}), flush=True)
    from kiban.index.embedding import SentenceEmbedder

    embedder = SentenceEmbedder()
    embedder.embed(["warm-up"])
    t = time.perf_counter()
    for _ in range(20):
        embedder.embed(["which kinase inhibitors are used in chronic myeloid leukaemia"])
    report["minilm_query_embedding_ms"] = round(1000 * (time.perf_counter() - t) / 20, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
