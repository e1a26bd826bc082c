"""The SMILES language-model molecule encoder: parity with transformers' RoBERTa and BERT on tiny random models."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaTokenizerFast,
)

from kiban.encoders import InvalidInput, create_encoder

ESOL_CSV = Path(__file__).resolve().parents[3] / "shared" / "data" / "molecules" / "esol_delaney.csv"
FALLBACK = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "C[C@H](N)C(=O)O", "[Na+].[Cl-]", "O=C=O"]
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def smiles() -> list[str]:
    if not ESOL_CSV.is_file():
        return FALLBACK
    with ESOL_CSV.open() as handle:
        return [row["smiles"].strip() for row in csv.DictReader(handle)][:60]


@pytest.fixture(scope="module")
def chemberta_dir(tmp_path_factory, smiles) -> tuple[Path, RobertaForMaskedLM]:
    """A ChemBERTa-style folder: byte-level BPE learned on SMILES, a RobertaForMaskedLM."""
    directory = tmp_path_factory.mktemp("chemberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(smiles, vocab_size=500, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(directory))
    tokenizer = RobertaTokenizerFast.from_pretrained(directory)  # reads vocab.json + merges.txt
    tokenizer.save_pretrained(directory)
    torch.manual_seed(3)
    model = RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=130, **SIZES)).eval()
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def smiles_bert_dir(tmp_path_factory, smiles) -> tuple[Path, BertForMaskedLM]:
    """A BERT folder with a character-level WordPiece vocabulary of SMILES symbols."""
    directory = tmp_path_factory.mktemp("smiles_bert")
    symbols = sorted({ch for s in smiles for ch in s})
    pieces = [*symbols, *(f"##{symbol}" for symbol in symbols)]
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces]) + "\n")
    (directory / "tokenizer_config.json").write_text('{"do_lower_case": false, "tokenizer_class": "BertTokenizer"}')
    tokenizer = BertTokenizerFast.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(4)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128, **SIZES)).eval()
    model.save_pretrained(directory)
    return directory, model


@pytest.mark.parametrize("folder", ["chemberta_dir", "smiles_bert_dir"])
def test_tokens_equal_the_reference_models_hidden_states(request, folder, smiles):
    directory, reference = request.getfixturevalue(folder)
    encoder = create_encoder("molecule", kind="smiles_lm", model_path=str(directory), max_length=120).eval()
    tokenizer = encoder.featurizer.tokenizer.__class__.from_pretrained(directory)
    expected = tokenizer(smiles, padding=True, return_tensors="pt")
    batch = encoder.featurizer.collate([encoder.featurizer(s) for s in smiles])
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert (expected["input_ids"] == tokenizer.unk_token_id).sum() == 0  # the vocabulary covers the SMILES
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    with torch.no_grad():
        tokens = encoder(**batch)
        base = reference.roberta if hasattr(reference, "roberta") else reference.bert
        hidden = base(**expected).last_hidden_state
    mask = expected["attention_mask"].bool()
    assert torch.equal(tokens.mask, mask)
    assert (tokens.embeddings[mask] - hidden[mask]).abs().max().item() <= 1e-5
    assert not (~mask).any() or tokens.embeddings[~mask].abs().max().item() == 0.0


def test_rdkit_still_validates_the_smiles(chemberta_dir):
    directory, _ = chemberta_dir
    encoder = create_encoder("molecule", kind="smiles_lm", model_path=str(directory), max_length=120)
    with pytest.raises(InvalidInput, match=r"invalid molecule input 'C1CC': RDKit cannot parse SMILES"):
        encoder.featurizer("C1CC")
    with pytest.raises(InvalidInput, match="more than this encoder's max_length=8"):
        create_encoder("molecule", kind="smiles_lm", model_path=str(directory), max_length=8).featurizer(
            "CC(=O)Oc1ccccc1C(=O)O"
        )
    assert pickle.loads(pickle.dumps(encoder.featurizer))("CCO")["input_ids"].shape[0] >= 3


def test_missing_folder_and_unknown_kind_say_what_to_set():
    with pytest.raises(ValueError, match='kind="smiles_lm" needs model_path'):
        create_encoder("molecule", kind="smiles_lm")
    with pytest.raises(ValueError, match="kind 'gnn' is unknown; kinds: dmpnn, smiles_lm"):
        create_encoder("molecule", kind="gnn")


def test_saved_assets_rebuild_the_encoder(chemberta_dir, tmp_path, smiles):
    directory, _ = chemberta_dir
    encoder = create_encoder("molecule", kind="smiles_lm", model_path=str(directory), max_length=120).eval()
    config, fields = encoder.export_assets(tmp_path / "assets")
    assert fields == ("model_path",) and not config.pretrained
    assert not list((tmp_path / "assets").glob("*.safetensors"))  # weights travel in the saved model
    rebuilt = create_encoder("molecule", config).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.encode(smiles[:4]).embeddings, encoder.encode(smiles[:4]).embeddings)
