"""The batch cell featurizer against an earlier revision of itself, in one process, alternating.

Loads ``data/cell_batches.py`` as it was at ``--against`` (any git revision) beside the current one,
reads --batches shuffled CSR batches of 64 cells from the data_loading.py file once, checks that both
give the same tensors, then runs the two over the same batches in alternating rounds (so background
load falls on both alike) and prints cells/s per round and the ratio of the best rounds.

    .venv/bin/python benchmarks/cell_batches_ab.py --against 6ddf28c [--path FILE.h5ad] [--rounds 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision of the featurizer to compare with")
    parser.add_argument("--path", type=Path, default=Path("/tmp/kiban-bench-data/cells_200000x20000_500.h5ad"))
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-genes", type=int, default=1200)
    args = parser.parse_args()

    import importlib.util

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from kiban.data import H5adReader
    from kiban.data.cell_batches import CellBatchFeaturizer
    from kiban.encoders.cell import CellFeaturizer, synthetic_gene_names

    source = subprocess.run(
        ["git", "show", f"{args.against}:data/cell_batches.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    source = source.replace('@register_batch_featurizer("cell")', "")  # the name is the current one's
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as handle:
        handle.write(source)
    spec = importlib.util.spec_from_file_location("earlier_cell_batches", handle.name)
    earlier = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = earlier
    spec.loader.exec_module(earlier)

    reader = H5adReader(args.path, chunk_size=256)
    featurizer = CellFeaturizer(synthetic_gene_names(reader.n_vars), max_genes=args.max_genes)
    rng = np.random.default_rng(0)
    batches = [reader.read_batch(np.sort(rng.choice(len(reader), 64, replace=False))) for _ in range(args.batches)]
    sides = {args.against: earlier.CellBatchFeaturizer(featurizer), "current": CellBatchFeaturizer(featurizer)}
    for rows in batches:
        a, b = (side(rows)[1] for side in sides.values())
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the two disagree"
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            started = time.perf_counter()
            for rows in batches:
                side(rows)
            rates[name].append(64 * len(batches) / (time.perf_counter() - started))
    for name, per_round in rates.items():
        print(f"{name:>12}: cells/s per round {[round(r) for r in per_round]}, best {max(per_round):,.0f}")
    print(f"current / {args.against}: x{max(rates['current']) / max(rates[args.against]):.2f} (best rounds)")


if __name__ == "__main__":
    main()
