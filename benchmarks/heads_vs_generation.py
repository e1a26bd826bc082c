"""Classifying with a head over the fused model's pooled states vs. asking the same backbone to
generate the label as text (the slow way an LLM classifies): items/s and agreement, same inputs,
one run.

Task: BBBP blood-brain-barrier penetration (../shared/data/molecules/bbbp.csv; RDKit's bundled
NCI SMILES with a size-threshold label when the shared data is absent). A probe head is fitted on
``--train`` molecules; then ``--n`` other molecules are classified twice:

    head:        model.embed([("molecule", smiles), ...]) -> head -> "yes" / "no"
    fast head:   the molecule encoder's tokens, mean-pooled (no projector, no LLM) -> head
    generation:  model.generate("Does <molecule> cross the blood-brain barrier? Answer yes or no.")
                 -> the first "yes" / "no" in the text (anything else counts as unparseable)

Agreement is the fraction of molecules where both give the same answer; with an untrained
backbone (``tiny``, or the default model before instruction tuning) the generated text is rarely
"yes" or "no", so agreement is low: the timing is the point, and it is what the reported ratio
compares. Prints a Markdown table.

    .venv/bin/python benchmarks/heads_vs_generation.py [--model tiny|default|PATH] [--n 64] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "molecules" / "bbbp.csv"
QUESTION = "Does <molecule> cross the blood-brain barrier? Answer yes or no."


def load_molecules(n: int) -> tuple[list[str], np.ndarray]:
    from rdkit import Chem

    if SHARED.is_file():
        import pandas as pd

        table = pd.read_csv(SHARED).sample(frac=1.0, random_state=0)
        pairs = [
            (s.strip(), int(y))
            for s, y in zip(table.smiles, table.p_np)
            if Chem.MolFromSmiles(s.strip()) is not None
        ]
    else:  # RDKit's NCI set, labelled "heavy" (> 20 heavy atoms) so the head has something to learn
        import os

        import rdkit

        path = Path(os.path.dirname(rdkit.__file__)) / "Data" / "NCI" / "first_5K.smi"
        smiles = [line.split()[0] for line in path.read_text().splitlines()[: 3 * n]]
        pairs = [
            (s, int(m.GetNumHeavyAtoms() > 20)) for s in smiles if (m := Chem.MolFromSmiles(s)) is not None
        ]
    pairs = pairs[:n]
    return [s for s, _ in pairs], np.array([y for _, y in pairs])


def build(spec: str):
    from kiban.fusion import KibanModel, default_config
    from kiban.tiny import tiny_model

    if spec == "tiny":
        return tiny_model(["molecule"]).eval()
    if spec == "default":
        return KibanModel.from_config(default_config()).eval()
    return KibanModel.from_pretrained(spec).eval()


@torch.no_grad()
def encoder_pooled(model, smiles: list[str]) -> torch.Tensor:
    """The fast path: the molecule encoder's tokens mean-pooled over atoms, no projector, no LLM: [B, D]."""
    featurizer = model.processor.featurizers["molecule"]
    batch = featurizer.collate([featurizer(s) for s in smiles])
    tokens = model.encoders["molecule"](**batch)
    weights = tokens.mask.unsqueeze(-1).float()
    return (tokens.embeddings * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def answer(text: str) -> str | None:
    match = re.search(r"\b(yes|no)\b", text.lower())
    return match.group(1) if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=64, help="molecules classified by both paths")
    parser.add_argument("--train", type=int, default=300, help="molecules the probe head is fitted on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from kiban.tasks.finetune import embed_items
    from kiban.tasks.heads import HeadConfig, create_head
    from kiban.tasks.training import FitSettings, fit_head

    model = build(args.model)
    smiles, labels = load_molecules(args.train + args.n)
    train, test = smiles[: args.train], smiles[args.train :]
    features = embed_items(model, "molecule", train, progress=False)
    head = create_head(
        HeadConfig(
            task="bbbp",
            modality="molecule",
            kind="classification",
            labels=["no", "yes"],
            input_dim=features.shape[1],
        )
    )
    fit_head(
        head,
        features,
        torch.as_tensor(labels[: args.train]),
        settings=FitSettings(epochs=100, progress=False),
    )
    batches = range(0, len(train), args.batch_size)
    fast_features = torch.cat([encoder_pooled(model, train[i : i + args.batch_size]) for i in batches])
    fast_head = create_head(
        HeadConfig(
            task="bbbp-fast",
            modality="molecule",
            kind="classification",
            labels=["no", "yes"],
            input_dim=fast_features.shape[1],
        )
    )
    fit_head(
        fast_head,
        fast_features,
        torch.as_tensor(labels[: args.train]),
        settings=FitSettings(epochs=100, progress=False),
    )

    started = time.perf_counter()
    fast_answers = []
    for i in range(0, len(test), args.batch_size):
        pooled = encoder_pooled(model, test[i : i + args.batch_size])
        fast_answers += [row["label"] for row in fast_head.outputs(pooled)]
    fast_seconds = time.perf_counter() - started

    started = time.perf_counter()
    head_answers = []
    for i in range(0, len(test), args.batch_size):
        head_answers += [row["label"] for row in head.predict(model, test[i : i + args.batch_size])]
    head_seconds = time.perf_counter() - started

    started = time.perf_counter()
    generated = []
    for i in range(0, len(test), args.batch_size):
        records = [
            {"messages": [{"role": "user", "content": QUESTION}], "inputs": {"molecule": [s]}}
            for s in test[i : i + args.batch_size]
        ]
        generated += model.generate(records, max_new_tokens=args.max_new_tokens)
    generation_seconds = time.perf_counter() - started

    text_answers = [answer(t) for t in generated]
    agree = np.mean([h == t for h, t in zip(head_answers, text_answers)])
    truth = ["yes" if y else "no" for y in labels[args.train :]]
    print(
        f"model {args.model}; {len(test)} molecules; batch {args.batch_size}; "
        f"generation max_new_tokens {args.max_new_tokens}; torch threads {torch.get_num_threads()}\n"
    )
    print("| path | items/s | accuracy vs. BBBP label | unparseable answers |")
    print("| --- | --- | --- | --- |")
    print(
        f"| head over pooled states | {len(test) / head_seconds:.1f} | "
        f"{np.mean([h == t for h, t in zip(head_answers, truth)]):.3f} | 0 |"
    )
    print(
        f"| head over encoder tokens (fast path, no LLM) | {len(test) / fast_seconds:.1f} | "
        f"{np.mean([h == t for h, t in zip(fast_answers, truth)]):.3f} | 0 |"
    )
    print(
        f"| generate the label as text | {len(test) / generation_seconds:.1f} | "
        f"{np.mean([a == t for a, t in zip(text_answers, truth)]):.3f} | {sum(a is None for a in text_answers)} |"
    )
    print(
        f"\nspeed-up over generation: pooled-state head ×{generation_seconds / head_seconds:.1f}, "
        f"encoder-token head ×{generation_seconds / fast_seconds:.1f}; agreement pooled head vs. generation {agree:.3f}"
    )
    print(f"example generated answer: {generated[0][:80]!r}")


if __name__ == "__main__":
    main()
