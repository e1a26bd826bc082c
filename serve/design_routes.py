"""Generative design over HTTP: ``POST /v1/design/molecules`` and ``POST /v1/design/proteins``.

Both run ``kiban.design`` on the server's model through ``InferenceEngine.call``: queued like any
request, alone on the model, stopped at the server's deadline. Molecules are valid by construction
(SELFIES-constrained decoding) and come back with their flags and counts, nothing filtered out of
sight; proteins come back as Gibbs-sampled variants of the template, fixed positions untouched,
each with its pseudo-log-likelihood. The training set novelty and refusals are measured against
is ``design_reference.smi`` in the model directory, when it is there (the server reads files from
the model directory only).

Bad requests are 422 naming the field: a condition that cannot be read or that lies outside what
the training set reaches (``condition``), a target or template with letters that are no amino
acids (``target`` / ``template``), fixed positions outside the template (``fixed``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from kiban.design.conditions import ConditionError, parse_conditions
from kiban.design.molecules import Reference, design_molecules, read_smiles_file
from kiban.design.proteins import design_proteins, identity, parse_positions
from kiban.encoders.base import InvalidInput
from kiban.serve.decode import RequestError
from kiban.serve.engine import InferenceEngine
from kiban.serve.schemas import error_responses
from kiban.serve.settings import ServeSettings

__all__ = [
    "MoleculeDesignRequest",
    "MoleculeDesignResponse",
    "ProteinDesignRequest",
    "ProteinDesignResponse",
    "add_design_routes",
]

#: The file in a model directory that holds its training molecules (one SMILES a line).
REFERENCE_FILE = "design_reference.smi"

_ERRORS = error_responses(400, 401, 413, 422, 429, 503, 504)


class MoleculeDesignRequest(BaseModel):
    """Molecules wanted: how many, under which property conditions, for which target protein."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(10, ge=1, le=256, description="distinct molecules meeting the conditions wanted")
    condition: str | None = Field(None, description='property ranges, e.g. "logP 1-3, MW < 450, QED > 0.6"')
    target: str | None = Field(None, description="amino-acid sequence of the protein the molecules should bind")
    budget: int | None = Field(None, ge=1, le=4096, description="the most molecules sampled (default 20 x n)")
    seed: int = Field(0, ge=0, le=2**63 - 1)
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_symbols: int = Field(100, ge=1, le=200, description="SELFIES symbols per molecule at most")
    max_tokens: int | None = Field(
        None, ge=4, le=4096, description="backbone tokens per molecule at most (default: enough for max_symbols)"
    )
    guidance: float = Field(
        1.0, ge=0.0, le=10.0, description="classifier-free guidance scale against the unconditioned prompt (1: none)"
    )


class MoleculeOut(BaseModel):
    """One sampled molecule and its flags."""

    index: int
    smiles: str | None
    selfies: str
    meets_conditions: bool
    duplicate: bool
    in_training_set: bool | None
    finish_reason: str
    properties: dict[str, float]


class MoleculeDesignResponse(BaseModel):
    """Every sampled molecule, and the counts (sampled = valid + invalid)."""

    object: str = "design.molecules"
    molecules: list[MoleculeOut]
    counts: dict[str, Any]


class ProteinDesignRequest(BaseModel):
    """Variants of a template protein wanted."""

    model_config = ConfigDict(extra="forbid")

    template: str = Field(..., min_length=1, description="amino-acid sequence of the scaffold")
    fixed: str | None = Field(None, description="1-based positions that never change, e.g. '1-20,45'")
    n: int = Field(4, ge=1, le=64)
    steps: int | None = Field(None, ge=0, le=20000, description="masked draws per design (default: one per free position)")
    temperature: float = Field(1.0, gt=0.0, le=5.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class ProteinOut(BaseModel):
    """One designed sequence with its scores."""

    name: str
    sequence: str
    pll: float
    pll_per_residue: float
    identity: float
    mutations: list[str]


class ProteinDesignResponse(BaseModel):
    """The designs, in chain order."""

    object: str = "design.proteins"
    template: str
    designs: list[ProteinOut]


class _References:
    """The model directory's reference set, read once on first use."""

    def __init__(self, model_dir: Path | None) -> None:
        self.path = model_dir / REFERENCE_FILE if model_dir is not None else None
        self._value: Reference | None = None
        self._lock = threading.Lock()

    def get(self) -> Reference | None:
        if self.path is None or not self.path.is_file():
            return None
        with self._lock:
            if self._value is None:
                self._value = Reference.from_smiles(read_smiles_file(self.path, what="design reference"))
        return self._value


def _check_length(value: str | None, limit: int, param: str) -> None:
    if value is not None and len(value) > limit:
        raise RequestError(
            f"{param} is {len(value)} residues, over the limit max_sequence_length={limit}", param=param,
            code="limit_exceeded",
        )


def add_design_routes(app: FastAPI, engine: InferenceEngine, settings: ServeSettings) -> None:
    """Mount ``/v1/design/molecules`` and ``/v1/design/proteins`` over the engine's model."""
    references = _References(engine.model_dir)

    @app.post("/v1/design/molecules", response_model=MoleculeDesignResponse, responses=_ERRORS, tags=["design"])
    async def design_molecules_route(body: MoleculeDesignRequest) -> MoleculeDesignResponse:
        """Sample molecules (valid by construction) meeting property conditions, optionally for a target."""
        try:
            conditions = parse_conditions(body.condition, what="condition")
        except ConditionError as error:
            raise RequestError(str(error), param="condition") from None
        _check_length(body.target, settings.limits.max_sequence_length, "target")
        engine.check_capacity()
        if body.budget is not None and body.budget < body.n:
            raise RequestError(f"budget {body.budget} is smaller than n {body.n}", param="budget")

        def work(model: Any, should_stop: Any) -> Any:
            if body.target is not None and "protein" not in model.encoders:
                raise RequestError("target: this model has no protein encoder", param="target")
            return design_molecules(
                model, n=body.n, conditions=conditions, target=body.target, reference=references.get(),
                seed=body.seed, temperature=body.temperature, top_p=body.top_p, max_symbols=body.max_symbols,
                max_tokens=body.max_tokens, guidance=body.guidance,
                budget=body.budget, should_stop=should_stop,
            )

        try:
            report = await engine.call(work, name="design_molecules")
        except ConditionError as error:
            raise RequestError(str(error).replace("--condition", "condition"), param="condition") from None
        except InvalidInput as error:
            raise RequestError(f"target: {error}", param="target") from None
        molecules = [
            MoleculeOut(index=d.index, smiles=d.smiles, selfies=d.selfies, meets_conditions=d.meets,
                        duplicate=d.duplicate, in_training_set=d.in_reference, finish_reason=d.finish_reason,
                        properties=d.properties)
            for d in report.designs
        ]
        return MoleculeDesignResponse(molecules=molecules, counts=report.summary())

    @app.post("/v1/design/proteins", response_model=ProteinDesignResponse, responses=_ERRORS, tags=["design"])
    async def design_proteins_route(body: ProteinDesignRequest) -> ProteinDesignResponse:
        """Gibbs-sample variants of the template from the protein encoder's masked-LM head."""
        _check_length(body.template, settings.limits.max_sequence_length, "template")
        template = body.template.strip().upper()
        try:
            fixed = parse_positions(body.fixed, len(template), what="fixed")
        except ValueError as error:
            raise RequestError(str(error), param="fixed") from None
        if len(fixed) == len(template):
            raise RequestError("fixed holds every position of the template: nothing is left to design", param="fixed")
        engine.check_capacity()

        def work(model: Any, should_stop: Any) -> Any:
            if "protein" not in model.encoders:
                raise RequestError("template: this model has no protein encoder", param="template")
            return design_proteins(
                model.encoders["protein"], template, n=body.n, fixed=fixed, steps=body.steps,
                temperature=body.temperature, seed=body.seed,
            )

        try:
            designs = await engine.call(work, name="design_proteins")
        except InvalidInput as error:
            raise RequestError(f"template: {error}", param="template") from None
        return ProteinDesignResponse(
            template=template,
            designs=[
                ProteinOut(name=d.name, sequence=d.sequence, pll=d.pll, pll_per_residue=d.pll_per_residue,
                           identity=identity(d.sequence, template), mutations=d.mutations)
                for d in designs
            ],
        )
