"""Generative design over the fused model: molecules (SELFIES, constrained decoding) and protein sequences.

``design_molecules`` samples molecules from a ``KibanModel`` through the one generation path
(``kiban.fusion.generation``) with a logits processor that only lets SELFIES symbols through, so
every sample is a molecule RDKit parses; conditions (``parse_conditions``) are asked for in the
prompt and checked on the result. ``design_proteins`` Gibbs-samples variants of a template from
ESM-2's masked-LM head and scores them by pseudo-log-likelihood. ``kiban.design.metrics`` holds
the field's scores (MOSES / GuacaMol) and the baselines; docs/design.md has the measured table.
"""

from kiban.design.conditions import Condition, ConditionError, parse_conditions
from kiban.design.molecules import Design, DesignReport, Reference, design_molecules, design_prompt
from kiban.design.proteins import ProteinDesign, design_proteins, parse_positions, pseudo_log_likelihood
from kiban.design.selfies_decoding import SelfiesConstraint

__all__ = [
    "Condition",
    "ConditionError",
    "Design",
    "DesignReport",
    "ProteinDesign",
    "Reference",
    "SelfiesConstraint",
    "design_molecules",
    "design_prompt",
    "design_proteins",
    "parse_conditions",
    "parse_positions",
    "pseudo_log_likelihood",
]
