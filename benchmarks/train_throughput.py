r"""Training throughput of the fused model: samples/s, tokens/s and (where a peak is known) MFU.

A fixed config — all six encoders at their tiny presets, a 4-layer 128-wide Llama, batch 8 — is
trained through ``kiban.train.fit`` (Lightning, the same callbacks as any run); the first
``--warmup`` optimizer steps are left out of the measurement. Any training YAML can be measured
instead with ``--config`` (and ``KEY=VALUE`` overrides), e.g. the real backbone on a GPU::

    .venv/bin/python benchmarks/train_throughput.py                       # CPU, fixed tiny config
    .venv/bin/python benchmarks/train_throughput.py --config configs/align.yaml \
        data.train=tiny data.val=null data.tiny_records=512 data.batch_size=16 \
        trainer.strategy=deepspeed_stage_2 trainer.precision=bf16-mixed        # GPU
    .venv/bin/python benchmarks/train_throughput.py --config configs/mfu_llama1b.yaml \
        --seq-len 2048                       # GPU: MFU of a 1.1 B Llama, bf16, ZeRO-2, Lightning

MFU = (6·N·tokens + 12·L·d·Σ tokens·T) / (seconds · devices · peak), see kiban/train/flops.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]

FIXED = [
    "model.encoders={protein: {preset: tiny}, dna: {preset: tiny}, cell: {preset: tiny}, "
    "image: {preset: tiny}, "
    "molecule: {preset: tiny}, text: {preset: tiny}}",
    "model.backbone.hf_config.hidden_size=128",
    "model.backbone.hf_config.intermediate_size=256",
    "model.backbone.hf_config.num_hidden_layers=4",
    "data.batch_size=8",
    "data.tiny_records=64",
    "stage=full",
]


class Measure(pl.Callback):
    """Per optimizer step after ``warmup``: seconds, samples, tokens and model FLOPs."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps: list[tuple[float, int, int, float]] = []
        self._last, self._time = -1, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from kiban.train.flops import model_flops

        if trainer.global_step == self._last:
            return
        self._last, now = trainer.global_step, time.perf_counter()
        if trainer.global_step == self.warmup:
            self.model = model_flops(pl_module.model.llm)
        elif trainer.global_step > self.warmup:
            s = pl_module.stats
            flops = self.model.step_flops(
                tokens=s.tokens, attention_units=int(s.tokens * s.padded_tokens / s.samples)
            )
            self.steps.append((now - self._time, s.samples, s.tokens, flops))
        self._time = now

    def rates(self, steps: list[tuple[float, int, int, float]]) -> tuple[float, float, float]:
        seconds = sum(step[0] for step in steps)
        return tuple(sum(step[i] for step in steps) / seconds for i in (1, 2, 3))


def write_long_records(path: Path, *, chars: int, n: int, seed: int = 0) -> None:
    """``n`` chat records with a protein and a molecule and an assistant answer of ``chars``
    characters of seeded random words (the byte tokenizer gives one token per character).
    """
    import random

    rng = random.Random(seed)
    words = "protein binds kinase domain cell expression gene pathway ligand residue fold".split()
    with path.open("w") as handle:
        for i in range(n):
            answer = ""
            while len(answer) < chars:
                answer += rng.choice(words) + " "
            record = {
                "id": f"long{i}",
                "messages": [
                    {"role": "user", "content": "Describe <protein> and how <molecule> acts on it."},
                    {"role": "assistant", "content": answer[:chars]},
                ],
                "inputs": {
                    "protein": ["".join(rng.choice("ACDEFGHIKLMNPQRSTVWY") for _ in range(200))],
                    "molecule": ["CC(=O)Oc1ccccc1C(=O)O"],
                },
            }
            handle.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the measurement")
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="train on written records whose assistant answer is this many characters (byte-tokenizer "
        "tokens) instead of data.train: long sequences, as an MFU measurement needs",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from kiban.train.config import load_config
    from kiban.train.flops import peak_flops
    from kiban.train.runner import fit

    overrides = FIXED if args.config.endswith("smoke.yaml") else []
    with tempfile.TemporaryDirectory() as run_dir:
        if args.seq_len:
            records = Path(run_dir) / "long.jsonl"
            write_long_records(records, chars=args.seq_len, n=512)
            overrides = [*overrides, f"data.train={records}"]
        config = load_config(
            args.config,
            [
                *overrides,
                *args.overrides,
                f"run.dir={run_dir}",
                "run.resume=never",
                f"trainer.max_steps={args.warmup + args.steps}",
                "data.val=null",
                "trainer.val_check_interval=null",
                "callbacks.checkpoint.every_n_steps=100000",
                "trainer.log_every_n_steps=100000",
            ],
        )
        measure = Measure(args.warmup)
        fit(config, callbacks=[measure])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    peak, source = peak_flops(
        device, config.trainer.precision, override_tflops=config.callbacks.throughput.peak_tflops
    )
    # all measured steps, and the faster half: on a shared machine the slow steps are other jobs
    fast = sorted(measure.steps)[: max(1, len(measure.steps) // 2)]
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "strategy": config.trainer.strategy,
        "precision": config.trainer.precision,
        "batch_size_per_device": config.data.batch_size,
        "steps": len(measure.steps),
        "llm_params": measure.model.params,
        "median_step_s": round(sorted(s[0] for s in measure.steps)[len(measure.steps) // 2], 4),
    }
    for name, steps in (("all_steps", measure.steps), ("faster_half", fast)):
        samples, tokens, flops = measure.rates(steps)
        report[name] = {
            "samples_per_s": round(samples, 2),
            "tokens_per_s": round(tokens, 1),
            "mfu": None if peak is None else round(flops / (world * peak), 4),
        }
    report.update(peak=source, torch=torch.__version__)
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
