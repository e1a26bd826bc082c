"""``kiban variants`` end to end: the real TEM-1 β-lactamase DMS with a tiny random ESM-2 (the
mechanics only: its Spearman means nothing), DNA variants with a saved kiban model whose DNA
encoder has a masked-LM head, and bad input ending in one line and exit code 2.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from kiban.cli import main
from kiban.encoders import create_encoder
from kiban.tasks.metrics import spearman
from kiban.tasks.variants import masked_marginal_scores

# the tac promoter: -35 box TTGACA at 1-6, -10 box TATAAT at 23-28
PROMOTER = "TTGACAATTAATCATCGGCTCGTATAATGTGTGGAATTGTGAGCGGATAACAATT"

BROKEN_ROWS = pd.DataFrame(
    {
        "id": ["stop", "wrong", "text", "empty"],
        "mutation": ["P20*", "G21A", "twenty", ""],
        "fitness": ["0.1", "0.5", "", "1.0"],
    }
)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["variants", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_every_row_is_accounted_for(table: pd.DataFrame, out: pd.DataFrame, column: str = "mutation") -> None:
    assert len(out) == len(table)
    assert out[column].fillna("").tolist() == table[column].tolist()  # same rows, same order
    scored = out.kiban_reject_reason.isna()
    assert np.isfinite(out.kiban_score[scored]).all()
    assert out.kiban_score[~scored].isna().all()
    for mutation, reason in zip(out[column][~scored].fillna(""), out.kiban_reject_reason[~scored]):
        assert f"'{mutation}" in reason or "empty" in reason


@pytest.fixture(scope="module")
def tem1(shared_data, tmp_path_factory):
    table = pd.read_csv(shared_data / "protein" / "sequences" / "beta_lactamase_P62593_dms.csv", dtype=str)
    wild_type = table[table.mutation.str[0] == table.mutation.str[-1]].sequence.iloc[0]
    folder = tmp_path_factory.mktemp("tem1")
    (folder / "P62593.fasta").write_text(f">sp|P62593|BLAT_ECOLX TEM-1 beta-lactamase\n{wild_type}\n")
    subset = pd.concat([table.sample(40, random_state=0)[["id", "mutation", "fitness"]], BROKEN_ROWS])
    subset.to_csv(folder / "dms.csv", index=False)
    return folder, wild_type, subset


def test_tem1_dms_every_row_scored_or_rejected_with_spearman(tem1, capsys):
    folder, wild_type, subset = tem1
    out = folder / "scores.csv"
    code, stdout, stderr = run(
        capsys, "--wild-type", folder / "P62593.fasta", "--variants", folder / "dms.csv", "--effects", "fitness",
        "--out", out,
    )
    assert code == 0, stderr
    assert "read 44 = scored 40 + rejected 4" in stderr
    assert "stop codon: 1" in stderr and "wild type differs: 1" in stderr and "not written like A23V: 2" in stderr
    result = pd.read_csv(out)
    check_every_row_is_accounted_for(subset, result)
    assert result.kiban_reject_reason.notna().tolist() == [False] * 40 + [True] * 4
    # the printed Spearman is the one between the written scores and the measured effects
    rho = float(re.search(r"Spearman (-?[0-9.]+) between kiban_score and fitness over 40 variants", stdout).group(1))
    scored = result.kiban_reject_reason.isna()
    assert rho == pytest.approx(spearman(result.fitness[scored], result.kiban_score[scored]), abs=1e-4)
    # the scores are the library's, row for row (the CLI's tiny model is seeded with 0)
    torch.manual_seed(0)
    encoder = create_encoder("protein", preset="tiny")
    expected = masked_marginal_scores(encoder, wild_type, subset.mutation[:40].tolist())
    np.testing.assert_allclose(result.kiban_score[:40], expected, rtol=1e-5, atol=1e-5)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_dna_variants_with_a_saved_kiban_model(tmp_path, capsys):
    from kiban.fusion import KibanModel
    from kiban.tiny import tiny_config

    config = tiny_config(["dna"])
    config.encoders["dna"] = {"preset": "tiny", "mlm_head": True}
    torch.manual_seed(1)
    model = KibanModel.from_config(config).eval()
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "tac.fa").write_text(f">tac promoter\n{PROMOTER}\n")
    variants = pd.DataFrame(
        {
            "variant": ["T2C", "G3A", "T2C:G3A", "A24G", "T1T", "A5C", "T2C:T99A", "A6N"],
            "expression": ["0.2", "0.3", "0.1", "0.05", "1.0", "0.4", "0.3", "n.d."],
        }
    )
    variants.to_csv(tmp_path / "snvs.tsv", sep="\t", index=False)
    code, stdout, stderr = run(
        capsys, "--wild-type", tmp_path / "tac.fa", "--variants", tmp_path / "snvs.tsv", "--column", "variant",
        "--effects", "expression", "--model", tmp_path / "model", "--strand", "both",
    )
    assert code == 0, stderr
    assert "read 8 = scored 5 + rejected 3" in stderr
    assert "over 5 variants" in stdout  # the n.d. effect belongs to a rejected row
    result = pd.read_csv(tmp_path / "snvs.kiban_scores.csv")  # the default output, beside the input
    check_every_row_is_accounted_for(variants, result, column="variant")
    assert result.kiban_score[4] == 0.0  # T1T: the wild type
    assert "the wild type has C at 5, not A" in result.kiban_reject_reason[5]
    assert "position 99 is outside the 55-base wild type" in result.kiban_reject_reason[6]
    assert "mutant base 'N' is not one of A, C, G, T" in result.kiban_reject_reason[7]
    encoder = KibanModel.from_pretrained(tmp_path / "model").encoders["dna"]
    expected = masked_marginal_scores(encoder, PROMOTER, ["T2C", "G3A", "T2C:G3A", "A24G"], strand="both")
    np.testing.assert_allclose(result.kiban_score[:4], expected, rtol=1e-5, atol=1e-5)
    assert result.kiban_score[2] == pytest.approx(result.kiban_score[0] + result.kiban_score[1], abs=1e-4)


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "v.csv").write_text("mutation\nA1G\n")
    variants = tmp_path / "v.csv"
    cases = [
        (["ACGT", tmp_path / "missing.csv"], "no such file"),
        (["ACGT", variants, "--column", "mut"], "no column 'mut' (--column); columns: mutation"),
        (["MKTJ", variants], "non-amino-acid letters 'J' at positions 4"),
        (["ACGT", variants, "--model", tmp_path / "nope"], "no such file or folder"),
        (["ACGT/acgt", variants], "neither a FASTA file nor a sequence"),
        (["ACGT", variants, "--modality", "protein", "--strand", "both"], "strand='both' applies to DNA"),
    ]
    for (wild_type, table, *extra), words in cases:
        code, _, stderr = run(
            capsys, "--wild-type", wild_type, "--variants", table, *extra, "--out", tmp_path / "out.csv"
        )
        lines = stderr.strip().splitlines()
        assert code == 2 and lines[-1].startswith("kiban variants: error: ") and words in lines[-1], stderr
        assert not (tmp_path / "out.csv").exists()
    # nothing scorable: the reasons are still written, and the exit code says it failed
    code, _, stderr = run(
        capsys, "--wild-type", "TTGACA", "--variants", tmp_path / "v.csv", "--offset", "5", "--out", tmp_path / "none.csv"
    )
    assert code == 2 and "no variant could be scored" in stderr and "--offset" in stderr
    assert "position 1 is outside" in pd.read_csv(tmp_path / "none.csv").kiban_reject_reason[0]
    # an existing output is never overwritten
    (tmp_path / "kept.csv").write_text("mine\n")
    code, _, stderr = run(capsys, "--wild-type", "ACGT", "--variants", tmp_path / "v.csv", "--out", tmp_path / "kept.csv")
    assert code == 2 and "already exists" in stderr and (tmp_path / "kept.csv").read_text() == "mine\n"
