import json

import pytest

from kiban.data import DataError, Rejects, merge_rejects, rejects_log


def test_counts_add_up_and_rejects_are_grouped_by_reason():
    rejects = Rejects(keep=1)
    rejects.accept(3)
    rejects.reject(id="a", location="f.fa:line 1", reason="no sequence", detail="empty")
    rejects.reject(id=None, location="f.fa:line 9", reason="no sequence", detail="empty\n  again")
    report = rejects.report()
    assert (report.read, report.accepted, report.rejected) == (5, 3, 2)
    assert report.by_reason == {"no sequence": 2}
    assert len(report.first_rejects) == 1  # keep=1 bounds memory; the counts are complete
    rejects.reject(id="b", location="x", reason="r", detail="d")
    assert rejects.read == rejects.accepted + rejects.rejected


def test_strict_raises_with_the_location():
    with pytest.raises(DataError, match=r"f\.smi:line 4: RDKit says no") as caught:
        Rejects(strict=True).reject(
            id="m1", location="f.smi:line 4", reason="unparseable SMILES", detail="RDKit says no"
        )
    assert caught.value.reject.id == "m1"
    assert isinstance(caught.value, ValueError)  # the CLI's one-line error path


def test_rejects_log_writes_both_files_even_when_nothing_was_rejected(tmp_path):
    with rejects_log(tmp_path / "run", command="test") as rejects:
        rejects.accept(2)
    assert (tmp_path / "run" / "rejects.jsonl").read_text() == ""
    counts = json.loads((tmp_path / "run" / "counts.json").read_text())
    assert (
        counts["read"] == 2
        and counts["rejected"] == 0
        and counts["complete"] is True
        and counts["command"] == "test"
    )

    with pytest.raises(RuntimeError), rejects_log(tmp_path / "run") as rejects:
        rejects.reject(id="x", location="f:line 1", reason="bad", detail="d")
        raise RuntimeError("the run failed")
    lines = (tmp_path / "run" / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"id": "x", "location": "f:line 1", "reason": "bad", "detail": "d"}
    ]
    assert json.loads((tmp_path / "run" / "counts.json").read_text())["complete"] is False


def test_merge_dedupes_rejects_across_epochs_and_sums_counts(tmp_path):
    for epoch in (0, 1):
        rejects = Rejects(sink=tmp_path / f"rejects-train-e{epoch}-r0-w0.jsonl")
        rejects.accept(4)
        rejects.reject(id="r9", location="d.jsonl:line 9", reason="missing file", detail="img.png")
        rejects.close()
        rejects.write_counts(tmp_path / f"counts-train-e{epoch}-r0-w0.json", epoch=epoch)
    merged = merge_rejects(tmp_path, into=tmp_path / "out")
    assert (merged.read, merged.accepted, merged.rejected) == (10, 8, 2)
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 1
    counts = json.loads((tmp_path / "out" / "counts.json").read_text())
    assert [part["epoch"] for part in counts["parts"]] == [0, 1]
