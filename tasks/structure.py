"""Structure tasks: residue–residue contacts from a protein.

Labels: ``contact_labels(pdb)`` reads one chain with Biopython (PDB or mmCIF) and marks pairs
whose Cβ atoms (Cα for glycine) lie closer than 8 Å — the CASP / ESM-2 definition. Residues
without that atom are left out of scoring through the ``valid`` mask.

Predictor: ``AttentionContactHead`` is ESM-2's contact head (Rao et al. 2021, "Transformer protein
language models are unsupervised structure learners"): every layer's and head's attention map,
symmetrised and APC-corrected, feeds a logistic regression over the ``layers * heads`` features of
each pair. Baseline: ``separation_prior``, the contact rate of each sequence separation |i - j|
in the training structures. Metrics: ``kiban.tasks.metrics.precision_at_l``.

Saved heads over per-residue tokens: ``ProteinTokenHead`` is the base of heads that read the
protein encoder's tokens [L, D] (not pooled fused states; ``config.input_dim`` is D), in the same
folder format as ``PooledHead`` (head.json + head.safetensors, ``load_head``). ``ContactMapHead``
(architecture "contact", kind "contact") wraps a trained ``PairwiseContactHead``; its ``predict``
gives each protein's top-k residue pairs by contact probability. ``kiban finetune`` saves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kiban.tasks.heads import HeadConfig, register_head, save_head
from kiban.tasks.metrics import precision_at_l

__all__ = [
    "AttentionContactHead",
    "ChainContacts",
    "ContactMapHead",
    "PairwiseContactHead",
    "ProteinTokenHead",
    "apc",
    "contact_labels",
    "contact_metrics",
    "protein_sequence",
    "protein_tokens",
    "separation_prior",
    "symmetrize",
]

CONTACT_DISTANCE = 8.0  # Å, Cβ–Cβ (Cα for glycine)


@dataclass
class ChainContacts:
    """sequence: one letter per residue read; contacts, valid: [L, L] booleans; numbers: residue ids."""

    sequence: str
    contacts: np.ndarray
    valid: np.ndarray
    numbers: list[int]
    distances: np.ndarray


def contact_labels(
    path: str | Path, *, chain: str | None = None, threshold: float = CONTACT_DISTANCE
) -> ChainContacts:
    """Contacts of one chain (the first, unless ``chain`` names one) of model 1 of a PDB / mmCIF file."""
    from Bio.PDB import MMCIFParser, PDBParser
    from Bio.PDB.Polypeptide import is_aa, protein_letters_3to1

    path = Path(path)
    parser = MMCIFParser(QUIET=True) if path.suffix.lower() in (".cif", ".mmcif") else PDBParser(QUIET=True)
    model = next(iter(parser.get_structure(path.stem, str(path))))
    chains = {c.id: c for c in model}
    if not chains:
        raise ValueError(f"{path}: no chain in model 1")
    if chain is not None and chain not in chains:
        raise ValueError(f"{path}: no chain {chain!r}; chains: {', '.join(chains)}")
    residues = [r for r in chains[chain or next(iter(chains))] if r.id[0] == " " and is_aa(r, standard=True)]
    if not residues:
        raise ValueError(f"{path}: the chain has no standard amino-acid residue")
    coordinates = np.full((len(residues), 3), np.nan)
    for k, residue in enumerate(residues):
        atom = "CA" if residue.get_resname() == "GLY" else "CB"
        if atom in residue:
            coordinates[k] = residue[atom].coord
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1)
    valid = ~np.isnan(distances)
    contacts = np.where(valid, distances < threshold, False)
    sequence = "".join(protein_letters_3to1.get(r.get_resname(), "X") for r in residues)
    return ChainContacts(sequence, contacts, valid, [r.id[1] for r in residues], distances)


# ----------------------------------------------------------------------------------------------
# ESM-2's attention features


def symmetrize(x: Tensor) -> Tensor:
    """X + x^T over the last two dimensions."""
    return x + x.transpose(-1, -2)


def apc(x: Tensor) -> Tensor:
    """Average product correction (Dunn et al. 2008), as in ESM: x - (row sum x column sum) / total."""
    a1 = x.sum(-1, keepdims=True)
    a2 = x.sum(-2, keepdims=True)
    return x - a1 * a2 / x.sum((-1, -2), keepdims=True).clamp(min=1e-12)


def attention_features(attentions: Tensor) -> Tensor:
    """[layers, heads, L, L] attention of one protein -> [L, L, layers * heads] pair features."""
    layers, heads, length, _ = attentions.shape
    x = apc(symmetrize(attentions.float().reshape(layers * heads, length, length)))
    return x.permute(1, 2, 0)


class AttentionContactHead(nn.Module):
    """Logistic regression on APC-corrected symmetrised attention: [L, L, F] -> contact logits [L, L]."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.regression = nn.Linear(in_features, 1)

    def forward(self, features: Tensor) -> Tensor:
        """Contact logits [B, N, N] from pair features."""
        return self.regression(features).squeeze(-1)

    def fit(
        self,
        examples: Sequence[tuple[Tensor, np.ndarray, np.ndarray]],
        *,
        min_separation: int = 6,
        epochs: int = 200,
        l1: float = 1e-3,
        lr: float = 0.05,
    ) -> list[float]:
        """Train on (features [L, L, F], contacts [L, L], valid [L, L]) per protein; pairs with
        |i - j| >= ``min_separation`` only. An L1 penalty as in ESM-2 (which fitted 20 proteins).
        """
        xs, ys = [], []
        for features, contacts, valid in examples:
            i, j = np.triu_indices(len(contacts), k=min_separation)
            keep = valid[i, j]
            xs.append(features[i[keep], j[keep]])
            ys.append(torch.as_tensor(contacts[i[keep], j[keep]], dtype=torch.float32))
        x, y = torch.cat(xs), torch.cat(ys)
        optimiser = torch.optim.Adam(self.parameters(), lr=lr)
        history = []
        for _ in range(epochs):
            loss = (
                nn.functional.binary_cross_entropy_with_logits(self(x), y)
                + l1 * self.regression.weight.abs().sum()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            history.append(float(loss.detach()))
        return history


class PairwiseContactHead(nn.Module):
    """Supervised pairwise head over per-residue encoder tokens: [L, D] -> contact logits [L, L].

    Each residue is projected to ``project`` features a_i; a pair (i, j) reads the symmetric
    features [a_i * a_j, |a_i - a_j|, a_i + a_j] (outer-product diagonal and concatenation) plus a
    learned embedding of its binned sequence separation, through a one-hidden-layer MLP. Trained with
    binary cross-entropy on PDB-derived labels over pairs with |i - j| >= ``min_separation``.
    """

    SEPARATION_BINS = (6, 9, 12, 16, 24, 32, 48, 64, 96, 128)

    def __init__(self, in_features: int, *, project: int = 32, hidden: int = 64) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, project))
        self.separation = nn.Embedding(len(self.SEPARATION_BINS) + 1, 3 * project)
        self.mlp = nn.Sequential(nn.Linear(3 * project, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def _pairs(self, tokens: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return self._pair_logits(self.project(tokens.float()), i, j)

    def _pair_logits(self, a: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """Logits of pairs (i, j) from projected residues a [L, project]."""
        left, right = a[i], a[j]
        bins = torch.bucketize((j - i).abs(), torch.tensor(self.SEPARATION_BINS, device=a.device), right=True)
        features = torch.cat([left * right, (left - right).abs(), left + right], -1) + self.separation(bins)
        return self.mlp(features).squeeze(-1)

    @torch.no_grad()
    def pair_probabilities(
        self, tokens: Tensor, *, min_separation: int = 6, chunk: int = 65536
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, probability) of every pair i < j with j - i >= ``min_separation``, 0-based, computed
        ``chunk`` pairs at a time (the full [L, L] map of a 1000-residue protein would hold ~400 MB of
        pair features at once).
        """
        a = self.project(tokens.float())
        i, j = np.triu_indices(len(tokens), k=max(min_separation, 1))
        i, j = torch.as_tensor(i), torch.as_tensor(j)
        probabilities = [
            self._pair_logits(a, i[start : start + chunk], j[start : start + chunk]).sigmoid()
            for start in range(0, len(i), chunk)
        ]
        p = torch.cat(probabilities) if probabilities else torch.zeros(0)
        return i.numpy(), j.numpy(), p.float().numpy()

    def forward(self, tokens: Tensor) -> Tensor:
        """Tokens [L, D] of one protein -> symmetric logits [L, L]."""
        length = len(tokens)
        i, j = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
        return self._pairs(tokens, i.reshape(-1), j.reshape(-1)).reshape(length, length)

    def fit(
        self,
        examples: Sequence[tuple[Tensor, np.ndarray, np.ndarray]],
        *,
        min_separation: int = 6,
        epochs: int = 100,
        lr: float = 3e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
        progress: bool = False,
    ) -> list[float]:
        """Train on (tokens [L, D], contacts [L, L], valid [L, L]) per protein, one protein a step;
        pairs with |i - j| >= ``min_separation`` and valid labels only. Returns the mean loss per epoch.
        """
        pairs = []
        for tokens, contacts, valid in examples:
            i, j = np.triu_indices(len(contacts), k=min_separation)
            keep = valid[i, j]
            pairs.append(
                (
                    tokens.detach().float(),
                    torch.as_tensor(i[keep]),
                    torch.as_tensor(j[keep]),
                    torch.as_tensor(contacts[i[keep], j[keep]], dtype=torch.float32),
                )
            )
        from kiban.tasks.training import train_loop

        history = train_loop(
            [self],
            torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay),
            batches=lambda g: ((pairs[k], 1) for k in torch.randperm(len(pairs), generator=g).tolist()),
            loss=lambda pair: nn.functional.binary_cross_entropy_with_logits(self._pairs(*pair[:3]), pair[3]),
            epochs=epochs,
            seed=seed,
            progress=progress,
            desc="training contact head",
        )
        return history["train"]


def separation_prior(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], *, max_separation: int = 1024
) -> np.ndarray:
    """Contact rate by separation |i - j| over training (contacts, valid) maps: [max_separation] scores."""
    hits, seen = np.zeros(max_separation), np.zeros(max_separation)
    for contacts, valid in examples:
        i, j = np.triu_indices(len(contacts), k=1)
        d = np.minimum(j - i, max_separation - 1)
        np.add.at(hits, d, (contacts[i, j] & valid[i, j]).astype(float))
        np.add.at(seen, d, valid[i, j].astype(float))
    return np.divide(hits, seen, out=np.zeros_like(hits), where=seen > 0)


def prior_scores(prior: np.ndarray, length: int) -> np.ndarray:
    """[L, L] scores of the separation prior for a protein of ``length`` residues."""
    index = np.arange(length)
    return prior[np.minimum(np.abs(index[:, None] - index[None]), len(prior) - 1)]


def contact_metrics(scores: np.ndarray, contacts: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """P@L, P@L/2, P@L/5 for short, medium and long range: keys like ``long_P@L/5``."""
    out = {}
    for separation in ("short", "medium", "long"):
        for name, fraction in (("L", 1.0), ("L/2", 0.5), ("L/5", 0.2)):
            out[f"{separation}_P@{name}"] = precision_at_l(
                scores, contacts, fraction=fraction, separation=separation, valid=valid
            )
    return out


def progress_range(n: int, *, progress: bool, desc: str) -> Any:
    """``range(n)``, with a tqdm bar (unit: epoch) when ``progress``."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc, unit="epoch", leave=False)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ----------------------------------------------------------------------------------------------
# Saved heads over per-residue protein tokens


def protein_sequence(item: Any) -> str:
    """The cleaned upper-case residue string of a protein input (str, Bio.Seq or SeqRecord);
    ``InvalidInput`` names bad letters and their positions.
    """
    from kiban.encoders.base import read_sequence
    from kiban.encoders.protein import RESIDUES

    sequence, _ = read_sequence(
        item, None, modality="protein", kind="amino-acid", allowed=RESIDUES, allowed_text=", ".join(RESIDUES)
    )
    return sequence


def protein_tokens(encoder: Any, sequence: str) -> Tensor:
    """Per-residue tokens [L, D] of one protein (float32, CPU, no gradient). One protein per call,
    so a protein's tokens never depend on what else is in a batch.
    """
    batch = encoder.featurizer.collate([encoder.featurizer(sequence)])
    with torch.no_grad():
        tokens = encoder(batch["tokens"].to(_device(encoder))).embeddings[0]
    if len(tokens) != len(sequence):
        raise ValueError(
            f"the protein encoder gave {len(tokens)} tokens for a {len(sequence)}-residue sequence"
        )
    return tokens.float().cpu()


class ProteinTokenHead(nn.Module):
    """Base of the saved heads that read the protein encoder's per-residue tokens [L, D].

    ``config.modality`` is "protein" and ``config.input_dim`` the encoder's width D (not the LLM's:
    these heads never see pooled fused states). Subclasses build their modules in ``__init__`` and
    implement ``outputs(tokens, sequence, **options)`` -> one JSON-ready dict per protein.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        if config.modality != "protein":
            raise ValueError(f"head {config.task!r} reads protein tokens; its modality must be 'protein'")
        self.config = config

    @property
    def task(self) -> str:
        """The head's task name."""
        return self.config.task

    def check_model(self, model: Any) -> None:
        """Raise ValueError unless ``model`` has a protein encoder of this head's width."""
        if "protein" not in model.encoders:
            raise ValueError(f"head {self.task!r} reads protein tokens, but the model has no protein encoder")
        width = model.encoders["protein"].output_dim
        if width != self.config.input_dim:
            raise ValueError(
                f"head {self.task!r} reads {self.config.input_dim}-wide protein tokens; the model's "
                f"protein encoder gives {width}-wide ones"
            )

    def outputs(self, tokens: Tensor, sequence: str, **options: Any) -> dict[str, Any]:  # pragma: no cover
        """Per-protein outputs of the head for one sequence's tokens."""
        raise NotImplementedError

    def predict(self, model: Any, items: Sequence[Any], **options: Any) -> list[dict[str, Any]]:
        """One output dict per protein input (see the subclass's ``outputs``); bad letters or an
        over-long sequence raise the encoder's ``InvalidInput``.
        """
        encoder = model.encoders["protein"]
        rows = []
        for item in items:
            sequence = protein_sequence(item)
            rows.append(self.outputs(protein_tokens(encoder, sequence), sequence, **options))
        return rows

    def save(self, directory: str | Path) -> Path:
        """The same two files as ``PooledHead.save``: head.json and head.safetensors."""
        return save_head(self, directory)


@register_head("contact")
class ContactMapHead(ProteinTokenHead):
    """A saved ``PairwiseContactHead``: protein tokens [L, D] -> contact probabilities of residue pairs.

    Config: kind "contact", labels ["contact"], ``hidden_dim`` the pair MLP's hidden width (64),
    ``extra["project"]`` the per-residue projection (32), ``extra["min_separation"]`` the smallest
    |i - j| it was trained on (6). ``outputs`` gives the ``top_k`` most probable pairs (default L,
    the P@L convention) with |i - j| >= ``min_separation``, positions 1-based.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        if config.kind != "contact":
            raise ValueError(f"head {config.task!r}: a contact head has kind 'contact', got {config.kind!r}")
        self.net = PairwiseContactHead(
            config.input_dim, project=int(config.extra.get("project", 32)), hidden=config.hidden_dim or 64
        )

    @property
    def min_separation(self) -> int:
        """The smallest sequence separation |i - j| a contact is counted at."""
        return int(self.config.extra.get("min_separation", 6))

    def forward(self, tokens: Tensor) -> Tensor:
        """Symmetric contact logits [L, L]."""
        return self.net(tokens)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Binary cross-entropy of logits [L, L] against contacts [L, L] (1 / 0, NaN = unknown) over
        pairs i < j at least ``min_separation`` apart (what ``PairwiseContactHead.fit`` minimises).
        """
        i, j = torch.triu_indices(len(targets), len(targets), offset=self.min_separation)
        y = targets[i, j].float()
        known = ~torch.isnan(y)
        if not known.any():
            return outputs.sum() * 0.0
        return nn.functional.binary_cross_entropy_with_logits(outputs[i, j][known], y[known])

    def metrics(self, outputs: Any, targets: Any) -> dict[str, float]:
        """``contact_metrics`` (P@L, L/2, L/5 by range) of logits [L, L] against contacts (NaN = unknown)."""
        targets = np.asarray(targets, dtype=float)
        scores = 1 / (1 + np.exp(-np.asarray(outputs, dtype=float)))
        return contact_metrics(scores, np.nan_to_num(targets) == 1, ~np.isnan(targets))

    def outputs(
        self, tokens: Tensor, sequence: str, *, top_k: int | None = None, min_separation: int | None = None
    ) -> dict[str, Any]:
        """``{"length": L, "contacts": [{"i", "j", "probability"}, ...]}``, most probable first."""
        separation = self.min_separation if min_separation is None else min_separation
        i, j, p = self.net.pair_probabilities(tokens, min_separation=separation)
        k = len(sequence) if top_k is None else top_k
        order = np.argsort(-p, kind="stable")[:k]
        return {
            "length": len(sequence),
            "contacts": [{"i": int(i[n]) + 1, "j": int(j[n]) + 1, "probability": float(p[n])} for n in order],
        }
