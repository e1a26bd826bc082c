"""Where an align step of the default quickstart spends its time, part by part, on the real corpus.

Builds the quickstart's align model and data exactly as ``kiban quickstart`` does (``align_config``
over the corpus of an existing quickstart folder: ``--out`` must hold ``corpus/``, e.g. from
``kiban quickstart --out DIR``, whose first stage builds it), then runs --steps optimizer steps by
hand, timing each part: the batch (read, featurize, collate), the encoders and projectors, the
frozen backbone's forward + backward (``next_token_loss``), the optimizer. Prints each part's share,
the step time, the minor page faults per step and the batch shapes. Nothing is asserted.

    .venv/bin/python benchmarks/align_parts.py --out QUICKSTART_DIR [--steps 12]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a quickstart folder holding corpus/")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="run every position through the backbone (no FrozenPrefix)"
    )
    args = parser.parse_args()

    import torch

    from kiban.data.datamodule import KibanDataModule
    from kiban.fusion.merge import merge_modality_tokens
    from kiban.quickstart.run import QuickstartOptions, align_config, plan_for
    from kiban.train.module import KibanLightningModule
    from kiban.train.objectives import FrozenPrefix, next_token_loss

    torch.set_num_threads(2)
    config = align_config(args.out, QuickstartOptions(out=args.out), plan_for(10, "default"))
    torch.manual_seed(0)
    module = KibanLightningModule(config=config)
    module.configure_model()  # builds the model and applies the align freeze policy
    model = module.model.train()
    data = KibanDataModule.from_config(config, splits=("train",))
    data.attach(model.processor, rank=0, world_size=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = iter(data.loader("train"))
    prefix = None if args.no_prefix_cache else FrozenPrefix()

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    spent = dict.fromkeys(("batch", "encoders + projectors", "backbone forward + backward", "optimizer"), 0.0)
    shapes, paged = [], 0
    for step in range(args.warmup + args.steps):
        counting = step >= args.warmup
        before = faults()
        t0 = time.perf_counter()
        batch = next(batches).inputs
        t1 = time.perf_counter()
        encoded = model.encode(batch)
        text = model.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
        embeds, mask, labels = merge_modality_tokens(batch.input_ids, batch.attention_mask, batch.labels, text, encoded)
        t2 = time.perf_counter()
        next_token_loss(model.llm, embeds, mask, labels, prefix=prefix, input_ids=batch.input_ids).backward()
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        t4 = time.perf_counter()
        if counting:
            for part, (a, b) in zip(spent, ((t0, t1), (t1, t2), (t2, t3), (t3, t4)), strict=True):
                spent[part] += b - a
            shapes.append(tuple(mask.shape))
            paged += faults() - before
    total = sum(spent.values())
    cached = "off" if prefix is None else f"{prefix.misses} computed, {prefix.hits} reused"
    print(f"{args.steps} align steps, batch {config.data.batch_size}, torch threads {torch.get_num_threads()}, "
          f"shared prefix cache: {cached}")
    for part, seconds in spent.items():
        print(f"  {part:<30} {seconds / args.steps:8.3f} s/step  {100 * seconds / total:5.1f}%")
    print(f"  step {total / args.steps:.3f} s, {config.data.batch_size * args.steps / total:.2f} samples/s, "
          f"minor page faults/step {paged // args.steps:,}")
    print(f"  batch shapes [rows, positions]: {shapes}")


if __name__ == "__main__":
    main()
