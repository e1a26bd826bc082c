"""float32 vs int8 vs int4 (weight-only, ``kiban.adapt.quantize``) on the default backbone, side
by side in one run: decode tokens/s, memory, and a head's metric.

Model: SmolLM2-135M-Instruct (the GGUF default, de-quantised to float32 on load) with the default
molecule encoder and an untrained projector (seeded, the same in every process). On the CPU int8
and int4 are kiban's layers over ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu``
(int8 decode steps: kiban's AVX-512 kernel, ``kiban.adapt.int8_gemv``, where it builds;
``KIBAN_INT8_KERNEL=off`` times ATen's instead), with decoder layer 0 left float
(``DEFAULT_FLOAT_LAYERS``); "int8 all" quantises every layer; "int8, layer-2 head" also keeps
float the layers under a layer-2 head's states, as ``kiban serve`` / ``predict`` load such a model.

    tokens/s       greedy decoding of exactly ``--new-tokens`` tokens (end of turn forbidden) after
                   each of ``--prompts`` short prompts, batch 1, through kiban's own decode loop
                   (``KibanModel.complete``: what ``kiban serve`` and ``kiban chat`` run), and
                   through the backbone's Hugging Face ``generate`` (``--hf-generate``). The
                   models live in one process and take turns (every precision on prompt 1,
                   then prompt 2, ..., ``--repeats`` times round), and each (precision, prompt)'s
                   fastest round counts, so a burst of load from other jobs on a shared machine
                   neither falls on one precision alone nor stays in the figures
    memory         each precision in a process of its own: resident memory after load and
                   quantisation, and the process's peak (load included: the float32 weights exist
                   before they are quantised)
    head           a linear probe for BBBP (../shared/data/molecules/bbbp.csv; RDKit's NCI set with
                   a size label when absent) fitted once on float32 states of ``--train`` molecules,
                   at layer 2 (the quickstart's heads' layer, ``kiban finetune --layer 2``) and on the final states (all
                   30 layers), then scored on ``--test`` others with each precision's states: accuracy, ROC-AUC,
                   the share of predicted labels equal to float32's, the largest difference of a
                   class probability from float32's, and (head-independent) the median of
                   ``|h_q - h_float| / |h_float|`` over the test molecules' pooled states

    .venv/bin/python benchmarks/quantized_inference.py [--new-tokens 32] [--prompts 4] [--repeats 3]
        [--train 300] [--test 300] [--threads 2]

Prints a Markdown table, with the load average before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# row -> (quantize mode, float_layers, head_layers): "int8" and "int4" keep kiban's default float
# layers (DEFAULT_FLOAT_LAYERS, decoder layer 0); "int8 all" quantises every decoder layer; "int8,
# layer-2 head" is what kiban serve / predict load for a model whose head reads layer 2 (the
# quickstart's heads, kiban finetune --layer 2): the decoder layers under it (0 and 1) stay float
PRECISIONS = {
    "float32": (None, None, ()),
    "int8": ("int8", None, ()),
    "int8, layer-2 head": ("int8", None, (2,)),
    "int8 all": ("int8", (), ()),
    "int4": ("int4", None, ()),
}
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


# the quickstart's heads (HEAD_LAYER) read the output of decoder layer 2; the final states are
# kiban finetune's default
HEAD_LAYERS = {"layer 2": 2, "final": None}


def states(model, smiles: list[str], *, layer: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model.embed([("molecule", s) for s in smiles[i : i + 32]], layer=layer).float() for i in range(0, len(smiles), 32)]
        )


def _kiban_decode(model, text: str, new_tokens: int) -> int:
    """Greedy decode through ``KibanModel.complete`` with the end of turn forbidden: exactly ``new_tokens``."""
    from kiban.fusion.generation import GenerationSettings, RowHooks

    eos = model.tokenizer.eos_token_id

    def no_end(ids, logits):
        logits[eos] = float("-inf")
        return logits

    record = {"messages": [{"role": "user", "content": text}]}
    completion = model.complete([record], [GenerationSettings(max_tokens=new_tokens)], [RowHooks(process_logits=no_end)])
    return completion[0].completion_tokens


def _hf_decode(model, text: str, new_tokens: int) -> int:
    """Greedy decode through the backbone's Hugging Face ``generate``: exactly ``new_tokens``."""
    tokenizer = model.tokenizer
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        out = model.llm.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out.shape[1] - ids.shape[1]


def tokens_per_second(
    models: dict, *, prompts: int, new_tokens: int, repeats: int, hf_generate: bool = False
) -> dict[str, float]:
    """Greedy decode tokens/s of each model, the models taking turns prompt by prompt."""
    decode = _hf_decode if hf_generate else _kiban_decode
    best = {(name, text): float("inf") for name in models for text in PROMPTS[:prompts]}
    for _ in range(repeats):
        for text in PROMPTS[:prompts]:
            for name, model in models.items():
                started = time.perf_counter()
                assert decode(model, text, new_tokens) == new_tokens
                best[name, text] = min(best[name, text], time.perf_counter() - started)
    return {name: prompts * new_tokens / sum(best[name, t] for t in PROMPTS[:prompts]) for name in models}


def memory(args: argparse.Namespace) -> dict:
    """One precision, in this process: resident memory after load and quantisation, and the peak."""
    import resource

    import psutil

    from kiban.adapt.quantize import quantize_model

    torch.set_num_threads(args.threads)
    mode, float_layers, head_layers = PRECISIONS[args.precision]
    model = quantize_model(build_model(), mode, float_layers=float_layers, head_layers=head_layers)
    rss = psutil.Process().memory_info().rss
    tokens_per_second({"one": model}, prompts=1, new_tokens=4, repeats=1)
    return {
        "rss_gib": rss / 2**30,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def head_figures(models: dict, *, train: int, test: int) -> dict[str, dict]:
    """The BBBP probe fitted on float32 states (at each of ``HEAD_LAYERS``), scored with each model's states."""
    from heads_vs_generation import fit_probe, load_molecules

    smiles, labels = load_molecules(train + test)
    figures: dict[str, dict] = {name: {"n": len(smiles) - train} for name in models}
    for where, layer in HEAD_LAYERS.items():
        head = fit_probe("bbbp", states(models["float32"], smiles[:train], layer=layer), labels[:train], layer=layer)
        reference, reference_states = None, None
        for name, model in models.items():
            test_states = states(model, smiles[train:], layer=layer)
            with torch.no_grad():
                probabilities = head(test_states).softmax(-1).numpy()
            metrics = head.metrics(probabilities, labels[train:])
            if reference is None:
                reference, reference_states = probabilities, test_states
            figures[name][where] = {
                "accuracy": metrics["accuracy"],
                "roc_auc": metrics.get("roc_auc"),
                "agreement": float((probabilities.argmax(1) == reference.argmax(1)).mean()),
                "max_dp": float(np.abs(probabilities - reference).max()),
                # head-independent: how far the pooled states moved, relative to their length (median)
                "state_error": float(
                    ((test_states - reference_states).norm(dim=1) / reference_states.norm(dim=1)).median()
                ),
            }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--hf-generate", action="store_true", help="time Hugging Face generate instead of kiban's decode loop"
    )
    parser.add_argument("--precision", default=None, help=argparse.SUPPRESS)  # internal: one memory child
    args = parser.parse_args()
    if args.precision:
        print(json.dumps(memory(args)))
        return
    from kiban.adapt.quantize import quantize_model

    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.time()
    rows = {}
    for precision in PRECISIONS:
        command = [sys.executable, __file__, "--threads", str(args.threads), "--precision", precision]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0:
            sys.exit(f"{precision} memory run failed:\n{done.stderr[-3000:]}")
        rows[precision] = json.loads(done.stdout.strip().splitlines()[-1])
        print(precision, rows[precision], file=sys.stderr, flush=True)  # a partial run still says something
    reference = build_model()
    models = {"float32": reference}
    for precision, (mode, float_layers, head_layers) in list(PRECISIONS.items())[1:]:
        models[precision] = quantize_model(
            copy.deepcopy(reference), mode, float_layers=float_layers, head_layers=head_layers
        )
    for precision, figures in head_figures(models, train=args.train, test=args.test).items():
        rows[precision].update(figures)
        print(precision, figures, file=sys.stderr, flush=True)
    speeds = tokens_per_second(
        models, prompts=args.prompts, new_tokens=args.new_tokens, repeats=args.repeats, hf_generate=args.hf_generate
    )
    for precision, speed in speeds.items():
        rows[precision]["tokens_per_s"] = speed
    base = rows["float32"]
    print(f"load average (1/5/15 min) before: {' '.join(f'{v:.1f}' for v in load_before)}; "
          f"after: {' '.join(f'{v:.1f}' for v in os.getloadavg())}; {time.time() - started:.0f} s; "
          f"{args.threads} threads, {os.cpu_count()} CPUs, torch {torch.__version__}")
    loop = "Hugging Face generate" if args.hf_generate else "kiban's decode loop (KibanModel.complete)"
    print(f"decode: {loop}; head: BBBP probe, {base['n']} test molecules (one molecule = {100 / base['n']:.2f}% accuracy)")
    heads = " | ".join(f"BBBP {where}: accuracy / ROC-AUC / labels as float32 / state error" for where in HEAD_LAYERS)
    print(f"| precision | decode tokens/s | × float32 | RSS after load | peak RSS | {heads} |")
    print("| --- " * (5 + len(HEAD_LAYERS)) + "|")
    for precision, row in rows.items():
        cells = []
        for where in HEAD_LAYERS:
            head = row[where]
            auc = "n/a" if head["roc_auc"] is None else f"{head['roc_auc']:.4f}"
            cells.append(f"{head['accuracy']:.4f} / {auc} / {head['agreement']:.4f} / {head['state_error']:.3f}")
        print(
            f"| {precision} | {row['tokens_per_s']:.2f} | ×{row['tokens_per_s'] / base['tokens_per_s']:.2f} | "
            f"{row['rss_gib']:.2f} GiB (×{row['rss_gib'] / base['rss_gib']:.2f}) | "
            f"{row['peak_rss_gib']:.2f} GiB | " + " | ".join(cells) + " |"
        )


if __name__ == "__main__":
    main()
