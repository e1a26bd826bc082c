"""A SMILES language model as the molecule encoder: a Hugging Face RoBERTa/BERT folder, its tokens.

ChemBERTa (Chithrananda et al. 2020; Ahmad et al. 2022) and similar SMILES models are published as
Hugging Face folders: config.json, the weights (often of a ``...ForMaskedLM``; its encoder is used),
and the tokenizer that cut SMILES into tokens during pretraining. Built with
``create_encoder("molecule", kind="smiles_lm", model_path=PATH)``; the tokens are the model's last
hidden states, one per SMILES token including the special ones.

RDKit still reads every molecule first, so an invalid SMILES is an ``InvalidInput`` naming it, as
with the graph encoder; a mol block or ``Chem.Mol`` is written as its canonical SMILES. The SMILES
string itself is tokenised as given (not canonicalised), as the model saw SMILES in pretraining.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rdkit import Chem, rdBase
from torch import Tensor
from transformers import AutoTokenizer

from kiban.encoders.base import Encoder, InvalidInput, ModalityTokens, pad_stack
from kiban.encoders.molecule import (
    MODALITY,
    MoleculeEncoderConfig,
    MoleculeFeaturizer,
    register_molecule_kind,
)
from kiban.encoders.text import TextEncoderConfig, load_transformer

__all__ = ["SmilesLanguageModelEncoder", "SmilesTokenFeaturizer"]


class SmilesTokenFeaturizer:
    """SMILES / mol block / ``Chem.Mol`` -> token ids of the model's tokenizer. Picklable, no weights.

    One item gives ``input_ids [L]`` and ``attention_mask [L]``. RDKit validates the molecule (and
    ``max_atoms``) before tokenising; a SMILES of more than ``max_length`` tokens is InvalidInput.
    """

    modality = MODALITY

    def __init__(self, *, tokenizer_path: str, max_length: int, max_atoms: int | None = None) -> None:
        """Validate with RDKit, then tokenise with the tokenizer in ``tokenizer_path``."""
        self.molecules = MoleculeFeaturizer(max_atoms=max_atoms)
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer in {tokenizer_path} has no padding token")

    def __call__(self, item: Any, *, item_id: Any = None) -> dict[str, Tensor]:
        """Token ids of one molecule; raises InvalidInput naming ``item_id`` (or the item)."""
        mol, name = self.molecules.parse(item, item_id=item_id)
        if self.molecules.max_atoms is not None and mol.GetNumAtoms() > self.molecules.max_atoms:
            raise InvalidInput(
                MODALITY, name, f"{mol.GetNumAtoms()} atoms, more than this encoder's max_atoms={self.molecules.max_atoms}"
            )
        if isinstance(item, str) and "M  END" not in item:
            smiles = item.strip()
        else:
            with rdBase.BlockLogs():
                smiles = Chem.MolToSmiles(mol)
        ids = self.tokenizer(smiles, truncation=False)["input_ids"]
        if len(ids) > self.max_length:
            raise InvalidInput(
                MODALITY, name, f"{len(ids)} SMILES tokens, more than this encoder's max_length={self.max_length}"
            )
        input_ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def collate(self, features: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad to the longest SMILES: ``input_ids [B, L]``, ``attention_mask [B, L]`` (1 = real)."""
        input_ids, mask = pad_stack([f["input_ids"] for f in features], pad_value=self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask.long()}


@register_molecule_kind("smiles_lm")
class SmilesLanguageModelEncoder(Encoder):
    """A Hugging Face encoder over SMILES tokens (RoBERTa, BERT, ...).

    forward returns ModalityTokens with embeddings [B, N, D] and mask [B, N]: B molecules, N SMILES
    tokens of the longest one including <s>/</s> (or [CLS]/[SEP]), padding masked False and zero,
    D the model's hidden size. The transformer is loaded as the text encoder loads its model
    (``kiban.encoders.text.load_transformer``): the folder's weights, or its architecture at random.
    """

    modality = MODALITY

    def __init__(self, config: MoleculeEncoderConfig) -> None:
        """Load the Hugging Face model and tokenizer in ``config.model_path``."""
        super().__init__()
        if not config.model_path:
            raise ValueError('MoleculeEncoderConfig.kind="smiles_lm" needs model_path, a Hugging Face folder')
        self.config = config
        self.featurizer = SmilesTokenFeaturizer(
            tokenizer_path=config.model_path, max_length=config.max_length, max_atoms=config.max_atoms
        )
        text_config = TextEncoderConfig(
            model_path=config.model_path, pretrained=config.pretrained, max_length=config.max_length
        )
        self.model = load_transformer(text_config, config.model_path)
        self.output_dim = self.model.config.hidden_size

    def portable_config(self) -> MoleculeEncoderConfig:
        """The same architecture with random weights: a saved model brings its own."""
        return dataclasses.replace(self.config, pretrained=False)

    def export_assets(self, directory: Path) -> tuple[MoleculeEncoderConfig, tuple[str, ...]]:
        """The tokenizer and config.json (no weights), so a saved model rebuilds from its own folder."""
        directory.mkdir(parents=True, exist_ok=True)
        self.featurizer.tokenizer.save_pretrained(directory)
        self.model.config.save_pretrained(directory)
        return dataclasses.replace(self.portable_config(), model_path=str(directory)), ("model_path",)

    def forward(self, *, input_ids: Tensor, attention_mask: Tensor) -> ModalityTokens:
        """Encode a collated batch (see ``SmilesTokenFeaturizer.collate``) into tokens [B, N, D]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.bool()
        return ModalityTokens(hidden * mask.unsqueeze(-1).to(hidden.dtype), mask)
