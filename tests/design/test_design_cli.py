"""``kiban design molecules | proteins | records`` end to end, in process, on real files."""

from __future__ import annotations

import csv

import pytest
import torch
from rdkit import Chem

from kiban.cli import main
from kiban.tiny import tiny_model

TEMPLATE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
SMILES = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "O=C(O)CCc1ccccc1", "not a smiles", "CCO"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("design-model") / "model"
    model = tiny_model(["protein", "molecule"], seed=0)
    with torch.no_grad():
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "train.smi"
    path.write_text("\n".join(SMILES[:5]) + "\n")
    return path


def test_molecules_writes_every_sample_with_its_flags(model_dir, reference, tmp_path, capsys):
    out = tmp_path / "designs.csv"
    code = main(["design", "molecules", "--model", str(model_dir), "--n", "3", "--budget", "6", "--batch-size", "6",
                 "--condition", "MW < 500", "--reference", str(reference), "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and all(Chem.MolFromSmiles(r["smiles"]) is not None for r in rows)
    assert {r["in_training_set"] for r in rows} <= {"0", "1"}
    err = capsys.readouterr().err
    assert "sampled 6 (budget 6) = valid 6 + invalid 0" in err and "met MW at most 500" in err
    assert main(["design", "molecules", "--model", str(model_dir), "--n", "1", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--condition", "logP 50"], "'logP 50' is outside what the training set reaches"),
        (["--condition", "logP ~3"], "'logP ~3' is not written like"),
        (["--target", "MKT1AY"], "--target 'MKT1AY' is neither a FASTA file nor a sequence of letters"),
        (["--target", "MKTJAY"], "protein"),
        (["--guidance", "-1"], "--guidance must be a finite number at least 0, got -1.0"),
    ],
)
def test_molecules_bad_input_is_one_line(model_dir, reference, tmp_path, capsys, extra, message):
    code = main(["design", "molecules", "--model", str(model_dir), "--reference", str(reference),
                 "--out", str(tmp_path / "x.csv"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err and err.startswith("kiban design")
    assert not (tmp_path / "x.csv").exists()


def test_proteins_writes_fasta_and_keeps_fixed_positions(tmp_path, capsys):
    out = tmp_path / "designs.fasta"
    code = main(["design", "proteins", "--model", "tiny", "--template", TEMPLATE, "--fixed", "1-10,20",
                 "--n", "2", "--steps", "10", "--temperature", "2", "--out", str(out)])
    assert code == 0
    text = out.read_text().splitlines()
    headers = [k for k, line in enumerate(text) if line.startswith(">")]
    assert len(headers) == 2 and "pll=" in text[0]
    for k in headers:
        sequence = text[k + 1]
        assert sequence[:10] == TEMPLATE[:10] and sequence[19] == TEMPLATE[19]
    assert "random mutants with as many changes" in capsys.readouterr().err
    assert main(["design", "proteins", "--model", "tiny", "--template", TEMPLATE, "--fixed", "1-99",
                 "--out", str(tmp_path / "y.fasta")]) == 2
    assert "--fixed '1-99' is outside the 33-residue template" in capsys.readouterr().err


def test_records_split_by_molecule_and_counts_add_up(tmp_path, capsys):
    source = tmp_path / "mols.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "label"])
        writer.writerows([s, 0] for s in SMILES + ["CCCCCCCCN", "Oc1ccc(Cl)cc1", "CC(C)Cc1ccc(cc1)C(C)C(=O)O"])
    out = tmp_path / "records"
    code = main(["design", "records", "--molecules", str(source), "--out", str(out), "--test-fraction", "0.25",
                 "--val-fraction", "0.25"])
    assert code == 0
    err = capsys.readouterr().err
    assert "molecules read 10 = used 8 + rejected 2" in err and "duplicate: 1" in err
    import json

    train = [json.loads(line) for line in (out / "train.jsonl").open()]
    answers = {r["messages"][1]["content"] for r in train}
    from kiban.design.selfies_decoding import encode_selfies

    test_molecules = (out / "test.smi").read_text().split()
    assert len(test_molecules) == 2 and len((out / "train.smi").read_text().split()) == 4
    assert not {encode_selfies(s) for s in test_molecules} & answers  # no test molecule is a training answer
    assert all(r["messages"][0]["content"].startswith("Design a drug-like molecule") for r in train)
    assert len(train) == 4 * 2  # per training molecule: one record without conditions, one with

    more = tmp_path / "records3"
    assert main(["design", "records", "--molecules", str(source), "--out", str(more), "--test-fraction", "0.25",
                 "--val-fraction", "0.25", "--conditioned", "3"]) == 0
    train3 = [json.loads(line) for line in (more / "train.jsonl").open()]
    assert len(train3) == 4 * 4 and len({r["id"] for r in train3}) == 16
    assert (more / "train.smi").read_text() == (out / "train.smi").read_text()  # the same split
    asked = [r for r in train3 if " with " in r["messages"][0]["content"]]
    assert len(asked) == 12 and len({r["messages"][0]["content"] for r in asked}) > 4  # draws differ
    # every conditioned record gives its conditions as a <properties> input too, in the prompt's words;
    # an unconditioned one has none
    from kiban.design.conditions import compute_properties, meets, parse_conditions
    from kiban.design.selfies_decoding import decode_selfies

    for record in train3:
        prompt = record["messages"][0]["content"]
        if record in asked:
            written = prompt.split(" with ", 1)[1].split(" <properties>. ", 1)[0]
            assert record["inputs"] == {"properties": [written]} and prompt.endswith(" <properties>. Answer in SELFIES.")
            smiles = decode_selfies(record["messages"][1]["content"])
            assert meets(compute_properties(Chem.MolFromSmiles(smiles)), parse_conditions(written))
        else:
            assert "inputs" not in record and "<properties>" not in prompt

    text_only = tmp_path / "records-text"
    assert main(["design", "records", "--molecules", str(source), "--out", str(text_only), "--test-fraction", "0.25",
                 "--val-fraction", "0.25", "--no-properties-input"]) == 0
    plain = [json.loads(line) for line in (text_only / "train.jsonl").open()]
    assert len(plain) == 8 and not any("inputs" in r or "<properties>" in r["messages"][0]["content"] for r in plain)

    for bad in ("0", "7"):
        assert main(["design", "records", "--molecules", str(source), "--out", str(tmp_path / f"bad{bad}"),
                     "--properties-per-record", bad]) == 2
        assert f"--properties-per-record must be 1-6, got {bad}" in capsys.readouterr().err
        assert not (tmp_path / f"bad{bad}").exists()


def _population(molecules):
    from kiban.design.conditions import compute_properties
    from kiban.design.records import CONDITIONED

    values = [compute_properties(mol) for mol in molecules]
    return {name: sorted(v[name] for v in values) for name in CONDITIONED}


@pytest.mark.parametrize("most", [3, 6])
def test_drawn_conditions_hold_and_none_is_vacuous(most):
    # "TPSA at least -5" or "QED at most 1" says nothing a molecule could fail: the records must
    # teach only bounds that separate molecules, and each record's conditions hold for its answer.
    # A record asks about 1 to ``most`` properties (--properties-per-record), each at most once.
    import math
    import random

    from kiban.design.conditions import PROPERTIES, compute_properties, meets
    from kiban.design.records import random_conditions

    rng = random.Random(0)
    molecules = [Chem.MolFromSmiles(s) for s in SMILES[:5] + ["C", "O=C=O", "CCCCCCCCCCCCCCCC"]]
    population = _population(molecules)
    drawn = 0
    kinds, sizes = set(), set()
    for mol in molecules * 60:
        values = compute_properties(mol)
        conditions = random_conditions(values, rng, population, most)
        assert 1 <= len(conditions) <= most and meets(values, conditions)
        assert len({c.name for c in conditions}) == len(conditions)
        sizes.add(len(conditions))
        for condition in conditions:
            prop = PROPERTIES[condition.name.lower()]
            assert prop.floor is None or (math.isinf(condition.low) or condition.low > prop.floor), condition.text()
            assert prop.ceiling is None or (math.isinf(condition.high) or condition.high < prop.ceiling), condition.text()
            kinds.add((math.isinf(condition.low), math.isinf(condition.high)))
            drawn += 1
    assert drawn > 0.85 * 480 * (most + 1) / 2  # 1 to most properties drawn, a few left with both ends open
    assert kinds == {(True, False), (False, True), (False, False)}  # at most, at least, ranges
    assert sizes == set(range(1, most + 1))


def test_drawn_conditions_depend_on_the_molecule_only_through_the_cell_it_lies_in():
    # A record's molecule must be a draw from those meeting its conditions: "MW at most 450" after
    # molecules anywhere below 450, not near it. Bounds fall on the properties' steps, so two
    # molecules within the same step of every property get the same conditions from the same draw.
    import math
    import random

    from kiban.design.conditions import PROPERTIES, compute_properties
    from kiban.design.records import random_conditions

    population = _population([Chem.MolFromSmiles(s) for s in SMILES[:5] + ["C", "O=C=O", "CCCCCCCCCCCCCCCC"]])
    base = compute_properties(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
    near = dict(base, MW=base["MW"] + 1.5, logP=base["logP"] + 0.1, QED=base["QED"] + 0.01, TPSA=base["TPSA"] + 1)
    for name in ("MW", "logP", "QED", "TPSA"):  # the counts (HBD, HBA) are equal
        step = PROPERTIES[name.lower()].step
        assert math.floor(base[name] / step) == math.floor(near[name] / step) and base[name] % step, name
    draws = [random_conditions(base, random.Random(seed), population) for seed in range(300)]
    assert draws == [random_conditions(near, random.Random(seed), population) for seed in range(300)]
    assert len({tuple(d) for d in draws}) > 100  # and the draws themselves vary
