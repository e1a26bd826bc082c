import json

from kiban.cli import main


def test_check_prints_a_table_and_exits_nonzero_on_rejects(tmp_path, capsys, nci):
    (tmp_path / "a.fa").write_text(">ok\nMKTAYIAKQR\n>bad\nMK1\n")
    assert main(["data", "check", str(tmp_path / "a.fa"), str(nci / "first_200.props.sdf")]) == 1
    out = capsys.readouterr().out
    assert "a.fa (fasta)" in out and "invalid residues" in out and f"{tmp_path / 'a.fa'}:line 3 [bad]" in out
    assert "first_200.props.sdf (sdf)" in out
    assert main(["data", "check", str(tmp_path / "a.fa"), "--allow-rejects"]) == 0


def test_check_json_and_rejects_dir(tmp_path, capsys):
    path = tmp_path / "m.smi"
    path.write_text("CCO ethanol\nC1CC( broken\n")
    assert main(["data", "check", str(path), "--json", "--rejects-dir", str(tmp_path / "out")]) == 1
    report = json.loads(capsys.readouterr().out)
    (file,) = report["files"]
    assert report["ok"] is False and (file["read"], file["accepted"], file["rejected"]) == (2, 1, 1)
    assert file["first_rejects"][0]["location"] == f"{path}:line 2"
    assert json.loads((tmp_path / "out" / "rejects.jsonl").read_text())["id"] == "broken"
    assert json.loads((tmp_path / "out" / "counts.json").read_text())["rejected"] == 1


def test_clean_input_exits_zero_and_kind_can_be_forced(tmp_path, capsys):
    path = tmp_path / "seqs.data"
    path.write_text(">a\nACGT\n")
    assert main(["data", "check", str(path), "--kind", "fasta", "--modality", "dna"]) == 0
    assert "rejected" in capsys.readouterr().out


def test_bad_usage_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "a.fa").write_text(">a\nMKT\n")
    assert main(["data", "check", str(tmp_path / "missing.fa")]) == 2
    assert main(["data", "check", str(tmp_path / "a.fa"), "--smiles-column", "x"]) == 2
    assert main(["data", "check", str(tmp_path / "a.fa"), "--kind", "nope"]) == 2
    assert main(["data", "check", str(tmp_path / "a.unknown")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("kiban data: error:") for line in errors)
    assert "--smiles-column" in errors[1] and "fasta" in errors[1]


def test_h5ad_options_reach_the_reader(pbmc_h5ad, tmp_path, capsys):
    vocab = tmp_path / "genes.txt"
    vocab.write_text("CD3E\nMS4A1\nNOT_A_GENE\n")
    assert (
        main(["data", "check", str(pbmc_h5ad), "--use-raw", "--vocab", str(vocab), "--log1p", "--json"]) == 1
    )
    (file,) = json.loads(capsys.readouterr().out)["files"]
    assert file["notes"]["gene_match"]["matched"] == 2 and file["notes"]["preprocessing"] == ["log1p"]
    assert set(file["by_reason"]) == {"no expressed genes"}
