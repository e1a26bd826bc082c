"""The de-quantised GGUF backbone is cached as a Hugging Face folder: the same model and tokenizer,
loaded without parsing the GGUF again; a cache it cannot use is skipped, never an error.
"""

import logging
from pathlib import Path

import pytest
import torch

from kiban.fusion.backbone import BackboneConfig, gguf_cache_folder, load_backbone, smollm2_gguf

TEXTS = [
    "What does the enzyme lactase do?",
    "<|im_start|>user\nMKTAYIAKQR <molecule> CC(=O)Oc1ccccc1C(=O)O ünïcödé<|im_end|>",
    "  leading spaces,\ttabs\nand newlines  ",
]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory):
    """The backbone straight from the GGUF, with the cache in a folder of this module's own."""
    root = tmp_path_factory.mktemp("kiban-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KIBAN_CACHE_DIR", str(root))
        model, tokenizer = load_backbone(BackboneConfig(gguf=str(smollm2_gguf())))
    return root, model, tokenizer


def _assert_same_backbone(model, tokenizer, want_model, want_tokenizer) -> None:
    got, want = model.state_dict(), want_model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.config.quantization_config is None if hasattr(model.config, "quantization_config") else True
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == want_tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        want_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (want_tokenizer.eos_token_id, want_tokenizer.pad_token_id)


def test_the_second_load_reads_the_cache_and_gives_the_same_model_and_tokenizer(fresh, monkeypatch):
    root, want_model, want_tokenizer = fresh
    monkeypatch.setenv("KIBAN_CACHE_DIR", str(root))
    folder = gguf_cache_folder(smollm2_gguf(), torch.float32)
    assert folder is not None and folder.parent == root / "gguf"
    assert (folder / "kiban-gguf-cache.json").is_file() and (folder / "model.safetensors").is_file()
    import gguf

    def no_parsing(*args, **kwargs):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_parsing)
    model, tokenizer = load_backbone(BackboneConfig(gguf=str(smollm2_gguf())))
    _assert_same_backbone(model, tokenizer, want_model, want_tokenizer)
    with torch.no_grad():
        ids = torch.tensor([tokenizer("Name three amino acids.")["input_ids"]])
        torch.testing.assert_close(model(ids).logits, want_model(ids).logits, rtol=0, atol=0)


def test_an_incomplete_or_unwritable_cache_is_skipped_with_a_warning(fresh, tmp_path: Path, monkeypatch, caplog):
    _, want_model, want_tokenizer = fresh
    # a folder without its record (a load killed half-way) is not read, and is replaced
    monkeypatch.setenv("KIBAN_CACHE_DIR", str(tmp_path / "cache"))
    folder = gguf_cache_folder(smollm2_gguf(), torch.float32)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    model, tokenizer = load_backbone(BackboneConfig(gguf=str(smollm2_gguf())))
    _assert_same_backbone(model, tokenizer, want_model, want_tokenizer)
    assert (folder / "kiban-gguf-cache.json").is_file()
    assert not list(folder.parent.glob("*.partial-*"))
    # a cache root that is a file: nothing can be written there; the load still works, and says so
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("KIBAN_CACHE_DIR", str(blocked))
    with caplog.at_level(logging.WARNING, logger="kiban.fusion.backbone"):
        model, _ = load_backbone(BackboneConfig(gguf=str(smollm2_gguf())))
    assert "could not cache the de-quantised" in caplog.text
    assert torch.equal(model.model.norm.weight, want_model.model.norm.weight)
    monkeypatch.setenv("KIBAN_CACHE_DIR", "off")
    assert gguf_cache_folder(smollm2_gguf(), torch.float32) is None
