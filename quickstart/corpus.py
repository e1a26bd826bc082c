"""The quickstart's instruction corpus, built from real data that installed packages ship.

Every example says where it came from (``source`` in each JSONL record, and ``SOURCES.md`` beside
the corpus):

* cells: scanpy's ``pbmc68k_reduced`` (700 PBMCs from 10x Genomics' Fresh 68k PBMCs, Zheng et
  al. 2017, with their annotated ``bulk_labels``); the file is copied into the corpus folder and
  each record refers to one cell by row (``raw.X``, log-normalised expression of 765 genes);
* molecules: the NCI open-database molecules in RDKit's ``Data/NCI/first_5K.smi``, with
  properties RDKit computes (molecular weight, Crippen logP, TPSA, H-bond donors/acceptors, rings);
* images: scikit-image's bundled microscopy images, ``cell.png`` (a quantitative phase image of a
  cell floating in saline, CC0) and ``ihc.png`` (immunohistochemistry of colonic glands, FHL2
  revealed with DAB on a haematoxylin counterstain), cut into crops;
* proteins and DNA: from the user's FASTA files, when given (the header's description is the
  answer for proteins; length and GC content for DNA).

Nothing the task heads are scored on is in the corpus: the cell-type head's test cells (the
``random_split`` that ``kiban finetune`` makes for the same file and seed) are left out, and the
molecular-property head reads NCI molecules disjoint from the corpus's (checked by canonical SMILES).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CorpusPlan", "build_corpus", "nci_smiles_path", "pbmc_path"]

PBMC_FILE = "pbmc68k_reduced.h5ad"
PROPERTY = "logP"  # the molecular-property head's target: Wildman–Crippen logP as RDKit computes it


def pbmc_path() -> Path:
    """The bundled pbmc68k_reduced h5ad (from scanpy's package data)."""
    import scanpy

    return Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"


def nci_smiles_path() -> Path:
    """The bundled NCI SMILES file (from RDKit's package data)."""
    import rdkit

    return Path(os.path.dirname(rdkit.__file__)) / "Data" / "NCI" / "first_5K.smi"


def _skimage_image(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


@dataclass
class CorpusPlan:
    """How much of each source goes in. ``molecules``: NCI molecules in the corpus;
    ``head_molecules``: other NCI molecules for the molecular-property head; ``image_crops`` per
    image; ``val_fraction``: records held for the align stage's validation loss.
    """

    molecules: int = 600
    head_molecules: int = 400
    image_crops: int = 24
    max_sequences: int = 200
    val_fraction: float = 0.05
    seed: int = 0
    proteins: Path | None = None
    dna: Path | None = None


@dataclass
class Corpus:
    folder: Path
    counts: dict[str, int] = field(default_factory=dict)  # records by modality
    train: int = 0
    val: int = 0
    held_out_cells: list[str] = field(default_factory=list)
    rejected: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": {"train": self.train, "val": self.val},
            "by_modality": dict(sorted(self.counts.items())),
            "held_out_cells": len(self.held_out_cells),
            "rejected_user_records": self.rejected,
        }


def build_corpus(folder: Path, plan: CorpusPlan) -> Corpus:
    """Write ``train.jsonl``, ``val.jsonl``, ``SOURCES.md``, the copied h5ad, image crops and
    ``molecules.csv`` (the head's molecules with their property) into ``folder`` (new or empty).
    """
    from kiban.data import rejects_log

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty: the corpus is built into a new folder")
    rng = random.Random(plan.seed)
    records: list[dict[str, Any]] = []
    corpus = Corpus(folder)
    cells, corpus.held_out_cells = _cell_records(folder, plan.seed, rng)
    records += cells
    molecules, head_rows = _molecule_records(plan, rng)
    records += molecules
    records += _image_records(folder, plan, rng)
    with rejects_log(folder) as rejects:
        if plan.proteins is not None:
            records += _protein_records(plan.proteins, plan.max_sequences, rng, rejects)
        if plan.dna is not None:
            records += _dna_records(plan.dna, plan.max_sequences, rng, rejects)
        corpus.rejected = rejects.report().rejected
    with (folder / "molecules.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "smiles", PROPERTY])
        writer.writerows(head_rows)
    for record in records:
        modality = next(iter(record["inputs"]))
        corpus.counts[modality] = corpus.counts.get(modality, 0) + 1
    rng.shuffle(records)
    n_val = max(1, round(len(records) * plan.val_fraction))
    for name, part in (("val", records[:n_val]), ("train", records[n_val:])):
        with (folder / f"{name}.jsonl").open("w") as handle:
            for record in part:
                handle.write(json.dumps(record) + "\n")
    corpus.val, corpus.train = n_val, len(records) - n_val
    (folder / "SOURCES.md").write_text(_sources(corpus, plan))
    return corpus


# ----------------------------------------------------------------------------------------------
# Cells


_CELL_QUESTIONS = (
    "Which cell type is <cell>?",
    "<cell> This is a peripheral blood mononuclear cell. What type is it?",
    "Name the cell type of <cell>.",
)


def corpus_cell_rows(n_cells: int, seed: int) -> list[int]:
    """The pbmc68k_reduced rows the corpus (and anything fitted for the model) may use: all but the
    test cells of the ``random_split`` that ``kiban finetune`` makes for the same file and seed.
    """
    from kiban.tasks.splits import random_split

    test = set(random_split(n_cells, seed=seed).test.tolist())
    return [row for row in range(n_cells) if row not in test]


def _cell_records(folder: Path, seed: int, rng: random.Random) -> tuple[list[dict], list[str]]:
    import anndata

    shutil.copyfile(pbmc_path(), folder / PBMC_FILE)
    adata = anndata.read_h5ad(folder / PBMC_FILE, backed="r")
    try:
        names = [str(n) for n in adata.obs_names]
        labels = [str(v) for v in adata.obs["bulk_labels"]]
        genes = adata.obs["n_genes"].to_numpy() if "n_genes" in adata.obs else None
    finally:
        adata.file.close()
    rows = corpus_cell_rows(len(names), seed)
    records = []
    for row in rows:
        name, label = names[row], labels[row]
        cell = {"h5ad": PBMC_FILE, "row": row, "use_raw": True}
        records.append(
            _record(
                f"pbmc:{name}",
                rng.choice(_CELL_QUESTIONS),
                f"{label}.",
                {"cell": [cell]},
                f"scanpy pbmc68k_reduced row {row} (obs bulk_labels)",
            )
        )
        if genes is not None and rng.random() < 0.3:
            records.append(
                _record(
                    f"pbmc:{name}:genes",
                    "How many genes does <cell> express?",
                    f"About {int(genes[row])} genes.",
                    {"cell": [cell]},
                    f"scanpy pbmc68k_reduced row {row} (obs n_genes)",
                )
            )
    kept = set(rows)
    return records, [name for row, name in enumerate(names) if row not in kept]


# ----------------------------------------------------------------------------------------------
# Molecules


def molecule_properties(mol: Any) -> dict[str, float]:
    from rdkit.Chem import Crippen, Descriptors, Lipinski, rdMolDescriptors

    return {
        "MW": Descriptors.MolWt(mol),
        PROPERTY: Crippen.MolLogP(mol),
        "TPSA": rdMolDescriptors.CalcTPSA(mol),
        "HBD": Lipinski.NumHDonors(mol),
        "HBA": Lipinski.NumHAcceptors(mol),
        "rings": rdMolDescriptors.CalcNumRings(mol),
    }


_MOLECULE_ANSWERS = (
    ("What is the molecular weight of <molecule>?", "{MW:.1f} g/mol."),
    ("Estimate the octanol–water partition coefficient (logP) of <molecule>.", "logP is about {logP:.2f}."),
    ("What is the topological polar surface area of <molecule>?", "{TPSA:.1f} Å²."),
    (
        "How many hydrogen-bond donors and acceptors does <molecule> have?",
        "{HBD} donors and {HBA} acceptors.",
    ),
    ("How many rings does <molecule> have?", "{rings} rings."),
)


def _molecule_records(plan: CorpusPlan, rng: random.Random) -> tuple[list[dict], list[list[Any]]]:
    """Corpus records for the first ``plan.molecules`` parseable NCI molecules; the next
    ``plan.head_molecules`` (no canonical SMILES shared with the corpus) for the property head.
    """
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # the NCI file has a few molecules RDKit warns about
    seen: set[str] = set()
    corpus, head = [], []
    with nci_smiles_path().open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if len(head) >= plan.head_molecules:
                break
            parts = line.split()
            mol = Chem.MolFromSmiles(parts[0]) if parts else None
            if mol is None:
                continue
            canonical = Chem.MolToSmiles(mol)
            if canonical in seen:
                continue
            seen.add(canonical)
            name = f"NCI-{parts[1]}" if len(parts) > 1 else f"NCI-line{line_no}"
            values = molecule_properties(mol)
            if len(corpus) < plan.molecules:
                question, answer = rng.choice(_MOLECULE_ANSWERS)
                corpus.append(
                    _record(
                        name,
                        question,
                        answer.format(**values),
                        {"molecule": [parts[0]]},
                        f"RDKit Data/NCI/first_5K.smi line {line_no}; property computed by RDKit",
                    )
                )
            else:
                head.append([name, parts[0], round(values[PROPERTY], 4)])
    return corpus, head


# ----------------------------------------------------------------------------------------------
# Images


_IMAGES = {
    "cell.png": (
        "A quantitative phase image of a single cell floating in saline (digital holography).",
        "scikit-image data cell.png (Müller et al., CC0)",
    ),
    "ihc.png": (
        "Immunohistochemistry of colonic glands: FHL2 revealed with brown DAB on a blue haematoxylin counterstain.",
        "scikit-image data ihc.png (CMMI, no known copyright restrictions)",
    ),
}
_IMAGE_QUESTIONS = ("What does <image> show?", "Describe the microscopy image <image>.")


def _image_records(folder: Path, plan: CorpusPlan, rng: random.Random) -> list[dict]:
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    records = []
    np_rng = np.random.default_rng(plan.seed)
    for name, (caption, source) in _IMAGES.items():
        pixels = np.asarray(Image.open(_skimage_image(name)))
        height, width = pixels.shape[:2]
        size = min(256, height, width)
        for k in range(plan.image_crops):
            top = int(np_rng.integers(0, height - size + 1))
            left = int(np_rng.integers(0, width - size + 1))
            crop = pixels[top : top + size, left : left + size]
            if k % 2:
                crop = crop[:, ::-1]
            if crop.ndim == 2:  # grayscale: the same intensities in 3 channels for an RGB encoder
                crop = np.stack([crop] * 3, axis=-1)
            relative = f"images/{Path(name).stem}_{k:02d}.png"
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / relative)
            records.append(
                _record(
                    f"{Path(name).stem}:{k}",
                    rng.choice(_IMAGE_QUESTIONS),
                    caption,
                    {"image": [relative]},
                    f"{source}, crop {size}x{size} at ({top}, {left})" + (", mirrored" if k % 2 else ""),
                )
            )
    return records


# ----------------------------------------------------------------------------------------------
# The user's sequences


def _protein_records(path: Path, limit: int, rng: random.Random, rejects: Any) -> list[dict]:
    from kiban.data.sequences import read_fasta

    descriptions = _fasta_descriptions(path)
    records = []
    for record in read_fasta(path, modality="protein", rejects=rejects):
        if len(records) >= limit:
            break
        sequence = str(getattr(record.item, "seq", record.item))  # the reader yields SeqRecords
        description = descriptions.get(record.id, "")
        answer = _protein_answer(description) or f"A protein of {len(sequence)} residues."
        records.append(
            _record(
                f"protein:{record.id}",
                rng.choice(("What protein is <protein>?", "<protein> Which protein is this?")),
                answer,
                {"protein": [sequence]},
                f"your file {path} ({record.location})",
            )
        )
    return records


def _dna_records(path: Path, limit: int, rng: random.Random, rejects: Any) -> list[dict]:
    from kiban.data.sequences import read_fasta

    records = []
    for record in read_fasta(path, modality="dna", rejects=rejects):
        if len(records) >= limit:
            break
        sequence = str(getattr(record.item, "seq", record.item)).upper()
        gc = 100.0 * sum(base in "GC" for base in sequence) / max(1, len(sequence))
        records.append(
            _record(
                f"dna:{record.id}",
                "What are the length and GC content of <dna>?",
                f"{len(sequence)} bases, {gc:.0f}% GC.",
                {"dna": [sequence]},
                f"your file {path} ({record.location})",
            )
        )
    return records


def _fasta_descriptions(path: Path) -> dict[str, str]:
    import gzip

    from Bio import SeqIO

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as handle:
            return {r.id: r.description for r in SeqIO.parse(handle, "fasta")}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}  # the reader reports what is wrong with the file


def _protein_answer(description: str) -> str:
    """``sp|P69905|HBA_HUMAN Hemoglobin subunit alpha OS=Homo sapiens OX=9606`` -> "Hemoglobin
    subunit alpha, from Homo sapiens." (UniProt style); other headers: the text after the id.
    """
    words = description.split(maxsplit=1)
    if len(words) < 2:
        return ""
    text = words[1]
    name, _, rest = text.partition(" OS=")
    organism = rest.split(" OX=")[0].split(" GN=")[0].strip()
    return f"{name.strip()}, from {organism}." if organism else f"{name.strip()}."


# ----------------------------------------------------------------------------------------------


def _record(record_id: str, question: str, answer: str, inputs: dict, source: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
        "inputs": inputs,
        "source": source,
    }


def _sources(corpus: Corpus, plan: CorpusPlan) -> str:
    from importlib.metadata import version

    counts = ", ".join(f"{m}: {n}" for m, n in sorted(corpus.counts.items()))
    lines = [
        "# Where the quickstart corpus comes from",
        "",
        f"Records: {corpus.train} train, {corpus.val} validation ({counts}). Seed {plan.seed}.",
        "Each record in train.jsonl / val.jsonl names its own source in its `source` field.",
        "",
        f"- **cells**: `{PBMC_FILE}`, a copy of scanpy {version('scanpy')}'s bundled pbmc68k_reduced",
        "  (700 PBMCs from 10x Genomics' Fresh 68k PBMCs, Zheng et al. 2017, Nat. Commun. 8:14049;",
        "  `raw.X` = log-normalised expression of 765 genes; answers from `obs['bulk_labels']` and",
        f"  `obs['n_genes']`). The {len(corpus.held_out_cells)} cells the cell-type head is tested on are",
        "  not in the corpus.",
        f"- **molecules**: RDKit {version('rdkit')}'s `Data/NCI/first_5K.smi` (NCI open database),",
        "  answers computed by RDKit (MolWt, Crippen MolLogP, TPSA, Lipinski donors/acceptors, rings).",
        f"  `molecules.csv`: {plan.head_molecules} further NCI molecules (none in the corpus) with",
        f"  their {PROPERTY}, for the molecular-property head.",
        f"- **images**: scikit-image {version('scikit-image')}'s `data/cell.png` (quantitative phase image",
        "  of a cell in saline; Müller et al., CC0) and `data/ihc.png` (immunohistochemistry of",
        "  colonic glands, CMMI), cut into crops under `images/`.",
    ]
    if plan.proteins is not None:
        lines.append(f"- **proteins**: your file `{plan.proteins}` (answers from the FASTA descriptions).")
    if plan.dna is not None:
        lines.append(f"- **DNA**: your file `{plan.dna}` (answers: length and GC content).")
    return "\n".join(lines) + "\n"
