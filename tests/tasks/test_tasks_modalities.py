"""End to end on the shared real data, with one tiny model, for the protein, dna, image and text
task types: ``kiban finetune --type TYPE`` (counts add up, the baseline sits beside the head in
metrics.json, the split is the honest one), then the saved head through ``kiban predict`` and
through a real ``kiban serve`` over HTTP; and the bad-input refusals every type shares.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from kiban.cli import main

ROOT = Path(__file__).resolve().parents[2]
ROWS = 240  # records per type: small, so the module stays cheap


def _prepare():
    spec = importlib.util.spec_from_file_location("prepare_task_data", ROOT / "benchmarks" / "prepare_task_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tables(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Prepared tables of ROWS records each (benchmarks/prepare_task_data.py), in a temporary folder."""
    return _prepare().write_all(tmp_path_factory.mktemp("tables"), shared=shared_data, rows=ROWS)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """One tiny model with protein, DNA and image encoders (the backbone reads text): every head below reads it."""
    from kiban.tiny import tiny_model

    path = tmp_path_factory.mktemp("model") / "model"
    tiny_model(["protein", "dna", "image"], seed=0).eval().save_pretrained(path)
    return path


def _crops(shared: Path) -> Path:
    return shared / "microscopy" / "bccd_blood_cells" / "crops_labels.csv"


def _runs(tables: dict[str, Path], shared: Path) -> dict[str, tuple[str, Path, list[str]]]:
    """Task -> (type, data, extra flags)."""
    return {
        "ec": ("protein", tables["enzyme_class"], ["--labels", "ec_class", "--max-length", "400"]),
        "fitness": ("protein", tables["blactamase"], ["--labels", "fitness", "--groups", "position"]),
        "promoter": ("dna", tables["promoters"], ["--labels", "label"]),
        "cells": ("image", _crops(shared), ["--labels", "label", "--max-rows", str(ROWS)]),
        "pubmedqa": ("text", tables["pubmedqa"], ["--labels", "final_decision"]),
        "chemprot": ("text", tables["chemprot"], ["--labels", "label", "--groups", "abstract"]),
    }


@pytest.fixture(scope="module")
def runs(tables, shared_data, model_dir, tmp_path_factory) -> dict[str, Path]:
    """Each task fine-tuned once (a probe, 30 epochs) on the tiny model; task -> run folder."""
    parent = tmp_path_factory.mktemp("runs")
    out = {}
    for task, (kind, data, flags) in _runs(tables, shared_data).items():
        folder = parent / task
        args = ["finetune", task, "--type", kind, "--data", str(data), "--model", str(model_dir)]
        assert main([*args, *flags, "--epochs", "30", "--out", str(folder)]) == 0, task
        out[task] = folder
    return out


BASELINES = {
    "ec": "logistic regression on amino-acid + dipeptide composition",
    "fitness": "ridge regression on amino-acid + dipeptide composition",
    "promoter": "logistic regression on k-mer counts (k = 3..6)",
    "cells": "logistic regression on HOG features",
    "pubmedqa": "TF-IDF + logistic regression",
    "chemprot": "TF-IDF + logistic regression",
}


@pytest.mark.parametrize("task", list(BASELINES))
def test_counts_add_up_and_the_baseline_sits_beside_the_head(runs, task):
    folder = runs[task]
    metrics = json.loads((folder / "metrics.json").read_text())
    counts = json.loads((folder / "counts.json").read_text())
    assert counts["read"] == counts["accepted"] + counts["rejected"]
    sizes = metrics["split"]["sizes"]
    # --max-rows samples the accepted records (the images: 240 of 360)
    assert sizes["train"] + sizes["valid"] + sizes["test"] == metrics["n"] == min(counts["accepted"], ROWS)
    tested = {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}
    head = next(name for name in tested if name.startswith("head (probe"))
    assert BASELINES[task] in tested and any(name.startswith("trivial") for name in tested)
    key = "rmse" if metrics["kind"] == "regression" else "accuracy"
    for name in (head, BASELINES[task]):
        value = tested[name]["fitness"][key] if metrics["kind"] == "regression" else tested[name][key]
        assert value is not None and value >= 0
    assert (folder / "heads" / task / "head.json").is_file() and (folder / "plots").is_dir()
    split = pd.read_csv(folder / "split.csv")
    assert len(split) == metrics["n"] and set(split["side"]) == {"train", "valid", "test"}


def test_the_splits_are_honest(runs, shared_data, tables):
    """protein/dna: by k-mer similarity clusters; the DMS by position; images by source image;
    ChemProt relations by abstract: no group on two sides.
    """
    methods = {t: json.loads((runs[t] / "metrics.json").read_text())["split"]["method"] for t in runs}
    assert methods["ec"].startswith("kmer-jaccard (k=3") and methods["promoter"].startswith("kmer-jaccard (k=6")
    assert methods["fitness"] == methods["cells"] == methods["chemprot"] == "group"
    crops = pd.read_csv(_crops(shared_data)).set_index("file")["source_image"]
    split = pd.read_csv(runs["cells"] / "split.csv")
    sides = split.assign(source=split["id"].map(crops)).groupby("source")["side"].nunique()
    assert (sides == 1).all()
    positions = pd.read_csv(tables["blactamase"], dtype={"id": str}).set_index("id")["position"]
    split = pd.read_csv(runs["fitness"] / "split.csv", dtype={"id": str})
    assert (split.assign(g=split["id"].map(positions)).groupby("g")["side"].nunique() == 1).all()


INPUTS = {
    "ec": ("protein", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAEGASVAHRCHLRFVRQCLNPEWLSEIHRDAEIAVRPLEALHAAAGV"[:120]),
    "fitness": ("protein", None),
    "promoter": ("dna", "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATTTCACACAGGAAACAGCTATGACCATG"),
    "pubmedqa": ("text", "Is aspirin associated with a lower risk of colorectal cancer? We followed 1000 patients."),
    "chemprot": ("text", "aspirin | cyclooxygenase | Aspirin irreversibly inhibits cyclooxygenase."),
}


def test_saved_heads_predict_through_kiban_predict(runs, tables, shared_data, tmp_path):
    """The saved head of each type reads its type's files with ``kiban predict``."""
    data = {
        "ec": tables["enzyme_class"],
        "promoter": tables["promoters"],
        "cells": _crops(shared_data),
        "pubmedqa": tables["pubmedqa"],
        "fitness": tables["blactamase"],
    }
    for task, path in data.items():
        small = tmp_path / f"{task}{path.suffix}"
        if task == "cells":  # a few rows of the crops table, its image paths made absolute
            table = pd.read_csv(path).head(5)
            table["file"] = [str(path.parent / f) for f in table["file"]]
            table.to_csv(small, index=False)
        else:
            pd.read_csv(path).head(5).to_csv(small, index=False)
        written = tmp_path / f"{task}.predicted.csv"
        assert main(["predict", str(runs[task] / "heads" / task), "--data", str(small), "--out", str(written)]) == 0
        predicted = pd.read_csv(written, dtype={"label": str})
        assert len(predicted) == 5, task
        metrics = json.loads((runs[task] / "metrics.json").read_text())
        if metrics["kind"] == "classification":
            assert set(predicted["label"]) <= set(metrics["labels"])
            probabilities = predicted[[f"p:{label}" for label in metrics["labels"]]].sum(1)
            assert probabilities.between(0.999, 1.001).all()
        else:
            assert predicted["fitness"].notna().all()


@pytest.fixture(scope="module")
def served(runs, tags_run, model_dir, tmp_path_factory):
    """A real ``kiban serve`` (its own process, loopback, no keys) over the tiny model with every
    head above copied into its heads/; stopped by its own pid at the end.
    """
    from kiban.serve.launch import ServerProcess

    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(model_dir, folder)
    for task, run in {**runs, "cdr": tags_run}.items():
        shutil.copytree(run / "heads" / task, folder / "heads" / task)
    log = tmp_path_factory.mktemp("server") / "server.log"
    server = ServerProcess(folder, None, log, "--rate-limit", "0", "--max-inputs", "4", "--no-access-log")
    try:
        server.wait_ready(key=None, timeout=600)  # a busy CI box loads slowly
        with server.client(None) as client:
            yield client
    finally:
        server.stop()


def _png(shared: Path) -> str:
    first = pd.read_csv(_crops(shared))["file"].iloc[0]
    raw = (_crops(shared).parent / first).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def test_saved_heads_predict_through_a_running_server(served, runs, shared_data):
    """Labels with probabilities per input, for every new type, over HTTP."""
    bodies = {
        "ec": [{"type": "protein", "protein": {"sequence": INPUTS["ec"][1]}}],
        "promoter": [{"type": "dna", "dna": {"sequence": INPUTS["promoter"][1]}}],
        "cells": [{"type": "image_url", "image_url": {"url": _png(shared_data)}}],
        "pubmedqa": [INPUTS["pubmedqa"][1]],
        "chemprot": [INPUTS["chemprot"][1], "caffeine | adenosine receptor | Caffeine antagonises it."],
    }
    for task, inputs in bodies.items():
        response = served.post(f"/v1/predict/{task}", json={"inputs": inputs})
        assert response.status_code == 200, (task, response.text)
        labels = json.loads((runs[task] / "metrics.json").read_text())["labels"]
        for row in response.json()["data"]:
            assert row["label"] in labels and set(row["probabilities"]) == set(labels)
            assert abs(sum(row["probabilities"].values()) - 1) < 1e-4
    response = served.post("/v1/predict/fitness", json={"inputs": [{"type": "protein", "protein": {"sequence": "MSIQHFRVALIPFFAAFCLPVFA"}}]})
    assert response.status_code == 200 and "fitness" in response.json()["data"][0]["values"]
    schema = served.get("/openapi.json").json()["components"]["schemas"]
    assert "image_url parts" in schema["PredictRequest"]["properties"]["inputs"]["description"]
    assert "label -> probability" in schema["Prediction"]["properties"]["probabilities"]["description"]
    text = "Aspirin-induced asthma and naloxone in two patients."
    response = served.post("/v1/predict/cdr", json={"inputs": [text]})
    assert response.status_code == 200, response.text
    for entity in response.json()["data"][0]["entities"]:
        assert text[entity["start"] : entity["end"]] == entity["text"] and entity["label"] in ("Chemical", "Disease")
    assert "EntitySpan" in schema and "token_classification" in str(schema["HeadInfo"])
    listed = {h["task"]: h for h in served.get("/v1/models").json()["data"][0]["heads"]}
    assert {listed[t]["modality"] for t in ("ec", "promoter", "cells", "pubmedqa")} == {"protein", "dna", "image", "text"}


# -- bad input: one clear line, no traceback, nothing left behind; unreadable records to rejects.jsonl


def _fails(capsys, tmp_path, *args: str, message: str) -> None:
    out = tmp_path / "run"
    assert main(["finetune", "x", *args, "--epochs", "2", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and "Traceback" not in error[0], error
    assert not out.exists()


@pytest.mark.parametrize(
    ("kind", "header", "row"),
    [
        ("protein", "id,sequence,ec_class", "p{k},MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV{k},EC {c}"),
        ("dna", "id,sequence,label", "d{k},ACGTACGTTTGACAATTAATCATCGG{k},{c}"),
        ("text", "id,text,label", "t{k},passage number {k} about topic {c},{c}"),
        ("text-tags", "id,text,entities", 't{k},aspirin number {k},"[[0, 7, ""Chemical""]]"'),
    ],
)
def test_every_type_refuses_bad_files_in_one_line(kind, header, row, tmp_path, capsys):
    """An empty file, a missing label column, a file of unreadable records: one line each, no folder."""
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(capsys, tmp_path, "--type", kind, "--data", str(empty), "--labels", "label", message="the file is empty")
    good = [row.format(k=k % 10 if kind != "text" else k, c=k % 2) for k in range(40)]
    table = tmp_path / "table.csv"
    table.write_text("\n".join([header, *good]) + "\n")
    _fails(capsys, tmp_path, "--type", kind, "--data", str(table), "--labels", "nope", message="no label column 'nope'")
    broken = tmp_path / "broken.csv"
    bad = {"protein": "b1,MKT*1234,EC 1", "dna": "b1,ACGZZZ12,1", "text": "b1,,1", "text-tags": "b1,short,[[0]]"}[kind]
    broken.write_text("\n".join([header, bad, bad.replace("b1", "b2")]) + "\n")
    label = header.split(",")[-1]
    _fails(capsys, tmp_path, "--type", kind, "--data", str(broken), "--labels", label, message="0 usable")


def test_unreadable_records_go_to_rejects_and_the_run_goes_on(tmp_path, model_dir):
    """Two bad rows among good ones: rejected with their reason, the rest trained on; read = accepted + rejected."""
    import numpy as np

    rng = np.random.default_rng(0)  # unrelated random proteins: many similarity clusters
    rows = [f"p{k},{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 40))},EC {k % 2}" for k in range(40)]
    rows += ["bad1,MKT*Q12,EC 1", "bad2,MKTAYIAKQR,"]
    table = tmp_path / "proteins.csv"
    table.write_text("\n".join(["id,sequence,ec_class", *rows]) + "\n")
    out = tmp_path / "run"
    assert main(["finetune", "x", "--type", "protein", "--data", str(table), "--labels", "ec_class", "--model", str(model_dir), "--epochs", "2", "--out", str(out)]) == 0  # fmt: skip
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rejects} == {"bad1", "bad2"}
    counts = json.loads((out / "counts.json").read_text())
    assert counts["read"] == 42 and counts["accepted"] == 40 and counts["rejected"] == 2


def test_an_image_table_with_an_unreadable_file(tmp_path, shared_data, model_dir):
    crops = pd.read_csv(_crops(shared_data)).head(30)
    crops["file"] = [str(_crops(shared_data).parent / f) for f in crops["file"]]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    crops.loc[len(crops)] = {**crops.iloc[0].to_dict(), "file": str(tmp_path / "broken.png")}
    crops.loc[0, "label"] = "RBC"  # two classes in 30 rows
    table = tmp_path / "crops.csv"
    crops.to_csv(table, index=False)
    out = tmp_path / "run"
    assert main(["finetune", "x", "--type", "image", "--data", str(table), "--labels", "label", "--model", str(model_dir), "--epochs", "2", "--out", str(out)]) == 0  # fmt: skip
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["unreadable image"]


# -- entity tagging ------------------------------------------------------------------------------


def test_entity_scores_follow_seqeval():
    """Hand-checked against seqeval's classification_report (default mode, CoNLL rules)."""
    from kiban.tasks.tagging import entities, entity_scores

    # an I- after O opens an entity; a type change inside a run closes one and opens another
    assert entities(["O", "I-Chemical", "I-Chemical", "I-Disease", "O", "B-Disease"]) == {
        ("Chemical", 1, 2),
        ("Disease", 3, 3),
        ("Disease", 5, 5),
    }
    true = [["B-Chemical", "I-Chemical", "O", "B-Disease"], ["O", "B-Disease", "I-Disease"]]
    predicted = [["B-Chemical", "I-Chemical", "O", "O"], ["O", "B-Disease", "O"]]
    scores = entity_scores(true, predicted)
    # 2 predicted, 1 right (the chemical; the cut disease span is wrong); 3 true
    assert scores["precision"] == 0.5 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(0.4) and scores["per_type"]["Chemical"]["f1"] == 1.0


def test_the_dictionary_baseline_matches_longest_first():
    from kiban.tasks.tagging import dictionary_tagger, words

    tag = dictionary_tagger(["Aspirin and acetylsalicylic acid."], [[(0, 7, "Chemical"), (12, 32, "Chemical")]])
    text = "acetylsalicylic acid, not acid alone; aspirinate is no match."
    assert tag(text, words(text))[:3] == ["B-Chemical", "I-Chemical", "O"] and "B-Chemical" not in tag(text, words(text))[3:]


@pytest.fixture(scope="module")
def tags_run(tables, model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tags") / "run"
    args = ["finetune", "cdr", "--type", "text-tags", "--data", str(tables["bc5cdr_tags"]), "--labels", "entities"]
    assert main([*args, "--model", str(model_dir), "--epochs", "5", "--max-rows", "120", "--out", str(out)]) == 0
    return out


def test_tagging_end_to_end(tags_run, tables, tmp_path):
    """BC5CDR chemicals and diseases: entity F1 for head, dictionary and the no-entity tagger; the
    saved head writes entity spans with offsets through kiban predict.
    """
    metrics = json.loads((tags_run / "metrics.json").read_text())
    counts = json.loads((tags_run / "counts.json").read_text())
    assert counts["read"] == counts["accepted"] + counts["rejected"] == ROWS
    assert metrics["entity_types"] == ["Chemical", "Disease"] and metrics["n"] == 120
    tested = {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}
    assert tested["trivial (no entity)"]["f1"] == 0.0
    assert tested["dictionary longest-match (training entities)"]["f1"] > 0.2
    assert 0 <= tested[next(n for n in tested if n.startswith("token head"))]["f1"] <= 1
    small = tmp_path / "abstracts.csv"
    pd.read_csv(tables["bc5cdr_tags"]).head(3)[["id", "text"]].to_csv(small, index=False)
    written = tmp_path / "entities.csv"
    assert main(["predict", str(tags_run / "heads" / "cdr"), "--data", str(small), "--out", str(written)]) == 0
    found = pd.read_csv(written)
    assert list(found.columns) == ["id", "start", "end", "label", "text", "score"]
    texts = pd.read_csv(small).set_index("id")["text"]
    for row in found.itertuples():
        assert texts[row.id][row.start : row.end] == row.text


def test_a_tagged_table_with_unreadable_spans(tmp_path, model_dir):
    rows = [{"id": f"t{k}", "text": f"Aspirin causes ulcers in case {k}.", "entities": json.dumps([[0, 7, "Chemical"], [15, 21, "Disease"]])} for k in range(12)]  # fmt: skip
    rows += [{"id": "bad1", "text": "short", "entities": "[[0, 99, 'x']"}, {"id": "bad2", "text": "short", "entities": "[[0, 99, \"Chemical\"]]"}]  # fmt: skip
    table = tmp_path / "tags.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    out = tmp_path / "run"
    assert main(["finetune", "x", "--type", "text-tags", "--data", str(table), "--labels", "entities", "--model", str(model_dir), "--epochs", "2", "--out", str(out)]) == 0  # fmt: skip
    rejects = {json.loads(line)["id"]: json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()}
    assert set(rejects) == {"bad1", "bad2"} and "outside the text" in rejects["bad2"]["detail"]


def test_the_cli_lists_every_registered_type():
    """``kiban finetune --type`` offers exactly the registered types, in auto-detection order."""
    from kiban.tasks.cli import TYPES
    from kiban.tasks.finetune import task_types

    assert TYPES == ("auto", *task_types())
    assert {"protein", "dna", "image", "text", "text-tags"} <= set(task_types())
