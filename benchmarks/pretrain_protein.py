"""Masked-residue pretraining of ESM-2 8M, measured: held-out perplexity and a secondary-structure model.

After ``kiban pretrain protein ... --out RUN`` (docs/results.md has the exact command), this script

1. scores held-out sequences (a FASTA or sequence table never trained on) with fixed masks (15%,
   80/10/10, seeded per sequence; the first ``--crop`` residues of each, as the run cropped) under
   the pretrained encoder and under the same architecture at random initialisation;
2. writes two kiban model folders around the two encoders (a tiny backbone: the secondary-structure
   head reads the protein tokens, never the LLM), for ``kiban finetune --type secondary --model``.

    python benchmarks/pretrain_protein.py --run RUN --heldout HELDOUT.tsv --out DIR

prints one JSON object (perplexities, masked accuracies) and writes ``DIR/model-pretrained`` and
``DIR/model-random``. Run it with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kiban.data import Rejects, read
from kiban.encoders.base import create_encoder
from kiban.encoders.pretraining import create_objective, load_encoder
from kiban.train.pretrain_data import evaluate_objective, masked_batches


def _heldout(path: str, limit: int | None) -> list:
    records = list(read(path, rejects=Rejects(), modality="protein"))
    return records[:limit] if limit else records


def _model_folder(encoder_config: dict, target: Path) -> None:
    from kiban.fusion.model import KibanConfig, KibanModel
    from kiban.tiny import tiny_backbone_config

    config = KibanConfig.from_plain(
        {"encoders": {"protein": encoder_config}, "backbone": tiny_backbone_config()}
    )
    torch.manual_seed(0)
    KibanModel.from_config(config).save_pretrained(target)


def main() -> None:
    """Score the held-out set under both encoders and write both model folders."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the kiban pretrain --out folder")
    parser.add_argument("--heldout", required=True, help="held-out sequences (FASTA or table)")
    parser.add_argument("--out", required=True, help="where the two model folders go")
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--limit", type=int, help="score only the first N held-out sequences")
    parser.add_argument("--seed", type=int, default=0, help="the random initialisation's seed")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    records = _heldout(args.heldout, args.limit)
    pretrained = load_encoder(run / "encoder", truncate=True)
    torch.manual_seed(args.seed)
    random = create_encoder("protein", pretrained.portable_config())
    results = {"heldout": args.heldout, "sequences": len(records), "crop": args.crop}
    for name, encoder in (("random_init", random), ("pretrained", pretrained)):
        objective = create_objective("protein", encoder)
        if name == "random_init":
            objective.init_for_training()  # where a from-scratch pretraining run starts
        batches = masked_batches(objective, records, batch_size=16, seed=12345, crop=args.crop)
        results[name] = evaluate_objective(objective, batches)
    results["pretrained_step"] = json.loads((run / "encoder" / "config.json").read_text()).get("step")
    print(json.dumps(results, indent=1))
    config = json.loads((run / "encoder" / "config.json").read_text())["config"]
    _model_folder({**config, "weights_path": str((run / "encoder").resolve())}, out / "model-pretrained")
    _model_folder(config, out / "model-random")


if __name__ == "__main__":
    main()
