"""Protein and DNA tokenization side by side: kiban's byte-table featurizers vs fair-esm and Hugging Face.

Proteins: the 7,757 Swiss-Prot enzymes of ``../shared/data/protein/sequences/
enzyme_ec_clean_split10_train.tsv`` (cropped to 1,022 residues, ESM-2's limit), in batches of
--batch-size, all three producing the same ESM-1b alphabet tokens ([B, T] int64, <cls> ... <eos>,
<pad> padding):

    kiban        ProteinFeaturizer per sequence + collate, over length-bucketed batches
                 (``kiban.data.batching.length_bucketed_batches``)
    fair-esm     ``alphabet.get_batch_converter()`` over batches in file order (as esm's scripts batch)
    HF           ``EsmTokenizer`` over the same vocabulary (esm's ``all_toks`` as vocab.txt),
                 ``tokenizer(batch, padding=True)``, batches in file order

DNA: the 5,720 81-bp E. coli promoters (``../shared/data/dna``), kiban's DnaFeaturizer (6-mers,
non-overlapping, and single bases) per sequence + collate.

Each tokenizer runs --rounds times, alternating, and the best round counts (background load on a
shared machine only ever slows a round). Reported: sequences/s, residues/s and the share of real
tokens among padded ones. Nothing is asserted.

    .venv/bin/python benchmarks/sequence_tokenization.py [--batch-size 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _column(path: Path, column: str, delimiter: str = ",") -> list[str]:
    with path.open() as handle:
        return [row[column] for row in csv.DictReader(handle, delimiter=delimiter)]


def _best(rounds: int, runs: dict) -> dict:
    """Map name -> (best seconds, real tokens / padded tokens) over ``rounds`` alternating rounds."""
    best: dict = {}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            real, padded = run()
            seconds = time.perf_counter() - started
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, real / padded)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import esm
    import torch
    from transformers import EsmTokenizer

    from kiban.data.batching import length_bucketed_batches
    from kiban.encoders.dna import DnaFeaturizer
    from kiban.encoders.protein import ProteinFeaturizer

    torch.set_num_threads(1)
    proteins = [
        s[:1022] for s in _column(SHARED / "protein/sequences/enzyme_ec_clean_split10_train.tsv", "Sequence", "\t")
    ]
    residues = sum(map(len, proteins))
    size = args.batch_size
    in_order = [list(range(i, min(i + size, len(proteins)))) for i in range(0, len(proteins), size)]
    bucketed = length_bucketed_batches([len(p) for p in proteins], batch_size=size, seed=0)

    kiban = ProteinFeaturizer()
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    converter = alphabet.get_batch_converter()
    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    vocab.write_text("\n".join(alphabet.all_toks) + "\n")
    hf = EsmTokenizer(str(vocab))

    def run_kiban(batches=bucketed):
        real = padded = 0
        for batch in batches:
            tokens = kiban.collate([kiban(proteins[i]) for i in batch])["tokens"]
            real += int((tokens != kiban.padding_idx).sum())
            padded += tokens.numel()
        return real, padded

    def run_esm():
        real = padded = 0
        for batch in in_order:
            _, _, tokens = converter([(str(i), proteins[i]) for i in batch])
            real += int((tokens != alphabet.padding_idx).sum())
            padded += tokens.numel()
        return real, padded

    def run_hf():
        real = padded = 0
        for batch in in_order:
            tokens = hf([proteins[i] for i in batch], padding=True, return_tensors="pt")["input_ids"]
            real += int((tokens != hf.pad_token_id).sum())
            padded += tokens.numel()
        return real, padded

    # the three agree token for token on a batch (same alphabet, same specials)
    sample = [proteins[i] for i in in_order[0]]
    ours = kiban.collate([kiban(s) for s in sample])["tokens"]
    assert torch.equal(ours, converter([("", s) for s in sample])[2]), "kiban and fair-esm tokens differ"
    assert torch.equal(ours, hf(sample, padding=True, return_tensors="pt")["input_ids"]), "kiban and HF differ"

    best = _best(
        args.rounds,
        {
            "kiban ProteinFeaturizer, length-bucketed batches": run_kiban,
            "kiban ProteinFeaturizer, batches in file order": lambda: run_kiban(in_order),
            "fair-esm BatchConverter, batches in file order": run_esm,
            "HF EsmTokenizer, batches in file order": run_hf,
        },
    )
    print(
        f"proteins: {len(proteins):,} sequences, {residues:,} residues, batches of {size}, best of {args.rounds}"
    )
    reference = best["fair-esm BatchConverter, batches in file order"][0]
    for name, (seconds, useful) in best.items():
        print(
            f"  {name:<52} {len(proteins) / seconds:>9,.0f} seq/s {residues / seconds / 1e6:>6.2f} M residues/s "
            f"useful/padded {useful:.3f}  x{reference / seconds:.2f} vs fair-esm"
        )

    promoters = _column(SHARED / "dna/ecoli_promoters_iPromoter2L_benchmark.csv", "sequence")
    batches = [promoters[i : i + size] for i in range(0, len(promoters), size)]
    for label, featurizer in (
        ("6-mers", DnaFeaturizer(tokenization="kmer", k=6)),
        ("bases", DnaFeaturizer(tokenization="base")),
    ):

        def run_dna(featurizer=featurizer):
            for batch in batches:
                featurizer.collate([featurizer(s) for s in batch])
            return 1, 1

        seconds = _best(args.rounds, {label: run_dna})[label][0]
        print(f"dna ({label}): {len(promoters) / seconds:,.0f} seq/s over {len(promoters):,} promoters")


if __name__ == "__main__":
    main()
