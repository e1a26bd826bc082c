"""``stage: pretrain`` and ``kiban pretrain``: the encoder it writes, exact resume after a kill, rejects, refusals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kiban.cli import main
from kiban.encoders.base import create_encoder
from kiban.encoders.pretraining import load_encoder
from kiban.train.config import ConfigError, config_from_dict
from kiban.train.validation import validate_config

RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
TINY = ["--preset", "tiny", "--set", "data.batch_size=4", "--set", "optim.lr=0.003"]


def _fasta(path, n=24, *, seed=0, extra=""):
    """``n`` random proteins of 20-60 residues (seeded) plus ``extra`` FASTA text."""
    rng = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(n):
        length = int(torch.randint(20, 61, (), generator=rng))
        letters = "".join(RESIDUES[j] for j in torch.randint(20, (length,), generator=rng))
        lines += [f">p{i} random protein {i}", letters]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def _log(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _kiban(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "kiban.cli", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_kiban_pretrain_resumes_exactly_as_an_uninterrupted_run(tmp_path, capsys):
    data = _fasta(tmp_path / "train.fa", n=30)
    common = [
        "pretrain",
        "protein",
        "--data",
        str(data),
        "--steps",
        "12",
        "--seed",
        "3",
        *TINY,
        "--set",
        "callbacks.checkpoint.every_n_steps=4",
        "--set",
        "trainer.log_every_n_steps=1",
    ]
    straight = _kiban(*common, "--out", str(tmp_path / "straight"))
    assert straight.wait(timeout=300) == 0, straight.stdout.read()

    broken = tmp_path / "broken"
    # the save of step 8 pauses after writing its files, before its manifest: kill it there
    run = _kiban(*common, "--out", str(broken), env={"KIBAN_TEST_PAUSE_IN_SAVE": "8:120"})
    deadline = time.time() + 300
    while not (broken / "checkpoints" / "ckpt-000008.tmp" / "meta.json").exists():
        assert run.poll() is None, run.stdout.read()
        assert time.time() < deadline, "the run never reached step 8"
        time.sleep(0.2)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert not (broken / "encoder").exists()
    lost = [e for e in _log(broken) if e["step"] > 4]
    assert [e["step"] for e in lost] == [5, 6, 7, 8]  # logged, then lost with the torn save
    resumed = _kiban(*common, "--out", str(broken))
    output = resumed.stdout.read()
    assert resumed.wait(timeout=300) == 0, output
    assert "resumed from" in output and "ckpt-000004" in output

    a, b = _log(tmp_path / "straight"), _log(broken)
    again = b[8:12]  # a resumed run appends: steps 5-8 trained again, with the same numbers
    assert [e["step"] for e in again] == [5, 6, 7, 8]
    assert [(e["loss"], e["ids"]) for e in again] == [(e["loss"], e["ids"]) for e in lost]
    b = b[:4] + b[8:]
    assert [e["step"] for e in a] == [e["step"] for e in b] == list(range(1, 13))
    for x, y in zip(a, b, strict=True):
        for key in ("ids", "loss", "lr", "grad_norm", "masked_accuracy", "perplexity", "n_masked"):
            assert x[key] == y[key], f"step {x['step']}: {key} {x[key]} != {y[key]}"
    wa = load_file(str(tmp_path / "straight" / "encoder" / "model.safetensors"))
    wb = load_file(str(broken / "encoder" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    assert main([*common, "--out", str(broken)]) == 0
    assert "is finished (step 12 of 12)" in capsys.readouterr().err


def test_pretrain_stage_runs_from_a_yaml_through_kiban_fit(tmp_path):
    train, val = _fasta(tmp_path / "train.fa", n=24), _fasta(tmp_path / "val.fa", n=8, seed=1)
    config = {
        "seed": 0,
        "stage": "pretrain",
        "run": {"dir": str(tmp_path / "run")},
        "pretrain": {
            "modality": "protein",
            "encoder": {"preset": "tiny", "max_length": 64, "truncate": False},
            "objective": "mlm",
            "options": {"rate": 0.2},
            "train": [str(train)],
            "val": [str(val)],
            "crop": 32,
        },
        "data": {"batch_size": 4},
        "optim": {"lr": 0.003},
        "trainer": {"max_steps": 6, "log_every_n_steps": 1},
        "callbacks": {"checkpoint": {"every_n_steps": 3}},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    run = tmp_path / "run"
    log = _log(run)
    assert [e["step"] for e in log] == list(range(1, 7))
    assert all(e["n_masked"] > 0 and 0 <= e["masked_accuracy"] <= 1 and e["lr"] > 0 for e in log)
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*")) == ["ckpt-000003", "ckpt-000006"]
    meta = json.loads((run / "encoder" / "config.json").read_text())
    assert meta["modality"] == "protein" and meta["objective"] == "mlm" and meta["step"] == 6
    # the encoder's own weights_path reads the directory, as load_encoder does
    by_path = create_encoder("protein", weights_path=str(run / "encoder")).eval()
    assert by_path.config.num_layers == 2 and by_path.config.embed_dim == 16  # architecture from the file
    loaded = load_encoder(run / "encoder").eval()
    fresh = create_encoder("protein", preset="tiny").eval()
    with torch.no_grad():
        a, b, c = (e.encode(["MKTAYIAKQRQISFVKSHFSRQ"]).embeddings for e in (by_path, loaded, fresh))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-3)
    assert main(["validate", "--config", str(path)]) == 0


def test_bad_records_go_to_the_rejects_file_with_their_reason_and_the_counts_add_up(tmp_path):
    bad = ">bad_letters\nMKT1AYJ\n>too_long\n" + "M" * 80 + "\n>p0\nMKV\n"  # p0 again: a duplicate id
    data = _fasta(tmp_path / "train.fa", n=12, extra=bad)
    out = tmp_path / "out"
    code = main(
        [
            "pretrain",
            "protein",
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "2",
            *TINY,
            "--set",
            "pretrain.encoder.max_length=64",
        ]
    )
    assert code == 0
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"bad_letters", "too_long", "p0"}
    assert (
        rejects["bad_letters"]["reason"] == "invalid residues"
        or "letters" in rejects["bad_letters"]["detail"]
    )
    assert rejects["too_long"]["reason"] == "invalid protein input"
    assert "over max_length 64" in rejects["too_long"]["detail"]
    assert rejects["p0"]["reason"] == "duplicate id"
    counts = json.loads((out / "counts.json").read_text())
    assert counts["read"] == 15 and counts["accepted"] == 12 and counts["rejected"] == 3
    assert counts["read"] == counts["accepted"] + counts["rejected"]
    assert sum(counts["by_reason"].values()) == 3
    (entry,) = counts["notes"]["files"].values()
    assert entry["accepted"] == 12 and entry["read"] == 15


def test_a_dna_run_writes_an_encoder_with_its_masked_lm_head(tmp_path):
    data = tmp_path / "dna.csv"
    rng = torch.Generator().manual_seed(0)
    rows = ["id,sequence"] + [
        f"s{i},{''.join('ACGT'[j] for j in torch.randint(4, (60,), generator=rng))}" for i in range(16)
    ]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert main(["pretrain", "dna", "--data", str(data), "--out", str(out), "--steps", "3", *TINY]) == 0
    encoder = create_encoder("dna", weights_path=str(out / "encoder"))
    assert encoder.lm_head is not None and encoder.config.tokenization == "base"
    assert [e["step"] for e in _log(out)] == [1, 2, 3]


def test_an_out_dir_holding_something_else_is_refused_in_one_line(tmp_path, capsys):
    data = _fasta(tmp_path / "train.fa", n=8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["pretrain", "protein", "--data", str(data), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not empty and holds no kiban pretraining run" in err
    run = tmp_path / "run"
    assert main(["pretrain", "protein", "--data", str(data), "--out", str(run), "--steps", "1", *TINY]) == 0
    other = _fasta(tmp_path / "other.fa", n=8, seed=5)
    assert main(["pretrain", "protein", "--data", str(other), "--out", str(run), "--steps", "2", *TINY]) == 2
    assert "holds another pretraining run (its train differ)" in capsys.readouterr().err


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="^pretrain: stage 'pretrain' needs a pretrain section"):
        config_from_dict({"stage": "pretrain"})
    config = config_from_dict({"stage": "pretrain", "pretrain": {"modality": "protien", "train": ["x"]}})
    with pytest.raises(ConfigError, match="^pretrain.modality: unknown encoder 'protien'"):
        validate_config(config)
    config = config_from_dict(
        {"stage": "pretrain", "pretrain": {"modality": "protein", "objective": "mae", "train": ["x"]}}
    )
    with pytest.raises(ConfigError, match="^pretrain.objective: modality 'protein' has no objective 'mae'"):
        validate_config(config)


def test_deepspeed_on_the_cpu_refuses_pretraining_in_one_line(tmp_path):
    data = _fasta(tmp_path / "train.fa", n=8)
    config = config_from_dict(
        {
            "stage": "pretrain",
            "pretrain": {"modality": "protein", "encoder": {"preset": "tiny"}, "train": [str(data)]},
            "trainer": {"strategy": "deepspeed_stage_2", "accelerator": "cpu"},
        }
    )
    with pytest.raises(ConfigError, match="^trainer.strategy: deepspeed_stage_2 on the CPU .* auto or ddp"):
        validate_config(config)


def test_the_shipped_pretraining_config_parses_and_validates(tmp_path):
    from kiban.train.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "pretrain_esm2.yaml"
    data = str(_fasta(tmp_path / "train.fa"))
    config = load_config(path, [f"run.dir={tmp_path / 'run'}", f"pretrain.train=[{data}]", f"pretrain.val=[{data}]"])
    validate_config(config)
    assert config.stage == "pretrain" and config.pretrain.encoder == {"preset": "esm2_t6_8m"}
    assert config_from_dict(yaml.safe_load(config.to_yaml())).pretrain == config.pretrain  # round trip


def test_the_pretraining_yaml_goes_to_slurm_as_it_is(tmp_path, capsys):
    data = str(_fasta(tmp_path / "train.fa"))
    path = Path(__file__).resolve().parents[2] / "configs" / "pretrain_esm2.yaml"
    args = ["--set", f"pretrain.train=[{data}]", "--set", f"pretrain.val=[{data}]", "--set", f"run.dir={tmp_path / 'run'}"]
    assert main(["slurm", "submit", str(path), "--nodes", "1", "--gpus-per-node", "1", "--dry-run", *args]) == 0
    script = capsys.readouterr().out
    assert "kiban fit --config" in script and str(path) in script


def test_h5ad_files_with_different_gene_sets_are_each_matched_once_and_counted(tmp_path):
    from kiban.data.rejects import Rejects
    from kiban.encoders.cell import make_adata
    from kiban.train.pretrain_data import read_pretrain_source

    featurizer = create_encoder("cell", preset="tiny").featurizer
    first = make_adata(30, 60, seed=0)
    second = make_adata(20, 80, seed=1)
    second.var_names = [f"NOTAGENE{i}" if i % 4 == 0 else name for i, name in enumerate(second.var_names)]
    second.X[3] = 0  # a cell with nothing expressed: rejected with its reason
    first.write_h5ad(tmp_path / "a.h5ad")
    second.write_h5ad(tmp_path / "b.h5ad")
    rejects = Rejects(sink=tmp_path / "rejects.jsonl")
    source = read_pretrain_source(
        [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")], modality="cell", featurizer=featurizer, rejects=rejects
    )
    rejects.close()
    files = rejects.notes["files"]
    a, b = files[str(tmp_path / "a.h5ad")], files[str(tmp_path / "b.h5ad")]
    assert a["gene_match"]["matched"] == 60 and a["gene_match"]["unmatched"] == 0
    assert b["gene_match"]["matched"] == 60 and b["gene_match"]["unmatched"] == 20
    assert (a["read"], a["accepted"], b["read"], b["accepted"], b["rejected"]) == (30, 30, 20, 19, 1)
    assert rejects.read == 50 == rejects.accepted + rejects.rejected and len(source) == 49
    (line,) = (tmp_path / "rejects.jsonl").read_text().splitlines()
    reject = json.loads(line)
    assert reject["id"] == "cell3" and reject["reason"] == "no expressed genes" and reject["detail"]
    record = source.read_many([45])[0]  # a cell of the second file, read from disk by row
    assert record.location.startswith(str(tmp_path / "b.h5ad")) and len(record.item["genes"]) > 0


def test_a_cell_encoder_without_a_vocabulary_learns_the_genes_of_its_h5ad_files(tmp_path):
    from kiban.encoders.cell import make_adata

    make_adata(24, 40, seed=0).write_h5ad(tmp_path / "a.h5ad")
    other = make_adata(16, 60, seed=1)
    other.var_names = [f"OTHER{i}" for i in range(60)]  # none of these are in a.h5ad
    other.write_h5ad(tmp_path / "b.h5ad")
    out = tmp_path / "out"
    data = [str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad")]
    assert main(["pretrain", "cell", "--data", *data, "--out", str(out), "--steps", "2", "--preset", "tiny"]) == 0
    encoder = create_encoder("cell", weights_path=str(out / "encoder"))
    assert encoder.featurizer.vocab == tuple(f"GENE{i}" for i in range(40)) + tuple(f"OTHER{i}" for i in range(60))
    counts = json.loads((out / "counts.json").read_text())
    assert counts["accepted"] == 40 and counts["rejected"] == 0
