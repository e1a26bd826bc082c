"""What of a cell's expression survives fusion: the quickstart's cell-type head over each cell path.

For every variant of the cell path (cell encoder config + cell projector), a fused model is built
over the quickstart's backbone (SmolLM2-135M-Instruct, only the cell encoder attached: a cell's
fused states do not depend on the other encoders) and ``kiban finetune`` runs the quickstart's
cell-type head on it: pbmc68k_reduced from scanpy's datasets folder, ``--use-raw``, labels
``bulk_labels``, the same seed (so the same split), a linear probe on the pooled fused states after
decoder layer ``HEAD_LAYER`` (2). ``kiban finetune`` scores logistic regression on log-normalised
expression on the same split beside it. No align stage runs here: projectors are at their seeded
random initialisation, so each row says what a path keeps before any training (the quickstart's
align then starts from it). Prints a Markdown table: test accuracy, macro-F1, seconds.

``--trace NAME`` instead follows one variant's cells stage by stage (encoder tokens pooled, after
the projector, after each decoder layer up to ``HEAD_LAYER``), scoring each with scikit-learn's
logistic regression on standardised features over the same split: where the information is lost.

    .venv/bin/python benchmarks/cell_fusion_variants.py [--variants NAME ...] [--out DIR] [--seed 0]
    .venv/bin/python benchmarks/cell_fusion_variants.py --trace profile/linear
    .venv/bin/python benchmarks/cell_fusion_variants.py --trace profile/linear-orth256 --draws 8
    .venv/bin/python benchmarks/cell_fusion_variants.py --saved runs/quickstart/model
    .venv/bin/python benchmarks/cell_fusion_variants.py --gene-choice 8   # which genes a fitted token keeps
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> (cell encoder settings over the pbmc vocabulary, cell projector)
QUICKSTART_TRUNK = {"preset": "scgpt", "arch": "kiban", "width": 256, "num_layers": 1, "num_heads": 4,
                    "ffn_dim": 512, "max_genes": 1200, "dropout": 0.0}
RESAMPLER16 = {"kind": "resampler", "num_tokens": 16, "depth": 1}
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # the quickstart's cell path before this change: 16 resampler tokens over a random 1-layer trunk
    "genes/resampler16": (QUICKSTART_TRUNK, RESAMPLER16),
    # the same plus a whole-profile token among the resampler's inputs
    "profile+genes/resampler16": ({**QUICKSTART_TRUNK, "profile_token": "first"}, RESAMPLER16),
    # the profile token alone, through a per-token projector: one LLM position per cell
    "profile/mlp2": ({**QUICKSTART_TRUNK, "profile_token": "only", "width": 576}, {"kind": "mlp2"}),
    "profile/linear": ({**QUICKSTART_TRUNK, "profile_token": "only", "width": 576}, {"kind": "linear"}),
    # the linear projector started as an orthogonal map times a gain (kiban.fusion.projector): the
    # cell arrives unmixed, and the gain decides how much of it the first decoder layers keep
    **{
        f"profile/linear-orth{gain}": (
            {**QUICKSTART_TRUNK, "profile_token": "only", "width": 576},
            {"kind": "linear", "init": "orthogonal", "gain": float(gain)},
        )
        for gain in (1, 8, 32, 64, 256)
    },
    # the profile token fitted to the training cells (kiban.encoders.cell_profile): each of the 576
    # most dispersed genes z-scored on its own dimension, instead of random gene vectors
    "profile-fitted/linear-orth256": (
        {**QUICKSTART_TRUNK, "profile_token": "only", "width": 576, "fit_profile": True},
        {"kind": "linear", "init": "orthogonal", "gain": 256.0},
    ),
    # profile token + every gene token, each projected on its own (no resampler): ~766 positions
    "profile+genes/mlp2": ({**QUICKSTART_TRUNK, "profile_token": "first"}, {"kind": "mlp2"}),
}


def encoder_settings(name: str, *, seed: int, vocab: list[str], pbmc: Path) -> dict[str, Any]:
    """The variant's cell encoder settings over ``vocab``; a fitted profile token gets its statistics
    from the split's training and validation cells (never the test cells), as the quickstart's.
    """
    settings = {**VARIANTS[name][0], "gene_vocab": vocab}
    if settings.pop("fit_profile", False):
        import anndata

        from kiban.data.cell_profiles import fitted_profile_settings
        from kiban.quickstart.corpus import corpus_cell_rows

        adata = anndata.read_h5ad(pbmc)
        rows = corpus_cell_rows(adata.n_obs, seed)
        settings.update(fitted_profile_settings(settings, adata.raw.to_adata(), rows=rows))
    return settings


def run_variant(name: str, *, out: Path, seed: int, vocab: list[str], pbmc: Path) -> dict[str, Any]:
    """Build the variant's fused model and run the cell-type head; returns its row of the table."""
    import torch

    from kiban.fusion.model import KibanConfig, KibanModel, default_config
    from kiban.quickstart.run import HEAD_LAYER
    from kiban.tasks.finetune import FinetuneOptions, finetune

    config = default_config().to_plain()
    config["encoders"] = {"cell": encoder_settings(name, seed=seed, vocab=vocab, pbmc=pbmc)}
    config["projectors"] = {"cell": VARIANTS[name][1]}
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = KibanModel.from_config(KibanConfig.from_plain(config)).eval()
    folder = out / name.replace("/", "__")
    shutil.rmtree(folder, ignore_errors=True)
    metrics = finetune(
        FinetuneOptions(
            task="cell-type",
            data=pbmc,
            out=folder,
            labels=["bulk_labels"],
            use_raw=True,
            model=f"variant {name}",
            loaded_model=model,
            layer=HEAD_LAYER,
            seed=seed,
            epochs=200,  # the quickstart's head epochs
            progress=False,
        )
    )
    seconds = time.perf_counter() - started
    test = [r for r in metrics["results"] if r["split"] == "test"]
    head = next(r for r in test if r["model"].startswith("head"))
    logistic = next(r for r in test if "logistic" in r["model"].lower())
    return {
        "variant": name,
        "accuracy": head["metrics"]["accuracy"],
        "macro_f1": head["metrics"]["macro_f1"],
        "lr_accuracy": logistic["metrics"]["accuracy"],
        "lr_macro_f1": logistic["metrics"]["macro_f1"],
        "seconds": seconds,
        "cell_positions": _positions(model, vocab),
    }


def trace_variant(
    name: str | None, *, seed: int, vocab: list[str], pbmc: Path, saved: Path | None = None
) -> list[tuple[str, float, float]]:
    """(stage, test accuracy, test macro-F1) of logistic regression on each stage's pooled states,
    for variant ``name`` at its seeded initialisation, or for the saved model ``saved`` (e.g. the
    quickstart's ``model/`` after align).
    """
    import anndata
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from kiban.fusion.model import KibanConfig, KibanModel, default_config
    from kiban.quickstart.run import HEAD_LAYER
    from kiban.tasks.splits import random_split

    adata = anndata.read_h5ad(pbmc)
    matrix = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    split = random_split(len(labels), seed=seed)
    if saved is not None:
        model = KibanModel.from_pretrained(saved).eval()
    else:
        config = default_config().to_plain()
        config["encoders"] = {"cell": encoder_settings(name, seed=seed, vocab=vocab, pbmc=pbmc)}
        config["projectors"] = {"cell": VARIANTS[name][1]}
        torch.manual_seed(seed)
        model = KibanModel.from_config(KibanConfig.from_plain(config)).eval()
    cell_encoder = model.encoders["cell"]
    cells = [(row, vocab) for row in matrix]

    def score(features: np.ndarray) -> tuple[float, float]:
        scaler = StandardScaler().fit(features[split.train])
        fitted = LogisticRegression(max_iter=2000).fit(scaler.transform(features[split.train]), labels[split.train])
        predicted = fitted.predict(scaler.transform(features[split.test]))
        return accuracy_score(labels[split.test], predicted), f1_score(labels[split.test], predicted, average="macro")

    rows = [("log-normalised expression as given", *score(matrix))]
    if saved is not None:
        singular = torch.linalg.svdvals(model.projectors["cell"].proj.weight.detach().float())
        print(f"cell projector singular values: {singular.min():.1f}-{singular.max():.1f}")
    with torch.no_grad():
        batch = cell_encoder.featurizer.collate([cell_encoder.featurizer(cell) for cell in cells])
        tokens = cell_encoder(**batch)
        rows.append(("cell encoder tokens, pooled", *score(tokens.pooled().numpy())))
        rows.append(("after the projector, pooled", *score(model.projectors["cell"](tokens).pooled().numpy())))
        for layer in range(1, HEAD_LAYER + 1):
            states = model.embed([("cell", cell) for cell in cells], layer=layer).float().numpy()
            rows.append((f"fused states after decoder layer {layer}, pooled", *score(states)))
    return rows


def encoder_draws(name: str, *, draws: int, seed: int, vocab: list[str], pbmc: Path) -> list[tuple[int, float, float]]:
    """(init seed, test accuracy, test macro-F1) of logistic regression on the pooled tokens of
    variant ``name``'s cell encoder alone, initialised under seeds 0..draws-1 (same split: ``seed``):
    how much a random draw of the encoder (the profile token's gene vectors) decides.
    """
    import anndata
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from kiban.encoders import create_encoder
    from kiban.fusion.model import KibanConfig, default_config
    from kiban.tasks.splits import random_split

    adata = anndata.read_h5ad(pbmc)
    matrix = adata.raw.X.toarray() if hasattr(adata.raw.X, "toarray") else np.asarray(adata.raw.X)
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    split = random_split(len(labels), seed=seed)
    settings = encoder_settings(name, seed=seed, vocab=vocab, pbmc=pbmc)
    rows = []
    for draw in range(draws):
        config = default_config().to_plain()
        config["encoders"] = {"cell": settings}
        torch.manual_seed(draw)
        spec = KibanConfig.from_plain(config).encoders["cell"]
        cell_encoder = create_encoder("cell", spec.encoder_config("cell")).eval()
        with torch.no_grad():
            batch = cell_encoder.featurizer.collate([cell_encoder.featurizer((row, vocab)) for row in matrix])
            features = cell_encoder(**batch).pooled().numpy()
        scaler = StandardScaler().fit(features[split.train])
        fitted = LogisticRegression(max_iter=2000).fit(scaler.transform(features[split.train]), labels[split.train])
        predicted = fitted.predict(scaler.transform(features[split.test]))
        rows.append((draw, accuracy_score(labels[split.test], predicted), f1_score(labels[split.test], predicted, average="macro")))
    return rows


def gene_choices(*, splits: int, width: int, pbmc: Path) -> dict[str, tuple[float, float]]:
    """Mean (accuracy, macro-F1) over ``splits`` random splits of logistic regression on the z-scores
    of ``width`` genes chosen by each ranking (statistics of the split's non-test cells), beside all
    genes: which genes a fitted profile token of ``width`` dimensions should keep.
    """
    import anndata
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    from kiban.data.cells import seurat_hvg
    from kiban.tasks.splits import random_split

    adata = anndata.read_h5ad(pbmc)
    matrix = adata.raw.X.toarray()
    labels = adata.obs["bulk_labels"].cat.codes.to_numpy()
    scores: dict[str, list[tuple[float, float]]] = {}
    for seed in range(splits):
        split = random_split(len(labels), seed=seed)
        fit_rows = np.concatenate([split.train, split.valid])
        mean, std = matrix[fit_rows].mean(0), matrix[fit_rows].std(0)
        rankings = {
            "dispersion (variance / mean)": std**2 / np.maximum(mean, 1e-12),
            "variance": std,
            "mean": mean,
            "random": np.random.default_rng(seed).random(len(mean)),
        }
        chosen = {name: np.argsort(-rank, kind="stable")[:width] for name, rank in rankings.items()}
        expm1 = np.expm1(matrix[fit_rows])
        seurat = seurat_hvg(expm1.mean(0), expm1.var(0, ddof=1), n_top=width)
        chosen["seurat binned dispersion"] = np.flatnonzero(seurat)[:width]
        chosen["all genes"] = np.arange(len(mean))
        for name, genes in chosen.items():
            features = (matrix[:, genes] - mean[genes]) / (std[genes] + 1e-3)
            scaler = StandardScaler().fit(features[split.train])
            fitted = LogisticRegression(max_iter=5000).fit(scaler.transform(features[split.train]), labels[split.train])
            predicted = fitted.predict(scaler.transform(features[split.test]))
            scores.setdefault(name, []).append(
                (accuracy_score(labels[split.test], predicted), f1_score(labels[split.test], predicted, average="macro"))
            )
    return {name: tuple(np.mean(values, axis=0)) for name, values in scores.items()}


def _positions(model: Any, vocab: list[str]) -> int:
    """LLM positions one cell takes (projected tokens of a cell expressing every gene)."""
    import numpy as np
    import torch

    features = model.encoders["cell"].featurizer((np.ones(len(vocab)), vocab))
    batch = model.encoders["cell"].featurizer.collate([features])
    with torch.no_grad():
        return int(model.projectors["cell"](model.encoders["cell"](**batch)).mask.sum())


def main() -> None:
    """Run the chosen variants and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="keep each variant's finetune folder here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trace", choices=list(VARIANTS), default=None, help="follow one variant stage by stage")
    parser.add_argument("--saved", type=Path, default=None, help="trace a saved model's cell path instead (its model/ folder)")
    parser.add_argument("--draws", type=int, default=0, help="score --trace's cell encoder alone under this many init seeds")
    parser.add_argument("--gene-choice", type=int, default=0, metavar="SPLITS",
                        help="compare gene rankings for a fitted profile token over this many random splits")
    args = parser.parse_args()

    import anndata
    import torch

    from kiban.encoders.cell import vocab_from_adata
    from kiban.quickstart.corpus import pbmc_path

    torch.set_num_threads(2)
    pbmc = pbmc_path()
    vocab = list(vocab_from_adata(anndata.read_h5ad(pbmc).raw))
    if args.gene_choice:
        print("\n| genes kept (576, z-scored) | mean LR accuracy | mean LR macro-F1 |\n| --- | ---: | ---: |")
        for name, (accuracy, f1) in gene_choices(splits=args.gene_choice, width=576, pbmc=pbmc).items():
            print(f"| {name} | {accuracy:.3f} | {f1:.3f} |")
        return
    if args.trace and args.draws:
        print(f"\n| {args.trace}: encoder init seed | LR accuracy | LR macro-F1 |\n| --- | ---: | ---: |")
        for draw, accuracy, f1 in encoder_draws(args.trace, draws=args.draws, seed=args.seed, vocab=vocab, pbmc=pbmc):
            print(f"| {draw} | {accuracy:.3f} | {f1:.3f} |")
        return
    if args.trace or args.saved:
        print(f"\n| {args.saved or args.trace}: stage | LR accuracy | LR macro-F1 |\n| --- | ---: | ---: |")
        for stage, accuracy, f1 in trace_variant(args.trace, seed=args.seed, vocab=vocab, pbmc=pbmc, saved=args.saved):
            print(f"| {stage} | {accuracy:.3f} | {f1:.3f} |")
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="cell-fusion-"))
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, out=out, seed=args.seed, vocab=vocab, pbmc=pbmc))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| cell path | LLM positions per cell | accuracy | macro-F1 | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['variant']} | {row['cell_positions']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} "
            f"| {row['seconds']:.0f} |"
        )
    print(
        f"| logistic regression on log-normalised expression | - | {rows[0]['lr_accuracy']:.3f} "
        f"| {rows[0]['lr_macro_f1']:.3f} | - |"
    )


if __name__ == "__main__":
    main()
