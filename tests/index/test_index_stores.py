"""Both stores behind one contract: groups filtered inside the query (before ranking), dedup,
regrouping, removal, and PostgreSQL's row-level security as a second line of defence.
"""

from __future__ import annotations

import pytest

from kiban.index import Document, Indexer, Section


def document(title: str, text: str, *, source: str = "test") -> Document:
    return Document(title=title, source=source, text=text, sections=(Section("", 0, len(text)),))


def _add(indexer, docs, groups):
    return indexer.add(docs, groups=groups)


def test_group_filter_is_applied_before_ranking(make_store, embedder):
    """A small group's one document is found at k=1 even when 40 better matches belong to another group."""
    indexer = Indexer(make_store(), embedder=embedder)
    crowd = [
        document(f"Insulin {n}", f"Insulin lowers blood glucose; insulin signalling study number {n}.")
        for n in range(40)
    ]
    _add(indexer, crowd, ["big"])
    mine = document("Hepatic metabolism", "The liver stores glycogen; insulin is mentioned once here.")
    _add(indexer, [mine], ["small"])
    retriever = indexer.retriever(candidates=5)  # a filter over an unfiltered top-5 would find nothing
    for mode in ("dense", "lexical", "hybrid"):
        hits = retriever.search("insulin lowers blood glucose", groups=["small"], k=1, mode=mode)
        assert [h.chunk.doc_id for h in hits] == [mine.doc_id], mode
        hits = retriever.search("insulin lowers blood glucose", groups=["big"], k=5, mode=mode)
        assert len(hits) == 5 and mine.doc_id not in {h.chunk.doc_id for h in hits}, mode
    assert retriever.search("insulin", groups=["nobody"], k=5) == []


def test_same_text_is_stored_once_and_regrouped(make_store, embedder):
    store = make_store()
    indexer = Indexer(store, embedder=embedder)
    doc = document("Kinases", "Imatinib inhibits the BCR-ABL kinase in chronic myeloid leukaemia.")
    assert _add(indexer, [doc], ["lab-a"]).added == 1
    again = _add(indexer, [doc, doc], ["lab-a"])
    assert (again.read, again.added, again.unchanged) == (2, 0, 2)
    moved = _add(indexer, [doc], ["lab-b"])
    assert moved.regrouped == 1
    assert [(i.doc_id, i.groups) for i in store.documents(groups=None)] == [(doc.doc_id, ("lab-b",))]
    retriever = indexer.retriever()
    assert retriever.search("imatinib", groups=["lab-a"], k=3) == []
    assert [h.chunk.doc_id for h in retriever.search("imatinib", groups=["lab-b"], k=3)] == [doc.doc_id]


def test_removed_document_is_gone_from_the_next_search(make_store, embedder):
    store = make_store()
    indexer = Indexer(store, embedder=embedder)
    a = document("CRISPR", "Cas9 cuts DNA at a site chosen by its guide RNA.")
    b = document("Base editing", "Base editors change one nucleotide without a double-strand break.")
    _add(indexer, [a, b], ["lab-a"])
    retriever = indexer.retriever()
    assert a.doc_id in {h.chunk.doc_id for h in retriever.search("Cas9 guide RNA", groups=["lab-a"], k=5)}
    assert store.remove(a.doc_id) and not store.remove(a.doc_id)
    for mode in ("dense", "lexical", "hybrid"):
        assert a.doc_id not in {h.chunk.doc_id for h in retriever.search("Cas9 guide RNA", groups=["lab-a"], k=5, mode=mode)}
    assert [i.doc_id for i in store.documents(groups=["lab-a"])] == [b.doc_id]


def test_documents_lists_only_the_callers_groups(make_store, embedder):
    store = make_store()
    indexer = Indexer(store, embedder=embedder)
    shared = document("Shared", "A protocol both labs may read.")
    _add(indexer, [shared], ["lab-a", "lab-b"])
    _add(indexer, [document("Private", "Lab B's own notes.")], ["lab-b"])
    listed = store.documents(groups=["lab-a"])
    assert [(i.doc_id, i.groups) for i in listed] == [(shared.doc_id, ("lab-a",))]  # lab-b's name is not shown
    assert len(store.documents(groups=["lab-b"])) == 2 and store.documents(groups=[]) == []


def test_chunks_of_other_groups_cannot_be_fetched_by_id(make_store, embedder):
    store = make_store()
    indexer = Indexer(store, embedder=embedder)
    doc = document("Secret", "Unpublished results about protein folding.")
    _add(indexer, [doc], ["lab-b"])
    assert store.chunks([f"{doc.doc_id}:0"], groups=["lab-a"]) == {}
    assert store.chunks([f"{doc.doc_id}:0"], groups=["lab-b"])[f"{doc.doc_id}:0"].text == doc.text


def test_vectors_of_another_embedder_are_refused(make_store):
    store = make_store()
    from kiban.index import open_store

    location = str(store.folder) if make_store.kind == "sqlite" else store.dsn
    with pytest.raises(ValueError, match="holds vectors of all-MiniLM-L6-v2"):
        open_store(location, dim=768, embedder="other-model")


def test_postgres_row_level_security_hides_other_groups_without_a_where_clause(make_store, embedder):
    if make_store.kind != "postgres":
        pytest.skip("row-level security is PostgreSQL's")
    import psycopg

    store = make_store()
    indexer = Indexer(store, embedder=embedder)
    _add(indexer, [document("A", "alpha text of lab a")], ["lab-a"])
    _add(indexer, [document("B", "beta text of lab b")], ["lab-b"])
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        for groups, expected in (("lab-a", ["alpha text of lab a"]), ("", []), ("lab-c", [])):
            with conn.transaction():
                conn.execute("SET LOCAL ROLE kiban_reader")
                conn.execute("SELECT set_config('kiban.groups', %s, true)", (groups,))
                assert [t for (t,) in conn.execute("SELECT text FROM kiban_chunks")] == expected
                assert conn.execute("SELECT count(*) FROM kiban_documents").fetchone()[0] == len(expected)
        with conn.transaction():  # no setting at all: nothing
            conn.execute("SET LOCAL ROLE kiban_reader")
            assert conn.execute("SELECT count(*) FROM kiban_chunks").fetchone()[0] == 0
