"""Protein sequence design by Gibbs sampling from ESM-2's masked-LM head, scored by pseudo-log-likelihood.

Each of ``n`` chains starts at the template. One step masks one free position (chosen uniformly
among the positions not held fixed), reads the LM head's distribution there given the rest of the
sequence, and draws a residue among the 20 standard amino acids (temperature-scaled). After
``steps`` steps the design is scored by its pseudo-log-likelihood (Salazar et al. 2020; used for
ESM designs by e.g. Verkuil et al. 2022): the sum over positions i of log p(x_i | x with i masked).
Fixed positions are never chosen, so they keep the template's residue by construction (and the
result is checked). All chains run as one batch, each drawing from one seeded generator, so the
same seed gives the same designs.

``random_mutants`` is the baseline the designs are compared with: the same number of changes,
at random free positions, to random other amino acids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STANDARD",
    "ProteinDesign",
    "design_proteins",
    "identity",
    "parse_positions",
    "pseudo_log_likelihood",
    "random_mutants",
    "write_fasta",
]

#: The residues designs are drawn from.
STANDARD = "ACDEFGHIKLMNPQRSTVWY"


def parse_positions(text: str | None, length: int, *, what: str = "--fixed") -> list[int]:
    """``"1-20,45"`` (1-based, ends included) -> sorted 0-based indices inside a ``length``-residue template."""
    if text is None or not text.strip():
        return []
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"{what} {part!r} is not a position or range like '1-20' or '45'")
        first, last = int(match[1]), int(match[2] or match[1])
        if first > last:
            raise ValueError(f"{what} {part!r}: the range runs backwards")
        if first < 1 or last > length:
            raise ValueError(f"{what} {part!r} is outside the {length}-residue template (positions 1-{length})")
        out.update(range(first - 1, last))
    return sorted(out)


@dataclass
class ProteinDesign:
    """One designed sequence with its pseudo-log-likelihood and its changes from the template."""

    name: str
    sequence: str
    pll: float
    mutations: list[str]

    @property
    def pll_per_residue(self) -> float:
        """PLL divided by length (comparable across lengths)."""
        return self.pll / len(self.sequence)


def identity(a: str, b: str) -> float:
    """Fraction of positions where two equal-length sequences agree."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), 1)


def _mutations(template: str, sequence: str) -> list[str]:
    return [f"{w}{i + 1}{m}" for i, (w, m) in enumerate(zip(template, sequence)) if w != m]


class _Masked:
    """The encoder's featurizer, mask token, residue ids and LM logits [B, T, 20] over ``STANDARD``."""

    def __init__(self, encoder: Any) -> None:
        if not hasattr(encoder, "model") or not hasattr(encoder.model, "mask_idx"):
            raise ValueError("protein design needs an ESM-2 protein encoder with its masked-LM head")
        self.encoder = encoder
        self.featurizer = encoder.featurizer
        self.mask = encoder.model.mask_idx
        self.ids = torch.tensor([self.featurizer.token_ids[a] for a in STANDARD])
        self.letter = {int(i): a for a, i in self.featurizer.token_ids.items()}

    def tokens(self, sequence: str, what: str) -> Tensor:
        return self.featurizer(sequence, item_id=what)["tokens"]

    def log_probs(self, tokens: Tensor) -> Tensor:
        logits = self.encoder.model(tokens)["logits"]
        return torch.log_softmax(logits[..., self.ids.to(logits.device)].float(), dim=-1)


@torch.no_grad()
def pseudo_log_likelihood(encoder: Any, sequences: Sequence[str], *, batch_size: int = 32) -> list[float]:
    """Σ_i log p(x_i | x masked at i) of each sequence, in nats (one masked copy per residue).

    The distribution at i is the LM head's restricted to the 20 standard amino acids (the residues
    designs are drawn from); a non-standard residue contributes nothing.
    """
    head = _Masked(encoder)
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for k, sequence in enumerate(sequences):
            tokens = head.tokens(sequence, f"sequence {k + 1}").to(device)
            positions = [i for i, a in enumerate(sequence) if a in STANDARD]
            total = 0.0
            for chunk in range(0, len(positions), batch_size):
                where = torch.tensor(positions[chunk : chunk + batch_size], device=device)
                batch = tokens.repeat(len(where), 1)
                batch[torch.arange(len(where)), where + 1] = head.mask  # +1: BOS
                log_probs = head.log_probs(batch)[torch.arange(len(where)), where + 1]
                truth = torch.tensor([STANDARD.index(sequence[int(i)]) for i in where], device=device)
                total += float(log_probs.gather(1, truth[:, None]).sum())
            out.append(total)
    finally:
        encoder.train(was_training)
    return out


@torch.no_grad()
def design_proteins(
    encoder: Any,
    template: str,
    *,
    n: int,
    fixed: Sequence[int] = (),
    steps: int | None = None,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[ProteinDesign]:
    """``n`` Gibbs-sampled variants of ``template`` (fixed: 0-based positions that never change).

    steps: masked draws per chain (default: one per free position, a sweep on average).
    Designs come back in chain order, named ``design_1..n``, scored by ``pseudo_log_likelihood``.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if temperature <= 0:
        raise ValueError(f"--temperature must be above 0, got {temperature}")
    head = _Masked(encoder)
    template_tokens = head.tokens(template, "template")
    template = "".join(head.letter[int(t)] for t in template_tokens[1:-1])  # cleaned, upper case
    fixed_set = set(fixed)
    if any(not 0 <= i < len(template) for i in fixed_set):
        raise ValueError(f"--fixed names a position outside the {len(template)}-residue template")
    free = torch.tensor([i for i in range(len(template)) if i not in fixed_set], dtype=torch.long)
    if not len(free):
        raise ValueError("--fixed holds every position of the template: nothing is left to design")
    steps = len(free) if steps is None else steps
    if steps < 0:
        raise ValueError(f"--steps must be 0 or more, got {steps}")
    device = next(encoder.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    tokens = template_tokens.repeat(n, 1).to(device)
    rows = torch.arange(n, device=device)
    was_training = encoder.training
    encoder.eval()
    try:
        for _ in range(steps):
            where = free[torch.randint(len(free), (n,), generator=generator)] + 1  # +1: BOS
            where = where.to(device)
            masked = tokens.clone()
            masked[rows, where] = head.mask
            probs = torch.softmax(head.log_probs(masked)[rows, where] / temperature, dim=-1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
            tokens[rows, where] = head.ids[choice].to(device)
    finally:
        encoder.train(was_training)
    sequences = ["".join(head.letter[int(t)] for t in row[1:-1]) for row in tokens.cpu()]
    for sequence in sequences:  # the guarantee, checked rather than assumed
        if any(sequence[i] != template[i] for i in fixed_set):
            raise AssertionError("a fixed position changed during sampling")
    scores = pseudo_log_likelihood(encoder, sequences)
    return [
        ProteinDesign(f"design_{k + 1}", s, score, _mutations(template, s))
        for k, (s, score) in enumerate(zip(sequences, scores))
    ]


def random_mutants(template: str, counts: Sequence[int], *, fixed: Sequence[int] = (), seed: int = 0) -> list[str]:
    """One random mutant per entry of ``counts``: that many changes at random free positions."""
    generator = torch.Generator().manual_seed(seed)
    fixed_set = set(fixed)
    free = [i for i in range(len(template)) if i not in fixed_set]
    out = []
    for count in counts:
        sequence = list(template)
        for j in torch.randperm(len(free), generator=generator)[: min(count, len(free))].tolist():
            i = free[j]
            others = [a for a in STANDARD if a != template[i]]
            sequence[i] = others[int(torch.randint(len(others), (1,), generator=generator))]
        out.append("".join(sequence))
    return out


def write_fasta(designs: Sequence[ProteinDesign], template: str) -> str:
    """FASTA text: ``>design_1 pll=-210.31 pll_per_residue=-2.1031 identity=0.950 mutations=5 A12G,...``."""
    lines = []
    for d in designs:
        changes = ",".join(d.mutations) if d.mutations else "none"
        lines.append(
            f">{d.name} pll={d.pll:.2f} pll_per_residue={d.pll_per_residue:.4f} "
            f"identity={identity(d.sequence, template):.3f} mutations={len(d.mutations)} {changes}"
        )
        lines.extend(d.sequence[i : i + 60] for i in range(0, len(d.sequence), 60))
    return "\n".join(lines) + "\n"
