"""``kiban merge RECIPE.yaml --out DIR`` and ``kiban evaluate MODEL``.

``kiban merge`` writes a normal saved model (``kiban serve DIR``, ``kiban predict DIR/heads/TASK``
read it) with every source's heads in ``heads/``, ``merge.json`` (the recipe as run, the sources)
and ``metrics.json``: perplexity on general text (and on the recipe's instruction set) of the base,
of each source and of the merged model, plus each head's metric on the source it came from and on
the merged model when the recipe names a labelled file for it (``evaluate.heads``).

``kiban evaluate`` takes ``--device`` as every command that runs the model does. ``kiban merge``
runs on the CPU in float32 on purpose: it writes weights, and the bfloat16 a GPU would run in
would round the merged weights it saves.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kiban.cli import arguments, command
from kiban.device import add_device_argument

__all__ = ["evaluate_command", "merge_command"]


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", type=Path, help="a merge recipe (YAML): method, models, base; see README")
    parser.add_argument("--out", type=Path, required=True, help="the merged model's folder; must not exist")


@command("merge", help="merge LoRA adapters and models fine-tuned from one base (linear, task arithmetic, TIES, DARE)")
@arguments(_merge_arguments)
def merge_command(args: argparse.Namespace) -> int:
    """``kiban merge``: merge the recipe's models into one saved model with all their heads."""
    from kiban.adapt.merge import read_recipe

    if args.out.exists():
        raise ValueError(f"{args.out} already exists; choose a new --out")
    recipe = read_recipe(args.recipe)
    metrics = run_merge(recipe, args.out)
    after = metrics["after"].get("general_text", {}).get("perplexity")
    line = f"merged {len(recipe.models)} model(s) by {recipe.method} into {args.out}"
    if after is not None:
        line += f"; general-text perplexity {after:.2f}"
    print(line, file=sys.stderr)
    return 0


def run_merge(recipe, out: Path) -> dict:
    """Merge, take the before/after figures, and write the merged model folder ``out`` (atomically)."""
    from kiban.adapt.evaluation import head_metrics
    from kiban.adapt.forgetting import GENERAL_TEXT, language_figures, read_instructions, read_texts
    from kiban.adapt.merge import collect_heads, copy_heads, load_sources, merged_state
    from kiban.adapt.quantize import quantize_model, save_quantized
    from kiban.atomic import staged_folder, write_json
    from kiban.config import to_plain
    from kiban.tasks.heads import load_head

    evaluate = recipe.evaluate
    texts = read_texts(evaluate.lm_data or GENERAL_TEXT, limit=evaluate.max_texts)
    records = read_instructions(evaluate.instructions, limit=evaluate.max_texts) if evaluate.instructions else None
    sources, base = load_sources(recipe)
    heads = collect_heads(sources)
    unknown = sorted(set(evaluate.heads) - set(heads))
    if unknown:
        raise ValueError(f"evaluate.heads names task(s) no source has: {', '.join(unknown)}")
    loaded = {task: load_head(folder) for task, folder in heads.items()}
    # "before": every model as it was, measured before the merged weights replace the ones they share
    before = {"models": {}}
    if base is not None:
        before["base"] = language_figures(base.model, texts=texts, instructions=records)
    for source in sources:
        figures = language_figures(source.model, texts=texts, instructions=records)
        figures["heads"] = {
            task: head_metrics(source.model, loaded[task], evaluate.heads[task])
            for task in source.heads
            if task in evaluate.heads
        }
        before["models"][str(source.path)] = figures
    state = merged_state(recipe, sources, base)
    model = (base or sources[0]).model
    model.load_state_dict(state, strict=True)
    after = language_figures(model, texts=texts, instructions=records)
    after["heads"] = {task: head_metrics(model, loaded[task], file) for task, file in evaluate.heads.items()}
    metrics = {
        "method": recipe.method,
        "lm_data": str(evaluate.lm_data or GENERAL_TEXT.name),
        "instructions": evaluate.instructions,
        "before": before,
        "after": after,
    }
    with staged_folder(out, replace=False) as stage:
        if recipe.quantize:
            save_quantized(model, stage, recipe.quantize)  # float weights + quantization.json
        else:
            model.save_pretrained(stage)
        copy_heads(heads, stage)
        if recipe.quantize:
            # what serving it costs: the same figures from the model as kiban serve will load it
            layers = [head.config.layer for head in heads.values()]
            quantize_model(model, recipe.quantize, head_layers=layers)
            quantized = language_figures(model, texts=texts, instructions=records)
            quantized["heads"] = {task: head_metrics(model, loaded[task], file) for task, file in evaluate.heads.items()}
            metrics[f"after_{recipe.quantize}"] = quantized
        write_json(stage / "merge.json", {"recipe": to_plain(recipe), "heads": sorted(heads)})
        write_json(stage / "metrics.json", _finite(metrics))
    return metrics


def _finite(value):
    """``value`` with every NaN / infinity as None (an undefined metric), for strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="a saved kiban model folder (heads in MODEL/heads/<task>/)")
    parser.add_argument(
        "--lm-data",
        type=Path,
        default=None,
        help="held-out general text: .txt (documents separated by blank lines) or .jsonl of {\"text\"}; "
        "default: a short general-English sample shipped with kiban",
    )
    parser.add_argument("--instructions", type=Path, default=None, help="an instruction JSONL to score")
    parser.add_argument(
        "--head-data",
        action="append",
        default=[],
        metavar="TASK=FILE",
        help="a labelled file to score the head of TASK on (as kiban finetune reads it); repeatable",
    )
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None, help="evaluate the model quantised")
    add_device_argument(parser)
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")


@command("evaluate", help="perplexity on general text and instructions, and each head's metric (forgetting)")
@arguments(_evaluate_arguments)
def evaluate_command(args: argparse.Namespace) -> int:
    """``kiban evaluate``: print (and optionally write) the model's forgetting report as JSON."""
    from kiban.adapt.evaluation import evaluate_model
    from kiban.atomic import dumps_json, write_json
    from kiban.device import resolve_device
    from kiban.tasks.predict import load_model_with_heads

    placement = resolve_device(args.device)  # a missing GPU: one line, before the model is read
    head_data = {}
    for value in args.head_data:
        task, mark, file = value.partition("=")
        if not mark or not task or not file:
            raise ValueError(f"--head-data takes TASK=FILE, got {value!r}")
        head_data[task] = file
    model, heads = load_model_with_heads(args.model, quantize=args.quantize, placement=placement)
    report = evaluate_model(
        model, heads, lm_data=args.lm_data, instructions=args.instructions, head_data=head_data
    )
    report["model"] = str(args.model)
    report["quantize"] = getattr(model, "quantization", None)
    report = _finite(report)
    if args.out:
        write_json(args.out, report)
    print(dumps_json(report), end="")
    return 0
