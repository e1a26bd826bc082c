"""Instruction records that teach the fused model molecule design (the instruct-stage recipe's data).

    molecule CSVs (MoleculeNet) + drug–target pairs (Davis / KIBA)
      -> canonical SMILES, deduplicated, split by molecule (train / val / test)
      -> per training molecule: one unconditioned record and one with property conditions it meets
      -> per strong drug–target pair: "... that binds <protein>" with the target as a protein input
      -> train.jsonl, val.jsonl (read by ``kiban fit``), train.smi / test.smi (novelty, FCD reference)

The user turn is ``design_record``'s (the exact wording and inputs ``kiban design molecules`` asks
with: the conditions in words and, by default, as a ``<properties>`` input) and the assistant turn is
the molecule's SELFIES. Conditions are the cells, between cuts at random quantiles of the training
molecules, that the molecule lies in, so every record's conditions hold for its answer and its
molecule is a draw from those that meet them: the model learns what "logP 1 to 3" means by seeing
molecules that meet it (``random_conditions``). The split is by molecule, so no test molecule is ever an
answer in training. Counts add up: read = used + rejected (by reason).
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiban.atomic import staged_folder
from kiban.design.conditions import CONDITIONED, Condition, compute_properties, random_cells
from kiban.design.molecules import design_record
from kiban.design.selfies_decoding import encode_selfies

__all__ = ["CONDITIONED", "RecipeCounts", "random_conditions", "write_design_records"]

#: Davis pKd and KIBA score at or above which a pair counts as a binder (the usual thresholds).
BINDERS = {"davis_pairs.csv": ("pKd", 7.0), "kiba_pairs.csv": ("kiba_score", 12.1)}


def random_conditions(
    values: dict[str, float], rng: random.Random, population: Mapping[str, Sequence[float]], most: int = 3
) -> list[Condition]:
    """1 to ``most`` conditions (at most one per property in ``CONDITIONED``) that ``values`` all
    meet, each cut independently of ``values``: the cells (``random_cells``) of 1 to ``most``
    properties drawn at random.

    A condition depends on the molecule only through the cell it lies in, so a record's molecule
    is a draw from the training molecules that meet its conditions: "MW at most 450" teaches MW
    anywhere below 450, not near it. (Bounds drawn within a fixed distance of the molecule's own
    value taught "near 450", and a three-part ask then pulled molecules towards its one-sided
    bounds.) A property drawn whose cell is open at both ends is not written; when that leaves no
    condition, the draw is made again.
    """
    if not 1 <= most <= len(CONDITIONED):
        raise ValueError(f"properties per record must be 1-{len(CONDITIONED)}, got {most}")
    out = random_cells(values, rng.sample(CONDITIONED, rng.randint(1, most)), rng, population)
    if not out:  # every property drawn was left with both sides open: draw again
        return random_conditions(values, rng, population, most)
    return out


@dataclass
class RecipeCounts:
    """Molecules read, used and rejected (by reason), and the records written per file."""

    read: int = 0
    used: int = 0
    rejected: Counter = field(default_factory=Counter)
    records: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """``read N = used U + rejected R (reason: k, ...)``."""
        reasons = ", ".join(f"{r}: {k}" for r, k in self.rejected.most_common())
        return f"molecules read {self.read} = used {self.used} + rejected {sum(self.rejected.values())}" + (
            f" ({reasons})" if reasons else ""
        )


def _smiles_columns(path: Path) -> Iterable[str]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        column = next((c for c in reader.fieldnames or () if c.strip().lower() in ("smiles", "mol")), None)
        if column is None:
            raise ValueError(f"{path}: no 'smiles' or 'mol' column (columns: {', '.join(reader.fieldnames or ())})")
        for row in reader:
            yield row[column].strip()


def write_design_records(
    *,
    molecule_files: Sequence[str | Path],
    dti_dir: str | Path | None,
    out: str | Path,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    max_molecules: int | None = None,
    max_target_records: int = 2000,
    max_atoms: int = 50,
    conditioned: int = 1,
    properties_per_record: int = 3,
    properties: bool = True,
) -> RecipeCounts:
    """Write the design records into the new folder ``out`` (see the module docstring).

    conditioned: records with conditions per molecule (each its own draw), beside the one without.
    properties_per_record: the most properties one conditioned record asks about (1 to 6; each
    record asks about 1 to this many, uniformly).
    properties: conditioned records also give their conditions as a ``<properties>`` input (the
    model then needs the ``properties`` encoder, as ``configs/design_cpu.yaml`` has); False writes
    the conditions as text only.

    max_atoms: molecules with more heavy atoms are left out (counted), which keeps SELFIES answers
    short enough to learn on a CPU. max_target_records: the most drug–target records (a random
    sample of the binders whose drug is in the split).
    """
    from rdkit import Chem, rdBase

    _quiet = rdBase.BlockLogs()  # noqa: F841 - rejects are counted by reason, not logged one by one
    out = Path(out)
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new folder")
    if conditioned < 0:
        raise ValueError(f"--conditioned must be 0 or more, got {conditioned}")
    if not 1 <= properties_per_record <= len(CONDITIONED):
        raise ValueError(f"--properties-per-record must be 1-{len(CONDITIONED)}, got {properties_per_record}")
    rng = random.Random(seed)
    counts = RecipeCounts()
    molecules: dict[str, tuple[str, dict[str, float]]] = {}  # canonical SMILES -> (SELFIES, properties)
    dti_dir = Path(dti_dir) if dti_dir is not None else None
    sources = [Path(p) for p in molecule_files]
    if dti_dir is not None:
        sources += [dti_dir / name for name in ("davis_drugs.csv", "kiba_drugs.csv") if (dti_dir / name).is_file()]
    for path in sources:
        if not path.is_file():
            raise FileNotFoundError(f"molecule file {path}: no such file")
        for smiles in _smiles_columns(path):
            counts.read += 1
            mol = Chem.MolFromSmiles(smiles) if smiles else None
            if mol is None:
                counts.rejected["RDKit cannot parse"] += 1
                continue
            if mol.GetNumHeavyAtoms() > max_atoms:
                counts.rejected[f"over {max_atoms} heavy atoms"] += 1
                continue
            if len(Chem.GetMolFrags(mol)) > 1:
                counts.rejected["several fragments (salt or mixture)"] += 1
                continue
            canonical = Chem.MolToSmiles(mol)
            if canonical in molecules:
                counts.rejected["duplicate"] += 1
                continue
            selfies = encode_selfies(canonical)
            if selfies is None:
                counts.rejected["SELFIES cannot encode"] += 1
                continue
            molecules[canonical] = (selfies, compute_properties(mol))
            counts.used += 1
    names = sorted(molecules)
    rng.shuffle(names)
    if max_molecules is not None and len(names) > max_molecules:
        counts.rejected["over --max-molecules"] += len(names) - max_molecules
        counts.used -= len(names) - max_molecules
        names = names[:max_molecules]
    n_test, n_val = int(len(names) * test_fraction), int(len(names) * val_fraction)
    split = {"test": names[:n_test], "val": names[n_test : n_test + n_val], "train": names[n_test + n_val :]}
    where = {s: part for part, smiles in split.items() for s in smiles}

    population = {name: sorted(molecules[s][1][name] for s in split["train"]) for name in CONDITIONED}
    records: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for part in ("train", "val"):
        for k, smiles in enumerate(split[part]):
            selfies, values = molecules[smiles]
            records[part].append(_record(f"{part}-{k}", [], selfies, properties=properties))
            for c in range(conditioned):
                suffix = "c" if c == 0 else f"c{c + 1}"
                conditions = random_conditions(values, rng, population, properties_per_record)
                records[part].append(_record(f"{part}-{k}-{suffix}", conditions, selfies, properties=properties))
    if dti_dir is not None:
        for part, items in _target_records(dti_dir, where, molecules, rng, max_target_records).items():
            records[part].extend(items)
    for items in records.values():
        rng.shuffle(items)

    with staged_folder(out) as folder:
        for part, items in records.items():
            with (folder / f"{part}.jsonl").open("w") as handle:
                for record in items:
                    handle.write(json.dumps(record) + "\n")
            counts.records[f"{part}.jsonl"] = len(items)
        for part in ("train", "test"):
            (folder / f"{part}.smi").write_text("".join(s + "\n" for s in split[part]))
            counts.records[f"{part}.smi"] = len(split[part])
        (folder / "counts.json").write_text(
            json.dumps({"read": counts.read, "used": counts.used, "rejected": dict(counts.rejected), "files": counts.records}, indent=2)
        )
    return counts


def _record(rid: str, conditions: list[Condition], selfies: str, target: str | None = None, *, properties: bool) -> dict[str, Any]:
    record = design_record(conditions, target=target, properties=properties, rid=rid)
    record["messages"].append({"role": "assistant", "content": selfies})
    return record


def _target_records(
    dti_dir: Path, where: dict[str, str], molecules: dict[str, tuple[str, dict[str, float]]], rng: random.Random, limit: int
) -> dict[str, list[dict[str, Any]]]:
    """Records for strong binders (``BINDERS``) whose drug is in the train or val split."""
    from rdkit import Chem

    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for pairs_name, (column, threshold) in BINDERS.items():
        prefix = pairs_name.split("_")[0]
        pairs, drugs, targets = (dti_dir / f"{prefix}_{kind}.csv" for kind in ("pairs", "drugs", "targets"))
        if not (pairs.is_file() and drugs.is_file() and targets.is_file()):
            continue
        with drugs.open(newline="") as handle:
            drug_smiles = {}
            for row in csv.DictReader(handle):
                mol = Chem.MolFromSmiles(row["smiles"])
                if mol is not None:
                    drug_smiles[row["drug_id"]] = Chem.MolToSmiles(mol)
        with targets.open(newline="") as handle:
            sequences = {row["target_id"]: row["sequence"] for row in csv.DictReader(handle)}
        with pairs.open(newline="") as handle:
            for row in csv.DictReader(handle):
                smiles = drug_smiles.get(row["drug_id"])
                part = where.get(smiles or "")
                if part in out and float(row[column]) >= threshold and row["target_id"] in sequences:
                    out[part].append((f"{prefix}-{row['drug_id']}-{row['target_id']}", smiles, sequences[row["target_id"]]))
    result: dict[str, list[dict[str, Any]]] = {}
    for part, pairs_list in out.items():
        rng.shuffle(pairs_list)
        cap = limit if part == "train" else max(limit // 10, 1)
        result[part] = [
            _record(f"{part}-{name}", [], molecules[smiles][0], sequence, properties=False) for name, smiles, sequence in pairs_list[:cap]
        ]
    return result
