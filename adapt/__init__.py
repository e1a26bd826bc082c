"""Adapting and shrinking trained kiban models: merging, quantised inference, forgetting figures.

    kiban.adapt.merge       ``kiban merge RECIPE.yaml``: LoRA merge-and-unload; linear, task
                            arithmetic, TIES and DARE merges of models fine-tuned from one base
    kiban.adapt.quantize    ``--quantize int8|int4``: torchao weight-only quantisation of the backbone
    kiban.adapt.forgetting  perplexity on general text and instructions, before and after a change
    kiban.adapt.cli         the ``kiban merge`` and ``kiban evaluate`` commands

This file imports nothing: ``kiban.tasks`` and ``kiban.serve`` import ``kiban.adapt.quantize`` to
load models quantised, while ``kiban.adapt.cli`` imports ``kiban.tasks``; importing a submodule
must not drag the others in (that would be an import cycle through this package).
"""
