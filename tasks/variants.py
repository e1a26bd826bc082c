"""Zero-shot variant-effect scoring with a masked language model's head, for proteins and DNA.

Masked marginals (Meier et al. 2021, ESM-1v). For each token t a variant changes, mask t in the
wild type and read the model's log-probabilities there; the variant scores

    sum over changed tokens t of  log p(mutant token at t | wild type, t masked)
                                - log p(wild-type token at t | wild type, t masked)

so the wild type itself (or a synonymous "P20P") scores exactly 0, and mutations in different
tokens add up. Higher = more like what the model expects = predicted fitter. With measured effects,
``spearman`` against them is the standard report (ProteinGym). Mutations are written ``A23V``
(wild type, position, mutant; 1-based on the wild type unless ``offset`` says where position 1
sits), several joined by ":" (``A23V:G40S``), in either case.

Protein: the ESM-2 LM head of ``ProteinEncoder``; one token per residue, so this is ESM-1v's
masked marginal exactly. Mutants and wild types are among the 20 standard amino acids.

DNA: the masked-LM head of ``DnaEncoder`` (``mlm_head=True``); mutations on A, C, G, T (``A23G``).
How a base maps to a token depends on the tokenizer:

* single bases: one token per base, exactly as for proteins.
* non-overlapping k-mers (Nucleotide Transformer): the k-mer token holding the base is masked and
  the mutant k-mer (the wild-type k-mer with the base substituted) is compared with the wild-type
  k-mer. Two substitutions inside one k-mer change one token, so they are scored together as that
  k-mer's change, not as the sum of two singles. A substitution between A, C, G and T never moves a
  k-mer boundary (the tokenizer splits only at N and at the end); every mutant is re-tokenized to
  make sure, and one that tokenizes differently is rejected.
* overlapping k-mers (DNABERT) are refused: each base sits in k tokens, so masking one token
  leaks the base through its k - 1 neighbours, and masking all k gives k dependent predictions of
  the same base with no agreed way to combine them into one log-probability ratio.
* a Hugging Face tokenizer is accepted when its tokens spell out the sequence base by base (the
  Nucleotide Transformer's 6-mers do; BPE with word markers does not) and it has a mask token.

``strand="both"`` (the default for an encoder built with ``strand="both"``) averages the score on
the given strand and the score of the complemented mutation on the reverse complement, which makes
the score the same whichever strand the wild type is written on.

The LM heads are in the encoders' ``never_trained`` sets: fusion training never moves them, and
scoring reads them in eval.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "AMINO_ACIDS",
    "NUCLEOTIDES",
    "MutationError",
    "masked_marginal_scores",
    "parse_mutations",
    "score_variants",
]

#: The letters a protein mutation may name (mutant and wild type): the 20 standard amino acids.
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
#: The letters a DNA mutation may name.
NUCLEOTIDES = "ACGT"

_MUTATION = re.compile(r"^([A-Z*])(\d+)([A-Z*])$")
_UNITS = {AMINO_ACIDS: "residue", NUCLEOTIDES: "base"}

# (token position in the model input, wild-type token id, mutant token id)
Site = tuple[int, int, int]


class MutationError(ValueError):
    """A mutation that cannot be scored. The message names it; ``reason`` is a short fixed phrase
    to count rejects by ("wild type differs", "not written like A23V", ...).
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def parse_mutations(
    text: str, wild_type: str, *, offset: int = 1, alphabet: str | None = None
) -> list[tuple[int, str, str]]:
    """``"A23V:G40S"`` -> [(index 0-based, wt, mt), ...], checked against ``wild_type``.

    alphabet: the letters wild-type and mutant may be (``AMINO_ACIDS``, ``NUCLEOTIDES``; for DNA
    ``U`` is read as ``T``); None allows any letter. Errors are ``MutationError`` naming the
    mutation: not written like A23V, a position outside the wild type, a wild-type letter that
    differs from the sequence, a letter outside the alphabet (a stop ``*`` says so), a position
    named twice.
    """
    unit = _UNITS.get(alphabet, "residue")
    parts = [part.strip() for part in str(text).split(":")]
    out, seen = [], set()
    for part in parts:
        name = f"mutation {part!r}" if len(parts) == 1 else f"mutation {part!r} of {text!r}"
        match = _MUTATION.match(part.upper())
        if not match:
            raise MutationError(
                "not written like A23V",
                f"{name} is not written like A23V (wild type, 1-based position, mutant)"
                if part
                else f"mutation {text!r} is empty or has an empty part",
            )
        wt, position, mt = match.group(1), int(match.group(2)), match.group(3)
        if alphabet == NUCLEOTIDES:
            wt, mt = wt.replace("U", "T"), mt.replace("U", "T")
        index = position - offset
        if not 0 <= index < len(wild_type):
            first, last = offset, offset + len(wild_type) - 1
            raise MutationError(
                "position outside the wild type",
                f"{name}: position {position} is outside the {len(wild_type)}-{unit} wild type "
                f"(positions {first}-{last})",
            )
        if wild_type[index] != wt:
            raise MutationError(
                "wild type differs", f"{name}: the wild type has {wild_type[index]} at {position}, not {wt}"
            )
        for role, letter in (("wild-type", wt), ("mutant", mt)):
            if letter == "*":
                raise MutationError(
                    "stop codon", f"{name}: a stop codon '*' is not a substitution a masked LM can score"
                )
            if alphabet is not None and letter not in alphabet:
                raise MutationError(
                    f"{role} {unit} not in {'ACGT' if alphabet == NUCLEOTIDES else 'the 20 amino acids'}",
                    f"{name}: {role} {unit} {letter!r} is not one of {', '.join(alphabet)}",
                )
        if index in seen:
            raise MutationError("position mutated twice", f"{name}: position {position} is mutated twice")
        seen.add(index)
        out.append((index, wt, mt))
    return out


def masked_marginal_scores(
    encoder: Any,
    wild_type: str,
    mutations: Sequence[str],
    *,
    offset: int = 1,
    strand: str | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """Scores [len(mutations)] of each variant of ``wild_type`` (see the module docstring).

    encoder: a ``ProteinEncoder`` or a ``DnaEncoder`` with ``mlm_head=True``. Raises
    ``MutationError`` naming the first mutation that cannot be scored; ``score_variants`` reports
    them instead.
    """
    scores, problems = score_variants(
        encoder, wild_type, mutations, offset=offset, strand=strand, batch_size=batch_size
    )
    for problem in problems:
        if problem is not None:
            raise problem
    return scores


@torch.no_grad()
def score_variants(
    encoder: Any,
    wild_type: str,
    mutations: Sequence[str],
    *,
    offset: int = 1,
    strand: str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[np.ndarray, list[MutationError | None]]:
    """(scores [len(mutations)], problems): the score of every variant that can be scored and NaN
    for the others, whose ``problems`` entry is the ``MutationError`` saying why (None where scored).

    Problems with the model or the wild type (no LM head, overlapping k-mers, a wild type longer
    than the model reads) raise ``ValueError`` / ``InvalidInput`` instead: no variant could be
    scored. strand: DNA only, "forward" or "both" (default: the encoder's ``config.strand``).
    ``progress`` shows a bar over the masked forward passes.
    """
    targets = _targets(encoder, wild_type, strand)
    device = next(encoder.parameters()).device
    sites: list[list[list[Site]] | None] = []
    problems: list[MutationError | None] = []
    for text in mutations:
        try:
            parsed = parse_mutations(text, targets[0].sequence, offset=offset, alphabet=targets[0].alphabet)
            sites.append([target.sites(parsed, text) for target in targets])
            problems.append(None)
        except MutationError as error:
            sites.append(None)
            problems.append(error)
    was_training = encoder.training
    encoder.eval()
    try:
        per_target = [
            _log_probs(
                target,
                sorted({site[0] for variant in sites if variant for site in variant[k]}),
                device=device,
                batch_size=batch_size,
                progress=progress,
            )
            for k, target in enumerate(targets)
        ]
    finally:
        encoder.train(was_training)
    scores = np.full(len(mutations), np.nan)
    for row, variant in enumerate(sites):
        if variant is not None:
            strands = [
                sum(float(log_probs[p][mt] - log_probs[p][wt]) for p, wt, mt in target_sites)
                for log_probs, target_sites in zip(per_target, variant)
            ]
            scores[row] = sum(strands) / len(strands)
    return scores, problems


# ----------------------------------------------------------------------------------------------
# What the model reads: the wild type's tokens, where a mutation lands, the LM head's logits


class _Target:
    """One wild-type sequence as a model reads it.

    sequence: the cleaned wild type mutations are checked against; alphabet: letters they may
    name; tokens [T]: the model input; mask_id: the mask token; logits: [B, T] -> [B, T, V];
    sites(parsed, text): the (position, wt id, mt id) a variant changes; MutationError naming it.
    """

    sequence: str
    alphabet: str
    tokens: Tensor
    mask_id: int
    logits: Callable[[Tensor], Tensor]

    def sites(self, parsed: list[tuple[int, str, str]], text: str) -> list[Site]:  # pragma: no cover
        raise NotImplementedError


class _ProteinTarget(_Target):
    alphabet = AMINO_ACIDS

    def __init__(self, encoder: Any, wild_type: str) -> None:
        from kiban.encoders.base import read_sequence

        featurizer = _strict(encoder.featurizer)
        self.sequence, _ = read_sequence(
            wild_type,
            "wild type",
            modality="protein",
            kind="amino-acid",
            allowed=featurizer.token_ids,
            allowed_text=", ".join(featurizer.token_ids),
        )
        self.tokens = featurizer(self.sequence, item_id="wild type")["tokens"]
        _check_length(len(self.tokens) - 2, encoder.featurizer.max_length, "residues")
        self.ids = featurizer.token_ids
        self.mask_id = encoder.model.mask_idx
        size = encoder.model.alphabet_size
        self.logits = lambda batch: encoder.model(batch)["logits"][..., :size]

    def sites(self, parsed: list[tuple[int, str, str]], text: str) -> list[Site]:
        return [(index + 1, self.ids[wt], self.ids[mt]) for index, wt, mt in parsed]  # +1: BOS


class _DnaTarget(_Target):
    alphabet = NUCLEOTIDES

    def __init__(self, encoder: Any, sequence: str) -> None:
        if encoder.lm_head is None:
            raise ValueError(
                "this DNA encoder has no masked-LM head to score with: build it with mlm_head=True "
                "(or give a Hugging Face masked-LM directory)"
            )
        featurizer = _strict(encoder.featurizer)
        if getattr(featurizer, "overlapping", False) and featurizer.tokenization == "kmer":
            raise ValueError(
                "masked-marginal scoring is not defined for overlapping k-mers (DNABERT): each base "
                f"sits in {featurizer.k} tokens, so masking one leaks it through the others; use "
                "single bases or non-overlapping k-mers"
            )
        if featurizer.mask_id is None:
            raise ValueError("the DNA tokenizer has no mask token, so there is nothing to mask a base with")
        self.featurizer = featurizer
        self.sequence = sequence
        self.tokens = featurizer(sequence, item_id="wild type")["tokens"]
        self.mask_id = featurizer.mask_id
        self.logits = encoder.masked_lm_logits
        # Sequence tokens and the bases each covers; they must spell out the sequence.
        self.positions = [i for i, t in enumerate(self.tokens.tolist()) if t not in featurizer.boundary_ids]
        _check_length(len(self.positions), encoder.featurizer.max_length, "tokens")
        strings = featurizer.token_strings([int(self.tokens[i]) for i in self.positions])
        if "".join(strings) != sequence:
            raise ValueError(
                "the DNA tokenizer's tokens do not spell out the sequence base by base "
                f"(e.g. {strings[:4]}), so a base cannot be assigned to one token"
            )
        self.token_of = np.repeat(np.arange(len(strings)), [len(s) for s in strings])
        self.starts = np.cumsum([0] + [len(s) for s in strings[:-1]])
        self.strings = strings

    def sites(self, parsed: list[tuple[int, str, str]], text: str) -> list[Site]:
        changed: dict[int, list[str]] = {}
        for index, _, mt in parsed:
            token = int(self.token_of[index])
            changed.setdefault(token, list(self.strings[token]))[index - self.starts[token]] = mt
        out, mutant_tokens = [], self.tokens.clone()
        for token, letters in sorted(changed.items()):
            mutant = "".join(letters)
            mt_id = self.featurizer.vocab.get(mutant)
            if mt_id is None:
                raise MutationError(
                    "mutant token not in the vocabulary",
                    f"mutation {text!r}: the mutant token {mutant!r} is not in the tokenizer's vocabulary",
                )
            position = self.positions[token]
            out.append((position, int(self.tokens[position]), mt_id))
            mutant_tokens[position] = mt_id
        sequence = list(self.sequence)
        for index, _, mt in parsed:
            sequence[index] = mt
        if not torch.equal(self.featurizer("".join(sequence))["tokens"], mutant_tokens):
            raise MutationError(
                "mutant tokenized differently",
                f"mutation {text!r}: the tokenizer splits the mutant into different tokens than the "
                "wild type, so its tokens cannot be compared one by one",
            )
        return out


class _ReverseDnaTarget(_DnaTarget):
    """The reverse complement of a DNA wild type, fed mutations written on the forward strand."""

    def sites(self, parsed: list[tuple[int, str, str]], text: str) -> list[Site]:
        from kiban.encoders.dna import reverse_complement

        last = len(self.sequence) - 1
        flipped = [(last - index, reverse_complement(wt), reverse_complement(mt)) for index, wt, mt in parsed]
        return super().sites(flipped, text)


def _targets(encoder: Any, wild_type: str, strand: str | None) -> list[_Target]:
    """The wild type as the encoder reads it: one target, or forward and reverse for strand="both"."""
    modality = getattr(encoder, "modality", "")
    if modality == "protein":
        if strand not in (None, "forward"):
            raise ValueError(f"strand={strand!r} applies to DNA; a protein has one sequence")
        return [_ProteinTarget(encoder, wild_type)]
    if modality != "dna":
        raise ValueError(f"variant scoring needs a protein or DNA encoder, not {modality or type(encoder).__name__!r}")
    from kiban.encoders.dna import reverse_complement

    strand = strand or encoder.config.strand
    if strand not in ("forward", "both"):
        raise ValueError(f"strand must be 'forward' or 'both', got {strand!r}")
    sequence = encoder.featurizer.sequence(wild_type, item_id="wild type")
    targets: list[_Target] = [_DnaTarget(encoder, sequence)]
    if strand == "both":
        targets.append(_ReverseDnaTarget(encoder, reverse_complement(sequence)))
    return targets


def _strict(featurizer: Any) -> Any:
    """A copy of a featurizer with no length limit that never flips strands: a score reads the
    whole wild type as given (``_check_length`` refuses one longer than the model reads).
    """
    featurizer = copy.copy(featurizer)
    featurizer.truncate = False
    featurizer.max_length = sys.maxsize
    if hasattr(featurizer, "rc_augment"):
        featurizer.rc_augment = 0.0
    return featurizer


def _check_length(length: int, max_length: int, unit: str) -> None:
    if length > max_length:
        raise ValueError(
            f"the wild type is {length} {unit} long, over the model's max_length of {max_length}: score "
            "a window around the mutations instead (offset / --offset numbers its first position)"
        )


def _log_probs(
    target: _Target, positions: list[int], *, device: torch.device, batch_size: int, progress: bool
) -> dict[int, Tensor]:
    """Log-probabilities [V] at each position, masked alone in the wild type (one row per position)."""
    chunks = [positions[start : start + batch_size] for start in range(0, len(positions), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="scoring", unit="batch", leave=False)
    out: dict[int, Tensor] = {}
    for chunk in chunks:
        batch = target.tokens.repeat(len(chunk), 1)
        batch[torch.arange(len(chunk)), chunk] = target.mask_id
        logits = target.logits(batch.to(device)).float()
        for row, position in enumerate(chunk):
            out[position] = logits[row, position].log_softmax(-1).cpu()
    return out
