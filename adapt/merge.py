"""Model merging: one kiban model out of several fine-tuned from the same base.

A recipe (YAML) names the sources, each a saved model folder or a ``kiban finetune`` run folder
(``model/`` + ``heads/``), and a method. Every source is loaded and its LoRA adapters, if any, are
merged into the backbone (``merge_and_unload``), so each source is a plain weight set ``W_i``; with
the base's weights ``W_0`` the task vectors are ``tau_i = W_i - W_0`` (Ilharco et al. 2023). Every
floating tensor of the model is merged this way (encoders, projectors and backbone alike): a tensor
no source changed has ``tau_i = 0`` and comes out as the base's, which is how projectors and frozen
parts are carried over. Each source's task heads are copied into the merged model's ``heads/``.

Methods (each a small function over task vectors, tested against its paper's formula):

    linear           W = sum_i w_i W_i / sum_i w_i                      (weight averaging)
    task_arithmetic  W = W_0 + scale * sum_i w_i tau_i                  (Ilharco et al. 2023)
    ties             trim each tau_i to its top ``density`` by magnitude, elect the sign of
                     sum_i trimmed_i, average the w_i trimmed_i that agree with it
                     (Yadav et al. 2023, "TIES-Merging"); W = W_0 + scale * that
    dare_linear      drop each entry of tau_i with probability 1 - density, rescale the rest by
                     1 / density (Yu et al. 2024, "DARE"), then task arithmetic
    dare_ties        DARE's drop-and-rescale, then TIES's sign election and disjoint mean

Why dense task vectors rather than peft's ``add_weighted_adapter``: its ``linear`` combination
mixes the A and B matrices separately, so the merged update is not the weighted sum of the
adapters' updates ``B_i A_i`` (cross terms appear), and its TIES / DARE variants without SVD prune
A and B, not the update. Merging ``W_0 + (alpha/r) B_i A_i`` densely is exact for every method, and
the result is merged into the backbone anyway (a plain saved model, no adapters).

Refused with one line, before anything is written: sources whose tensors differ in name or
shape (a different architecture), LoRA sources whose base weights differ from each other or from
the recipe's base (adapters trained on different bases), LoRA adapters of different shapes
(rank or target modules), different tokenizers, and two heads of the same task.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "MergeError",
    "MergeEvaluation",
    "MergeRecipe",
    "MergeSource",
    "SourceModel",
    "dare",
    "linear",
    "load_source",
    "load_sources",
    "merge_models",
    "merged_state",
    "merge_state",
    "read_recipe",
    "task_arithmetic",
    "ties",
]


class MergeError(ValueError):
    """Sources that cannot be merged (different bases, architectures or adapter shapes)."""


# ----------------------------------------------------------------------------------------------
# The methods, on tensors


def linear(weights_list: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted average ``sum_i w_i W_i / sum_i w_i`` of full weight tensors (same shape)."""
    total = float(sum(weights))
    if total == 0:
        raise MergeError("linear merge: the weights sum to 0")
    return sum(w * t for w, t in zip(weights, weights_list)) / total


def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float], *, scale: float = 1.0) -> Tensor:
    """The merged task vector ``scale * sum_i w_i tau_i`` (Ilharco et al. 2023, "Editing models
    with task arithmetic"), to be added to the base's weights.
    """
    return scale * sum(w * d for w, d in zip(weights, deltas))


def trim(delta: Tensor, density: float) -> Tensor:
    """TIES's trim step: keep the ``density`` fraction of entries largest in magnitude, zero the rest.

    ``k = round(density * numel)`` entries are kept (at least one when density > 0); ties at the
    threshold are broken by ``torch.topk``'s order.
    """
    if density >= 1.0:
        return delta.clone()
    k = int(round(density * delta.numel()))
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.abs().topk(k).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(delta)


def elect_and_merge(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """TIES's elect and disjoint-merge steps over (already trimmed or dropped) task vectors.

    gamma = sign(sum_i tau_i) per entry (+ where the sum is 0); the result at an entry is the mean
    of the ``w_i tau_i`` whose ``tau_i`` has sign gamma there (zeros never count); 0 where none does.
    The sign is elected on the unweighted vectors and the weights enter the mean, as in peft's
    ``merge_utils.ties`` (the paper has no per-model weights), so the two agree.
    """
    stacked = torch.stack(list(deltas))
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    weighted = torch.stack([w * d for w, d in zip(weights, deltas)])
    total = torch.where(agree, weighted, torch.zeros_like(weighted)).sum(0)
    return total / agree.sum(0).clamp(min=1)


def ties(deltas: Sequence[Tensor], weights: Sequence[float], *, density: float, scale: float = 1.0) -> Tensor:
    """TIES-Merging (Yadav et al. 2023): trim to ``density``, elect sign, disjoint mean; times ``scale``."""
    return scale * elect_and_merge([trim(d, density) for d in deltas], weights)


def dare(delta: Tensor, density: float, *, generator: torch.Generator) -> Tensor:
    """DARE's drop-and-rescale (Yu et al. 2024): keep each entry with probability ``density``
    (a Bernoulli mask drawn from ``generator``) and divide what is kept by ``density``.
    """
    if density >= 1.0:
        return delta.clone()
    if density <= 0.0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


@dataclass
class _Plan:
    """How one method combines tensors: from full weights (linear) or from task vectors."""

    needs_base: bool
    combine: Callable[..., Tensor]


def _linear(base: Tensor | None, tensors: list[Tensor], recipe: MergeRecipe, generator) -> Tensor:
    return linear(tensors, recipe.weights)


def _task_arithmetic(base: Tensor, tensors: list[Tensor], recipe: MergeRecipe, generator) -> Tensor:
    return base + task_arithmetic([t - base for t in tensors], recipe.weights, scale=recipe.scale)


def _ties(base: Tensor, tensors: list[Tensor], recipe: MergeRecipe, generator) -> Tensor:
    return base + ties([t - base for t in tensors], recipe.weights, density=recipe.density, scale=recipe.scale)


def _dare_linear(base: Tensor, tensors: list[Tensor], recipe: MergeRecipe, generator) -> Tensor:
    dropped = [dare(t - base, recipe.density, generator=generator) for t in tensors]
    return base + task_arithmetic(dropped, recipe.weights, scale=recipe.scale)


def _dare_ties(base: Tensor, tensors: list[Tensor], recipe: MergeRecipe, generator) -> Tensor:
    dropped = [dare(t - base, recipe.density, generator=generator) for t in tensors]
    return base + recipe.scale * elect_and_merge(dropped, recipe.weights)


# method name -> plan (a registry, not if/elif)
METHODS: dict[str, _Plan] = {
    "linear": _Plan(needs_base=False, combine=_linear),
    "task_arithmetic": _Plan(needs_base=True, combine=_task_arithmetic),
    "ties": _Plan(needs_base=True, combine=_ties),
    "dare_linear": _Plan(needs_base=True, combine=_dare_linear),
    "dare_ties": _Plan(needs_base=True, combine=_dare_ties),
}


# ----------------------------------------------------------------------------------------------
# The recipe


@dataclass
class MergeSource:
    """One model to merge: a saved model folder or a finetune run folder, and its weight."""

    path: str
    weight: float = 1.0


@dataclass
class MergeEvaluation:
    """Optional before/after figures: perplexity on general text and on an instruction set."""

    lm_data: str | None = None
    instructions: str | None = None
    heads: dict[str, str] = field(default_factory=dict)  # task -> labelled file to score its head on
    max_texts: int = 200


@dataclass
class MergeRecipe:
    """What ``kiban merge`` reads from RECIPE.yaml (paths relative to the recipe's folder).

    base: the model the sources were fine-tuned from; needed by every method but ``linear``, except
    when every source carries LoRA adapters (their shared base weights are then the base).
    density: TIES, the fraction of each task vector kept; DARE, the probability of keeping an entry.
    scale: lambda, the factor on the merged task vector. seed: DARE's random drops.
    """

    method: str
    models: list[MergeSource]
    base: str | None = None
    scale: float = 1.0
    density: float = 0.5
    seed: int = 0
    quantize: str | None = None
    evaluate: MergeEvaluation = field(default_factory=MergeEvaluation)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if len(self.models) < 1:
            raise MergeError("models: name at least one model to merge")
        if not 0.0 < self.density <= 1.0:
            raise MergeError(f"density must be in (0, 1], got {self.density}")
        if self.quantize not in (None, "int8", "int4"):
            raise MergeError(f"quantize must be int8 or int4, got {self.quantize!r}")

    @property
    def weights(self) -> list[float]:
        """The sources' weights, in order."""
        return [m.weight for m in self.models]


def read_recipe(path: str | Path) -> MergeRecipe:
    """The recipe in a YAML file, with relative paths resolved against the file's folder."""
    import yaml

    from kiban.config import ConfigError, from_plain

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such recipe: {path}")
    try:
        recipe = from_plain(MergeRecipe, yaml.safe_load(path.read_text()) or {})
    except ConfigError as error:
        raise MergeError(f"{path}: {error}") from None
    except MergeError as error:
        raise MergeError(f"{path}: {error}") from None
    here = path.resolve().parent

    def resolve(value: str | None) -> str | None:
        return None if value is None else str(here / value)

    recipe.models = [dataclasses.replace(m, path=resolve(m.path)) for m in recipe.models]
    recipe.base = resolve(recipe.base)
    recipe.evaluate.lm_data = resolve(recipe.evaluate.lm_data)
    recipe.evaluate.instructions = resolve(recipe.evaluate.instructions)
    recipe.evaluate.heads = {task: resolve(file) for task, file in recipe.evaluate.heads.items()}
    return recipe


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass
class SourceModel:
    """A source, loaded: its model with adapters merged in, and what the checks need."""

    path: Path
    model: Any
    heads: dict[str, Path]  # task -> head folder
    lora_shapes: dict[str, tuple[int, ...]] | None  # adapter tensor -> shape; None without LoRA
    base_state: dict[str, Tensor] | None  # backbone weights under the adapters; None without LoRA


def model_folder(path: str | Path) -> tuple[Path, Path]:
    """(model folder, folder holding ``heads/``) of a saved model or a finetune run folder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path, path
    if (path / "model" / "config.json").is_file():
        return path / "model", path
    raise FileNotFoundError(f"{path} is neither a saved kiban model (config.json) nor a finetune run (model/)")


def load_source(path: str | Path) -> SourceModel:
    """Load a source and merge its LoRA adapters into the backbone (``merge_and_unload``)."""
    from kiban.fusion.model import KibanModel

    folder, run = model_folder(path)
    model = KibanModel.from_pretrained(folder).eval()
    lora_shapes = base_state = None
    if model.has_lora:
        lora_shapes = {n: tuple(p.shape) for n, p in model.llm.named_parameters() if "lora_" in n}
        base = model.llm.get_base_model()
        base_state = {
            n.replace(".base_layer", ""): t.detach().clone() for n, t in base.state_dict().items() if "lora_" not in n
        }
        unload_lora(model)
    heads_root = run / "heads"
    heads = (
        {p.name: p for p in sorted(heads_root.iterdir()) if (p / "head.json").is_file()} if heads_root.is_dir() else {}
    )
    return SourceModel(Path(path), model, heads, lora_shapes, base_state)


def unload_lora(model: Any) -> Any:
    """Merge the backbone's LoRA adapters into its weights and drop them (a plain model after)."""
    if model.has_lora:
        model.llm = model.llm.merge_and_unload()
        model.config.backbone = dataclasses.replace(model.config.backbone, lora=None)
    return model


def _float_state(model: Any) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def check_compatible(sources: Sequence[SourceModel], base: SourceModel | None) -> None:
    """Raise MergeError (one line) when the sources cannot be merged; see the module docstring."""
    everyone = ([base] if base is not None else []) + list(sources)
    first = everyone[0]
    reference = _float_state(first.model)
    for other in everyone[1:]:
        state = _float_state(other.model)
        if set(state) != set(reference):
            extra = sorted(set(state) ^ set(reference))[:3]
            raise MergeError(
                f"{other.path} and {first.path} are different models (tensors only one has: {', '.join(extra)})"
            )
        for name, tensor in state.items():
            if tensor.shape != reference[name].shape:
                raise MergeError(
                    f"{other.path} and {first.path} have different architectures: {name} is "
                    f"{list(tensor.shape)} vs {list(reference[name].shape)}"
                )
        if other.model.tokenizer.get_vocab() != first.model.tokenizer.get_vocab():
            raise MergeError(f"{other.path} and {first.path} have different tokenizers")
    adapted = [s for s in everyone if s.lora_shapes is not None]
    for other in adapted[1:]:
        if other.lora_shapes != adapted[0].lora_shapes:
            raise MergeError(
                f"the LoRA adapters of {other.path} ({_describe_lora(other)}) and {adapted[0].path} "
                f"({_describe_lora(adapted[0])}) have different shapes"
            )
    # A LoRA source's own base weights must be the base's: adapters only make sense on their base.
    base_of = base.base_state if base is not None and base.base_state is not None else None
    if base is not None and base_of is None:
        base_of = {k: v for k, v in _float_state(base.model).items()}
    for other in adapted:
        if other is base:
            continue
        expected = base_of if base_of is not None else adapted[0].base_state
        for name, tensor in other.base_state.items():
            key = f"llm.{name}"
            reference_tensor = expected.get(key, expected.get(name))
            if reference_tensor is None or not torch.equal(tensor, reference_tensor):
                against = base.path if base is not None else adapted[0].path
                raise MergeError(
                    f"{other.path} was not fine-tuned from the same base as {against}: its backbone weights "
                    f"under the adapters differ ({key})"
                )


def _describe_lora(source: SourceModel) -> str:
    ranks = sorted({shape[0] for name, shape in source.lora_shapes.items() if "lora_A" in name})
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in source.lora_shapes})
    return f"r={','.join(map(str, ranks))} on {','.join(targets)}"


# ----------------------------------------------------------------------------------------------
# Merging


def merge_state(
    states: Sequence[dict[str, Tensor]], base: dict[str, Tensor] | None, recipe: MergeRecipe
) -> dict[str, Tensor]:
    """The merged state dict: ``METHODS[recipe.method]`` over every floating tensor; other tensors
    (integer buffers) must agree across the sources and are taken as they are.
    """
    plan = METHODS[recipe.method]
    if plan.needs_base and base is None:
        raise MergeError(f"method {recipe.method} needs a base model (the recipe's base:)")
    generator = torch.Generator().manual_seed(recipe.seed)
    merged = {}
    for name in states[0]:
        tensors = [s[name] for s in states]
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise MergeError(f"the sources disagree on {name}, which cannot be averaged ({tensors[0].dtype})")
            merged[name] = tensors[0]
            continue
        dtype = tensors[0].dtype
        floats = [t.float() for t in tensors]
        anchor = base[name].float() if base is not None else None
        merged[name] = plan.combine(anchor, floats, recipe, generator).to(dtype)
    return merged


def load_sources(recipe: MergeRecipe) -> tuple[list[SourceModel], SourceModel | None]:
    """Load the recipe's sources and base (adapters merged in) and check they can be merged."""
    sources = [load_source(m.path) for m in recipe.models]
    base = load_source(recipe.base) if recipe.base is not None else None
    check_compatible(sources, base)
    return sources, base


def merged_state(recipe: MergeRecipe, sources: Sequence[SourceModel], base: SourceModel | None) -> dict[str, Tensor]:
    """The merged weights of the sources (a state dict of the shared architecture).

    Without a base, LoRA sources use the weights under their adapters (checked identical) as the
    base; everything outside the adapters must then be the same in every source.
    """
    states = [_float_state(s.model) for s in sources]
    base_state = None
    if base is not None:
        base_state = _float_state(base.model)
    elif METHODS[recipe.method].needs_base:
        if not all(s.base_state is not None for s in sources):
            raise MergeError(
                f"method {recipe.method} needs the base the models were fine-tuned from: set base: in the recipe"
            )
        under = {f"llm.{k}": v for k, v in sources[0].base_state.items()}
        for name in states[0]:
            # outside the adapters the sources were not trained: they must all still be the base
            if name not in under and any(not torch.equal(s[name], states[0][name]) for s in states[1:]):
                raise MergeError(f"the sources differ outside their LoRA adapters ({name}): set base: in the recipe")
        base_state = {k: under.get(k, v) for k, v in states[0].items()}
    return merge_state(states, base_state, recipe)


def merge_models(recipe: MergeRecipe) -> Any:
    """Load, check and merge: the merged model (the base's, or the first source's, model object
    with the merged weights and no adapters).
    """
    sources, base = load_sources(recipe)
    state = merged_state(recipe, sources, base)
    target = base.model if base is not None else sources[0].model
    # tied tensors (input embeddings and LM head) appear twice in the state; both merge alike
    target.load_state_dict(state, strict=True)
    return target


def collect_heads(sources: Sequence[SourceModel]) -> dict[str, Path]:
    """Task -> head folder over every source; a task two sources both have is refused."""
    heads: dict[str, Path] = {}
    for source in sources:
        for task, folder in source.heads.items():
            if task in heads:
                raise MergeError(
                    f"two sources have a head for task {task!r} ({heads[task]} and {folder}); "
                    "rename one (a task is one /v1/predict route)"
                )
            heads[task] = folder
    return heads


def copy_heads(heads: dict[str, Path], model_dir: Path) -> list[str]:
    """Copy the heads into ``model_dir/heads/<task>`` with ``extra.model`` pointing at ``model_dir``."""
    from kiban.atomic import write_json

    for task, folder in heads.items():
        target = model_dir / "heads" / task
        shutil.copytree(folder, target)
        config = json.loads((target / "head.json").read_text())
        config.setdefault("extra", {})["model"] = "../.."  # heads/<task>/ -> the model folder
        write_json(target / "head.json", config)
    return sorted(heads)
