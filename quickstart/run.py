"""``kiban quickstart``: the whole platform on bundled real data, in stages that resume.

    corpus   instruction records from pbmc68k_reduced cells, RDKit's NCI molecules (with
             RDKit-computed properties), scikit-image microscopy crops, and the user's FASTA files
    align    the align stage (projectors only) over the backbone, on the CPU, with a progress bar;
             ``kiban fit``'s own runner: atomic checkpoints, exact resume, model export
    heads    ``kiban finetune`` twice on the aligned model: a cell-type head (pbmc68k_reduced) and a
             molecular-property head (logP of NCI molecules the corpus never saw), each scored on a
             held-out split beside a specialist's baseline and the trivial predictor
    cells    UMAPs of every cell: the fused states the cell-type head read (after decoder layer
             ``HEAD_LAYER``) beside log-normalised expression
    report   metrics.json, plots/*.png and a self-contained report.html
    model    the exported model moved to OUT/model with both heads, so ``kiban serve OUT/model``
             answers chat, embeddings and /v1/predict/<task>

``OUT/quickstart.json`` records the run's settings and the stages done. Re-running with the same
settings skips finished stages (training resumes from its newest checkpoint); different settings
on the same folder are refused. ``--minutes`` sizes the run (training steps, data) from a fixed
table calibrated on a 2-core CPU; it is not a clock, so the same seed gives the same run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiban.atomic import staged_folder, stale_stages, write_json

__all__ = ["Plan", "QuickstartError", "QuickstartOptions", "plan_for", "run_quickstart"]

log = logging.getLogger(__name__)

STATE_FILE = "quickstart.json"
STAGES = ("corpus", "align", "heads", "cells", "report", "model")
CELL_TASK = "cell-type"
# The heads read the fused states after this decoder layer: as accurate as the final states for
# probes and a fraction of the cost (benchmarks/README.md, heads_vs_generation.py)
HEAD_LAYER = 2
CELL_PROJECTOR_GAIN = 256.0
MOLECULE_TASK = "logp"
MODELS = ("default", "tiny")


class QuickstartError(ValueError):
    """Bad settings or an output folder that holds something else: one clear line for the user."""


@dataclass
class QuickstartOptions:
    """What ``kiban quickstart`` was asked for: output folder, time budget, model, seed, inputs."""
    out: Path = Path("runs/quickstart")
    minutes: float = 10.0
    seed: int = 0
    model: str = "default"  # default: six encoders + SmolLM2-135M-Instruct; tiny: random, for smoke tests
    proteins: Path | None = None
    dna: Path | None = None
    progress: bool = True
    device: str = "cpu"  # --device: auto | cpu | cuda | cuda:N (kiban.device); resuming may change it


@dataclass
class Plan:
    """What ``--minutes`` buys: align steps and batch size, corpus and head sizes."""

    align_steps: int
    batch_size: int
    corpus_molecules: int
    head_molecules: int
    image_crops: int
    head_epochs: int

    def describe(self) -> str:
        """The options in one line, for the run's first message."""
        return (
            f"{self.align_steps} align steps of {self.batch_size} records, "
            f"{self.corpus_molecules} corpus molecules, {self.head_molecules} head molecules, "
            f"{2 * self.image_crops} image crops"
        )


# Calibrated on the project's 2-core CPU box with the default model (2026-11-25): about 1.5 minutes
# are fixed costs (loading the backbone twice, the corpus, embedding 700 cells and the head
# molecules, UMAP, report, copying the model) and the align stage runs about 60 steps of 4 records
# a minute; 50 leaves a margin for a busier machine.
_FIXED_MINUTES = 1.5
_STEPS_PER_MINUTE = 50


def plan_for(minutes: float, model: str) -> Plan:
    """The sizes of each stage that fit ``minutes`` on this machine for ``model``."""
    if minutes <= 0:
        raise QuickstartError(f"--minutes must be positive, got {minutes:g}")
    if model == "tiny":  # smoke tests: seconds, whatever the budget
        return Plan(
            align_steps=max(4, round(4 * minutes)),
            batch_size=4,
            corpus_molecules=60,
            head_molecules=120,
            image_crops=4,
            head_epochs=100,
        )
    training = max(0.5, minutes - _FIXED_MINUTES)
    scale = min(1.0, minutes / 10.0)
    return Plan(
        align_steps=max(5, round(_STEPS_PER_MINUTE * training)),
        batch_size=4,
        corpus_molecules=max(100, round(600 * scale)),
        head_molecules=max(120, round(400 * scale)),
        image_crops=max(4, round(24 * scale)),
        head_epochs=200,
    )


def run_quickstart(options: QuickstartOptions) -> dict[str, Any]:
    """Run (or finish) the quickstart in ``options.out``; returns metrics.json's content."""
    if options.model not in MODELS:
        raise QuickstartError(f"--model must be one of {', '.join(MODELS)}, got {options.model!r}")
    for name, path in (("--proteins", options.proteins), ("--dna", options.dna)):
        if path is not None and not Path(path).is_file():
            raise QuickstartError(f"{name}: no such file: {path}")
    _quiet_libraries()
    out = Path(options.out)
    plan = plan_for(options.minutes, options.model)
    state = _claim(out, _fingerprint(options))
    started = time.time()
    say = _Say(options.progress)
    say(f"kiban quickstart -> {out}  (seed {options.seed}; {plan.describe()})")

    if "corpus" not in state["done"]:
        say("[1/6] building the instruction corpus from bundled real data")
        _corpus(out, options, plan)
        _mark(out, state, "corpus")
    corpus = json.loads((out / "corpus" / "corpus.json").read_text())

    if "align" not in state["done"]:
        say(f"[2/6] align stage: {plan.align_steps} steps (projectors only, the backbone frozen)")
        _align(out, options, plan)
        _mark(out, state, "align")

    if "heads" not in state["done"]:
        say("[3/6] fine-tuning and scoring the task heads against the baselines")
        model = _load_model(out / "train" / "model", device=options.device)
        loss = validation_loss(model, out)
        write_json(out / "train" / "val_after.json", {"step": plan.align_steps, "loss": loss})
        _heads(out, options, plan, model)
        del model
        _mark(out, state, "heads")

    if "cells" not in state["done"]:
        say("[4/6] UMAP of the cell embeddings")
        _cells(out, options)
        _mark(out, state, "cells")

    say("[5/6] metrics.json and report.html")
    metrics = _metrics(out, options, plan, corpus)
    if "report" not in state["done"]:
        from kiban.quickstart.report import write_report

        write_report(out, metrics, head_layer=HEAD_LAYER)
        _mark(out, state, "report")

    if "model" not in state["done"]:
        say("[6/6] saving the model with its heads")
        _assemble_model(out)
        _mark(out, state, "model")
    say(f"done in {time.time() - started:.0f} s (this invocation)")
    return metrics


def _quiet_libraries() -> None:
    """Keep the user's terminal for the run's own progress: library chatter that says nothing to
    them (pbmc68k_reduced's old-format warning, Lightning's banners and tips) is dropped.
    """
    warnings.filterwarnings("ignore", message=r"Moving element from \.uns\[.neighbors.\]")
    warnings.filterwarnings("ignore", message=r"The `srun` command is available")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # frozen encoders
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    import pytorch_lightning  # noqa: F401  (it sets its own logger to INFO when imported)

    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------------------------
# The run's identity: refuse a folder that holds another run


def _fingerprint(options: QuickstartOptions) -> dict[str, Any]:
    from kiban.version import __version__

    def file_id(path: Path | None) -> dict[str, str] | None:
        if path is None:
            return None
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return {"path": str(Path(path).resolve()), "sha256": digest}

    return {
        "kiban_version": __version__,
        "seed": options.seed,
        "minutes": options.minutes,
        "model": options.model,
        "proteins": file_id(options.proteins),
        "dna": file_id(options.dna),
    }


def _claim(out: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    state_file = out / STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
            recorded = state["run"]
        except (ValueError, KeyError, TypeError):
            raise QuickstartError(f"{state_file} is damaged; delete {out} or choose another --out") from None
        if recorded != fingerprint:
            changed = ", ".join(
                f"{key} {recorded.get(key)!r} there vs {fingerprint[key]!r} now"
                for key in fingerprint
                if recorded.get(key) != fingerprint[key]
            )
            raise QuickstartError(
                f"{out} holds a different quickstart run ({changed}); "
                "choose another --out, or delete the folder to start again"
            )
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuickstartError(
            f"{out} is not empty and holds no quickstart run ({STATE_FILE} missing); choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    state = {"run": fingerprint, "done": []}
    write_json(state_file, state)
    return state


def _mark(out: Path, state: dict[str, Any], stage: str) -> None:
    state["done"].append(stage)
    write_json(out / STATE_FILE, state)


class _Say:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Stages


def _corpus(out: Path, options: QuickstartOptions, plan: Plan) -> None:
    from kiban.quickstart.corpus import CorpusPlan, build_corpus

    target = out / "corpus"
    for stale in stale_stages(target):  # an interrupted earlier build
        shutil.rmtree(stale, ignore_errors=True)
    with staged_folder(target) as staging:  # replaces a corpus never marked done
        corpus = build_corpus(
            staging,
            CorpusPlan(
                molecules=plan.corpus_molecules,
                head_molecules=plan.head_molecules,
                image_crops=plan.image_crops,
                seed=options.seed,
                proteins=options.proteins,
                dna=options.dna,
            ),
        )
        write_json(staging / "corpus.json", corpus.to_dict())


def model_config(out: Path, model: str, *, seed: int = 0) -> dict[str, Any]:
    """The fused model the quickstart trains: every encoder (so the served model takes any input),
    the cell encoder's vocabulary = the pbmc68k_reduced genes, each cell one whole-profile token
    fitted to the corpus cells (a 16-token resampler over gene tokens in the tiny model), a 16-token
    resampler for images (short fused sequences), atom / residue / base tokens for the rest.
    """
    import anndata

    from kiban.encoders.cell import vocab_from_adata
    from kiban.quickstart.corpus import PBMC_FILE, corpus_cell_rows

    adata = anndata.read_h5ad(out / "corpus" / PBMC_FILE)
    vocab = list(vocab_from_adata(adata.raw))
    if model == "tiny":
        from kiban.tiny import tiny_config

        config = tiny_config().to_plain()
        config["encoders"]["cell"] = {"preset": "tiny", "gene_vocab": vocab}
        config["default_projector"] = {"kind": "mlp2"}
    else:
        from kiban.data.cell_profiles import fitted_profile_settings
        from kiban.fusion.model import default_config

        config = default_config().to_plain()
        # The cell as one whole-profile token through a linear projector: measured against 16
        # resampler tokens over a gene-token transformer, it keeps far more of what the expression
        # says in the fused states. The token starts fitted to the corpus cells (never the head's
        # test cells): the 576 most dispersed of the 765 genes, each z-scored on its own dimension;
        # random gene vectors lost a draw-dependent share of the profile (docs/results.md,
        # benchmarks/cell_fusion_variants.py).
        cell = {"preset": "default", "gene_vocab": vocab, "profile_token": "only", "width": 576}
        rows = corpus_cell_rows(adata.n_obs, seed)
        config["encoders"]["cell"] = {**cell, **fitted_profile_settings(cell, adata.raw.to_adata(), rows=rows)}
    config["projectors"] = {"image": {"kind": "resampler", "num_tokens": 16, "depth": 1}}
    if model == "tiny":
        config["projectors"]["cell"] = {"kind": "resampler", "num_tokens": 16, "depth": 1}
    else:
        # An orthogonal start keeps every direction of the cell's profile token; the gain puts the
        # token at a norm the backbone's first layers add little to, so the states a head reads at
        # layer 2 still hold the cell (benchmarks/cell_fusion_variants.py, docs/results.md)
        config["projectors"]["cell"] = {"kind": "linear", "init": "orthogonal", "gain": CELL_PROJECTOR_GAIN}
    config.pop("kiban_version", None)
    return config


def align_config(out: Path, options: QuickstartOptions, plan: Plan) -> Any:
    """The align stage's TrainConfig (what ``kiban fit`` would read from YAML; saved beside the run).
    No validation inside the fit: the validation loss is measured before the first step and on the
    exported model (``validation_loss``), so a kill between a checkpoint and a validation loses none.
    """
    import torch

    from kiban.device import resolve_device
    from kiban.train.config import config_from_dict

    steps = plan.align_steps
    placement = resolve_device(options.device)
    on_gpu = placement.device.type == "cuda"
    return config_from_dict(
        {
            "seed": options.seed,
            "stage": "align",
            "run": {"dir": str(out / "train"), "resume": "auto"},
            "model": model_config(out, options.model, seed=options.seed),
            "data": {
                "train": str(out / "corpus" / "train.jsonl"),
                "val": None,
                "batch_size": plan.batch_size,
            },
            "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_steps": max(1, steps // 10), "min_lr_ratio": 0.1},
            "trainer": {
                "strategy": "auto",
                "accelerator": "gpu" if on_gpu else "cpu",
                "devices": 1,  # the align stage trains on one device (cuda:0 of CUDA_VISIBLE_DEVICES)
                "precision": "bf16-mixed" if placement.dtype == torch.bfloat16 else "32-true",
                "max_steps": steps,
                "log_every_n_steps": max(1, steps // 10),
                "gradient_clip_val": 1.0,
            },
            "callbacks": {
                "checkpoint": {"every_n_steps": max(2, steps // 4), "keep_last": 1, "monitor": None},
                "nan_guard": {"action": "stop"},
                "lr_monitor": False,
            },
        }
    )


def _align(out: Path, options: QuickstartOptions, plan: Plan) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelSummary

    from kiban.quickstart.progress import TrainingProgress
    from kiban.train.runner import fit

    config = align_config(out, options, plan)

    class ValidationBeforeTraining(pl.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step == 0:  # a resumed run measured it before its first checkpoint
                loss = validation_loss(pl_module.model, out)
                write_json(out / "train" / "val_before.json", {"step": 0, "loss": loss})

    callbacks = [
        TrainingProgress(plan.align_steps, enabled=options.progress),
        ValidationBeforeTraining(),
        ModelSummary(max_depth=0),  # no parameter table: the stage line says what trains
    ]
    fit(config, callbacks=callbacks)
    if not (out / "train" / "model" / "config.json").is_file():
        raise RuntimeError(f"the align stage ended without exporting {out / 'train' / 'model'}")


def validation_loss(model: Any, out: Path, *, batch_size: int = 4) -> float:
    """Mean next-token loss on the answers of ``corpus/val.jsonl`` (records the align stage never trains on)."""
    import torch

    from kiban.data.datamodule import KibanDataModule
    from kiban.train.objectives import fused_losses

    data = KibanDataModule(
        splits={"val": str(out / "corpus" / "val.jsonl")},
        modalities=list(model.encoders),
        batch_size=batch_size,
        shuffle=False,
    )
    data.attach(model.processor, rank=0, world_size=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.loader("val"):
            total += float(fused_losses(model, batch.inputs.to(model.device)).loss) * len(batch.ids)
            count += len(batch.ids)
    return total / max(1, count)


def _load_model(path: Path, *, device: str = "cpu") -> Any:
    import torch

    from kiban.device import place_model, resolve_device
    from kiban.fusion import KibanModel

    torch.manual_seed(0)
    return place_model(KibanModel.from_pretrained(path), resolve_device(device)).eval()


def _heads(out: Path, options: QuickstartOptions, plan: Plan, model: Any) -> None:
    from kiban.quickstart.corpus import PBMC_FILE, PROPERTY
    from kiban.tasks.finetune import FinetuneOptions, finetune

    heads = out / "heads"
    heads.mkdir(exist_ok=True)
    for stale in heads.glob(".*.partial"):  # a fine-tune interrupted by a kill
        shutil.rmtree(stale, ignore_errors=True)
    jobs = {
        CELL_TASK: dict(
            data=out / "corpus" / PBMC_FILE, labels=["bulk_labels"], use_raw=True, save_features=True
        ),
        MOLECULE_TASK: dict(data=out / "corpus" / "molecules.csv", labels=[PROPERTY]),
    }
    for task, job in jobs.items():
        if (heads / task / "metrics.json").is_file():
            continue
        finetune(
            FinetuneOptions(
                task=task,
                out=heads / task,
                model=str((out / "train" / "model").resolve()),
                loaded_model=model,
                layer=min(HEAD_LAYER, model.num_layers),
                seed=options.seed,
                epochs=plan.head_epochs,
                progress=options.progress and sys.stderr.isatty(),
                **job,
            )
        )
    _check_no_leak(out)


def _check_no_leak(out: Path) -> None:
    """The cell-type head's test cells must not be in the corpus (they were left out by row)."""
    import csv

    with (out / "heads" / CELL_TASK / "predictions.csv").open() as handle:
        tested = {f"pbmc:{row['id']}" for row in csv.DictReader(handle)}
    seen = set()
    for name in ("train.jsonl", "val.jsonl"):
        for line in (out / "corpus" / name).read_text().splitlines():
            seen.add(json.loads(line)["id"])
    leaked = sorted(tested & seen)
    if leaked:
        raise RuntimeError(
            f"{len(leaked)} test cells of the cell-type head are in the corpus, e.g. {leaked[:3]}"
        )


def _cells(out: Path, options: QuickstartOptions) -> None:
    """Every pbmc68k_reduced cell: the fused states the cell-type head read (its fine-tune saved
    them), log-normalised expression, and a UMAP of each (cells.npz).
    """
    import anndata
    import numpy as np

    from kiban.quickstart.corpus import PBMC_FILE

    saved = np.load(out / "heads" / CELL_TASK / "features.npz")
    ids = [str(i) for i in saved["ids"]]
    adata = anndata.read_h5ad(out / "corpus" / PBMC_FILE)
    label_of = dict(zip(map(str, adata.obs_names), map(str, adata.obs["bulk_labels"])))
    row_of = {name: row for row, name in enumerate(map(str, adata.obs_names))}
    expression = adata.raw.X
    expression = expression.toarray() if hasattr(expression, "toarray") else np.asarray(expression)
    expression = expression[[row_of[i] for i in ids]]
    states = saved["features"]
    np.savez(
        out / "cells.npz",
        ids=np.array(ids),
        labels=np.array([label_of[i] for i in ids]),
        states=states.astype(np.float32),
        umap=_umap(states, seed=options.seed).astype(np.float32),
        umap_expression=_umap(expression, seed=options.seed).astype(np.float32),
    )


def _umap(states: Any, *, seed: int) -> Any:
    """2-D UMAP of the states (PCA to 50 components first, as scanpy does), seeded."""
    import numpy as np
    from sklearn.decomposition import PCA

    x = np.asarray(states, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    x = PCA(n_components=min(50, *x.shape), random_state=seed).fit_transform(x)
    import umap

    return umap.UMAP(n_neighbors=15, min_dist=0.5, random_state=seed, n_jobs=1).fit_transform(x)


def _metrics(out: Path, options: QuickstartOptions, plan: Plan, corpus: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the align stage's losses, both heads' metrics.json, the corpus counts."""
    from kiban.version import __version__

    metrics = {
        "kiban_version": __version__,
        "seed": options.seed,
        "minutes": options.minutes,
        "model": options.model,
        "plan": asdict(plan),
        "corpus": corpus,
        "align": align_summary(out / "train"),
        "tasks": {
            task: json.loads((out / "heads" / task / "metrics.json").read_text())
            for task in (CELL_TASK, MOLECULE_TASK)
        },
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def align_summary(run_dir: Path) -> dict[str, Any]:
    """Losses per optimizer step (the last entry of a step wins after a resume) and the validation
    loss before the first step and after the last.
    """
    steps: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"]] = entry
    ordered = [steps[k] for k in sorted(steps)]
    val = [json.loads((run_dir / name).read_text()) for name in ("val_before.json", "val_after.json")]
    return {
        "steps": len(ordered),
        "samples": sum(e["samples"] for e in ordered),
        "tokens": sum(e["tokens"] for e in ordered),
        "loss": [round(e["loss"], 6) for e in ordered],
        "first_loss": round(ordered[0]["loss"], 6) if ordered else None,
        "final_loss": round(ordered[-1]["loss"], 6) if ordered else None,
        "val_loss": [{"step": v["step"], "loss": round(v["loss"], 6)} for v in val],
    }


def _assemble_model(out: Path) -> None:
    """OUT/model: the exported model (moved from train/model, not copied: it is most of a GB) with
    both heads under heads/, every head.json naming OUT/model (relative to the head's folder) (``kiban serve OUT/model``,
    ``kiban predict OUT/model/heads/logp``). Safe to repeat after an interruption.
    """
    from kiban.tasks.heads import model_reference

    target, staging, exported = out / "model", out / "model.partial", out / "train" / "model"
    if not staging.is_dir():
        exported.rename(staging)
    # a fixed staging name: a run killed after the move above finds the model there next time
    with staged_folder(target, stage=staging) as staging:
        shutil.rmtree(staging / "heads", ignore_errors=True)
        for task in (CELL_TASK, MOLECULE_TASK):
            shutil.copytree(out / "heads" / task / "heads" / task, staging / "heads" / task)
            for head_json, head_dir in (  # head_dir: where the head is once the model is in place
                (staging / "heads" / task / "head.json", target / "heads" / task),
                (out / "heads" / task / "heads" / task / "head.json", out / "heads" / task / "heads" / task),
            ):
                config = json.loads(head_json.read_text())
                config["extra"]["model"] = model_reference(target, head_dir)
                write_json(head_json, config)
