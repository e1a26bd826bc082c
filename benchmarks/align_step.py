"""The align step's heavy part: forward + backward through the frozen SmolLM2-135M to its input embeddings.

Two ways of taking the next-token loss, run alternately on the same batch so that background load
falls on both alike (median step over --rounds each):

    hf    ``llm(inputs_embeds=..., labels=...).loss``: logits for every position ([B, L, 49,152])
    lean  ``kiban.train.objectives.next_token_loss``: logits only where a label is

The batch has the shape of the quickstart's align batches: 4 rows of --length fused positions, a
32-token answer at the end of each. Reported: the median step, samples/s, minor page faults per
step (allocator churn: freshly mapped pages the kernel must zero) and the largest difference
between the two gradients. Nothing is asserted.

    .venv/bin/python benchmarks/align_step.py [--length 160] [--rounds 4]
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import torch

    from kiban.fusion.backbone import load_backbone
    from kiban.fusion.model import default_config
    from kiban.fusion.prompt import IGNORE_INDEX
    from kiban.train.objectives import next_token_loss

    torch.manual_seed(0)
    llm, _ = load_backbone(default_config().backbone)
    llm.requires_grad_(False)  # the align stage's frozen backbone
    llm.train()
    width, length = llm.config.hidden_size, args.length
    embeds = torch.randn(4, length, width) * 0.02
    mask = torch.ones(4, length, dtype=torch.long)
    labels = torch.full((4, length), IGNORE_INDEX)
    labels[:, length - 32 :] = torch.randint(0, llm.config.vocab_size, (4, 32))

    def hf() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        llm(inputs_embeds=x, attention_mask=mask, labels=labels).loss.backward()
        return x.grad

    def lean() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        next_token_loss(llm, x, mask, labels).backward()
        return x.grad

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    steps = {"hf": hf, "lean": lean}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    paged = dict.fromkeys(steps, 0)
    for _ in range(args.rounds):
        for name, step in steps.items():
            before, started = faults(), time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
            paged[name] += faults() - before
    print(f"batch 4 x {length} positions, torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    for name, spent in times.items():
        median = sorted(spent)[len(spent) // 2]
        print(
            f"  {name:<5} median step {median:.3f}s  samples/s {4 / median:.2f}  "
            f"minor page faults/step {paged[name] // args.rounds:,}"
        )
    difference = float((hf() - lean()).abs().max())
    print(f"  largest gradient difference: {difference:.3g}")


if __name__ == "__main__":
    main()
