"""``report.html``: one self-contained page (inline CSS and PNGs, no script, nothing fetched).

Every number in its metrics table is read from ``metrics.json`` and carries the JSON pointer it
came from (``<td data-metric="/tasks/cell-type/results/3/metrics/accuracy">``), so a reader (or a
test) can check the page against the file. Figures: the align stage's loss curve, UMAPs of the
cells (kiban's fused states beside log-normalised expression) coloured by cell type, the cell-type
head's confusion matrix and the property head's parity plot (both from ``kiban finetune``).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from kiban.atomic import staged_file, write_atomic
from kiban.tasks.plots import pyplot  # matplotlib on the Agg backend, as the heads' plots

__all__ = ["METRIC_COLUMNS", "display_name", "write_report"]

# the columns shown per task kind: (metrics key, header); a key a run lacks shows as "–"
METRIC_COLUMNS = {
    "classification": [
        ("accuracy", "accuracy"),
        ("macro_f1", "macro F1"),
        ("roc_auc_macro_ovr", "macro OvR ROC-AUC"),
    ],
    # regression metrics are per target: metrics[target][key]
    "regression": [("rmse", "RMSE ↓"), ("spearman", "Spearman"), ("concordance_index", "concordance index")],
}

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
tr.head td { font-weight: 600; background: #f3f7ff; }
figure { display: inline-block; margin: .5rem 1rem .5rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9rem; color: #555; max-width: 520px; }
code, pre { background: #f5f5f5; padding: .1rem .3rem; } pre { padding: .6rem; overflow-x: auto; }
.note { background: #fff8e5; border-left: 4px solid #f0b400; padding: .5rem .8rem; }
"""


def write_report(out: Path, metrics: dict[str, Any], *, head_layer: int) -> Path:
    """Write ``out/plots/{loss,umap}.png`` and ``out/report.html``; returns the report's path.

    head_layer: the decoder layer whose pooled states the heads read (for the captions).
    """
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    loss_png = _loss_plot(plots / "loss.png", metrics["align"])
    cells = np.load(out / "cells.npz")
    umap_png = _umap_plot(plots / "umap.png", cells)
    figures = [
        (
            loss_png,
            "Align stage: next-token loss on the answers per optimizer step (thin), its running mean "
            "(thick), and the validation loss before the first step and after the last (dots).",
        ),
        (
            umap_png,
            "UMAP of every pbmc68k_reduced cell, coloured by its annotated type (bulk_labels): "
            f"left kiban's fused states (pooled after decoder layer {head_layer}, what the cell-type "
            "head reads), right log-normalised expression (PCA, the usual scanpy view).",
        ),
    ]
    for task, name, caption in (
        (
            "cell-type",
            "confusion.png",
            "Cell-type head on its held-out test cells: confusion matrix (rows true, columns predicted).",
        ),
        (
            "logp",
            "parity.png",
            "logP head on its held-out test molecules (Bemis–Murcko scaffold split): "
            "predicted vs. RDKit's Crippen logP.",
        ),
    ):
        path = out / "heads" / task / "plots" / name
        if path.is_file():
            figures.append((path, caption))
    page = _page(metrics, figures)
    return write_atomic(out / "report.html", page)


# ----------------------------------------------------------------------------------------------


def _page(metrics: dict[str, Any], figures: list[tuple[Path, str]]) -> str:
    e = html.escape
    align = metrics["align"]
    corpus = metrics["corpus"]
    by_modality = ", ".join(f"{m} {n}" for m, n in corpus["by_modality"].items())
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>kiban quickstart report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>kiban quickstart</h1>",
        f"<p>kiban {e(metrics['kiban_version'])}, model <code>{e(metrics['model'])}</code>, seed "
        f"{metrics['seed']}, budget {metrics['minutes']:g} min. Corpus: {corpus['records']['train']} training and "
        f"{corpus['records']['val']} validation records ({e(by_modality)}); "
        f"{corpus['held_out_cells']} cells held out for the cell-type head's test. "
        f"Align stage: {align['steps']} steps, {align['samples']} records; validation loss "
        + " → ".join(f"{_number(v['loss'])} (step {v['step']})" for v in align["val_loss"])
        + ".</p>",
        '<p class="note">The encoders other than MiniLM are randomly initialised (no pretrained '
        "protein, cell, image or molecule weights install offline) and the align stage trains only "
        "the projectors, for a few minutes on a CPU. The heads below therefore read a lightly "
        "trained model: compare them with the baselines to see the pipeline work, not as a result "
        "about a pretrained foundation model.</p>",
        "<h2>Task heads vs. baselines (held-out test split)</h2>",
    ]
    for task, result in metrics["tasks"].items():
        parts.append(_task_table(task, result))
    parts.append("<h2>Figures</h2>")
    for path, caption in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(path.stem)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    parts += [
        "<h2>Serve it</h2>",
        "<pre>kiban serve MODEL_DIR --api-keys-file api-keys.txt</pre>",
        "<p>MODEL_DIR is the <code>model</code> folder beside this report. The exact commands "
        "(with a <code>curl</code> example) were printed at the end of the run.</p>",
        "<h2>Where the data comes from</h2>",
        "<p>See <code>corpus/SOURCES.md</code>; every record of <code>corpus/train.jsonl</code> names "
        "its source. Each metric above is also in <code>metrics.json</code>, with the split it came "
        "from.</p>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _task_table(task: str, result: dict[str, Any]) -> str:
    e = html.escape
    columns = METRIC_COLUMNS.get(result["kind"], METRIC_COLUMNS["classification"])
    split = result["split"]
    rows = []
    for index, entry in enumerate(result["results"]):
        if entry["split"] != "test":
            continue
        name = entry["model"]
        is_head = name.startswith("head (")
        if is_head:
            name = display_name(name)
        where = f"/tasks/{task}/results/{index}/metrics"
        values = entry["metrics"]
        if result["kind"] == "regression":  # one table per target would be wider than useful: the first
            where, values = f"{where}/{result['labels'][0]}", values[result["labels"][0]]
        cells = [f"<td>{e(name)}</td>", f"<td>{values.get('n', '')}</td>"]
        for key, _ in columns:
            value = values.get(key)
            pointer = f"{where}/{key}"
            cells.append(f'<td data-metric="{e(pointer)}">{_number(value)}</td>')
        rows.append(f'<tr class="{"head" if is_head else ""}">' + "".join(cells) + "</tr>")
    header = "".join(f"<th>{e(title)}</th>" for _, title in columns)
    sizes = ", ".join(f"{k} {v}" for k, v in split["sizes"].items())
    labels = result["labels"]
    what = f"{len(labels)} classes" if result["kind"] == "classification" else "target " + ", ".join(labels)
    return (
        f"<h3>{e(task)}: {e(result['modality'])}, {e(result['kind'])} ({e(what)})</h3>"
        f"<p>{result['n']} rows; {e(split['method'])} split, seed {split['seed']} ({e(sizes)}).</p>"
        f"<table><tr><th>model</th><th>n test</th>{header}</tr>" + "\n".join(rows) + "</table>"
    )


def display_name(model: str) -> str:
    """A results entry's model, short: "head (probe, /abs/path/model, layer 2)" -> "kiban head (probe, layer 2)"."""
    if not model.startswith("head ("):
        return model
    parts = [p for p in model[len("head (") : -1].split(", ") if "/" not in p and p != "tiny"]
    return f"kiban head ({', '.join(parts)})"


def _number(value: Any) -> str:
    """Three decimals, the same rounding a reader of metrics.json would do; missing -> "–"."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{float(value):.3f}"


# ----------------------------------------------------------------------------------------------


def _loss_plot(path: Path, align: dict[str, Any]) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    steps = np.arange(1, len(align["loss"]) + 1)
    losses = np.asarray(align["loss"], dtype=float)
    axis.plot(steps, losses, linewidth=0.8, alpha=0.45, label="train (per step)")
    window = max(1, len(losses) // 20)
    if window > 1:  # a running mean: one step's 4 records are a noisy sample
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1 :], smooth, linewidth=1.8, color="C0", label=f"train (mean of {window})")
    if align["val_loss"]:
        axis.scatter(
            [v["step"] for v in align["val_loss"]],
            [v["loss"] for v in align["val_loss"]],
            color="C3",
            zorder=3,
            label="validation (before / after)",
        )
    axis.set(xlabel="optimizer step", ylabel="loss", title="align stage")
    axis.legend()
    figure.tight_layout()
    with staged_file(path) as staged:
        figure.savefig(staged, dpi=100, format="png")
    plt.close(figure)
    return path


def _umap_plot(path: Path, cells: Any) -> Path:
    plt = pyplot()
    labels = cells["labels"]
    names = sorted(set(labels.tolist()))
    panels = [("kiban fused states", cells["umap"])]
    if "umap_expression" in cells.files:
        panels.append(("log-normalised expression", cells["umap_expression"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.4, 4.6), squeeze=False)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for axis, (title, xy) in zip(axes[0], panels):
        for k, name in enumerate(names):
            chosen = labels == name
            axis.scatter(xy[chosen, 0], xy[chosen, 1], s=6, color=colours(k % colours.N), label=name)
        axis.set(title=title, xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    axes[0][-1].legend(
        loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, markerscale=2, frameon=False
    )
    figure.tight_layout()
    with staged_file(path) as staged:
        figure.savefig(staged, dpi=100, format="png")
    plt.close(figure)
    return path
