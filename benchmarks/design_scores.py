"""The design table of docs/design.md: a trained model's molecules beside two baselines, in one run.

    kiban design records --molecules ../shared/data/molecules/*.csv --dti ../shared/data/dti --out runs/design-data
    kiban fit --config configs/design_cpu.yaml
    python benchmarks/design_scores.py --model runs/design-cpu/model --data runs/design-data --n 300

Rows: the model unconditioned, the model asked for ``--condition`` (plain, and with classifier-free
guidance at each ``--guidance`` scale), the training set sampled (the
copy-the-data baseline), and a character-level SMILES 6-gram model fitted on the same training
molecules. Columns: validity, uniqueness, novelty, internal diversity (MOSES), FCD and the
GuacaMol KL score against the held-out test molecules, and the share of samples inside the asked
ranges (for every row, so the conditioned model reads against the unconditioned one and the data),
with its Wilson 95% interval, and a second table with the share meeting each condition alone.
The same model decoded without the SELFIES constraint: how many of its answers parse, and why not.
Probes (``--probe``): one extreme condition at a time, the share meeting it when asked (plain and
guided) against the unconditioned model and the data: does the model follow what it is asked?
Likelihood probes (``--likelihood-probe``): held-out molecules' log-likelihood after asking one
condition minus after asking its opposite, or minus unconditioned (``A | -``, by default for
``--condition``): does what is asked move the model at all? The target
probe: held-out drugs' log-likelihood after their own target minus after another one.
Proteins: Gibbs designs of a template beside random mutants with as many changes, by PLL.
Prints a Markdown table and writes the numbers as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from kiban.design import Reference, design_molecules, design_proteins, parse_conditions, pseudo_log_likelihood
from kiban.design.conditions import compute_properties, meets
from kiban.design.metrics import NgramSmiles, molecule_scores, sample_training
from kiban.design.molecules import canonical_smiles, read_smiles_file
from kiban.design.proteins import identity, random_mutants
from kiban.fusion import KibanModel

# The N-terminal 60 residues of TEM-1 beta-lactamase (P62593), the template of the protein rows.
TEMPLATE = "MSIQHFRVALIPFFAAFCLPVFAHPETLVKVKDAEDQLGARVGYIELDLNSGKILESFRP"


def _shares(smiles: list[str | None], conditions) -> dict:
    """The share of valid samples meeting all ``conditions`` (with its Wilson 95% interval) and each one."""
    from rdkit import Chem

    values = [compute_properties(Chem.MolFromSmiles(s)) for s in smiles if s]
    if not values:
        return {"in_ranges": float("nan"), "in_ranges_95": [float("nan")] * 2, "each": {}}
    hits = sum(meets(v, conditions) for v in values)
    return {
        "in_ranges": hits / len(values),
        "in_ranges_95": _wilson(hits, len(values)),
        "each": {c.text(): sum(meets(v, [c]) for v in values) / len(values) for c in conditions},
    }


def _unconstrained_validity(model, n: int, seed: int, symbols) -> dict:
    """The same model and prompt decoded without the SELFIES constraint: how many answers parse."""
    from kiban.design.molecules import design_prompt
    from kiban.design.selfies_decoding import (
        SelfiesConstraint,
        decode_selfies,
        default_alphabet,
        split_symbols,
    )
    from kiban.fusion.generation import GenerationSettings, context_length, generate_completions

    alphabet = set(default_alphabet(symbols))
    tokens = SelfiesConstraint(model.tokenizer, sorted(alphabet), max_symbols=100).max_tokens()
    tokens = min(tokens, (context_length(model.llm) or tokens + 128) - 128)
    record = {"id": "design", "messages": [{"role": "user", "content": design_prompt()}]}
    texts: list[str] = []
    for start in range(0, n, 16):
        rows = min(16, n - start)
        settings = [GenerationSettings(max_tokens=tokens, temperature=1.0, seed=seed + start + r) for r in range(rows)]
        texts += [c.text.strip() for c in generate_completions(model, [record] * rows, settings)]
    reasons = {"valid": 0, "not SELFIES symbols": 0, "symbol outside the alphabet": 0, "no molecule": 0}
    for text in texts:
        try:
            parts = split_symbols(text)
        except ValueError:  # a hanging "["
            parts = []
        if not parts or "".join(parts) != text:
            reasons["not SELFIES symbols"] += 1
        elif not set(parts) <= alphabet:
            reasons["symbol outside the alphabet"] += 1
        elif canonical_smiles(decode_selfies(text)) is None:
            reasons["no molecule"] += 1
        else:
            reasons["valid"] += 1
    return {"n": n, "validity": reasons["valid"] / n, **reasons}


def _answer_log_likelihood(model, record: dict, answer: str) -> float:
    """The model's total log-likelihood (nats) of ``answer`` as the assistant's reply to ``record``."""
    record = {**record, "messages": [*record["messages"], {"role": "assistant", "content": answer}]}
    batch = model.prepare([record])
    with torch.no_grad():
        return -model(batch).loss.item() * int((batch.labels != -100).sum())


def _likelihood_probe(model, test: list[str], pair: tuple[str, str], per_side: int) -> dict:
    """Does a condition move the model's likelihood of a molecule? For held-out molecules meeting
    exactly one of two opposite conditions A and B (up to ``per_side`` each), the log-likelihood of
    the molecule's SELFIES after asking A minus after asking B, in nats: a model that reads its
    conditions gives positive values to A's molecules and negative ones to B's; one that ignores
    them gives about 0 to both. ``right``: the balanced share of molecules on the right side of 0.
    B ``-`` asks nothing: B's molecules are then those that do not meet A.
    """
    from rdkit import Chem

    from kiban.design.molecules import design_record
    from kiban.design.selfies_decoding import encode_selfies

    asked = [[] if text == "-" else parse_conditions(text, what="likelihood probe") for text in pair]
    sides: list[list[str]] = [[], []]
    for smiles in test:
        mol = Chem.MolFromSmiles(smiles)
        selfies = encode_selfies(smiles) if mol is not None else None
        if selfies is None:
            continue
        met = [meets(compute_properties(mol), conditions) for conditions in asked]
        if not asked[1]:
            met[1] = not met[0]
        if met[0] != met[1] and len(sides[met[1]]) < per_side:
            sides[met[1]].append(selfies)
    properties = "properties" in model.encoders
    records = [design_record(conditions, properties=properties) for conditions in asked]
    deltas = [
        [_answer_log_likelihood(model, records[0], m) - _answer_log_likelihood(model, records[1], m) for m in side]
        for side in sides
    ]
    return {
        "molecules": [len(side) for side in sides],
        "mean_delta": [statistics.mean(d) if d else float("nan") for d in deltas],
        "right": statistics.mean([sum(d > 0 for d in deltas[0]) / max(len(deltas[0]), 1),
                                  sum(d < 0 for d in deltas[1]) / max(len(deltas[1]), 1)]),
    }


def _target_probe(model, val: Path, seed: int, limit: int) -> dict:
    """Does the ``<protein>`` input carry information? For the held-out drug–target records (their
    drugs are never training answers; at most ``limit``, a seeded sample), the log-likelihood of the
    drug after its own target minus after another target of the set, drawn at random among those it
    is not recorded to bind.
    """
    import random

    from kiban.design.molecules import design_record

    records = [json.loads(line) for line in val.open() if '"protein"' in line]
    pairs = [(r["messages"][1]["content"], r["inputs"]["protein"][0]) for r in records if "protein" in r.get("inputs", {})]
    if not pairs:
        return {"records": 0}
    known, targets, rng = set(pairs), sorted({t for _, t in pairs}), random.Random(seed)
    sample = rng.sample(pairs, limit) if len(pairs) > limit else pairs

    deltas = []
    for selfies, target in sample:
        others = [t for t in targets if (selfies, t) not in known]
        if others:
            own, other = design_record(target=target), design_record(target=rng.choice(others))
            deltas.append(_answer_log_likelihood(model, own, selfies) - _answer_log_likelihood(model, other, selfies))
    return {"records": len(deltas), "mean_delta": statistics.mean(deltas), "right": sum(d > 0 for d in deltas) / len(deltas)}


def _wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """Wilson score interval of a binomial share: honest for shares near 0 at a few hundred samples."""
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def main() -> None:
    """Run every row and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the folder kiban design records wrote")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--condition", default="logP 1-3, MW < 450, QED > 0.6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, nargs="*", default=[3.0], help="classifier-free guidance scales to add rows for")
    parser.add_argument(
        "--probe", nargs="*", default=["MW < 250", "MW > 450", "logP < 1", "logP > 4", "TPSA > 100"],
        help="single conditions asked one at a time (the probe table)",
    )
    parser.add_argument(
        "--likelihood-probe", nargs="*",
        help="'A | B' pairs of opposite conditions, B '-' for none: held-out molecules' log-likelihood after A minus "
        "after B (default: MW, logP and TPSA extremes, and '--condition | -')",
    )
    parser.add_argument("--target-records", type=int, default=300, help="the most held-out drug-target records the target probe reads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/design_scores.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # kinases longer than the protein encoder's max_length are cropped, one warning each: expected here
    logging.getLogger("kiban.encoders.protein").setLevel(logging.ERROR)
    data = Path(args.data)
    train = read_smiles_file(data / "train.smi")
    test = read_smiles_file(data / "test.smi")
    training = set(train)
    conditions = parse_conditions(args.condition)
    model = KibanModel.from_pretrained(args.model).eval()
    reference = Reference.from_smiles(train)

    rows: dict[str, dict] = {}
    started = time.perf_counter()
    free = design_molecules(model, n=args.n, budget=args.n, seed=args.seed, reference=reference)
    free_smiles = [d.smiles for d in free.designs]
    rows["model, unconditioned"] = molecule_scores(free_smiles, training=training, reference=test)
    rows["model, unconditioned"] |= _shares(free_smiles, conditions)
    rows["model, unconditioned"]["seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    asked = design_molecules(model, n=args.n, budget=args.n, seed=args.seed, conditions=conditions, reference=reference)
    asked_smiles = [d.smiles for d in asked.designs]
    rows[f"model, asked {args.condition}"] = molecule_scores(asked_smiles, training=training, reference=test)
    rows[f"model, asked {args.condition}"] |= _shares(asked_smiles, conditions)
    rows[f"model, asked {args.condition}"]["seconds"] = time.perf_counter() - started
    for scale in args.guidance:
        started, name = time.perf_counter(), f"model, asked {args.condition}, guidance {scale:g}"
        guided = design_molecules(
            model, n=args.n, budget=args.n, seed=args.seed, conditions=conditions, reference=reference, guidance=scale
        )
        guided_smiles = [d.smiles for d in guided.designs]
        rows[name] = molecule_scores(guided_smiles, training=training, reference=test) | _shares(guided_smiles, conditions)
        rows[name]["seconds"] = time.perf_counter() - started

    unconstrained = _unconstrained_validity(model, args.n, args.seed, reference.symbols)

    copies = sample_training(train, args.n, seed=args.seed)
    rows["baseline: training set sampled"] = molecule_scores(copies, training=training, reference=test)
    rows["baseline: training set sampled"] |= _shares(copies, conditions)

    probes: dict[str, dict] = {}
    for text in args.probe:
        probe = parse_conditions(text, what="--probe")
        shares = {"model, unconditioned": _shares(free_smiles, probe)["in_ranges"]}
        for scale in [1.0, *args.guidance]:
            report = design_molecules(
                model, n=args.n, budget=args.n, seed=args.seed, conditions=probe, reference=reference, guidance=scale
            )
            shares[f"asked, guidance {scale:g}"] = _shares([d.smiles for d in report.designs], probe)["in_ranges"]
        shares["training set sampled"] = _shares(copies, probe)["in_ranges"]
        probes[probe[0].text()] = shares

    if args.likelihood_probe is None:
        args.likelihood_probe = ["MW < 250 | MW > 450", "logP < 1 | logP > 4", "TPSA < 40 | TPSA > 100", f"{args.condition} | -"]
    likelihood = {}
    for text in args.likelihood_probe:
        pair = tuple(part.strip() for part in text.split("|"))
        if len(pair) != 2:
            parser.error(f"--likelihood-probe {text!r}: write two conditions as 'A | B'")
        likelihood[text] = _likelihood_probe(model, test, pair, per_side=100)

    target = _target_probe(model, data / "val.jsonl", args.seed, args.target_records) if "protein" in model.encoders else {"records": 0}

    ngram = NgramSmiles(order=6).fit(train).sample(args.n, seed=args.seed)
    ngram = [canonical_smiles(s) for s in ngram]
    rows["baseline: SMILES 6-gram"] = molecule_scores(ngram, training=training, reference=test)
    rows["baseline: SMILES 6-gram"] |= _shares(ngram, conditions)

    encoder = model.encoders["protein"]
    designs = design_proteins(encoder, TEMPLATE, n=8, steps=60, seed=args.seed)
    mutants = random_mutants(TEMPLATE, [len(d.mutations) for d in designs], seed=args.seed)
    mutant_pll = pseudo_log_likelihood(encoder, mutants)
    proteins = {
        "designs_pll_per_residue": statistics.mean(d.pll_per_residue for d in designs),
        "mutants_pll_per_residue": statistics.mean(mutant_pll) / len(TEMPLATE),
        "template_pll_per_residue": pseudo_log_likelihood(encoder, [TEMPLATE])[0] / len(TEMPLATE),
        "identity": statistics.mean(identity(d.sequence, TEMPLATE) for d in designs),
        "changes": statistics.mean(len(d.mutations) for d in designs),
    }

    print(f"machine: {platform.node()}, {platform.machine()}, torch threads {args.threads}; n = {args.n} per row")
    print(f"model counts (unconditioned): {free.summary()}")
    print(f"model counts (asked {args.condition}): {asked.summary()}")
    print(f"the same model without the SELFIES constraint (unconditioned, n = {args.n}): {unconstrained}")
    print("\n| samples | validity | uniqueness | novelty | IntDiv | FCD (lower better) | KL score | in asked ranges (95%) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        low, high = r["in_ranges_95"]
        print(
            f"| {name} | {r['validity']:.3f} | {r['uniqueness']:.3f} | {r['novelty']:.3f} | {r['int_div']:.3f} "
            f"| {r['fcd']:.2f} | {r['kl_score']:.3f} | {r['in_ranges']:.3f} ({low:.3f}-{high:.3f}) |"
        )
    print("\n| samples | " + " | ".join(c.text() for c in conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r['each'].get(c.text(), float('nan')):.3f}" for c in conditions) + " |")
    if probes:
        columns = list(next(iter(probes.values())))
        print(f"\nprobes: the share of {args.n} samples meeting one condition\n\n| asked | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name, shares in probes.items():
            print(f"| {name} | " + " | ".join(f"{shares[c]:.3f}" for c in columns) + " |")
    if likelihood:
        print(
            "\nlikelihood probes: held-out molecules meeting A or B; log-likelihood of each after asking A "
            "minus after asking B (nats)\n\n| A \\| B | molecules A / B | mean, A's molecules | mean, B's molecules "
            "| on the right side of 0 |\n|---|---|---|---|---|"
        )
        for name, r in likelihood.items():
            print(
                f"| {name.replace('|', chr(92) + '|')} | {r['molecules'][0]} / {r['molecules'][1]} | {r['mean_delta'][0]:+.2f} "
                f"| {r['mean_delta'][1]:+.2f} | {r['right']:.3f} |"
            )
    if target["records"]:
        print(
            f"\ntarget probe: {target['records']} held-out drug-target records; log-likelihood of the drug after its own "
            f"target minus after another: mean {target['mean_delta']:+.2f} nats, above 0 for {target['right']:.3f}"
        )
    print(
        f"\nproteins ({len(TEMPLATE)}-residue template, 8 designs x 60 Gibbs steps): PLL/residue designs "
        f"{proteins['designs_pll_per_residue']:.4f}, random mutants with as many changes "
        f"{proteins['mutants_pll_per_residue']:.4f}, template {proteins['template_pll_per_residue']:.4f}; "
        f"identity {proteins['identity']:.3f}, {proteins['changes']:.1f} changes"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "probes": probes, "likelihood": likelihood, "target": target, "unconstrained": unconstrained, "proteins": proteins, "n": args.n}, indent=2))


if __name__ == "__main__":
    main()
