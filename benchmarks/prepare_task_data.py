"""Turn the shared real data (``../shared/data``) into the tables ``kiban finetune`` reads, for the
protein / dna / image / text rows of docs/results.md and the end-to-end tests.

    python benchmarks/prepare_task_data.py OUT [--rows N]

Writes into OUT (never into the repository; the data stay where they are):

    enzyme_class.csv    CLEAN split10 Swiss-Prot enzymes: Entry, sequence, ec_class (the first EC
                        digit; entries whose ECs disagree on it are left out)
    blactamase.csv      TEM-1 β-lactamase DMS: id, mutation, sequence, fitness, position (the mutated
                        residue, for a split that holds positions out whole)
    promoters.csv       the iPromoter-2L benchmark as it is (id, label, sequence): no copy, a path
    pubmedqa.csv        pmid, text (question + abstract without its conclusion), final_decision
    chemprot.csv        one row per distinct (chemical, relation, protein) triple in the ChemProt
                        set, relations mapped to the five evaluated ChemProt groups (CPR:3 up,
                        CPR:4 down, CPR:5 agonist, CPR:6 antagonist, CPR:9 substrate; the others
                        dropped): abstract, text (chemical | protein | the sentence naming both,
                        else the chemical's), label
    bc5cdr_tags.csv     BC5CDR abstracts with entity spans ``[[start, end, "Chemical" | "Disease"], ...]``:
                        the file holds the gold (chemical, disease) pair names, not mention offsets,
                        so every case-insensitive whole-word occurrence of a gold name in its
                        abstract is tagged (longest first, no overlaps). Mentions of entities in no
                        gold pair stay untagged: the labels are partial, the same for head and
                        baseline.
The microscopy crops are read in place (crops_labels.csv). ``--rows N`` keeps a seeded N rows of each.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CHEMPROT_GROUPS = {
    "upregulator": "CPR:3", "activator": "CPR:3", "indirect-upregulator": "CPR:3",
    "downregulator": "CPR:4", "inhibitor": "CPR:4", "indirect-downregulator": "CPR:4",
    "agonist": "CPR:5", "agonist-activator": "CPR:5", "agonist-inhibitor": "CPR:5",
    "antagonist": "CPR:6",
    "substrate": "CPR:9", "product-of": "CPR:9", "substrate_product-of": "CPR:9",
}  # fmt: skip


def _rows(frame: pd.DataFrame, rows: int | None, seed: int = 0) -> pd.DataFrame:
    if rows is None or rows >= len(frame):
        return frame
    return frame.sample(n=rows, random_state=seed).sort_index()


def enzyme_class(shared: Path, rows: int | None = None, *, max_length: int = 1000) -> pd.DataFrame:
    """CLEAN split10 enzymes with their top-level EC class."""
    table = pd.read_csv(shared / "protein/sequences/enzyme_ec_clean_split10_train.tsv", sep="\t")
    first = table["EC number"].astype(str).str.split(";").map(lambda ecs: {ec.strip().split(".")[0] for ec in ecs})
    table = table[(first.map(len) == 1) & (table["Sequence"].str.len() <= max_length)].copy()
    table["ec_class"] = first[table.index].map(lambda s: f"EC {next(iter(s))}")
    out = table.rename(columns={"Sequence": "sequence"})[["Entry", "sequence", "ec_class"]]
    return _rows(out, rows)


def blactamase(shared: Path, rows: int | None = None) -> pd.DataFrame:
    """TEM-1 DMS fitness with the mutated position."""
    table = pd.read_csv(shared / "protein/sequences/beta_lactamase_P62593_dms.csv")
    table["position"] = table["mutation"].str.extract(r"(\d+)")[0].astype(int)
    return _rows(table[["id", "mutation", "sequence", "fitness", "position"]], rows)


def pubmedqa(shared: Path, rows: int | None = None) -> pd.DataFrame:
    """PubMedQA expert set: question + context as one passage, yes / no / maybe."""
    table = pd.read_csv(shared / "text/pubmedqa_pqal_1k.csv")
    table["text"] = table["question"].str.strip() + " " + table["context"].str.strip()
    return _rows(table[["pmid", "text", "final_decision"]], rows)


def chemprot(shared: Path, rows: int | None = None) -> pd.DataFrame:
    """One row per distinct ChemProt triple of an evaluated group."""
    table = pd.read_csv(shared / "text/chemprot_relations_767.csv")
    out = []
    for abstract, (text, raw) in enumerate(zip(table["text"], table["relations_raw"])):
        sentences = re.split(r"(?<=[.!?])\s+", str(text))
        seen = set()
        for chemical, relation, protein in re.findall(r"\(([^()]*?(?:\([^()]*\)[^()]*?)*), ([\w-]+), ([^()]*?(?:\([^()]*\)[^()]*?)*)\)", str(raw)):
            group = CHEMPROT_GROUPS.get(relation.strip().lower())
            key = (chemical.lower(), protein.lower(), group)
            if group is None or key in seen:
                continue
            seen.add(key)
            both = [s for s in sentences if chemical.lower() in s.lower() and protein.lower() in s.lower()]
            either = [s for s in sentences if chemical.lower() in s.lower()]
            context = (both or either or sentences[:1])[0]
            out.append({"abstract": abstract, "text": f"{chemical} | {protein} | {context}", "label": group})
    return _rows(pd.DataFrame(out), rows)


def bc5cdr_tags(shared: Path, rows: int | None = None) -> pd.DataFrame:
    """BC5CDR abstracts with the spans of their gold chemical and disease names."""
    table = pd.read_csv(shared / "text/bc5cdr_chemical_disease_500.csv")
    out = []
    for k, (text, pairs) in enumerate(zip(table["text"].astype(str), table["pairs_json"])):
        names = {}
        for chemical, disease in json.loads(pairs):
            names.setdefault(chemical.strip().lower(), "Chemical")
            names.setdefault(disease.strip().lower(), "Disease")
        taken = np.zeros(len(text), dtype=bool)
        spans = []
        for name in sorted((n for n in names if n), key=len, reverse=True):
            for match in re.finditer(r"(?<!\w)" + re.escape(name) + r"(?!\w)", text.lower()):
                start, end = match.span()
                if not taken[start:end].any():
                    taken[start:end] = True
                    spans.append([start, end, names[name]])
        out.append({"id": f"bc5cdr-{k}", "text": text, "entities": json.dumps(sorted(spans))})
    return _rows(pd.DataFrame(out), rows)


def promoters(shared: Path, rows: int | None = None) -> pd.DataFrame:
    """The promoter benchmark's id, label and sequence."""
    table = pd.read_csv(shared / "dna/ecoli_promoters_iPromoter2L_benchmark.csv")
    return _rows(table[["id", "label", "sequence"]], rows)


def write_all(out: Path, *, shared: Path = SHARED, rows: int | None = None) -> dict[str, Path]:
    """Write every prepared table into ``out``; returns name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, build in (
        ("enzyme_class", enzyme_class),
        ("blactamase", blactamase),
        ("promoters", promoters),
        ("pubmedqa", pubmedqa),
        ("chemprot", chemprot),
        ("bc5cdr_tags", bc5cdr_tags),
    ):
        paths[name] = out / f"{name}.csv"
        build(shared, rows).to_csv(paths[name], index=False)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    for name, path in write_all(args.out, rows=args.rows).items():
        print(f"{name}: {len(pd.read_csv(path))} rows -> {path}")
