"""Molecule design with the fused model: prompt, constrained sampling, RDKit check, honest counts.

    request (n, conditions, target protein, seed)
      -> prompt (``design_record``: the same wording and inputs the training records use; the
         conditions also as a ``<properties>`` input when the model has that encoder)
      -> batches of rows through ``generate_completions`` with a ``SelfiesConstraint`` per row
      -> SELFIES -> SMILES -> RDKit (canonical SMILES, properties) -> meets the conditions?
      -> until n distinct molecules meet them, or the sampling budget is spent

Every sampled molecule is returned (``Design`` rows), with whether it met the conditions, whether it
repeats an earlier one, and whether it is a copy of a reference (training) molecule: nothing is
filtered out of sight. ``DesignReport`` gives the counts; sampled = valid + invalid (invalid stays
0 by construction and is counted anyway). Row r of a request samples with seed ``seed + r``, so the
same seed gives the same designs whatever the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiban.design.conditions import Condition, check_reachable, compute_properties, meets
from kiban.design.selfies_decoding import SelfiesConstraint, decode_selfies, default_alphabet
from kiban.fusion.generation import (
    GenerationSettings,
    Guidance,
    PromptTooLong,
    RowHooks,
    check_guidance_scale,
    generate_completions,
)

__all__ = [
    "Design",
    "DesignReport",
    "Reference",
    "canonical_smiles",
    "design_molecules",
    "design_prompt",
    "design_record",
    "read_smiles_file",
]

#: The instruction the model is trained on and asked with (conditions and target are appended).
TASK = "Design a drug-like molecule"


def design_prompt(conditions: Sequence[Condition] = (), *, target: bool = False, properties: bool = False) -> str:
    """The user turn asking for one molecule: ``Design a drug-like molecule that binds <protein>
    with logP 1 to 3, MW at most 450. Answer in SELFIES.`` With ``properties`` (and conditions), the
    conditions are also given as a ``<properties>`` input: ``... MW at most 450 <properties>. ...``
    """
    text = TASK
    if target:
        text += " that binds <protein>"
    if conditions:
        text += " with " + ", ".join(c.text() for c in conditions)
        if properties:
            text += " <properties>"
    return text + ". Answer in SELFIES."


def design_record(
    conditions: Sequence[Condition] = (), *, target: str | None = None, properties: bool = False, rid: str = "design"
) -> dict[str, Any]:
    """The fused-model record asking for one molecule (``design_prompt``, with its inputs bound).

    target: a protein sequence, bound to ``<protein>``. properties: also bind the conditions to a
    ``<properties>`` input (``kiban.encoders.properties``), the numbers as numbers; the training
    records and ``design_molecules`` do so exactly when the model has that encoder.
    """
    properties = properties and bool(conditions)
    record: dict[str, Any] = {
        "id": rid,
        "messages": [{"role": "user", "content": design_prompt(conditions, target=target is not None, properties=properties)}],
    }
    inputs: dict[str, list[Any]] = {}
    if target is not None:
        inputs["protein"] = [target]
    if properties:
        inputs["properties"] = [", ".join(c.text() for c in conditions)]
    if inputs:
        record["inputs"] = inputs
    return record


def canonical_smiles(smiles: str) -> str | None:
    """RDKit's canonical SMILES, or None when RDKit cannot parse it (or it is empty)."""
    from rdkit import Chem, rdBase

    if not smiles:
        return None
    _quiet = rdBase.BlockLogs()  # noqa: F841 - RDKit logs nothing while it lives (sampled oddities are counted, not logged)
    mol = Chem.MolFromSmiles(smiles)
    return Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() else None


def read_smiles_file(path: str | Path, *, what: str = "--reference") -> list[str]:
    """SMILES from a ``.smi``/``.txt`` file (first field of each line) or a CSV with a ``smiles`` column."""
    import csv

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            column = next((c for c in reader.fieldnames or () if c.strip().lower() in ("smiles", "mol")), None)
            if column is None:
                raise ValueError(f"{what} {path}: no 'smiles' column (columns: {', '.join(reader.fieldnames or ())})")
            return [row[column].strip() for row in reader if row[column].strip()]
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class Reference:
    """The molecules designs are compared with (the training set): novelty, copies, reachable ranges."""

    smiles: frozenset[str]
    ranges: dict[str, tuple[float, float]]
    size: int
    symbols: frozenset[str] = frozenset()

    @classmethod
    def from_smiles(cls, smiles: Iterable[str]) -> "Reference":
        """Canonicalise, compute property ranges and SELFIES symbols; unparsable SMILES are skipped."""
        import selfies as sf
        from rdkit import Chem

        canonical, values, symbols = set(), {}, set()
        for text in smiles:
            mol = Chem.MolFromSmiles(text)
            if mol is None or not mol.GetNumAtoms():
                continue
            smi = Chem.MolToSmiles(mol)
            canonical.add(smi)
            for name, value in compute_properties(mol).items():
                values.setdefault(name, []).append(value)
            try:
                symbols.update(sf.split_selfies(sf.encoder(smi)))
            except sf.EncoderError:
                pass
        if not canonical:
            raise ValueError("the reference set holds no molecule RDKit can parse")
        ranges = {name: (min(v), max(v)) for name, v in values.items()}
        return cls(frozenset(canonical), ranges, len(canonical), frozenset(symbols))


@dataclass
class Design:
    """One sampled molecule: SELFIES and canonical SMILES (None if invalid), properties and flags."""

    index: int
    selfies: str
    smiles: str | None
    properties: dict[str, float]
    meets: bool
    duplicate: bool
    in_reference: bool | None
    finish_reason: str


@dataclass
class DesignReport:
    """What a design request produced: every sampled molecule, and the counts over them."""

    requested: int
    conditions: list[Condition]
    designs: list[Design] = field(default_factory=list)
    budget: int = 0

    @property
    def sampled(self) -> int:
        """Molecules sampled (= valid + invalid)."""
        return len(self.designs)

    @property
    def valid(self) -> int:
        """Sampled molecules RDKit parses."""
        return sum(d.smiles is not None for d in self.designs)

    @property
    def invalid(self) -> int:
        """Sampled molecules RDKit does not parse (0 by construction; counted to prove it)."""
        return self.sampled - self.valid

    @property
    def duplicates(self) -> int:
        """Valid molecules that repeat an earlier one of this request."""
        return sum(d.duplicate for d in self.designs)

    @property
    def in_reference(self) -> int:
        """Distinct valid molecules that are copies of a reference (training) molecule."""
        return sum(bool(d.in_reference) for d in self.designs if not d.duplicate)

    @property
    def met(self) -> list[Design]:
        """Distinct valid molecules that meet every condition (the designs asked for)."""
        return [d for d in self.designs if d.meets and not d.duplicate]

    def summary(self) -> dict[str, Any]:
        """The counts as plain values (CLI summary line, API response, benchmark rows)."""
        return {
            "requested": self.requested,
            "sampled": self.sampled,
            "budget": self.budget,
            "valid": self.valid,
            "invalid": self.invalid,
            "duplicates": self.duplicates,
            "unique": self.valid - self.duplicates,
            "in_training_set": self.in_reference,
            "met_conditions": len(self.met),
            "met_fraction": round(len(self.met) / max(self.valid - self.duplicates, 1), 4),
            "conditions": [c.text() for c in self.conditions],
        }


def design_molecules(
    model: Any,
    *,
    n: int,
    conditions: Sequence[Condition] = (),
    target: str | None = None,
    reference: Reference | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_symbols: int = 100,
    max_tokens: int | None = None,
    budget: int | None = None,
    batch_size: int = 16,
    guidance: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
) -> DesignReport:
    """Sample molecules from ``model`` (a ``KibanModel``) until ``n`` distinct ones meet ``conditions``.

    target: a protein sequence given to the model as a ``<protein>`` input. reference: the training
    set (novelty, copies, the ranges impossible conditions are refused against). budget: the most
    molecules sampled (default ``20 * n``); the loop never runs past it, so a condition too hard for
    the model ends with fewer than ``n`` designs and says so in the counts. max_symbols bounds each
    molecule's length in SELFIES symbols (the default, 100, is above the longest training molecule
    of ``kiban design records``: 95 symbols at 50 heavy atoms). max_tokens caps the backbone tokens
    per molecule (default: enough for max_symbols, within the backbone's context); a row cut by it
    keeps its finished symbols, with finish_reason "length". guidance: the classifier-free guidance
    scale (``kiban.fusion.generation.Guidance``) against the same request without conditions or
    target; 1 (the default) samples the model as it is, above 1 follows the request more strongly.
    Raises ``ConditionError`` (refused before sampling) and the model's ``InvalidInput`` for a bad target.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    budget = budget if budget is not None else 20 * n
    if budget < n:
        raise ValueError(f"--budget {budget} is smaller than --n {n}")
    check_guidance_scale(guidance, what="--guidance")
    if reference is not None:
        check_reachable(conditions, reference.ranges, size=reference.size)
    if target is not None and "protein" not in model.encoders:
        raise ValueError(f"--target: this model has no protein encoder to read a target with ({', '.join(model.encoders)})")
    alphabet = default_alphabet(reference.symbols if reference is not None else ())
    constraint = SelfiesConstraint(model.tokenizer, alphabet, max_symbols=max_symbols)
    tokens = max_tokens if max_tokens is not None else constraint.max_tokens()
    record = design_record(conditions, target=target, properties="properties" in model.encoders)
    guide = None
    if guidance != 1.0 and (conditions or target is not None):
        guide = Guidance(design_record(rid="design (unconditioned, for guidance)"), guidance)
    report = DesignReport(requested=n, conditions=list(conditions), budget=budget)
    seen: set[str] = set()
    while len(report.met) < n and report.sampled < budget:
        if should_stop is not None and should_stop():
            break
        rows = min(batch_size, budget - report.sampled)
        start = report.sampled
        settings = [
            GenerationSettings(max_tokens=tokens, temperature=temperature, top_p=top_p, seed=seed + start + r)
            for r in range(rows)
        ]
        hooks = [RowHooks(process_logits=constraint, should_stop=should_stop) for _ in range(rows)]
        try:
            completions = generate_completions(model, [record] * rows, settings, hooks, [guide] * rows)
        except PromptTooLong as error:
            if max_tokens is not None or error.context - error.prompt_tokens < 1:
                raise  # the caller's own cap, or no room at all: the error names the numbers
            tokens = error.context - error.prompt_tokens  # the derived budget shrinks to the context
            continue
        for r, completion in enumerate(completions):
            selfies = constraint.text_of(completion.text)
            reason = completion.finish_reason
            if reason == "stop" and constraint.at_max_symbols(selfies):
                reason = "length"  # ended because max_symbols allowed nothing else
            report.designs.append(_judge(start + r, selfies, reason, conditions, reference, seen))
    return report


def _judge(
    index: int, selfies: str, finish_reason: str, conditions: Sequence[Condition], reference: Reference | None, seen: set[str]
) -> Design:
    from rdkit import Chem, rdBase

    smiles = canonical_smiles(decode_selfies(selfies))
    _quiet = rdBase.BlockLogs()  # noqa: F841
    if smiles is None:
        return Design(index, selfies, None, {}, False, False, None, finish_reason)
    values = compute_properties(Chem.MolFromSmiles(smiles))
    duplicate = smiles in seen
    seen.add(smiles)
    in_reference = None if reference is None else smiles in reference.smiles
    return Design(index, selfies, smiles, values, meets(values, conditions), duplicate, in_reference, finish_reason)
