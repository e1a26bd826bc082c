"""Sharded checkpoints become servable models: raw DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU ranks over
gloo (torchrun) and a one-process run (the state.ckpt DDP writes) end with ``model/``; ``kiban
export`` writes the same from any checkpoint, an FSDP-sharded one too;
an instruct run under ZeRO-3 starts from an align checkpoint written under ZeRO-2 (``init_from``);
the exported model serves over HTTP the vectors of the weights as they were before export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiban.fusion import KibanModel
from kiban.serve.launch import ServerProcess
from kiban.train.config import load_config

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
LORA = "model.backbone.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"


def _export(checkpoint: Path, out: Path, capsys) -> Path:
    """``kiban export CHECKPOINT OUT`` (in this process: a subprocess would pay the imports again)."""
    from kiban.cli import main

    capsys.readouterr()
    assert main(["export", str(checkpoint), str(out)]) == 0, capsys.readouterr().err[-3000:]
    assert capsys.readouterr().out.strip() == str(out)  # the path alone on stdout, for scripts
    return out


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def runs(zero2_run, fit_two_ranks, tmp_path_factory):
    """The shared ZeRO-2 align run (4 steps), a one-process run of the same (its state.ckpt is the
    format DDP writes), and an instruct run under ZeRO-3 that starts from the ZeRO-2 checkpoint.
    """
    from kiban.train.runner import fit

    root = tmp_path_factory.mktemp("sharded")
    (root / "zero2").symlink_to(zero2_run)
    overrides = ["callbacks.checkpoint.every_n_steps=2", "data.val=null", "trainer.val_check_interval=null"]
    fit(load_config(SMOKE, [f"run.dir={root / 'single'}", "trainer.max_steps=4", *overrides]))
    fit_two_ranks(
        root / "zero3",
        "deepspeed_stage_3",
        2,
        "stage=instruct",
        f"run.init_from={zero2_run / 'checkpoints' / 'ckpt-000004'}",
        LORA,
    )
    return root


def test_a_zero2_fit_ends_with_the_weights_deepspeed_held_at_the_end(runs):
    run = runs / "zero2"
    exported = _weights(run / "model")
    # before export: ZeRO-2 keeps whole weights in every rank; DeepSpeed saves rank 0's module as is
    live = torch.load(
        run / "checkpoints" / "ckpt-000004" / "state" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    trained = [k for k in live if k.startswith("projectors.")]
    assert trained and all(torch.equal(exported[k], live[k]) for k in trained)
    # the frozen encoders and LLM are in the export too, as they were built (seeded)
    torch.manual_seed(0)
    fresh = KibanModel.from_config(load_config(run / "config.yaml").model).state_dict()
    frozen = [k for k in exported if k.startswith(("encoders.", "llm."))]
    assert frozen and all(torch.equal(exported[k], fresh[k]) for k in frozen)


@pytest.mark.parametrize("strategy", ["zero2", "single"])
def test_kiban_export_of_a_checkpoint_equals_the_model_the_fit_exported(runs, strategy, tmp_path, capsys):
    run = runs / strategy
    out = _export(run / "checkpoints" / "ckpt-000004", tmp_path / "exported", capsys)
    before, after = _weights(run / "model"), _weights(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # a run directory names its newest checkpoint
    again = _export(run, tmp_path / "from-run-dir", capsys)
    assert all(torch.equal(after[k], v) for k, v in _weights(again).items())


def test_the_zero3_instruct_stage_starts_from_the_zero2_align_checkpoint_and_exports(runs, tmp_path, capsys):
    align, instruct = runs / "zero2", runs / "zero3"
    state = {p.name for p in (instruct / "checkpoints" / "ckpt-000002" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= state
    model = KibanModel.from_pretrained(instruct / "model")
    assert model.has_lora
    lora_b = [p for n, p in model.llm.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the adapters trained under ZeRO-3"
    # the backbone is frozen in both stages: its weights are the align stage's, consolidated from
    # ZeRO-2 partitions, loaded, sharded again under ZeRO-3 and consolidated once more
    aligned = KibanModel.from_pretrained(align / "model")
    base = dict(model.llm.get_base_model().named_parameters())
    for name, value in aligned.llm.named_parameters():
        target = name if name in base else name.replace(".q_proj.", ".q_proj.base_layer.").replace(
            ".v_proj.", ".v_proj.base_layer."
        )
        assert torch.equal(base[target], value), name
    first = json.loads((instruct / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == pytest.approx(first["loss"])  # finite
    assert _export(instruct, tmp_path / "again", capsys)


def test_the_exported_zero3_model_serves_what_it_predicted_before_export(runs, tmp_path):
    """Before export: the instruct run's weights consolidated in this process from the ZeRO-3
    shards; after: ``kiban serve`` on the folder the fit wrote, over HTTP.
    """
    from kiban.train.weights import checkpoint_weights

    run = runs / "zero3"
    torch.manual_seed(0)
    before = KibanModel.from_config(load_config(run / "config.yaml").model).eval()
    weights = checkpoint_weights(run / "checkpoints" / "ckpt-000002")
    before.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()}, strict=False)
    with torch.no_grad():
        expected = before.embed([("protein", PROTEIN), ("molecule", "CC(=O)Oc1ccccc1C(=O)O")])
    with ServerProcess(run / "model", None, tmp_path / "serve.log", "--device", "cpu") as server:
        server.wait_ready(key=None, timeout=300)  # a loaded 2-core box takes minutes
        with server.client(None) as api:
            response = api.post(
                "/v1/embeddings",
                json={
                    "input": [
                        {"type": "protein", "protein": {"sequence": PROTEIN}},
                        {"type": "molecule", "molecule": {"smiles": "CC(=O)Oc1ccccc1C(=O)O"}},
                    ]
                },
            )
    assert response.status_code == 200, response.text
    served = torch.tensor([row["embedding"] for row in response.json()["data"]])
    assert torch.allclose(served, expected, atol=1e-5)


def test_export_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, capsys):
    from kiban.cli import main

    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kiban export: error: {tmp_path} is neither a kiban checkpoint nor a run directory with checkpoints"
    )
    assert not (tmp_path / "out").exists()


def test_an_fsdp_sharded_checkpoint_exports_its_model(train_config, tmp_path, capsys):
    """Lightning's FSDP (state_dict_type sharded, the shipped preset) saves ``state.ckpt/`` with
    torch.distributed.checkpoint: ``{"model": ..., "optimizer_0": ...}`` plus ``meta.pt``. The layout
    is written here in one process (FSDP itself needs GPUs); export reads only the model entry.
    """
    import torch.distributed.checkpoint as dcp

    from kiban.train.checkpoint import commit_checkpoint, prepare_checkpoint

    config = train_config("trainer.strategy=fsdp")
    torch.manual_seed(3)
    model = KibanModel.from_config(config.model)
    tmp = prepare_checkpoint(tmp_path / "checkpoints", 7)
    (tmp / "config.yaml").write_text(config.to_yaml())
    (tmp / "meta.json").write_text(json.dumps({"step": 7, "strategy": "FSDPStrategy"}))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    optimizer = {"state": {k: {"exp_avg": torch.zeros_like(v)} for k, v in state.items()}}
    dcp.save({"model": state, "optimizer_0": optimizer}, checkpoint_id=str(tmp / "state.ckpt"))
    torch.save({"epoch": 0, "global_step": 7}, tmp / "state.ckpt" / "meta.pt")
    checkpoint = commit_checkpoint(tmp, step=7)
    exported = _weights(_export(checkpoint, tmp_path / "model", capsys))
    expected = model.state_dict()
    assert exported.keys() <= expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in exported)


def test_a_pretraining_checkpoint_exports_its_encoder(tmp_path, capsys):
    """``kiban pretrain`` writes DIR/encoder/; export of its checkpoint gives the same encoder folder
    (the path a sharded pretraining run takes at its end), from the one-process checkpoint and from
    the same weights in FSDP's sharded layout.
    """
    from kiban.cli import main

    data = tmp_path / "proteins.fa"
    data.write_text("".join(f">p{i}\n{'MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ'[i:] * 2}\n" for i in range(12)))
    run = tmp_path / "pretrain"
    assert main(["pretrain", "protein", "--data", str(data), "--out", str(run), "--steps", "2", "--preset", "tiny"]) == 0
    out = _export(run, tmp_path / "encoder", capsys)
    assert json.loads((out / "config.json").read_text()) == json.loads((run / "encoder" / "config.json").read_text())
    before, after = _weights(run / "encoder"), _weights(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # the same weights as Lightning's FSDP would shard them (torch.distributed.checkpoint layout, as
    # in the FSDP test above): export reads the shards and still writes the encoder folder
    import torch.distributed.checkpoint as dcp

    from kiban.train.checkpoint import commit_checkpoint, complete_checkpoints, prepare_checkpoint

    _, single = complete_checkpoints(run / "checkpoints")[-1]
    state = torch.load(single / "state.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    tmp = prepare_checkpoint(tmp_path / "sharded", 2)
    (tmp / "config.yaml").write_text((single / "config.yaml").read_text().replace("strategy: auto", "strategy: fsdp"))
    (tmp / "meta.json").write_text(json.dumps({"step": 2, "strategy": "FSDPStrategy"}))
    dcp.save({"model": state, "optimizer_0": {"state": {}}}, checkpoint_id=str(tmp / "state.ckpt"))
    torch.save({"epoch": 0, "global_step": 2}, tmp / "state.ckpt" / "meta.pt")
    sharded = _export(commit_checkpoint(tmp, step=2), tmp_path / "encoder-sharded", capsys)
    assert json.loads((sharded / "config.json").read_text()) == json.loads((run / "encoder" / "config.json").read_text())
    after = _weights(sharded)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
