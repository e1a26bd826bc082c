"""The fused model: every modality in one batch, freeze policies, overfitting, save/load, generate."""

import re

import numpy as np
import pytest
import torch

from kiban.encoders import InvalidInput, list_encoders
from kiban.fusion import STAGES, KibanModel, apply_freeze_policy
from kiban.tiny import example_records, tiny_model


@pytest.fixture(scope="module")
def records():
    return example_records(n=3)


def _nudge_lora(model):
    # LoRA's B starts at zero, so A gets no gradient on the first step; give B a value so that every
    # trainable parameter must show a gradient.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)


def test_one_batch_with_every_modality_interleaved_with_text(records):
    model = tiny_model(lora=True)
    batch = model.prepare(records)
    assert set(batch.features) == set(list_encoders()) == {"protein", "dna", "cell", "image", "molecule", "text", "properties"}
    slots_per_row = (batch.input_ids < 0).sum(1)
    assert slots_per_row.tolist() == [7, 7, 7]
    out = model(batch)
    assert torch.isfinite(out.loss)
    embeds, mask, labels = model.embed_inputs(batch)
    # every row grew by its modality tokens; the text between them is still there
    assert (mask.sum(1) > batch.attention_mask.sum(1)).all()
    assert ((labels != -100).sum(1) == (batch.labels != -100).sum(1)).all()


@pytest.mark.parametrize("stage", STAGES)
def test_freeze_policy_sends_gradients_exactly_where_they_should_go(records, stage):
    model = tiny_model(lora=True)
    _nudge_lora(model)
    counts = apply_freeze_policy(model, stage)
    expected_parts = {
        "align": {"projectors", "encoders"},  # encoders: only the one nothing pretrains (properties)
        "instruct": {"projectors", "lora", "encoders"},
        "task": set(),
        "full": {"projectors", "lora", "encoders", "llm"},
    }[stage]
    assert set(counts) == expected_parts
    if stage in ("align", "instruct"):
        trained = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad and name.startswith("encoders.")}
        assert trained == {"properties"}
        assert counts["encoders"] == sum(p.numel() for p in model.encoders["properties"].parameters())
    loss = model(model.prepare(records)).loss
    if stage == "task":
        assert not loss.requires_grad
        return
    loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{stage}: {name} got no gradient"
        else:
            assert param.grad is None, f"{stage}: frozen {name} got a gradient"
    if stage == "full":
        for modality in list_encoders():
            assert any(p.grad is not None for p in model.encoders[modality].parameters()), modality


def test_instruct_stage_needs_lora():
    with pytest.raises(ValueError, match="LoRA"):
        apply_freeze_policy(tiny_model(["molecule"]), "instruct")


def test_tiny_fused_model_overfits_a_handful_of_multimodal_examples():
    model = tiny_model(seed=1)
    records = example_records(n=4)
    apply_freeze_policy(model, "full")
    batch = model.prepare(records)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


@pytest.mark.parametrize("projector", ["mlp2", "resampler"])
def test_save_then_load_gives_identical_logits(tmp_path, records, projector):
    model = tiny_model(lora=True, projector=projector).eval()
    _nudge_lora(model)
    with torch.no_grad():
        before = model(model.prepare(records)).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    loaded = KibanModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(loaded.prepare(records)).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_generate_batches_mixed_modalities_and_lengths():
    model = tiny_model(seed=2).eval()
    ex = example_records(n=3)
    records = [
        {"messages": [{"role": "user", "content": "Describe <protein>."}], "inputs": {"protein": ["MKTAYIAKQRQISFVKSHFSRQ"]}},
        {"messages": [{"role": "user", "content": "Is <molecule> like <image>?"}],
         "inputs": {"molecule": ["CCO"], "image": [ex[0]["inputs"]["image"][0]]}},
        {"messages": [{"role": "user", "content": "Plain text only."}], "inputs": {}},
        {"messages": ex[1]["messages"][:2], "inputs": ex[1]["inputs"]},
    ]
    batched = model.generate(records, max_new_tokens=6)
    one_by_one = [model.generate([r], max_new_tokens=6)[0] for r in records]
    assert len(batched) == 4 and all(isinstance(t, str) for t in batched)
    assert batched == one_by_one


@pytest.mark.parametrize(
    ("inputs", "question", "names"),
    [
        ({"protein": ""}, "What is <protein>?", "protein"),
        ({"protein": "MKTJ1QRS"}, "What is <protein>?", "MKTJ1QRS"),
        ({"molecule": "C1CC"}, "What is <molecule>?", "C1CC"),
        ({"image": np.zeros(7, dtype=np.float32)}, "What is <image>?", "image"),
        ({}, "What is <dna>?", "<dna>"),
    ],
)
def test_bad_input_gives_one_clear_error_naming_it(inputs, question, names):
    model = tiny_model()
    with pytest.raises(InvalidInput) as error:
        model.chat(question, max_new_tokens=2, **inputs)
    message = str(error.value)
    assert names in message
    assert "\n" not in message and "Traceback" not in message
    assert re.match(r"invalid (protein|molecule|image|dna|prompt) input", message)


def test_embed_pools_text_and_every_modality_into_the_llm_width():
    model = tiny_model(["protein", "molecule"]).eval()
    items = [("protein", "MKTAYIAKQRQ"), ("molecule", "CCO"), ("text", "insulin lowers blood glucose")]
    vectors = model.embed(items)
    assert vectors.shape == (3, model.llm.config.hidden_size) and torch.isfinite(vectors).all()
    # batching does not change a vector
    torch.testing.assert_close(model.embed(items[1:2])[0], vectors[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidInput, match="no cell encoder"):
        model.embed([("cell", {"genes": ["CD3E"], "values": [1.0]})])


def test_a_saved_model_reads_nothing_from_outside_its_folder(tmp_path):
    # the text encoder's tokenizer and architecture are copied in, and named relative to the folder
    model = tiny_model(["text", "molecule"]).eval()
    records = [{"messages": [{"role": "user", "content": "Summarise <text> and <molecule>."}],
                "inputs": {"text": ["Insulin lowers blood glucose."], "molecule": ["CCO"]}}]
    with torch.no_grad():
        before = model(model.prepare(records)).logits
    model.save_pretrained(tmp_path / "a")
    config = (tmp_path / "a" / "config.json").read_text()
    assert '"model_path": "encoders/text"' in config and "site-packages" not in config
    (tmp_path / "a").rename(tmp_path / "b")  # moved: still loads, from its new place only
    loaded = KibanModel.from_pretrained(tmp_path / "b").eval()
    assert loaded.encoders["text"].config.model_path == str((tmp_path / "b" / "encoders" / "text").resolve())
    with torch.no_grad():
        torch.testing.assert_close(loaded(loaded.prepare(records)).logits, before, atol=0, rtol=0)
