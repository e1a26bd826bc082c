"""Grounded answers with permissions, over HTTP, against both stores (embedded SQLite and PostgreSQL).

One ``kiban serve --index`` process per store (module-scoped), with a keys file that grants document
groups per key. The property test draws documents, groups and keys at random and checks that no
response a key gets (search results, document lists and counts, chat answers and citations, error
messages) carries text or ids of a document outside that key's groups, and that what the key may
read is found. The other tests check that removing a document, or a group from a key, counts on the
very next request, and the shape of a grounded chat answer.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiban.atomic import write_atomic
from kiban.index import Document, Indexer, Section, open_store
from kiban.index.embedding import SentenceEmbedder
from kiban.serve.launch import ServerProcess

KEYS = ("kiban-grounded-key-000000000001", "kiban-grounded-key-000000000002", "kiban-grounded-key-000000000003")
GROUPS = ("g0", "g1", "g2")
TOPICS = (
    "Insulin lowers blood glucose in diabetic mice.",
    "The kinase domain binds ATP and is blocked by imatinib.",
    "CRISPR guide RNAs direct Cas9 to its target site.",
    "Ribosomes translate messenger RNA into protein.",
)


class Grounded:
    """A server over one store, the store itself (to change documents) and the keys file."""

    def __init__(self, server: ServerProcess, store, indexer: Indexer, keys_path) -> None:
        self.server, self.store, self.indexer, self.keys_path = server, store, indexer, keys_path

    def set_keys(self, grants: dict[str, set[str]]) -> None:
        lines = [f"{key} name=k{i} groups={','.join(sorted(grants[key]))}" if grants[key] else key
                 for i, key in enumerate(KEYS) if key in grants]
        write_atomic(self.keys_path, "\n".join(lines) + "\n")  # a new file (inode): the server re-reads it

    def clear(self) -> None:
        for info in self.store.documents(groups=None):
            self.store.remove(info.doc_id)

    def add(self, title: str, text: str, groups) -> Document:
        doc = Document(title=title, source=f"test#{title}", text=text, sections=(Section("Body", 0, len(text)),))
        report = self.indexer.add([doc], groups=sorted(groups))
        assert report.added + report.unchanged + report.regrouped == 1
        return doc


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def grounded(request, tmp_path_factory, model_dir, embedder):
    folder = tmp_path_factory.mktemp(f"grounded-{request.param}")
    with _location(request.param, folder) as location:
        store = open_store(location)
        keys_path = folder / "keys.txt"
        write_atomic(keys_path, f"{KEYS[0]} groups=g0\n")
        flags = ("--index", location, "--rate-limit", "0", "--default-max-tokens", "4", "--max-tokens", "64")
        server = ServerProcess(model_dir, keys_path, folder / "server.log", *flags)
        try:
            server.wait_ready(key=KEYS[0], timeout=300)
            yield Grounded(server, store, Indexer(store, embedder=embedder), keys_path)
        finally:
            server.stop()
            store.close()


class _location:
    """The index location for a store kind: a folder, or a database on a local PostgreSQL (stopped after)."""

    def __init__(self, kind: str, folder) -> None:
        self.kind, self.folder, self.postgres = kind, folder, None

    def __enter__(self) -> str:
        if self.kind == "sqlite":
            return str(self.folder / "index")
        pytest.importorskip("pgserver")
        from kiban.index.pglocal import create_database, local_postgres

        self.postgres = local_postgres(self.folder / "pg")
        url = self.postgres.__enter__()
        return create_database(url, "grounded")

    def __exit__(self, *exc) -> None:
        if self.postgres is not None:
            self.postgres.__exit__(*exc)


def _chat(question: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": 4, **extra}


def _responses(client, query: str) -> list:
    """Everything one key can ask about ``query``: searches, listing, grounded chat, and refusals."""
    return [
        client.post("/v1/search", json={"query": query, "k": 10}),
        client.post("/v1/search", json={"query": query, "k": 10, "mode": "lexical"}),
        client.post("/v1/search", json={"query": query, "k": 3, "mode": "dense"}),
        client.get("/v1/documents"),
        client.post("/v1/chat/completions", json=_chat(query, retrieval={"k": 3})),
        client.post("/v1/search", json={"query": query, "k": 1000}),  # 422: k over 100
        client.post("/v1/search", json={"query": " ", "k": 5}),  # 422: empty query
        client.post("/v1/chat/completions", json=_chat(query, retrieval={}, tools=[{"type": "function"}])),
        client.post("/v1/chat/completions", json=_chat(query, retrieval={}, stream=True)),  # 422
    ]


_WORD = st.text(alphabet="bcdfghjklmnpqrstvwxz", min_size=8, max_size=8)


@st.composite
def worlds(draw):
    n = draw(st.integers(1, 5))
    docs = []
    for i in range(n):
        docs.append({
            "groups": draw(st.sets(st.sampled_from(GROUPS), min_size=1)),
            "topic": draw(st.sampled_from(TOPICS)),
            "said": f"qa{i}{draw(_WORD)}",  # may be sent in a query
            "secret": f"qs{i}{draw(_WORD)}",  # never sent by anyone
        })
    grants = {key: draw(st.sets(st.sampled_from(GROUPS))) for key in KEYS}
    target = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["marker", "topic", "both"]))
    doc = docs[target]
    query = {"marker": doc["said"], "topic": doc["topic"], "both": f"{doc['topic']} {doc['said']}"}[kind]
    return docs, grants, query, target


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(world=worlds())
def test_no_response_carries_another_groups_documents(grounded, world):
    docs, grants, query, target = world
    grounded.clear()
    stored = [
        grounded.add(f"Doc {i}", f"{d['topic']} Finding {d['said']}. Reference {d['secret']}.", d["groups"])
        for i, d in enumerate(docs)
    ]
    grounded.set_keys(grants)
    for key, groups in grants.items():
        readable = [i for i, d in enumerate(docs) if d["groups"] & groups]
        hidden = [i for i in range(len(docs)) if i not in readable]
        with grounded.server.client(key) as client:
            responses = _responses(client, query)
        statuses = [r.status_code for r in responses]
        assert statuses == [200, 200, 200, 200, 200, 422, 422, 422, 422], statuses
        bodies = [r.text for r in responses]
        for i in hidden:
            forbidden = [docs[i]["secret"], stored[i].doc_id, f"Doc {i}\""]
            if docs[i]["said"] not in query:
                forbidden.append(docs[i]["said"])
            for text in bodies:
                assert not any(word in text for word in forbidden), (key, groups, docs[i], text[:500])
        listed = {row["doc_id"] for row in responses[3].json()["data"]}
        assert listed == {stored[i].doc_id for i in readable}  # the counts are the caller's own
        found = {hit["doc_id"] for hit in responses[1].json()["data"]}
        if target in readable and docs[target]["said"] in query:  # what the key may read is found
            assert stored[target].doc_id in found
        cited = {c["doc_id"] for c in responses[4].json()["citations"]}
        assert cited <= {stored[i].doc_id for i in readable}


def test_removal_and_group_changes_count_on_the_next_request(grounded):
    grounded.clear()
    grounded.set_keys({KEYS[0]: {"g0"}, KEYS[1]: {"g1"}})
    doc = grounded.add("Telomeres", "Telomerase extends telomeres in stem cells. tq7marker", {"g0"})

    def found(key: str) -> bool:
        with grounded.server.client(key) as client:
            response = client.post("/v1/search", json={"query": "telomerase tq7marker", "k": 5})
        assert response.status_code == 200
        return doc.doc_id in {hit["doc_id"] for hit in response.json()["data"]}

    assert found(KEYS[0]) and not found(KEYS[1])
    grounded.set_keys({KEYS[0]: {"g1"}, KEYS[1]: {"g0", "g1"}})  # g0 moves from key 0 to key 1
    assert not found(KEYS[0]) and found(KEYS[1])
    assert grounded.store.remove(doc.doc_id)
    assert not found(KEYS[1])
    grounded.add("Telomeres", "Telomerase extends telomeres in stem cells. tq7marker", {"g0"})
    assert found(KEYS[1])
    grounded.set_keys({KEYS[0]: {"g1"}})  # key 1 revoked
    with grounded.server.client(KEYS[1]) as client:
        assert client.post("/v1/search", json={"query": "telomerase", "k": 5}).status_code == 401


def test_grounded_chat_cites_its_sources_in_text_and_fields(grounded):
    grounded.clear()
    grounded.set_keys({KEYS[0]: {"g0"}, KEYS[2]: set()})
    text = "Mitochondria make ATP by oxidative phosphorylation. The electron transport chain pumps protons."
    doc = grounded.add("Mitochondria", text, {"g0"})
    with grounded.server.client(KEYS[0]) as client:
        answer = client.post("/v1/chat/completions", json=_chat("How do mitochondria make ATP?", retrieval={"k": 2}))
        plain = client.post("/v1/chat/completions", json=_chat("How do mitochondria make ATP?"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    (citation,) = body["citations"]
    assert citation["doc_id"] == doc.doc_id and citation["chunk_id"] == f"{doc.doc_id}:0"
    assert citation["title"] == "Mitochondria" and citation["section"] == "Body" and citation["index"] == 1
    assert text[citation["start"] : citation["end"]] == text
    content = body["choices"][0]["message"]["content"]
    assert content.endswith(f"Sources:\n[1] Mitochondria, Body ({doc.doc_id}, characters 0-{len(text)})")
    assert plain.status_code == 200 and plain.json()["citations"] is None
    with grounded.server.client(KEYS[2]) as client:  # a key without groups reads nothing
        none = client.post("/v1/chat/completions", json=_chat("How do mitochondria make ATP?", retrieval={}))
    assert none.json()["citations"] == []
    assert none.json()["choices"][0]["message"]["content"].endswith("Sources: none found in the documents you may read.")


def test_retrieval_needs_an_index_and_tools_are_refused_by_name(api):
    response = api.post("/v1/chat/completions", json=_chat("hello", retrieval={}))
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "retrieval" and "no document index" in response.json()["error"]["message"]
    assert api.post("/v1/search", json={"query": "x"}).status_code == 404  # mounted only with --index
    response = api.post("/v1/chat/completions", json=_chat("hello", tools=[{"type": "function", "function": {"name": "f"}}]))
    error = response.json()["error"]
    assert response.status_code == 422 and error["param"] == "tools" and "retrieval" in error["message"]


def test_keys_file_with_groups_is_parsed_and_checked(tmp_path):
    from kiban.serve.auth import KeyRing, read_keys_file

    path = tmp_path / "keys.txt"
    path.write_text(f"# comment\n{KEYS[0]} name=alice groups=lab-a,lab-b\n{KEYS[1]}\n")
    keys = read_keys_file(path)
    assert [(p.name, p.groups) for p in keys.values()] == [("alice", ("lab-a", "lab-b")), ("key-1", ())]
    path.write_text(f"{KEYS[0]} group=lab-a\n")
    with pytest.raises(ValueError, match="line 1") as error:
        read_keys_file(path)
    assert KEYS[0] not in str(error.value)
    write_atomic(tmp_path / "ring.txt", f"{KEYS[0]} groups=a\n")
    ring = KeyRing(path=tmp_path / "ring.txt")
    assert ring.lookup(KEYS[0]).groups == ("a",) and ring.lookup(KEYS[1]) is None
    write_atomic(tmp_path / "ring.txt", f"{KEYS[0]} groups=bad!\n")  # unusable: every key refused
    assert ring.lookup(KEYS[0]) is None
    write_atomic(tmp_path / "ring.txt", f"{KEYS[0]} groups=b\n")
    assert ring.lookup(KEYS[0]).groups == ("b",)
