"""Attribute masking for the D-MPNN molecule encoder (Hu et al. 2020), optionally with a contrastive term.

Hu, Liu, Gomes, Zitnik, Liang, Pande, Leskovec 2020, "Strategies for pre-training graph neural
networks" (ICLR), node-level attribute masking: in every molecule ``int(n_atoms * rate + 1)`` atoms
(15% by default, at least one) are chosen; their input features are replaced by a mask input, as are
the features of every bond touching them; the network predicts the masked atoms' element types from
their tokens, and the masked bonds' types from the sum of their two atoms' tokens (a linear head each,
as in the paper). kiban's atom and bond inputs are multi-hot vectors in which every real atom and
bond has at least one hot column, so the all-zero vector serves as the mask input without widening
the network's input layer: a pretrained encoder keeps exactly the layout its ``weights_path`` reads.

The optional contrastive term (``contrastive_weight > 0``) follows GraphCL (You et al. 2020, "Graph
contrastive learning with augmentations", NeurIPS) with attribute masking as the augmentation: a
second, independently masked view of each molecule, and the NT-Xent loss between the two views'
mean-pooled atom tokens over the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiban.encoders.molecule import MoleculeEncoder, MoleculeFeaturizer, graph_features
from kiban.encoders.pretraining import ObjectiveOutput, PretrainObjective, register_objective

__all__ = ["AttributeMasker", "AttributeMasking"]

_GRAPH_KEYS = ("atom_features", "edge_index", "bond_features")
_VIEW2 = "view2_"


def _classes(rows: Tensor, columns: tuple[int, int]) -> Tensor:
    """The hot column of each row's one-hot block, or the block's width where none is hot."""
    block = rows[:, columns[0] : columns[1]]
    hot = block.argmax(dim=1)
    return torch.where(block.sum(dim=1) > 0, hot, torch.full_like(hot, columns[1] - columns[0]))


class AttributeMasker:
    """Masks one molecule's features (the molecule featurizer's dict) for attribute masking. Picklable.

    Adds ``masked_atoms [k]`` (atom indices), ``atom_targets [k]`` (element classes),
    ``masked_bond_ends [2, m]`` (the two atoms of each masked bond) and ``bond_targets [m]``
    (bond-type classes), and zeroes the masked atoms' and both directions of the masked bonds'
    features. With ``views=2`` a second, independently masked copy travels under ``view2_`` keys.
    Randomness comes from the global torch RNG (the data layer seeds it per record).
    """

    def __init__(self, featurizer: MoleculeFeaturizer, *, rate: float = 0.15, views: int = 1) -> None:
        """Mask ``rate`` of each molecule's atoms, in ``views`` independent copies."""
        if not 0.0 < rate < 1.0:
            raise ValueError(f"attribute masking rate must be between 0 and 1, got {rate}")
        if views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {views}")
        self.featurizer = featurizer
        self.rate = rate
        self.views = views

    def __call__(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """One molecule's masked view(s) and targets."""
        out = self._mask(features)
        if self.views == 2:
            out.update({_VIEW2 + key: value for key, value in self._mask(features).items() if key in _GRAPH_KEYS})
        return out

    def _mask(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        layout = graph_features(self.featurizer.features)
        atoms, edges, bonds = (features[key] for key in _GRAPH_KEYS)
        n_atoms = atoms.shape[0]
        k = min(n_atoms, int(n_atoms * self.rate + 1))  # Hu et al.'s sample size
        masked = torch.randperm(n_atoms)[:k].sort().values
        is_masked = torch.zeros(n_atoms, dtype=torch.bool)
        is_masked[masked] = True
        # Edges 2j and 2j + 1 are the two directions of bond j (see MoleculeFeaturizer)
        forward = edges[:, 0::2]
        bond_masked = is_masked[forward[0]] | is_masked[forward[1]]
        bond_ids = bond_masked.nonzero().flatten()

        atom_targets = _classes(atoms[masked], layout.element_columns)
        bond_targets = _classes(bonds[0::2][bond_ids], layout.bond_type_columns)
        atoms = atoms.clone()
        atoms[masked] = 0.0
        bonds = bonds.clone()
        bonds[0::2][bond_ids] = 0.0
        bonds[1::2][bond_ids] = 0.0
        return {
            "atom_features": atoms,
            "edge_index": edges,
            "bond_features": bonds,
            "masked_atoms": masked,
            "atom_targets": atom_targets,
            "masked_bond_ends": forward[:, bond_ids],
            "bond_targets": bond_targets,
        }

    def collate(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The featurizer's padded batch, plus the masked positions as rows of the flattened [B * N] atoms."""
        batch = self.featurizer.collate([{key: item[key] for key in _GRAPH_KEYS} for item in items])
        n = batch["atom_features"].shape[1]
        batch["masked_atoms"] = torch.cat([item["masked_atoms"] + i * n for i, item in enumerate(items)])
        batch["atom_targets"] = torch.cat([item["atom_targets"] for item in items])
        batch["masked_bond_ends"] = torch.cat([item["masked_bond_ends"] + i * n for i, item in enumerate(items)], 1)
        batch["bond_targets"] = torch.cat([item["bond_targets"] for item in items])
        if self.views == 2:
            view = self.featurizer.collate([{key: item[_VIEW2 + key] for key in _GRAPH_KEYS} for item in items])
            batch.update({_VIEW2 + key: value for key, value in view.items()})
        return batch


@register_objective("molecule", "attribute_masking")
class AttributeMasking(PretrainObjective):
    """Predict masked atoms' elements and masked bonds' types from the D-MPNN's atom tokens.

    Batch: from ``self.masker`` (see AttributeMasker). Loss: cross-entropy over masked atoms plus
    cross-entropy over masked bonds (Hu et al. 2020), plus ``contrastive_weight`` times NT-Xent
    between two masked views at ``temperature`` when the weight is above zero.
    Metrics: ``atom_accuracy``, ``bond_accuracy``, ``n_masked_atoms``, ``n_masked_bonds``, and
    ``contrastive_loss`` when used. Options: ``rate`` (0.15), ``contrastive_weight`` (0.0),
    ``temperature`` (0.1).
    """

    def __init__(
        self,
        encoder: MoleculeEncoder,
        *,
        rate: float = 0.15,
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
    ) -> None:
        """Wrap ``encoder`` (the D-MPNN) with an element head and a bond-type head."""
        if not isinstance(encoder, MoleculeEncoder):
            raise ValueError(
                f"attribute masking pretrains the D-MPNN molecule encoder (kind 'dmpnn'); got a "
                f"{type(encoder).__name__} (kind {encoder.config.kind!r}), whose inputs are not atoms and bonds"
            )
        super().__init__(encoder)
        layout = graph_features(encoder.featurizer.features)
        element_classes = layout.element_columns[1] - layout.element_columns[0] + 1
        bond_classes = layout.bond_type_columns[1] - layout.bond_type_columns[0] + 1
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.masker = AttributeMasker(encoder.featurizer, rate=rate, views=2 if contrastive_weight > 0 else 1)
        self.atom_head = nn.Linear(encoder.output_dim, element_classes)
        self.bond_head = nn.Linear(encoder.output_dim, bond_classes)

    def _tokens(self, batch: dict[str, Tensor], prefix: str = "") -> tuple[Tensor, Tensor]:
        tokens = self.encoder(
            atom_features=batch[prefix + "atom_features"],
            atom_mask=batch[prefix + "atom_mask"],
            edge_index=batch[prefix + "edge_index"],
            bond_features=batch[prefix + "bond_features"],
        )
        return tokens.embeddings, tokens.pooled()

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        """Masked-attribute loss (and contrastive term) of a collated, masked batch."""
        embeddings, pooled = self._tokens(batch)
        flat = embeddings.reshape(-1, embeddings.shape[-1])
        atom_logits = self.atom_head(flat[batch["masked_atoms"]])
        loss = F.cross_entropy(atom_logits, batch["atom_targets"])
        metrics = {
            "atom_loss": loss.detach(),
            "atom_accuracy": (atom_logits.argmax(1) == batch["atom_targets"]).float().mean().detach(),
            "n_masked_atoms": torch.tensor(float(batch["atom_targets"].numel())),
            "n_masked_bonds": torch.tensor(float(batch["bond_targets"].numel())),
        }
        ends = batch["masked_bond_ends"]
        if ends.shape[1]:  # a batch of single atoms masks no bond
            bond_logits = self.bond_head(flat[ends[0]] + flat[ends[1]])
            bond_loss = F.cross_entropy(bond_logits, batch["bond_targets"])
            loss = loss + bond_loss
            metrics["bond_loss"] = bond_loss.detach()
            metrics["bond_accuracy"] = (bond_logits.argmax(1) == batch["bond_targets"]).float().mean().detach()
        else:
            loss = loss + 0.0 * self.bond_head.weight.sum()  # keep every parameter in the graph (DDP)
        if self.contrastive_weight > 0:
            _, other = self._tokens(batch, _VIEW2)
            contrastive = nt_xent(pooled, other, temperature=self.temperature)
            loss = loss + self.contrastive_weight * contrastive
            metrics["contrastive_loss"] = contrastive.detach()
        return ObjectiveOutput(loss=loss, metrics=metrics)


def nt_xent(first: Tensor, second: Tensor, *, temperature: float) -> Tensor:
    """NT-Xent (SimCLR/GraphCL) between two views [B, D]: each row's positive is its twin, the rest negatives."""
    z = F.normalize(torch.cat([first, second]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    b = first.shape[0]
    twins = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(similarity, twins)
