"""``kiban index add|list|remove|search`` on the embedded store: counts that add up, a rejects file,
no duplicates on re-adding, JSON Lines out, and clear errors.
"""

from __future__ import annotations

import json

from kiban.cli import main


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_add_list_search_remove(tmp_path, capsys):
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "insulin.md").write_text("# Insulin\n\nInsulin lowers blood glucose by moving GLUT4 to the membrane.\n")
    (papers / "kinase.txt").write_text("Kinase inhibitors\nImatinib blocks the BCR-ABL kinase.\n")
    (papers / "abstracts.jsonl").write_text('{"pmid": "7", "abstract": "p53 is mutated in many cancers."}\nnope\n')
    (papers / "slides.pptx").write_bytes(b"PK")
    index = str(tmp_path / "index")

    assert main(["index", "add", str(papers), "--index", index, "--groups", "lab-a"]) == 1  # something rejected
    out, err = capsys.readouterr()
    counts = _lines(out)[0]
    assert counts == {"read": 5, "added": 3, "unchanged": 0, "regrouped": 0, "rejected": 2, "chunks": 3}
    assert "2 of 5 items rejected" in err
    rejects = _lines((tmp_path / "index" / "rejects.jsonl").read_text())
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in rejects) == ["abstracts.jsonl#row=2", "slides.pptx"]

    assert main(["index", "add", str(papers / "insulin.md"), str(papers / "kinase.txt"), "--index", index,
                 "--groups", "lab-a"]) == 0
    assert _lines(capsys.readouterr().out)[0]["unchanged"] == 2  # no duplicates
    assert main(["index", "add", str(papers / "kinase.txt"), "--index", index, "--groups", "lab-b"]) == 0
    assert _lines(capsys.readouterr().out)[0]["regrouped"] == 1

    assert main(["index", "list", "--index", index]) == 0
    listed = {row["title"]: row for row in _lines(capsys.readouterr().out)}
    assert set(listed) == {"Insulin", "Kinase inhibitors", "pmid 7"} and listed["Kinase inhibitors"]["groups"] == ["lab-b"]

    assert main(["index", "search", "blood sugar regulation", "--index", index, "--groups", "lab-a", "--k", "2"]) == 0
    hits = _lines(capsys.readouterr().out)
    assert hits[0]["title"] == "Insulin" and {"doc_id", "chunk_id", "score", "text", "start", "end"} <= set(hits[0])
    assert all(h["title"] != "Kinase inhibitors" for h in hits)

    doc_id = listed["Insulin"]["doc_id"]
    assert main(["index", "remove", doc_id, "--index", index]) == 0
    assert _lines(capsys.readouterr().out)[0] == {"removed": 1, "missing": []}
    assert main(["index", "search", "blood sugar", "--index", index, "--groups", "lab-a", "--mode", "lexical"]) == 0
    assert all(h["doc_id"] != doc_id for h in _lines(capsys.readouterr().out))
    assert main(["index", "remove", doc_id, "--index", index]) == 2
    assert f"no document {doc_id}" in capsys.readouterr().err


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["index", "list", "--index", str(tmp_path / "missing")]) == 2
    assert "no index at" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("text")
    assert main(["index", "add", str(tmp_path / "a.txt"), "--index", str(tmp_path / "i"), "--groups", "bad group"]) == 2
    assert "'bad group' is not a valid group name" in capsys.readouterr().err
