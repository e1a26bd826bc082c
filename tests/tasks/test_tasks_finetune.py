"""``kiban finetune`` end to end on a real SMILES CSV and a real h5ad, the saved head reloading,
and bad input failing with one clear message and nothing left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import pandas as pd
import pytest

from kiban.cli import main
from kiban.tasks.heads import load_head, load_heads

ESOL_LABEL = "measured log solubility in mols per litre"


@pytest.fixture(scope="module")
def esol_csv(shared_data, tmp_path_factory) -> Path:
    """500 ESOL rows (a small real regression set; fewer make the scaffold test set too odd to learn)."""
    path = tmp_path_factory.mktemp("esol") / "esol.csv"
    pd.read_csv(shared_data / "molecules" / "esol_delaney.csv").sample(500, random_state=0).to_csv(
        path, index=False
    )
    return path


@pytest.fixture(scope="module")
def pbmc_counts_h5ad(pbmc, tmp_path_factory) -> Path:
    """pbmc68k_reduced with X = its non-negative log-normalised raw.X (X itself is scaled)."""
    path = tmp_path_factory.mktemp("pbmc_raw") / "pbmc.h5ad"
    adata = anndata.AnnData(
        X=pbmc.raw.X.copy(), obs=pbmc.obs[["bulk_labels", "phase"]].copy(), var=pbmc.raw.var.copy()
    )
    adata.write_h5ad(path)
    return path


def _finetune(*args: str, epochs: int = 60) -> int:
    return main(["finetune", *args, "--epochs", str(epochs)])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def esol_run(esol_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "esol"
    assert (
        _finetune("esol", "--data", str(esol_csv), "--labels", ESOL_LABEL, "--out", str(out), epochs=200) == 0
    )
    return out


def test_finetune_smiles_csv_end_to_end(esol_run):
    assert {
        "metrics.json",
        "predictions.csv",
        "plots",
        "heads",
        "model",
        "rejects.jsonl",
        "counts.json",
    } <= set(_leftovers(esol_run))
    assert (esol_run / "plots" / "parity.png").stat().st_size > 1000
    metrics = json.loads((esol_run / "metrics.json").read_text())
    assert metrics["kind"] == "regression" and metrics["seed"] == 0
    assert metrics["split"]["method"] == "scaffold"
    test = {r["model"]: r["metrics"][ESOL_LABEL] for r in metrics["results"] if r["split"] == "test"}
    assert set(r["split"] for r in metrics["results"]) == {"valid", "test"}
    assert all(r["split_method"] == "scaffold" and r["seed"] == 0 for r in metrics["results"])
    head, trivial = test["head (probe, tiny)"], test["trivial (training mean)"]
    baseline = test["random forest on Morgan fingerprints"]
    # even a tiny random backbone's pooled states carry size / polarity: the head must beat the mean clearly
    assert head["rmse"] < 0.9 * trivial["rmse"] and head["spearman"] > 0.3
    assert baseline["rmse"] < trivial["rmse"]
    assert {"rmse", "spearman", "concordance_index", "n"} <= set(head)
    assert test["trivial (training mean)"]["spearman"] is None  # undefined for a constant: null, strict JSON


def test_saved_head_reloads_and_predicts_identically(esol_run, esol_csv, tmp_path):
    from kiban.tasks.predict import model_for_head

    folder = esol_run / "heads" / "esol"
    head = load_head(folder)
    assert set(load_heads(esol_run)) == {"esol"}  # the serve layout
    model = model_for_head(folder, head)
    smiles = pd.read_csv(esol_csv)["smiles"].str.strip().tolist()[:8]
    first = head.predict(model, smiles)
    again = load_head(folder).predict(model_for_head(folder, head), smiles)
    assert first == again
    # the run's predictions.csv (written before saving) agrees with the reloaded head
    predictions = pd.read_csv(esol_run / "predictions.csv")
    table = pd.read_csv(esol_csv)
    row = predictions.iloc[0]
    item = table.loc[table["Compound ID"] == row["id"], "smiles"].str.strip().iloc[0]
    value = head.predict(model, [item])[0]["values"][ESOL_LABEL]
    assert value == pytest.approx(row[f"predicted:{ESOL_LABEL}"], abs=1e-4)
    # and `kiban predict` writes the same numbers
    out = tmp_path / "predicted.csv"
    assert main(["predict", str(folder), "--data", str(esol_csv), "--out", str(out)]) == 0
    written = pd.read_csv(out).set_index("id")
    assert written.loc[row["id"], ESOL_LABEL] == pytest.approx(value, rel=1e-4)


def test_finetune_h5ad_end_to_end(pbmc_counts_h5ad, tmp_path):
    out = tmp_path / "celltype"
    assert (
        _finetune("celltype", "--data", str(pbmc_counts_h5ad), "--labels", "bulk_labels", "--out", str(out))
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "classification" and len(metrics["labels"]) == 10
    test = {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}
    head, trivial = test["head (probe, tiny)"], test["trivial (majority class)"]
    baseline = test["logistic regression on log-normalised expression"]
    assert head["accuracy"] > trivial["accuracy"] + 0.1
    assert baseline["accuracy"] > 0.75  # the scanpy-style baseline is strong on pbmc68k_reduced
    assert (
        len(head["per_class_f1"]) == 10 and len(head["confusion_matrix"]["rows_true_columns_predicted"]) == 10
    )
    assert (out / "plots" / "confusion.png").is_file()
    counts = json.loads((out / "counts.json").read_text())
    assert counts["notes"]["gene_match"]["matched"] == 765
    saved = load_head(out / "heads" / "celltype")
    assert saved.config.modality == "cell" and saved.config.labels == metrics["labels"]


def test_finetune_holds_out_groups_reading_raw(pbmc_h5ad, tmp_path):
    """Scanpy's own file (X scaled, raw.X log-normalised) with --use-raw; cell-cycle phase groups held out."""
    out = tmp_path / "grouped"
    assert (
        _finetune(
            "phase",
            "--data",
            str(pbmc_h5ad),
            "--use-raw",
            "--labels",
            "bulk_labels",
            "--groups",
            "phase",
            "--out",
            str(out),
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["method"] == "group" and metrics["n"] == 700
    # kiban predict reads raw.X too, as the head was trained (head.json extra.use_raw)
    predictions = tmp_path / "predicted.csv"
    assert (
        main(["predict", str(out / "heads" / "phase"), "--data", str(pbmc_h5ad), "--out", str(predictions)])
        == 0
    )
    assert len(pd.read_csv(predictions)) == 700


# -- bad input ----------------------------------------------------------------------------------


def _fails_cleanly(capsys, parent: Path, *args: str, message: str) -> None:
    before = _leftovers(parent)
    out = parent / "run"
    assert _finetune(*args, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not out.exists()
    assert _leftovers(parent) == before  # no temporary folder either


def test_missing_label_column(esol_csv, tmp_path, capsys):
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(esol_csv),
        "--labels",
        "solubility",
        message="no label column 'solubility'",
    )


def test_single_class_label(tmp_path, capsys):
    data = tmp_path / "one.csv"
    data.write_text("smiles,active\nCCO,1\nc1ccccc1,1\nCCN,1\n")
    _fails_cleanly(capsys, tmp_path, "x", "--data", str(data), "--labels", "active", message="single class")


def test_every_smiles_invalid(tmp_path, capsys):
    data = tmp_path / "bad.csv"
    data.write_text("smiles,y\nnot-a-smiles,1\nC1CC,0\nXx,1\n")
    _fails_cleanly(capsys, tmp_path, "x", "--data", str(data), "--labels", "y", message="no valid molecule")


def test_h5ad_without_gene_overlap(pbmc_counts_h5ad, tmp_path, capsys):
    from kiban.tiny import tiny_model

    model_dir = tmp_path / "synthetic_vocab_model"
    tiny_model(["cell"]).save_pretrained(model_dir)  # vocabulary GENE0..GENE499: no pbmc gene
    runs = tmp_path / "runs"
    runs.mkdir()
    _fails_cleanly(
        capsys,
        runs,
        "x",
        "--data",
        str(pbmc_counts_h5ad),
        "--labels",
        "bulk_labels",
        "--model",
        str(model_dir),
        message="no gene overlaps the model's vocabulary",
    )


def test_existing_output_is_not_overwritten(esol_csv, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _finetune("x", "--data", str(esol_csv), "--labels", ESOL_LABEL, "--out", str(out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert _leftovers(out) == ["keep.txt"]


def test_h5ad_missing_label_column(pbmc_counts_h5ad, tmp_path, capsys):
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(pbmc_counts_h5ad),
        "--labels",
        "celltype",
        message="adata.obs has no label column 'celltype'; columns: bulk_labels, phase",
    )


def test_a_moved_run_folder_still_finds_its_model(tmp_path):
    """head.json names the model relative to the head folder: moving the project keeps it working."""
    import shutil

    from kiban.tasks.predict import model_for_head
    from kiban.tiny import tiny_model

    project = tmp_path / "project"
    tiny_model(["molecule"]).save_pretrained(project / "model")
    smiles = ["CCO", "CCCO", "CCCCO", "c1ccccc1", "c1ccccc1O", "CC(=O)O", "CCN", "CCCN", "CCOC", "CCCl"] * 3
    table = pd.DataFrame({"smiles": smiles, "y": [float(len(s)) for s in smiles]})
    table.to_csv(project / "data.csv", index=False)
    args = ["y", "--data", str(project / "data.csv"), "--labels", "y", "--model", str(project / "model")]
    assert _finetune(*args, "--out", str(project / "run"), epochs=2) == 0
    config = json.loads((project / "run" / "heads" / "y" / "head.json").read_text())
    assert config["extra"]["model"] == "../../../model"
    moved = tmp_path / "moved"
    shutil.move(project, moved)
    folder = moved / "run" / "heads" / "y"
    head = load_head(folder)
    assert model_for_head(folder, head).encoders.keys() == {"molecule"}
    # a head saved before the fix names its model by an absolute path: still read
    config["extra"]["model"] = str((moved / "model").resolve())
    (folder / "head.json").write_text(json.dumps(config))
    assert model_for_head(folder, load_head(folder)).encoders.keys() == {"molecule"}
