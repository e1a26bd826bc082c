"""``kiban index``: add, list, remove and search documents of an index (a folder, or a PostgreSQL URL).

    kiban index add papers/ notes.md --index runs/index --groups lab-a,lab-b
    kiban index list --index runs/index
    kiban index remove doc-0123456789abcdef --index runs/index
    kiban index search "BRCA1 and homologous recombination" --index runs/index --groups lab-a --k 5

``add`` prints its counts as one JSON line (read = added + unchanged + regrouped + rejected) and
appends every rejected item with its reason to the rejects file; it exits 1 when anything was
rejected, 0 otherwise. ``list`` and ``search`` print JSON Lines.
"""

from __future__ import annotations

import argparse
import json
import sys

from kiban.cli import arguments, command

__all__ = ["index"]


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def location(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--index", required=True, metavar="DIR_OR_URL",
            help="a folder (the embedded SQLite store, created on first add) or a postgresql:// URL",
        )

    add = sub.add_parser("add", help="read, chunk, embed and store documents")
    add.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    location(add)
    add.add_argument("--groups", required=True, help="comma-separated access groups of these documents")
    add.add_argument("--rejects", help="JSON Lines file that rejected items are appended to "
                     "(default: DIR/rejects.jsonl, or ./kiban-index-rejects.jsonl for PostgreSQL)")
    add.add_argument("--id-column", help="tables: the id column (default: id, doc_id, pmid, pmcid or doi)")
    add.add_argument("--title-column", help="tables: the title column (default: title)")
    add.add_argument("--text-column", help="tables: the text column (default: abstract, text, context, body or content)")
    add.add_argument("--max-chars", type=int, default=1000, help="characters per chunk (default: %(default)s)")
    add.add_argument("--overlap-chars", type=int, default=150, help="characters shared by consecutive chunks "
                     "(default: %(default)s)")

    listing = sub.add_parser("list", help="list the documents (JSON Lines)")
    location(listing)
    listing.add_argument("--groups", help="only documents readable by these comma-separated groups")

    remove = sub.add_parser("remove", help="remove documents by id")
    remove.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    location(remove)

    search = sub.add_parser("search", help="search as a member of --groups (JSON Lines, best first)")
    search.add_argument("query", metavar="QUERY")
    location(search)
    search.add_argument("--groups", required=True, help="comma-separated groups the search may read")
    search.add_argument("--k", type=int, default=10, help="results (default: %(default)s)")
    search.add_argument("--mode", choices=["hybrid", "dense", "lexical"], default="hybrid")
    search.add_argument("--reranker", metavar="DIR", help="a local cross-encoder folder to re-rank with")


def _groups(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


@command("index", help="a document index for grounded answers: add, list, remove, search")
@arguments(_index_arguments)
def index(args: argparse.Namespace) -> int:
    """Run ``kiban index ACTION``; the process's exit code."""
    from kiban.index.documents import check_groups
    from kiban.index.store import open_store

    if args.action == "add":
        return _add(args)
    groups = check_groups(_groups(args.groups), where="--groups") if getattr(args, "groups", None) else None
    store = open_store(args.index, create=False)
    if args.action == "list":
        for info in store.documents(groups=groups):
            print(json.dumps({"doc_id": info.doc_id, "title": info.title, "source": info.source,
                              "groups": list(info.groups), "chunks": info.chunks, "chars": info.chars}))
        return 0
    if args.action == "remove":
        missing = [doc_id for doc_id in args.doc_ids if not store.remove(doc_id)]
        removed = len(args.doc_ids) - len(missing)
        print(json.dumps({"removed": removed, "missing": missing}))
        if missing:
            print(f"kiban index remove: no document {', '.join(missing)} in {args.index}", file=sys.stderr)
            return 2
        return 0
    from kiban.index.ingest import Indexer
    from kiban.index.retrieval import CrossEncoderReranker

    reranker = CrossEncoderReranker(args.reranker) if args.reranker else None
    retriever = Indexer(store).retriever(reranker=reranker)
    for hit in retriever.search(args.query, groups=groups, k=args.k, mode=args.mode):
        print(json.dumps(hit.to_dict()))
    return 0


def _add(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiban.index.documents import ChunkingConfig, check_groups
    from kiban.index.ingest import Indexer
    from kiban.index.readers import TableColumns
    from kiban.index.store import open_store

    groups = check_groups(_groups(args.groups), where="--groups")
    if not groups:
        raise ValueError("--groups: give at least one access group")
    chunking = ChunkingConfig(max_chars=args.max_chars, overlap_chars=args.overlap_chars)
    columns = TableColumns(id=args.id_column, title=args.title_column, text=args.text_column)
    store = open_store(args.index)
    is_folder = "://" not in args.index
    rejects = args.rejects or (str(Path(args.index) / "rejects.jsonl") if is_folder else "kiban-index-rejects.jsonl")
    report = Indexer(store, chunking=chunking).add_paths(args.paths, groups=groups, columns=columns,
                                                           rejects_path=rejects)
    print(json.dumps(report.summary()))
    if report.rejected:
        print(f"kiban index add: {report.rejected} of {report.read} items rejected; reasons in {rejects}",
              file=sys.stderr)
        for reject in report.rejects[:5]:
            print(f"  {reject.source}: {reject.reason}", file=sys.stderr)
        return 1
    return 0
