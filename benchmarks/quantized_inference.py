"""float32 vs int8 vs int4 (torchao weight-only, ``kiban.adapt.quantize``) on the default backbone,
side by side in one run: decode tokens/s, memory, and a head's metric.

Model: SmolLM2-135M-Instruct (the GGUF default, de-quantised to float32 on load) with the default
molecule encoder and an untrained projector (seeded, the same in every process). Each precision
runs in its own process, so its peak memory is its own:

    tokens/s       greedy decoding of ``--new-tokens`` tokens (exactly: no early stop) after each of
                   ``--prompts`` short prompts, batch 1, through the backbone's ``generate``; the
                   fastest of ``--repeats`` rounds per prompt counts (bursts from other jobs on a
                   shared machine stay out of the figure)
    peak RSS       the process's peak resident memory (load included: the float weights exist
                   before they are quantised) and its resident memory after quantisation
    head           a linear probe for BBBP (../shared/data/molecules/bbbp.csv; RDKit's NCI set with
                   a size label when absent) fitted once on float32 states of ``--train`` molecules,
                   then scored on ``--test`` others with each precision's states: accuracy, ROC-AUC,
                   and agreement of its predicted labels with float32's

    .venv/bin/python benchmarks/quantized_inference.py [--new-tokens 32] [--prompts 4] [--repeats 2]
        [--train 300] [--test 200] [--threads 2]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    "What does the enzyme lactase do?",
    "Name three amino acids.",
    "Why do cells need ATP?",
    "What is a protein kinase?",
    "Describe the structure of DNA.",
    "What is an antibody?",
]


def build_model():
    from kiban.fusion import KibanModel
    from kiban.fusion.backbone import BackboneConfig, smollm2_gguf
    from kiban.fusion.config import EncoderSpec, KibanConfig

    torch.manual_seed(0)  # the untrained projector (and encoder) are random: the same ones every process
    config = KibanConfig(
        encoders={"molecule": EncoderSpec(preset="default")}, backbone=BackboneConfig(gguf=str(smollm2_gguf()))
    )
    return KibanModel.from_config(config).eval()


def states(model, smiles: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.embed([("molecule", s) for s in smiles[i : i + 32]]).float() for i in range(0, len(smiles), 32)])


def tokens_per_second(model, *, prompts: int, new_tokens: int, repeats: int) -> float:
    tokenizer, llm = model.tokenizer, model.llm
    total_tokens, total_time = 0, 0.0
    for text in PROMPTS[:prompts]:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            with torch.no_grad():
                out = llm.generate(
                    ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            best = min(best, time.perf_counter() - started)
        total_tokens += out.shape[1] - ids.shape[1]
        total_time += best
    return total_tokens / total_time


def run_one(args: argparse.Namespace) -> dict:
    """One precision, in this process: the figures as a dict."""
    import resource

    import psutil
    from heads_vs_generation import fit_probe, load_molecules

    from kiban.adapt.quantize import quantize_model
    from kiban.tasks.heads import load_head

    torch.set_num_threads(args.threads)
    smiles, labels = load_molecules(args.train + args.test)
    model = build_model()
    mode = None if args.precision == "float32" else args.precision
    quantize_model(model, mode)
    rss = psutil.Process().memory_info().rss
    work = Path(args.work)
    if mode is None:
        head = fit_probe("bbbp", states(model, smiles[: args.train]), labels[: args.train], layer=None)
        head.save(work / "head")
    head = load_head(work / "head")
    test = states(model, smiles[args.train :])
    with torch.no_grad():
        outputs = head(test).numpy()
    metrics = head.metrics(outputs, labels[args.train :])
    np.save(work / f"{args.precision}.npy", outputs.argmax(1))
    speed = tokens_per_second(model, prompts=args.prompts, new_tokens=args.new_tokens, repeats=args.repeats)
    return {
        "precision": args.precision,
        "tokens_per_s": speed,
        "rss_gib": rss / 2**30,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "accuracy": metrics["accuracy"],
        "roc_auc": metrics.get("roc_auc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)  # internal: one child run
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.precision:
        print(json.dumps(run_one(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for precision in ("float32", "int8", "int4"):
            command = [sys.executable, __file__, *sys.argv[1:], "--precision", precision, "--work", work]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                sys.exit(f"{precision} run failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # a partial run still says something
        reference = np.load(Path(work) / "float32.npy")
        for row in rows:
            row["agreement"] = float((np.load(Path(work) / f"{row['precision']}.npy") == reference).mean())
    base = rows[0]["tokens_per_s"]
    print("| precision | decode tokens/s | × float32 | RSS after load | peak RSS | BBBP accuracy | ROC-AUC | labels as float32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        auc = "n/a" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
        print(
            f"| {row['precision']} | {row['tokens_per_s']:.1f} | ×{row['tokens_per_s'] / base:.2f} | "
            f"{row['rss_gib']:.2f} GiB | {row['peak_rss_gib']:.2f} GiB | {row['accuracy']:.3f} | {auc} | "
            f"{row['agreement']:.3f} |"
        )


if __name__ == "__main__":
    main()
