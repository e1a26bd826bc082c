"""``kiban finetune`` for per-residue secondary structure, drug–target pairs and contacts, each
saving a head that ``kiban predict`` reloads and reproduces; label columns whose names hold
commas (SIDER); and bad input failing with one clear line and nothing left behind. Real data
comes from the shared folder (skipped when absent); the contact run uses synthetic PDB files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kiban.cli import main
from kiban.tasks.heads import load_head, load_heads

ARTEFACTS = {"metrics.json", "plots", "heads", "model", "rejects.jsonl", "counts.json"}
SIDER_TASKS = [
    "Hepatobiliary disorders",
    "Congenital, familial and genetic disorders",
    "Neoplasms benign, malignant and unspecified (incl cysts and polyps)",
]


def _finetune(*args: str) -> int:
    return main(["finetune", *args])


def _test_results(metrics: dict) -> dict[str, dict]:
    return {r["model"]: r["metrics"] for r in metrics["results"] if r["split"] == "test"}


def _fasta(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{name}\n{sequence}\n" for name, sequence in rows))
    return path


# -- secondary structure -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ss_run(shared_data, tmp_path_factory) -> Path:
    """80 real DSSP-labelled chains of at most 200 residues, drawn by the command's own caps."""
    out = tmp_path_factory.mktemp("runs") / "ss"
    data = shared_data / "protein" / "sequences" / "secondary_structure_pdb_2000.csv"
    code = _finetune(
        "ss",
        "--data",
        str(data),
        "--max-rows",
        "80",
        "--max-length",
        "200",
        "--epochs",
        "6",
        "--out",
        str(out),
    )
    assert code == 0
    return out


def test_secondary_structure_finetune_end_to_end(ss_run):
    assert ARTEFACTS | {"predictions.csv"} <= {p.name for p in ss_run.iterdir()}
    assert (ss_run / "plots" / "confusion.png").stat().st_size > 1000
    metrics = json.loads((ss_run / "metrics.json").read_text())
    assert metrics["type"] == "secondary" and metrics["kind"] == "residue_classification"
    assert metrics["labels"] == ["C", "E", "H"] and metrics["label_column"] == "ss3" and metrics["n"] == 80
    assert {r["split"] for r in metrics["results"]} == {"valid", "test"}
    assert all(r["split_method"] == "length-stratified" and r["seed"] == 0 for r in metrics["results"])
    test = _test_results(metrics)
    head = test["residue head (conv window 7) on protein tokens"]
    trivial = test["trivial (majority state)"]
    assert "amino-acid propensity (most frequent state per residue type)" in test
    assert head["residues"] == trivial["residues"] > 1000
    assert head["accuracy"] > trivial["accuracy"] + 0.05  # held-out proteins, real DSSP labels
    counts = json.loads((ss_run / "counts.json").read_text())
    assert counts["read"] == 2000 and counts["by_reason"]["too long"] > 0  # --max-length, reported
    config = json.loads((ss_run / "heads" / "ss" / "head.json").read_text())
    assert (config["kind"], config["architecture"], config["modality"]) == (
        "residue_classification",
        "residue",
        "protein",
    )


def test_secondary_head_reloads_and_kiban_predict_reproduces_the_run(ss_run, tmp_path):
    from kiban.tasks.predict import model_for_head

    folder = ss_run / "heads" / "ss"
    run = pd.read_csv(ss_run / "predictions.csv")
    head = load_head(folder)
    model = model_for_head(folder, head)
    sequences = run["sequence"].tolist()[:3]
    assert head.predict(model, sequences) == load_head(folder).predict(
        model_for_head(folder, head), sequences
    )
    # kiban predict on a FASTA of the test proteins: per-residue rows, the run's predicted states
    written = tmp_path / "states.csv"
    fasta = _fasta(tmp_path / "test.fa", [(f"p{k}", s) for k, s in enumerate(run["sequence"])])
    assert main(["predict", str(folder), "--data", str(fasta), "--out", str(written)]) == 0
    states = pd.read_csv(written)
    assert list(states.columns) == ["id", "position", "residue", "label", "p:C", "p:E", "p:H"]
    for k, row in run.iterrows():
        mine = states[states["id"] == f"p{k}"]
        assert "".join(mine["residue"]) == row["sequence"]
        assert "".join(mine["label"]) == row["predicted"]


# -- drug–target pairs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def davis(shared_data, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A real Davis subset, 16 drugs x 30 kinases under 500 residues, named by id (DeepDTA's layout)."""
    folder = shared_data / "dti"
    pairs = pd.read_csv(folder / "davis_pairs.csv")
    targets = pd.read_csv(folder / "davis_targets.csv").set_index("target_id")["sequence"]
    rng = np.random.default_rng(0)
    drugs = rng.choice(pairs.drug_id.unique(), 16, replace=False)
    short = targets[targets.str.len() < 500].index
    kinases = rng.choice(pairs.target_id[pairs.target_id.isin(short)].unique(), 30, replace=False)
    path = tmp_path_factory.mktemp("davis") / "pairs.csv"
    pairs[pairs.drug_id.isin(drugs) & pairs.target_id.isin(kinases)].to_csv(path, index=False)
    return path, folder / "davis_drugs.csv", folder / "davis_targets.csv"


@pytest.fixture(scope="module")
def davis_run(davis, tmp_path_factory) -> Path:
    pairs, drugs, targets = davis
    out = tmp_path_factory.mktemp("runs") / "davis"
    args = ["--drugs", str(drugs), "--targets", str(targets), "--labels", "pKd", "--epochs", "60"]
    assert _finetune("davis", "--data", str(pairs), *args, "--out", str(out)) == 0
    return out


def test_pair_finetune_on_davis_end_to_end(davis_run):
    assert ARTEFACTS | {"predictions.csv"} <= {p.name for p in davis_run.iterdir()}
    assert (davis_run / "plots" / "parity.png").stat().st_size > 1000
    metrics = json.loads((davis_run / "metrics.json").read_text())
    assert metrics["type"] == "dti" and metrics["kind"] == "regression" and metrics["n"] == 480
    assert (metrics["drugs"], metrics["targets"]) == (16, 30)
    assert all(r["split_method"] == "random" and r["seed"] == 0 for r in metrics["results"])
    test = {name: m["pKd"] for name, m in _test_results(metrics).items()}
    head, mean = test["pair head (probe, tiny)"], test["trivial (training mean)"]
    forest = test["random forest on drug Morgan FP + target one-hot + composition"]
    assert mean["concordance_index"] == 0.5 and mean["spearman"] is None
    # held-out pairs: the head ranks affinities well above chance (the mean cannot rank at all)
    assert head["concordance_index"] > 0.6 and head["spearman"] > 0.15
    assert forest["concordance_index"] > 0.6
    for m in (head, forest, mean):
        assert m["mse"] == pytest.approx(m["rmse"] ** 2) and m["n"] == metrics["split"]["sizes"]["test"]
    config = load_heads(davis_run)["davis"].config
    assert (config.architecture, config.modality, config.input_dim) == ("pair", "protein+molecule", 64)


def test_pair_head_reloads_and_kiban_predict_reproduces_the_run(davis_run, davis, tmp_path):
    pairs, drugs, targets = davis
    written = tmp_path / "affinity.csv"
    args = ["--drugs", str(drugs), "--targets", str(targets), "--out", str(written)]
    assert main(["predict", str(davis_run / "heads" / "davis"), "--data", str(pairs), *args]) == 0
    predicted = pd.read_csv(written).set_index("id")
    assert list(predicted.columns) == ["drug_id", "target_id", "pKd"] and len(predicted) == 480
    run = pd.read_csv(davis_run / "predictions.csv")
    for _, row in run.iterrows():
        assert predicted.loc[row["id"], "pKd"] == pytest.approx(row["predicted:pKd"], abs=1e-4)


# -- contacts ------------------------------------------------------------------------------------


def _write_pdb(path: Path, rng: np.random.Generator, length: int) -> None:
    """One chain of alternating residue types (CA and CB) along a compact random walk."""
    names = ["ALA", "LEU", "GLY", "SER", "LYS", "PHE"]
    steps = rng.normal(size=(length, 3))
    xyz = np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=1, keepdims=True), 0) * 0.6
    lines, serial = [], 1
    for k, (x, y, z) in enumerate(xyz, start=1):
        for atom, shift in (("CA", 0.0), ("CB", 1.0)):
            lines.append(
                f"ATOM  {serial:5d}  {atom:<3s} {names[k % len(names)]} A{k:4d}    "
                f"{x + shift:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
            )
            serial += 1
    path.write_text("\n".join([*lines, "END"]) + "\n")


def test_contacts_run_saves_the_head_it_scored(tmp_path):
    """Always runs: the saved contact head, reloaded with the run's model, reproduces the run's own
    test-set precision; ``kiban predict`` lists its top-k pairs per protein.
    """
    from kiban.tasks.predict import model_for_head
    from kiban.tasks.structure import contact_labels, contact_metrics, protein_tokens

    rng = np.random.default_rng(0)
    folder = tmp_path / "pdbs"
    folder.mkdir()
    for k in range(8):
        _write_pdb(folder / f"s{k}.pdb", rng, 30 + 5 * k)
    out = tmp_path / "run"
    assert _finetune("contacts", "--data", str(folder), "--epochs", "4", "--out", str(out)) == 0
    assert ARTEFACTS <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "contact" and metrics["type"] == "contacts"
    assert all(r["split_method"] == "length-stratified" and r["seed"] == 0 for r in metrics["results"])
    scored = next(r for r in metrics["results"] if r["model"] == "pairwise MLP on encoder tokens")["metrics"]
    head = load_head(out / "heads" / "contacts")
    assert (head.config.kind, head.config.architecture) == ("contact", "contact")
    model = model_for_head(out / "heads" / "contacts", head)
    rows = []
    for name in metrics["test_structures"]:
        labels = contact_labels(folder / name)
        with torch.no_grad():
            scores = head(protein_tokens(model.encoders["protein"], labels.sequence)).sigmoid().numpy()
        rows.append(contact_metrics(scores, labels.contacts, labels.valid))
    for key, value in scored.items():
        assert float(np.nanmean([r[key] for r in rows])) == pytest.approx(value, abs=1e-6), key
    written = tmp_path / "contacts.csv"
    fasta = _fasta(tmp_path / "q.fa", [("a", "MKTAYIAKQRQISFVKSHFSRQ"), ("b", "GSHMSLFDFFKNKGSAATAT")])
    assert (
        main(
            [
                "predict",
                str(out / "heads" / "contacts"),
                "--data",
                str(fasta),
                "--top-k",
                "4",
                "--out",
                str(written),
            ]
        )
        == 0
    )
    table = pd.read_csv(written)
    assert list(table.columns) == ["id", "i", "j", "separation", "probability"]
    assert table.groupby("id").size().to_dict() == {"a": 4, "b": 4}
    assert (table["separation"] >= 6).all() and table["probability"].between(0, 1).all()


# -- label columns with commas (SIDER) -----------------------------------------------------------


def test_sider_columns_with_commas(shared_data, tmp_path):
    data = shared_data / "molecules" / "sider.csv"
    out = tmp_path / "sider"
    labels = [arg for name in SIDER_TASKS for arg in ("--labels", name)]
    code = _finetune(
        "sider", "--data", str(data), *labels, "--max-rows", "500", "--epochs", "60", "--out", str(out)
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == "multilabel" and metrics["labels"] == SIDER_TASKS and metrics["n"] == 500
    test = _test_results(metrics)
    head = test["head (probe, tiny)"]
    assert list(head["per_task"]) == SIDER_TASKS and head["tasks_scored"] == 3
    assert test["trivial (training positive rate)"]["mean_roc_auc"] == pytest.approx(0.5)
    assert head["mean_roc_auc"] > 0.5
    saved = load_heads(out)["sider"].config
    assert (saved.kind, saved.architecture, saved.labels) == ("multilabel", "multilabel", SIDER_TASKS)


def test_labels_file_names_columns_with_commas(tmp_path):
    """Always runs: a labels file gives one exact column name per line, commas and all."""
    smiles = ["C" * n for n in range(1, 16)] + ["c1ccccc1" + "C" * n for n in range(15)]
    smiles += ["OC" + "C" * n for n in range(15)] + ["NC(=O)" + "C" * n for n in range(15)]
    names = ["Aromatic, ring-bearing", "Polar, H-bond donor"]
    frame = pd.DataFrame(
        {
            "smiles": smiles,
            names[0]: [int("c1" in s) for s in smiles],
            names[1]: [int(s[0] in "ON") for s in smiles],
        }
    )
    data = tmp_path / "toy.csv"
    frame.to_csv(data, index=False)
    listed = tmp_path / "labels.txt"
    listed.write_text("\n".join(names) + "\n\n")
    out = tmp_path / "run"
    assert (
        _finetune(
            "toy", "--data", str(data), "--labels-file", str(listed), "--epochs", "5", "--out", str(out)
        )
        == 0
    )
    assert json.loads((out / "metrics.json").read_text())["labels"] == names
    written = tmp_path / "p.csv"
    assert main(["predict", str(out / "heads" / "toy"), "--data", str(data), "--out", str(written)]) == 0
    assert list(pd.read_csv(written, nrows=1).columns) == ["id", *(f"p:{name}" for name in names)]


# -- bad input -----------------------------------------------------------------------------------


def _fails_cleanly(capsys, parent: Path, *args: str, message: str) -> None:
    before = sorted(p.name for p in parent.iterdir())
    out = parent / "run"
    assert _finetune(*args, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error
    assert not out.exists()
    assert sorted(p.name for p in parent.iterdir()) == before  # no temporary folder either


def test_secondary_table_without_a_state_column(tmp_path, capsys):
    data = tmp_path / "ss.csv"
    data.write_text("sequence,dssp\nMKTAYIAKQR,CCHHHHHHCC\n")
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(data),
        "--type",
        "secondary",
        message="no per-residue state column (ss3 / ss8)",
    )
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(data),
        "--type",
        "secondary",
        "--labels",
        "ss3",
        message="no label column 'ss3'; columns: sequence, dssp",
    )


def test_secondary_labels_that_do_not_fit_their_sequences(tmp_path, capsys):
    data = tmp_path / "ss.csv"
    data.write_text("sequence,ss3\n" + "".join(f"MKTAYIAKQR{'A' * k},CCHH\n" for k in range(8)))
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(data),
        message="0 usable protein(s), need at least 5 (8 rejected: label length differs: 8)",
    )


def test_pairs_without_a_drug_side_or_label(davis, tmp_path, capsys):
    pairs, drugs, targets = davis
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(pairs),
        "--type",
        "dti",
        "--targets",
        str(targets),
        "--labels",
        "pKd",
        message="no drug column: give a 'smiles' / 'SMILES' / 'drug_smiles' / 'compound_smiles' column, or a 'drug_id' column and --drugs FILE",
    )
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(pairs),
        "--drugs",
        str(drugs),
        "--targets",
        str(targets),
        "--labels",
        "Kd",
        message="no label column 'Kd'; columns: drug_id, target_id, kd_nM, pKd, deepdta_split",
    )


def test_options_that_do_not_apply(tmp_path, capsys):
    data = tmp_path / "ss.csv"
    data.write_text("sequence,ss3\nMKTAYIAKQR,CCHHHHHHCC\n")
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(data),
        "--mode",
        "lora",
        message="not to secondary data",
    )
    _fails_cleanly(
        capsys, tmp_path, "x", "--data", str(data), "--max-rows", "0", message="--max-rows must be at least 1"
    )


def test_unknown_comma_named_label_is_named_whole(tmp_path, capsys):
    data = tmp_path / "mols.csv"
    data.write_text('smiles,"Congenital, familial and genetic disorders"\nCCO,1\nCCN,0\n')
    _fails_cleanly(
        capsys,
        tmp_path,
        "x",
        "--data",
        str(data),
        "--labels",
        "Congenital, familial and genetic disorder",
        message="no label column 'Congenital, familial and genetic disorder'; columns: smiles, Congenital, familial",
    )
