"""The molecule pretraining evidence of docs/results.md: its pretraining set and the two models compared.

``set OUT.csv``: the pretraining set, MoleculeNet SMILES with no scaffold of the evaluated sets.

Reads lipophilicity, Tox21, BACE and SIDER from ``../shared/data/molecules`` and drops every molecule
whose Bemis-Murcko scaffold (kiban.tasks.splits.murcko_scaffold, as the finetune split computes it)
occurs anywhere in ESOL or BBBP: stricter than removing their test scaffolds, so that no split of
those sets can have a test scaffold seen in pretraining. Duplicates (canonical SMILES) are kept once;
SMILES RDKit cannot read are left for kiban pretrain to reject and count.

``models ENCODER_DIR OUT_DIR``: two saved kiban models that differ only in the molecule encoder's
weights: ``OUT_DIR/pretrained`` reads ENCODER_DIR (``kiban pretrain``'s encoder/) through
``weights_path``, ``OUT_DIR/random`` is the same architecture at random initialisation. Both carry
the tiny random backbone and projector of ``kiban finetune --model tiny``, built under the same seed,
so a head on either reads the same random fusion and only the encoder differs.

    python benchmarks/molecule_pretraining.py set OUT.csv
    python benchmarks/molecule_pretraining.py models ENCODER_DIR OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from rdkit import Chem, rdBase

from kiban.tasks.splits import murcko_scaffold

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "molecules"
SOURCES = {"lipophilicity.csv": "smiles", "tox21.csv": "smiles", "bace_classification.csv": "mol", "sider.csv": "smiles"}
EVALUATED = {"esol_delaney.csv": "smiles", "bbbp.csv": "smiles"}


def _column(name: str, column: str) -> list[str]:
    with (DATA / name).open() as handle:
        return [row[column].strip() for row in csv.DictReader(handle)]


def _scaffold(smiles: str) -> str | None:
    try:
        return murcko_scaffold(smiles)
    except ValueError:
        return None


def write_set(out: str) -> None:
    """Write OUT (one ``smiles`` column) and print what was kept and dropped."""
    rdBase.DisableLog("rdApp.*")
    excluded = {_scaffold(s) for name, column in EVALUATED.items() for s in _column(name, column)} - {None}
    kept, seen, counts = [], set(), {"read": 0, "evaluated_scaffold": 0, "duplicate": 0}
    for name, column in SOURCES.items():
        for smiles in _column(name, column):
            counts["read"] += 1
            mol = Chem.MolFromSmiles(smiles)
            key = Chem.MolToSmiles(mol) if mol is not None else smiles
            if _scaffold(smiles) in excluded:
                counts["evaluated_scaffold"] += 1
            elif key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                kept.append(smiles)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles"])
        writer.writerows([s] for s in kept)
    print(f"{len(kept)} molecules written to {out}; {counts}; {len(excluded)} ESOL/BBBP scaffolds excluded")


def write_models(encoder_dir: str, out: str) -> None:
    """Save the pretrained-encoder and random-encoder models under OUT."""
    import json

    from kiban.tiny import tiny_model

    saved = json.loads((Path(encoder_dir) / "config.json").read_text())["config"]
    architecture = {key: saved[key] for key in ("hidden_dim", "depth", "bias", "activation", "undirected", "featurizer")}
    for name, weights in (("pretrained", {"weights_path": str(Path(encoder_dir).resolve())}), ("random", {})):
        model = tiny_model(encoders={"molecule": {"config": {**architecture, **weights}}}, seed=0)
        model.save_pretrained(Path(out) / name)
        print(f"saved {Path(out) / name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["set"]:
        write_set(sys.argv[2])
    elif sys.argv[1:2] == ["models"]:
        write_models(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
