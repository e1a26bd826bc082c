"""Classifying with a head over the fused model's hidden states vs. asking the same backbone to
generate the label as text (the slow way an LLM classifies): items/s, accuracy and agreement, same
inputs, one run.

Task: BBBP blood-brain-barrier penetration (../shared/data/molecules/bbbp.csv; RDKit's bundled
NCI SMILES with a size-threshold label when the shared data is absent). Probe heads are fitted on
``--train`` molecules; then ``--n`` other molecules are classified by every path:

    head, full depth:   model.embed([("molecule", smiles), ...]) -> head -> "yes" / "no"
    head at layer k:    the same, embed(..., layer=k): the forward stops after decoder layer k
                        (one row per ``--layer`` value; the head's HeadConfig.layer is k)
    fast head:          the molecule encoder's tokens, mean-pooled (no projector, no LLM) -> head
    generation:         model.generate("Does <molecule> cross the blood-brain barrier? Answer yes or
                        no.") -> the first "yes" / "no" in the text (anything else: unparseable)
    resampler rows:     with ``--resampler-tokens K`` (0: off), the same model with its molecule
                        projector swapped for a Perceiver resampler giving K tokens per molecule
                        instead of one per atom: heads at full depth and at each k, and generation.
                        The resampler's weights are UNTRAINED (random): its rows time the shorter
                        sequence; its accuracy says only what random K-token summaries keep.

The default model's projectors are untrained too (a fresh ``default_config`` model), so what the
heads learn comes through random projections of the encoder's atom tokens. With an untrained
backbone (``tiny``, or the default model before instruction tuning) the generated text is rarely a
considered answer, so agreement with it is low: the timing is the point. The paths run batch by
batch in turn (every path on batch 1, ``--repeats`` times round, then batch 2, ...) and each
batch's fastest run counts, so bursts of load from other users on a shared machine neither fall on
one path alone nor stay in the figures. Prints a Markdown table.

    .venv/bin/python benchmarks/heads_vs_generation.py [--model tiny|default|PATH] [--n 64] [--train 300]
        [--batch-size 16] [--layer 2 [4 ...]] [--resampler-tokens 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "molecules" / "bbbp.csv"
QUESTION = "Does <molecule> cross the blood-brain barrier? Answer yes or no."
LABELS = ["no", "yes"]


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

    torch.manual_seed(0)  # the untrained projectors are random: the same ones every run
    if spec == "tiny":
        return tiny_model(["molecule"]).eval()
    if spec == "default":
        return KibanModel.from_config(default_config()).eval()
    return KibanModel.from_pretrained(spec).eval()


def with_resampler(model, tokens: int):
    """The same encoders and backbone (shared, not copied) with an untrained K-token resampler as the
    molecule projector (``kiban.fusion.projector``: Flamingo's Perceiver resampler, 2 blocks).
    """
    from kiban.fusion import KibanModel
    from kiban.fusion.projector import ProjectorConfig, create_projector

    torch.manual_seed(1)
    width = model.llm.get_input_embeddings().embedding_dim
    projectors = dict(model.projectors)
    projectors["molecule"] = create_projector(
        ProjectorConfig(kind="resampler", num_tokens=tokens),
        in_dim=model.encoders["molecule"].output_dim,
        out_dim=width,
    )
    return KibanModel(
        encoders=dict(model.encoders),
        projectors=projectors,
        llm=model.llm,
        tokenizer=model.tokenizer,
        config=model.config,
    ).eval()


def _features(model, smiles: list[str]) -> dict:
    featurizer = model.processor.featurizers["molecule"]
    return featurizer.collate([featurizer(s) for s in smiles])


@torch.no_grad()
def encoder_pooled(model, smiles: list[str]) -> torch.Tensor:
    """The fast path: the molecule encoder's tokens mean-pooled over atoms, no projector, no LLM: [B, D]."""
    tokens = model.encoders["molecule"](**_features(model, smiles))
    weights = tokens.mask.unsqueeze(-1).float()
    return (tokens.embeddings * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def answer(text: str) -> str | None:
    match = re.search(r"\b(yes|no)\b", text.lower())
    return match.group(1) if match else None


@dataclass
class Row:
    """One way of classifying a batch of SMILES: its answers ("yes" / "no" / None) and its time."""

    name: str
    run: Callable[[list[str]], list[str | None]]
    generation: str | None = None  # the generation row its agreement is measured against
    seconds: float = 0.0
    answers: list[str | None] = field(default_factory=list)


def fit_probe(task: str, features: torch.Tensor, labels: np.ndarray, *, layer: int | None):
    from kiban.tasks.heads import HeadConfig, create_head
    from kiban.tasks.training import FitSettings, fit_head

    head = create_head(
        HeadConfig(
            task=task,
            modality="molecule",
            kind="classification",
            labels=LABELS,
            input_dim=features.shape[1],
            layer=layer,
        )
    )
    fit_head(head, features, torch.as_tensor(labels), settings=FitSettings(epochs=100, progress=False))
    return head.eval()


def head_path(
    name: str,
    model,
    train: list[str],
    labels: np.ndarray,
    *,
    layer: int | None,
    batch_size: int,
    generation: str,
) -> Row:
    """A probe head fitted on ``model.embed(..., layer=layer)`` of the training molecules; it then
    classifies through ``head.predict``, which reads the model at the head's own layer.
    """
    with torch.no_grad():
        features = torch.cat(
            [
                model.embed([("molecule", s) for s in train[i : i + batch_size]], layer=layer).float()
                for i in range(0, len(train), batch_size)
            ]
        )
    head = fit_probe(f"bbbp-{layer or 'full'}", features, labels, layer=layer)
    return Row(name, lambda batch: [row["label"] for row in head.predict(model, batch)], generation)


def generation_path(name: str, model, *, max_new_tokens: int, texts: list[str]) -> Row:
    def run(batch: list[str]) -> list[str | None]:
        records = [
            {"messages": [{"role": "user", "content": QUESTION}], "inputs": {"molecule": [s]}} for s in batch
        ]
        generated = model.generate(records, max_new_tokens=max_new_tokens)
        texts.extend(generated)
        return [answer(t) for t in generated]

    return Row(name, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--n", type=int, default=64, help="molecules classified by every path")
    parser.add_argument("--train", type=int, default=300, help="molecules the probe heads are fitted on")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=3, help="times each path runs each batch; the fastest one counts"
    )
    parser.add_argument(
        "--layer", type=int, nargs="+", default=[2], help="decoder layer(s) k for the 'head at layer k' rows"
    )
    parser.add_argument(
        "--resampler-tokens",
        type=int,
        default=8,
        help="K for the untrained-resampler rows; 0 leaves them out",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = build(args.model)
    if bad := [k for k in args.layer if not 1 <= k <= model.num_layers]:
        parser.error(f"--layer {bad}: this backbone has decoder layers 1..{model.num_layers}")
    smiles, labels = load_molecules(args.train + args.n)
    train, test = smiles[: args.train], smiles[args.train :]
    y_train, truth = labels[: args.train], ["yes" if y else "no" for y in labels[args.train :]]
    depth, bs = model.num_layers, args.batch_size

    texts: dict[str, list[str]] = {"model": [], "resampler model": []}

    def heads(fused, note: str, generation: str) -> list[Row]:
        """Rows for probe heads over ``fused`` at full depth and at each ``--layer``."""
        layers = [(f"head, full depth ({depth} layers{f'; {note}' if note else ''})", None)]
        layers += [(f"head at layer {k}{f' ({note})' if note else ''}", k) for k in args.layer]
        return [
            head_path(name, fused, train, y_train, layer=k, batch_size=bs, generation=generation)
            for name, k in layers
        ]

    generation = "generate the label as text"
    paths = heads(model, "", generation)
    fast_features = torch.cat([encoder_pooled(model, train[i : i + bs]) for i in range(0, len(train), bs)])
    fast_head = fit_probe("bbbp-fast", fast_features, y_train, layer=None)
    paths.append(
        Row(
            "head over encoder tokens (fast path, no LLM)",
            lambda batch: [row["label"] for row in fast_head.outputs(encoder_pooled(model, batch))],
            generation,
        )
    )
    paths.append(generation_path(generation, model, max_new_tokens=args.max_new_tokens, texts=texts["model"]))
    if args.resampler_tokens:
        resampled = with_resampler(model, args.resampler_tokens)
        tag = f"resampler {args.resampler_tokens} tokens, untrained"
        r_generation = f"generate the label as text ({tag})"
        paths += heads(resampled, tag, r_generation)
        paths.append(
            generation_path(
                r_generation, resampled, max_new_tokens=args.max_new_tokens, texts=texts["resampler model"]
            )
        )

    for path in paths:  # warm-up (lazy initialisation, first-call allocations), not timed
        path.run(train[:2])
    for texts_of_model in texts.values():
        texts_of_model.clear()
    load_before = os.getloadavg()[0]
    for i in range(0, len(test), bs):
        batch = test[i : i + bs]
        best = {path.name: float("inf") for path in paths}
        for repeat in range(args.repeats):
            for path in paths:
                started = time.perf_counter()
                answers = path.run(batch)
                best[path.name] = min(best[path.name], time.perf_counter() - started)
                if repeat == 0:
                    path.answers += answers
        for path in paths:
            path.seconds += best[path.name]

    by_name = {path.name: path for path in paths}
    baseline = by_name[generation].seconds
    with torch.no_grad():
        atoms = torch.cat(
            [
                model.encoders["molecule"](**_features(model, test[i : i + bs])).mask.sum(1)
                for i in range(0, len(test), bs)
            ]
        )
    print(
        f"model {args.model}; {len(test)} molecules ({atoms.float().mean():.1f} atom tokens on average, "
        f"at most {int(atoms.max())}); batch {bs}; best of {args.repeats} per batch; "
        f"generation max_new_tokens {args.max_new_tokens}; "
        f"torch threads {torch.get_num_threads()}; load average {load_before:.2f} before the timed loop, "
        f"{os.getloadavg()[0]:.2f} after\n"
    )
    print(
        "| path | items/s | × vs. generation | accuracy vs. BBBP label | agreement with generation | unparseable |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for path in paths:
        accuracy = np.mean([a == t for a, t in zip(path.answers, truth)])
        if path.generation:
            other = by_name[path.generation].answers
            agreement = f"{np.mean([a == b for a, b in zip(path.answers, other)]):.3f}"
        else:
            agreement = "—"
        print(
            f"| {path.name} | {len(test) / path.seconds:.1f} | ×{baseline / path.seconds:.1f} | {accuracy:.3f} | "
            f"{agreement} | {sum(a is None for a in path.answers)} |"
        )
    print(
        "\n× is against the first generation row (the model as built, molecule projector "
        f"{type(model.projectors['molecule']).__name__}); agreement is with the generation row of the same model."
    )
    for name, generated in texts.items():
        if generated:
            print(f"example generated answer ({name}): {generated[0][:80]!r}")


if __name__ == "__main__":
    main()
