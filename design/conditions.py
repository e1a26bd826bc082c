"""Property conditions for molecule design: parse ``"logP 1-3, MW < 450, QED > 0.6"``, compute, check.

A condition names a property from ``PROPERTIES`` (RDKit descriptors; names are case-insensitive)
and an interval: ``logP 1-3`` / ``logP 1 to 3`` (both ends included), ``MW < 450`` / ``MW <= 450`` /
``MW at most 450`` (``Condition.text``'s wording, so a written condition reads back the same),
``QED > 0.6``, ``HBD = 2``. Conditions are checked on the decoded molecule after generation: the
model is *asked* for them in its prompt (``Condition.text`` is the one wording used in training
records and at generation time), and a molecule *meets* them only when RDKit says so.

``check_reachable`` refuses, before any sampling, a condition no molecule of the reference set
(the training set) comes near: logP 50 is 40 log units past any drug-like molecule, and asking
for it would only burn the sampling budget.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rdkit.Chem import QED, Crippen, Descriptors, Lipinski, rdMolDescriptors

__all__ = [
    "CONDITIONED",
    "PROPERTIES",
    "Condition",
    "ConditionError",
    "Property",
    "check_reachable",
    "compute_properties",
    "meets",
    "parse_conditions",
    "random_cells",
]


class ConditionError(ValueError):
    """A condition that cannot be parsed or cannot be met; the message names it."""


@dataclass(frozen=True)
class Property:
    """One molecular property: its name, RDKit function, its resolution, whether it is a count, its unit.

    step: how finely conditions on it are written; ``logP 2`` means 2 ± step / 2.
    floor, ceiling: the least and greatest value it can take (None: unbounded).
    """

    name: str
    compute: Callable[[Any], float]
    step: float = 1.0
    integer: bool = False
    unit: str = ""
    floor: float | None = 0.0
    ceiling: float | None = None


def _descriptors() -> dict[str, Property]:
    return {
        p.name.lower(): p
        for p in (
            Property("logP", Crippen.MolLogP, step=0.5, floor=None),
            Property("MW", Descriptors.MolWt, step=10.0, unit="Da"),
            Property("QED", QED.qed, step=0.05, ceiling=1.0),
            Property("TPSA", rdMolDescriptors.CalcTPSA, step=5.0, unit="Å²"),
            Property("HBD", Lipinski.NumHDonors, integer=True),
            Property("HBA", Lipinski.NumHAcceptors, integer=True),
            Property("RotB", Lipinski.NumRotatableBonds, integer=True),
        )
    }


#: The properties a condition may name (lower-case key -> ``Property``).
PROPERTIES: dict[str, Property] = _descriptors()

#: The properties design records condition on (RotB only through the ``<properties>`` encoder's slot).
CONDITIONED = ("HBA", "HBD", "MW", "QED", "TPSA", "logP")


@dataclass(frozen=True)
class Condition:
    """``low <= property <= high`` (either end may be infinite); ``asked``: how the user wrote it."""

    name: str
    low: float = -math.inf
    high: float = math.inf
    asked: str = field(default="", compare=False)

    def holds(self, value: float) -> bool:
        """True when ``value`` lies inside the interval (ends included)."""
        return self.low <= value <= self.high

    def text(self) -> str:
        """The one wording of this condition in prompts (training records and generation alike)."""
        if math.isinf(self.low) and math.isinf(self.high):
            return f"{self.name} any"
        if math.isinf(self.low):
            return f"{self.name} at most {_number(self.high)}"
        if math.isinf(self.high):
            return f"{self.name} at least {_number(self.low)}"
        if self.low == self.high:
            return f"{self.name} {_number(self.low)}"
        return f"{self.name} {_number(self.low)} to {_number(self.high)}"


def _number(value: float) -> str:
    return f"{value:g}"


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_CONDITION = re.compile(
    rf"^(?P<name>[A-Za-z][A-Za-z0-9_]*)\s*(?:"
    rf"(?P<op><=|>=|=<|=>|<|>|=|≤|≥|at most\s|at least\s)\s*(?P<value>{_NUMBER})"
    rf"|(?P<low>{_NUMBER})\s*(?:-|–|to|\.\.)\s*(?P<high>{_NUMBER})"
    rf"|(?P<about>{_NUMBER}))$"
)


def parse_conditions(text: str | None, *, what: str = "--condition") -> list[Condition]:
    """``"logP 1-3, MW < 450, QED > 0.6"`` -> [Condition, ...] (empty text: no conditions).

    A bare number (``logP 2``) means within half the property's ``step`` of it (exactly, for
    counts). ``<`` and ``<=`` both give an inclusive upper end (descriptors are reals; for counts ``HBD < 3``
    means at most 2). Raises ``ConditionError`` naming the part that cannot be read, an unknown
    property (listing the known ones), an empty interval or a property named twice.
    """
    if text is None or not text.strip():
        return []
    out: list[Condition] = []
    for part in (p.strip() for p in re.split(r"[,;]", text)):
        if not part:
            raise ConditionError(f"{what} {text!r}: an empty part between commas")
        match = _CONDITION.match(part)
        if not match:
            raise ConditionError(
                f"{what} {part!r} is not written like 'logP 1-3', 'MW < 450' or 'QED > 0.6'"
            )
        key = match["name"].lower()
        if key not in PROPERTIES:
            known = ", ".join(p.name for p in PROPERTIES.values())
            raise ConditionError(f"{what} {part!r}: unknown property {match['name']!r} (known: {known})")
        prop = PROPERTIES[key]
        if match["about"]:
            value = float(match["about"])
            half = 0.0 if prop.integer else prop.step / 2
            low, high = value - half, value + half
        elif match["op"]:
            value = float(match["value"])
            op = match["op"].strip()  # "at most" / "at least": Condition.text's wording, inclusive
            op = {"=<": "<=", "=>": ">=", "≤": "<=", "≥": ">=", "at most": "<=", "at least": ">="}.get(op, op)
            if prop.integer and op in ("<", ">"):  # a count strictly below 3 is at most 2
                value = value - 1 if op == "<" else value + 1
            low, high = {"<": (-math.inf, value), "<=": (-math.inf, value), ">": (value, math.inf),
                         ">=": (value, math.inf), "=": (value, value)}[op]
        else:
            low, high = float(match["low"]), float(match["high"])
            if low > high:
                raise ConditionError(f"{what} {part!r}: the interval is empty ({_number(low)} > {_number(high)})")
        if any(c.name == prop.name for c in out):
            raise ConditionError(f"{what} {text!r}: {prop.name} is named twice")
        out.append(Condition(prop.name, low, high, asked=part))
    return out


def compute_properties(mol: Any, names: Iterable[str] | None = None) -> dict[str, float]:
    """{property name: value} of an RDKit molecule (default: every property in ``PROPERTIES``)."""
    props = PROPERTIES.values() if names is None else [PROPERTIES[n.lower()] for n in names]
    return {p.name: float(p.compute(mol)) for p in props}


def meets(values: dict[str, float], conditions: Sequence[Condition]) -> bool:
    """True when every condition holds for ``values`` (from ``compute_properties``)."""
    return all(c.holds(values[c.name]) for c in conditions)


def check_reachable(
    conditions: Sequence[Condition], ranges: dict[str, tuple[float, float]], *, size: int, margin: float = 0.25
) -> None:
    """Refuse a condition whose interval misses the reference set's range (widened by ``margin``).

    ranges: property name -> (min, max) over the ``size`` reference molecules. ``margin`` is a
    fraction of that range's width: a model can step a little past what it was trained on, not
    tens of units. Raises ``ConditionError`` naming the condition and the range it missed.
    """
    for condition in conditions:
        if condition.name not in ranges:
            continue
        low, high = ranges[condition.name]
        pad = margin * (high - low)
        if condition.low > high + pad or condition.high < low - pad:
            raise ConditionError(
                f"--condition {condition.asked or condition.text()!r} is outside what the training set reaches "
                f"({condition.name} {_number(round(low, 2) + 0.0)} to {_number(round(high, 2) + 0.0)} over {size} molecules); "
                "no design would meet it, so none is sampled"
            )


def random_cells(
    values: dict[str, float], names: Iterable[str], rng: random.Random, population: Mapping[str, Sequence[float]]
) -> list[Condition]:
    """Per property in ``names``, the cell ``values`` lies in among random cuts, as a condition.

    population: each property's values over the training molecules, sorted. For each property,
    1-9 cuts at random quantiles of it (rounded to the property's step) split its range into cells,
    and the condition is the cell the value lies in: "at most" the first cut, a range between two,
    "at least" past the last. The cuts never depend on ``values``, so the conditions depend on them
    only through the cells they lie in. Several cuts keep a condition informative (with one cut, a
    condition says about half a nat about its molecule). A bound every molecule meets ("TPSA at
    least 0", "QED at most 1") is left open, and a cell open at both ends is left out. The
    conditions come in ``PROPERTIES`` order.
    """
    out = []
    for name in names:
        prop, ranked = PROPERTIES[name.lower()], population[name]
        cuts = sorted({_quantile(ranked, rng.random(), prop) for _ in range(rng.randint(1, 9))})
        condition = _cell(prop, values[name], cuts)
        if condition is not None:
            out.append(condition)
    order = list(PROPERTIES)
    return sorted(out, key=lambda c: order.index(c.name.lower()))


def _quantile(ranked: Sequence[float], level: float, prop: Property) -> float:
    """``ranked``'s value at ``level`` (0-1), rounded to ``prop``'s step."""
    value = ranked[min(int(level * len(ranked)), len(ranked) - 1)]
    return round(round(value / prop.step) * prop.step, 3)


def _cell(prop: Property, value: float, cuts: Sequence[float]) -> Condition | None:
    """The cell of sorted ``cuts`` that ``value`` lies in, ``cut[i-1] < value <= cut[i]``, as a
    condition (for counts, past 2 is at least 3); ends every molecule meets are left open, None if both are.
    """
    i = bisect.bisect_left(cuts, value)
    low = round(cuts[i - 1] + (prop.step if prop.integer else 0.0), 3) if i > 0 else -math.inf
    high = cuts[i] if i < len(cuts) else math.inf
    if prop.floor is not None and low <= prop.floor:
        low = -math.inf
    if prop.ceiling is not None and high >= prop.ceiling:
        high = math.inf
    if math.isinf(low) and math.isinf(high):
        return None
    return Condition(prop.name, low, high)
