"""Fused-model throughput and protein padding waste, measured side by side in one run.

1. forward+backward samples/s and peak resident memory of a small fused model (every modality in
   every record, the tiny encoder presets over a 4-layer, 128-wide Llama backbone, batch 8);
2. padding waste on proteins of mixed lengths: kiban's length-bucketed batches through its ESM-2
   featurizer vs. fair-esm's own ``BatchConverter`` on the same sequences in arrival order (how
   esm's scripts batch), reported as useful tokens / padded tokens and as the ratio of ESM-2
   forward time over all batches (same model, same sequences).

Proteins: the real sequences in ../shared/data/protein/sequences when present, otherwise lengths
drawn from a log-normal fitted to Swiss-Prot (median ~300). Prints a table; writes nothing.

    .venv/bin/python benchmarks/fused_model.py [--proteins 512] [--batch-size 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import time
from pathlib import Path

import esm
import torch

from kiban.data.batching import length_bucketed_batches, padding_efficiency
from kiban.encoders import create_encoder
from kiban.fusion import KibanModel, apply_freeze_policy
from kiban.tiny import example_records, tiny_config

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "protein" / "sequences"
AMINO = "ACDEFGHIKLMNPQRSTVWY"


def proteins(n: int, seed: int, max_length: int) -> tuple[list[str], str]:
    source = SHARED / "secondary_structure_pdb_2000.csv"
    if source.is_file():
        with source.open() as handle:
            seqs = [row["sequence"] for row in csv.DictReader(handle)]
        seqs = [s for s in seqs if set(s) <= set(AMINO + "XBZUO") and 0 < len(s) <= max_length]
        random.Random(seed).shuffle(seqs)
        return seqs[:n], f"{source.name} (real PDB chains <= {max_length} aa)"
    rng = random.Random(seed)
    lengths = [min(max_length, max(20, int(rng.lognormvariate(5.7, 0.55)))) for _ in range(n)]
    return ["".join(rng.choice(AMINO) for _ in range(k)) for k in lengths], "synthetic, log-normal lengths"


def fused_throughput(steps: int, batch_size: int) -> tuple[float, float]:
    config = tiny_config()
    config.backbone.hf_config.update(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    torch.manual_seed(0)
    model = KibanModel.from_config(config)
    apply_freeze_policy(model, "full")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = model.prepare(example_records(n=batch_size))
    model(batch).loss.backward()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return steps * batch_size / elapsed, peak_mib


def padding_comparison(seqs: list[str], batch_size: int) -> dict[str, tuple[float, float]]:
    encoder = create_encoder("protein", preset="esm2_t6_8m").eval()
    lengths = [len(s) + 2 for s in seqs]  # BOS and EOS, in both tokenisations
    ours = length_bucketed_batches(lengths, batch_size=batch_size, seed=0)
    arrival = [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]
    converter = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()

    def run(batches, tokenize) -> tuple[float, float]:
        useful = padded = 0
        started = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                tokens = tokenize(batch)
                useful += sum(lengths[i] for i in batch)
                padded += tokens.numel()
                encoder(tokens=tokens)
        return useful / padded, time.perf_counter() - started

    kiban = run(ours, lambda b: encoder.featurizer.collate([encoder.featurizer(seqs[i]) for i in b])["tokens"])
    fair = run(arrival, lambda b: converter([(str(i), seqs[i]) for i in b])[2])
    # the bookkeeping above must agree with the closed form for kiban's batches
    assert abs(kiban[0] - padding_efficiency(lengths, ours)) < 1e-9
    return {"kiban length-bucketed": kiban, "fair-esm BatchConverter": fair}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proteins", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=1022)
    args = parser.parse_args()
    torch.set_num_threads(2)

    samples_per_s, peak = fused_throughput(args.steps, batch_size=8)
    print("fused model (tiny encoders, 4x128 Llama, batch 8, every modality in every record)")
    print(f"  forward+backward: {samples_per_s:8.1f} samples/s    peak RSS: {peak:8.0f} MiB\n")

    seqs, source = proteins(args.proteins, 0, args.max_length)
    print(f"protein padding, {len(seqs)} sequences from {source}, batch {args.batch_size}, ESM-2 8M forward")
    results = padding_comparison(seqs, args.batch_size)
    print(f"  {'batching':26s} {'useful/padded':>14s} {'forward s':>10s}")
    for name, (efficiency, seconds) in results.items():
        print(f"  {name:26s} {efficiency:14.3f} {seconds:10.2f}")
    (k_eff, k_s), (f_eff, f_s) = results.values()
    print(f"  ratio kiban/fair-esm: efficiency x{k_eff / f_eff:.2f}, forward time x{k_s / f_s:.2f}")


if __name__ == "__main__":
    main()
