"""The parts of a run, each alone: objectives, activation checkpointing, schedule, FLOPs/MFU,
strategies and presets, the resumable sampler, and validate/test on a checkpoint.
"""

import math

import pytest
import torch

from kiban.data.resumable import ResumableBatches
from kiban.fusion import apply_freeze_policy
from kiban.hpc.presets import deepspeed_config, list_presets, load_preset
from kiban.tiny import example_records, tiny_model
from kiban.train.config import ScheduleSection
from kiban.train.flops import model_flops, peak_flops
from kiban.train.objectives import fused_losses
from kiban.train.optim import lr_multiplier

MODALITIES = ["protein", "molecule"]


def test_the_contrastive_loss_trains_the_projectors_through_the_frozen_llm():
    model = tiny_model(MODALITIES)
    apply_freeze_policy(model, "align")
    batch = model.prepare(example_records(MODALITIES, n=4))
    out = fused_losses(model, batch, contrastive_weight=0.5, temperature=0.1)
    assert out.contrastive > 0 and torch.isclose(out.loss, out.lm_loss + 0.5 * out.contrastive)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projectors.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    # tokens counts text and modality positions; the padded length bounds them
    assert 0 < out.tokens <= out.padded_length * 4


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        model = tiny_model(MODALITIES, lora=True)
        if checkpointing:
            model.llm.gradient_checkpointing_enable()
        apply_freeze_policy(model, "instruct")
        model.train()
        loss = fused_losses(model, model.prepare(example_records(MODALITIES, n=2))).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_the_schedule_warms_up_linearly_then_decays_to_its_floor():
    cosine = ScheduleSection(name="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_multiplier(s, cosine, total_steps=14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(9, cosine, total_steps=14) == pytest.approx(0.55)
    assert lr_multiplier(14, cosine, total_steps=14) == pytest.approx(0.1)
    assert lr_multiplier(30, ScheduleSection(name="constant"), total_steps=14) == 1.0


def test_model_flops_follow_the_6n_plus_attention_formula():
    model = tiny_model(MODALITIES)
    flops = model_flops(model.llm)
    llm_params = sum(p.numel() for p in model.llm.parameters())  # tied embeddings: the head counts
    assert (flops.params, flops.layers, flops.width) == (llm_params, 2, 32)
    assert (
        flops.step_flops(tokens=100, attention_units=100 * 50)
        == 6 * llm_params * 100 + 12 * 2 * 32 * 100 * 50
    )
    peak, source = peak_flops(torch.device("cpu"), "32-true")
    assert peak is None and "set callbacks.throughput.peak_tflops" in source
    peak, source = peak_flops(torch.device("cpu"), "32-true", override_tflops=2.5)
    assert peak == 2.5e12 and "2.5 TFLOP/s per device" in source


def test_every_preset_parses_and_deepspeed_ones_get_the_run_values():
    assert set(list_presets()) == {
        "deepspeed_stage_2",
        "deepspeed_stage_2_offload",
        "deepspeed_stage_3",
        "deepspeed_stage_3_offload",
        "fsdp",
    }
    for name in list_presets():
        assert load_preset(name)
    config = deepspeed_config(
        "deepspeed_stage_3",
        micro_batch_size=4,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision="bf16-mixed",
    )
    assert config["zero_optimization"]["stage"] == 3
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (4, 2)
    assert config["gradient_clipping"] == 1.0 and config["bf16"] == {"enabled": True}


def test_strategies_are_built_from_yaml_names_and_preset_files(train_config):
    from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

    from kiban.train.strategies import build_strategy

    assert build_strategy(train_config(), accelerator="cpu", world_size=1) == "auto"
    ddp = build_strategy(train_config("trainer.strategy=ddp"), accelerator="cpu", world_size=2)
    assert isinstance(ddp, DDPStrategy) and ddp._process_group_backend == "gloo"
    # the GPU strategies are only constructed here (running them needs CUDA)
    ds = build_strategy(train_config("trainer.strategy=deepspeed_stage_3"), accelerator="gpu", world_size=8)
    assert (
        isinstance(ds, DeepSpeedStrategy)
        and ds.config["zero_optimization"] == load_preset("deepspeed_stage_3")["zero_optimization"]
    )
    fsdp = build_strategy(train_config("trainer.strategy=fsdp"), accelerator="gpu", world_size=8)
    assert isinstance(fsdp, FSDPStrategy)


def test_batches_are_dealt_to_ranks_once_per_epoch_and_resume_mid_epoch():
    lengths = list(range(23))
    ranks = [ResumableBatches(lengths, batch_size=3, rank=r, world_size=2, seed=7) for r in range(2)]
    epoch0 = [list(iter(r)) for r in ranks]
    assert (
        len(epoch0[0]) == len(epoch0[1]) == len(ranks[0]) == 4
    )  # 8 batches of 3 (the last short) over 2 ranks
    seen = [i for r in epoch0 for batch in r for (_, _, i) in batch]
    assert len(seen) == len(set(seen)) == 23
    epoch1 = list(iter(ranks[0]))
    assert {e for batch in epoch1 for (e, _, _) in batch} == {1} and epoch1 != epoch0[0]
    resumed = ResumableBatches(lengths, batch_size=3, rank=0, world_size=2, seed=7)
    resumed.start_at(1, 2)
    assert list(iter(resumed)) == epoch1[2:]
    assert {e for batch in iter(resumed) for (e, _, _) in batch} == {2}
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        ResumableBatches(list(range(5)), batch_size=2, world_size=4)


def test_validate_and_test_read_a_checkpoint(train_config):
    from kiban.train.runner import fit, test, validate

    config = train_config(
        "trainer.max_steps=2", "callbacks.checkpoint.every_n_steps=2", "trainer.val_check_interval=null"
    )
    fit(config)
    (metrics,) = validate(config)
    (tested,) = test(config)
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] == tested["test/loss"]  # both tiny


def test_instruction_jsonl_with_file_references_trains_and_rejects_are_named(train_config, tmp_path, caplog):
    import json
    import logging

    from kiban.train.runner import fit

    (tmp_path / "seqs.fa").write_text(">P1 kinase\nMKTAYIAKQRQISFVKSHFSRQ\n>P2\nMVLSPADKTNVKAAWGKVGAHAG\n")
    chat = [{"role": "user", "content": "What is <protein>?"}, {"role": "assistant", "content": "A kinase."}]
    records = [
        {
            "id": f"r{i}",
            "messages": chat,
            "inputs": {"protein": [{"fasta": "seqs.fa", "id": f"P{i % 2 + 1}"}]},
        }
        for i in range(6)
    ]
    records[3]["inputs"]["protein"][0]["id"] = "P9"  # no such sequence: rejected, not silently dropped
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    caplog.set_level(logging.WARNING, logger="kiban")
    result = fit(
        train_config(
            f"data.train={tmp_path / 'train.jsonl'}",
            "data.val=null",
            "trainer.max_steps=3",
            "trainer.val_check_interval=null",
            "callbacks.checkpoint.every_n_steps=3",
        )
    )
    assert result.global_step == 3
    assert (
        "rejected record r3 (" in caplog.text and "train.jsonl:line 4" in caplog.text and "P9" in caplog.text
    )
    seen = {
        i
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        for i in json.loads(line)["ids"]
    }
    assert seen == {"r0", "r1", "r2", "r4", "r5"}


def test_the_instruct_stage_starts_from_the_align_checkpoint(train_config, tmp_path):
    from kiban.train.module import KibanLightningModule
    from kiban.train.runner import fit

    align = fit(
        train_config(
            "trainer.max_steps=2",
            "callbacks.checkpoint.every_n_steps=2",
            "data.val=null",
            "trainer.val_check_interval=null",
            run_dir=tmp_path / "align",
        )
    )
    instruct = train_config(
        "stage=instruct",
        f"run.init_from={align.checkpoint}",
        "model.backbone.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
        run_dir=tmp_path / "instruct",
    )
    module = KibanLightningModule(config=instruct)
    module.configure_model()
    trained = torch.load(align.checkpoint / "state.ckpt", weights_only=True)["state_dict"]
    now = module.state_dict()
    assert torch.equal(
        now["model.projectors.protein.net.0.weight"], trained["model.projectors.protein.net.0.weight"]
    )
    assert torch.equal(
        now["model.llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"],
        trained["model.llm.model.layers.0.self_attn.q_proj.weight"],
    )


def test_bf16_mixed_precision_trains_every_modality():
    model = tiny_model()  # every registered encoder
    apply_freeze_policy(model, "full")
    batch = model.prepare(example_records(n=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_losses(model, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fit_exports_the_trained_model_for_serving(train_config):
    from kiban.fusion import KibanModel
    from kiban.train.runner import fit

    config = train_config("trainer.max_steps=2", "callbacks.checkpoint.every_n_steps=2", "trainer.val_check_interval=null")
    result = fit(config)
    exported = result.run_dir / "model"
    assert (exported / "model.safetensors").is_file() and not list(exported.parent.glob(".model.*.partial"))
    model = KibanModel.from_pretrained(exported).eval()
    assert set(model.encoders) == set(config.model.encoders)
    answer = model.chat("Is <molecule> soluble?", molecule="CCO", max_new_tokens=3)
    assert isinstance(answer, str)
