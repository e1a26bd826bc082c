"""Retrieval quality on real abstracts: each PubMedQA question against all 1,000 PubMedQA abstracts.

Every row of ../shared/data/text/pubmedqa_pqal_1k.csv is indexed as one document (its ``context``:
the abstract without its conclusion, as PubMedQA defines it; no titles) in a fresh embedded store;
each of the 1,000 questions is then searched with dense (MiniLM), lexical (FTS5 BM25) and hybrid
(reciprocal rank fusion) retrieval, and the rank of the question's own abstract among the distinct
abstracts returned gives recall@1/5/10 and MRR@10. One run, printed as JSON:

    .venv/bin/python benchmarks/retrieval_pubmedqa.py [--data ../shared/data/text/pubmedqa_pqal_1k.csv]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from kiban.index import Indexer, TableColumns, open_store, read_path

DEFAULT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "text" / "pubmedqa_pqal_1k.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    csv.field_size_limit(2**31 - 1)
    with open(args.data, newline="", encoding="utf-8") as handle:
        questions = [(row["pmid"], row["question"]) for row in csv.DictReader(handle)]
    with tempfile.TemporaryDirectory() as folder:
        indexer = Indexer(open_store(folder))
        started = time.perf_counter()
        report = indexer.add(read_path(args.data, columns=TableColumns(id="pmid", text="context")), groups=["pubmedqa"])
        ingest_s = time.perf_counter() - started
        source_of = {info.doc_id: info.source.rsplit("=", 1)[-1] for info in indexer.store.documents(groups=None)}
        retriever = indexer.retriever(candidates=100)
        results = {}
        for mode in ("dense", "lexical", "hybrid"):
            ranks = []
            started = time.perf_counter()
            for pmid, question in questions:
                hits = retriever.search(question, groups=["pubmedqa"], k=100, mode=mode)
                docs = list(dict.fromkeys(source_of[hit.chunk.doc_id] for hit in hits))
                ranks.append(docs.index(pmid) + 1 if pmid in docs else None)
            seconds = time.perf_counter() - started
            n = len(ranks)
            results[mode] = {
                "recall@1": sum(r is not None and r <= 1 for r in ranks) / n,
                "recall@5": sum(r is not None and r <= 5 for r in ranks) / n,
                "recall@10": sum(r is not None and r <= 10 for r in ranks) / n,
                "mrr@10": sum(1 / r for r in ranks if r is not None and r <= 10) / n,
                "questions": n,
                "ms_per_query": 1000 * seconds / n,
            }
    print(json.dumps({
        "data": str(args.data),
        "ingest": {**report.summary(), "seconds": round(ingest_s, 1)},
        "results": results,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, torch threads {args.threads}",
    }, indent=1))


if __name__ == "__main__":
    main()
