import gzip
import json

from kiban.data import Rejects, detect_kind, read, read_text


def test_jsonl_passages_with_bad_lines_reported(tmp_path):
    path = tmp_path / "papers.jsonl"
    path.write_text(
        json.dumps({"id": "pmid:1", "text": "Insulin regulates glucose.", "year": 2001})
        + "\n"
        + "\n"
        + "{not json\n"
        + json.dumps({"id": "pmid:2", "text": "  "})
        + "\n"
        + json.dumps("A bare string passage.")
        + "\n"
        + json.dumps({"id": "pmid:1", "text": "again"})
        + "\n"
    )
    assert detect_kind(path) == "text"
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert [(r.id, r.item) for r in records] == [
        ("pmid:1", "Insulin regulates glucose."),
        ("papers.jsonl:5", "A bare string passage."),
    ]
    assert records[0].fields == {"year": "2001"}
    report = rejects.report()
    assert report.read == report.accepted + report.rejected == 5
    assert {(r.reason, r.location.split(":")[-1]) for r in report.first_rejects} == {
        ("invalid JSON", "line 3"),
        ("no text", "line 4"),
        ("duplicate id", "line 6"),
    }


def test_plain_text_passages_and_gzip(tmp_path):
    (tmp_path / "a.txt").write_text("First passage\ncontinues here.\n\n\nSecond one.\n")
    records = list(read_text(tmp_path / "a.txt"))
    assert [(r.id, r.item) for r in records] == [
        ("a.txt:1", "First passage continues here."),
        ("a.txt:5", "Second one."),
    ]
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    assert [r.item for r in read(tmp_path / "b.jsonl.gz")] == ["zipped"]


def test_shared_pubmedqa_table(shared_data):
    path = shared_data / "text/pubmedqa_pqal_1k.csv"
    assert detect_kind(path) == "text-table"
    rejects = Rejects()
    records = list(read(path, rejects=rejects))
    assert (
        len(records) == 1000
        and rejects.rejected == 0
        and records[0].fields["final_decision"] in ("yes", "no", "maybe")
    )
