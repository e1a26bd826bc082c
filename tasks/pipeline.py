"""The fine-tuning driver every task type shares: options, the type registry, checks and outputs.

A task type (``kiban.tasks.types``) is one module that reads and validates its data, splits it,
fits its head and scores it beside its baselines; it registers a ``TaskType`` by name. The driver
(``run``) does what every type needs the same way: the option checks, the type (``--type`` or
told apart from the file), the atomic output folder (``kiban.atomic.staged_folder``: a failed run
leaves nothing behind), and, through the helpers below, seeded row caps, the strict-JSON
``metrics.json``, the "too few usable rows" message with the reject counts, and the saved head
beside the model it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiban.atomic import staged_folder, write_json
from kiban.tasks.heads import HeadConfig, model_reference
from kiban.tasks.labels import header

__all__ = [
    "MODES",
    "FinetuneOptions",
    "LabelledData",
    "TaskType",
    "bar",
    "data_type",
    "register_task_type",
    "require_rows",
    "run",
    "sample",
    "save_head",
    "score_entry",
    "task_type",
    "task_types",
    "write_metrics",
]

MODES = ("probe", "head", "lora")
LORA_EPOCHS = 10


@dataclass
class FinetuneOptions:
    """labels: label column names (see ``kiban.tasks.labels.resolve_labels``; each type says which
    it needs). model: "tiny" (a tiny random model, for smoke tests) or a ``save_pretrained`` folder.
    groups: a column of groups held out whole (h5ad obs: donors / batches; pairs: drug_id /
    target_id; images: the source image; proteins: overrides the similarity clusters). mode: probe
    (linear head on frozen states), head (one hidden layer), lora (LoRA adapters on the backbone
    trained with a linear head; pooled types only); per-residue and contact heads have their own
    architecture. type: a registered task type or "auto". epochs: None for the type's default.
    drugs / targets: id tables of a pairs file. max_rows / max_length: caps. layer: which backbone
    layer's states a pooled head reads (``KibanModel.embed``; None = the final states).
    loaded_model: the model ``model`` names, already loaded. save_features: also write
    ``features.npz`` (ids and the pooled states the head read). placement: where the model runs
    (``kiban.device.resolve_device``; None: the CPU in float32); the heads train on the CPU on the
    float32 states it gives.
    """

    task: str
    data: Path
    out: Path
    labels: list[str] = field(default_factory=list)
    mode: str = "probe"
    model: str = "tiny"
    groups: str | None = None
    seed: int = 0
    epochs: int | None = None
    use_raw: bool = False
    progress: bool = True
    type: str = "auto"
    drugs: Path | None = None
    targets: Path | None = None
    max_rows: int | None = None
    max_length: int | None = None
    layer: int | None = None
    loaded_model: Any = None
    save_features: bool = False
    lm_data: Path | None = None  # --mode lora: general text for the before/after perplexity (kiban.adapt)
    placement: Any = None  # kiban.device.Placement of --device

    def model_for(self, modalities: Sequence[str], *, lora: bool = False) -> Any:
        """The frozen model a type's head reads: ``loaded_model``, else the model ``model`` names
        (``kiban.tasks.models.model_with``), on ``placement``'s device; every type loads it here.
        """
        from kiban.tasks.models import model_with

        return model_with(
            self.model,
            Path(self.data),
            modalities,
            seed=self.seed,
            lora=lora,
            use_raw=self.use_raw,
            placement=self.placement,
            loaded=self.loaded_model,
        )

    def epochs_for(self, data_type: str) -> int:
        """The number of epochs for ``data_type`` (``epochs``, else the type's default)."""
        if self.epochs is not None:
            return self.epochs
        return LORA_EPOCHS if self.mode == "lora" else task_type(data_type).default_epochs

    def max_length_for(self, data_type: str) -> int | None:
        """``max_length``, else the type's default (None: no cap)."""
        return self.max_length or task_type(data_type).default_max_length


@dataclass
class LabelledData:
    """What a pooled type's data check accepted: ids, raw items for the model, targets, groups."""

    modality: str
    ids: list[str]
    items: list[Any]
    kind: str
    labels: list[str]  # class names or target names
    targets: np.ndarray  # [N] class indices or [N, K] floats (NaN = missing)
    groups: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskType:
    """A registered ``--type``. run(options, work folder) -> metrics.json's content; it writes its
    outputs into ``work``. detect(path, columns, options): whether ``--type auto`` picks this type
    (types are tried in registration order; None: named with --type only). modalities: the
    encoders a tiny model is built with. folder: --data may be a folder. groups / lora: whether
    --groups / --mode lora apply.
    """

    name: str
    run: Callable[[FinetuneOptions, Path], dict[str, Any]]
    description: str
    modalities: tuple[str, ...]
    default_epochs: int = 200
    default_max_length: int | None = None
    detect: Callable[[Path, list[str], FinetuneOptions], bool] | None = None
    folder: bool = False
    groups: bool = True
    lora: bool = False


_TYPES: dict[str, TaskType] = {}


def register_task_type(spec: TaskType) -> TaskType:
    """Add ``spec`` to the registry under ``spec.name`` (a second registration is an error)."""
    if spec.name in _TYPES:
        raise ValueError(f"task type {spec.name!r} is already registered")
    _TYPES[spec.name] = spec
    return spec


def task_types() -> list[str]:
    """Registered type names, in registration (auto-detection) order."""
    return list(_TYPES)


def task_type(name: str) -> TaskType:
    """The registered type ``name``."""
    if name not in _TYPES:
        raise ValueError(f"--type must be auto or one of {', '.join(_TYPES)}, got {name!r}")
    return _TYPES[name]


def run(options: FinetuneOptions) -> dict[str, Any]:
    """Check ``options``, pick the type and run it into a staged output folder; returns metrics.json's
    content. Bad input raises ValueError (FileNotFoundError for a missing path) with one line.
    """
    if options.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {options.mode!r}")
    for flag, value in (
        ("--max-rows", options.max_rows),
        ("--max-length", options.max_length),
        ("--epochs", options.epochs),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    HeadConfig(task=options.task, modality="x", kind="regression", labels=["y"], input_dim=1)  # checks the name
    out = Path(options.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} already exists and is not empty; choose another --out")
    spec = task_type(data_type(options))
    if options.mode == "lora" and not spec.lora:
        lora_types = ", ".join(t.name for t in _TYPES.values() if t.lora)
        raise ValueError(f"--mode lora applies to {lora_types} data, not to {spec.name} data")
    if options.groups is not None and not spec.groups:
        raise ValueError(f"--groups does not apply to {spec.name} data (it has its own split)")
    if (options.drugs or options.targets) and spec.name != "dti":
        raise ValueError(f"--drugs / --targets apply to drug–target pair tables, not to {spec.name} data")
    with staged_folder(out, replace=False) as work:  # an existing OUT was checked to be empty
        return spec.run(options, work)


def data_type(options: FinetuneOptions) -> str:
    """The type of ``options.data``: ``options.type`` when given, else the first registered type whose
    ``detect`` accepts it. A missing path is a FileNotFoundError; an empty file a ValueError.
    """
    data = Path(options.data)
    if options.type != "auto":
        task_type(options.type)  # an unknown name: the list of types
    folder_ok = options.type == "auto" or task_type(options.type).folder
    if not data.is_file() and not (folder_ok and data.is_dir()):
        raise FileNotFoundError(f"no such {'file or folder' if folder_ok else 'file'}: {data}")
    if data.is_file() and data.suffix != ".h5ad" and not _head_bytes(data).strip():
        raise ValueError(f"{data}: the file is empty")
    if options.type != "auto":
        return options.type
    columns = header(data) if data.suffix in (".csv", ".tsv") else []
    for spec in _TYPES.values():
        if spec.detect is not None and spec.detect(data, columns, options):
            return spec.name
    raise ValueError(f"{data}: cannot tell the data type; name it with --type ({', '.join(_TYPES)})")


# ----------------------------------------------------------------------------------------------
# Helpers every type uses


def sample(n: int, max_rows: int | None, seed: int) -> np.ndarray:
    """Row indices: all, or ``max_rows`` of them drawn with ``seed`` (kept in file order)."""
    if max_rows is None or max_rows >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_rows, replace=False))


def require_rows(n: int, minimum: int, path: Path, rejects: Any, *, what: str) -> None:
    """A ValueError naming ``path``, the usable count and the rejects by reason, when ``n < minimum``."""
    if n >= minimum:
        return
    report = rejects.report()
    example = (
        f"; e.g. {report.first_rejects[0].location}: {report.first_rejects[0].detail}"
        if report.first_rejects
        else ""
    )
    reasons = ", ".join(f"{k}: {v}" for k, v in report.by_reason.items()) or "none"
    raise ValueError(
        f"{path}: {n} usable {what}, need at least {minimum} ({report.rejected} rejected: {reasons}){example}"
    )


def score_entry(model: str, split: Any, side: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One ``results`` entry: every entry names its side, split method and seed, so a number never
    travels alone.
    """
    return {"model": model, "split": side, "split_method": split.method, "seed": split.seed, "metrics": metrics}


def write_metrics(path: Path, values: dict[str, Any]) -> None:
    """Write ``values`` as strict JSON: an undefined metric (NaN, e.g. Spearman of a constant) is null."""
    write_json(path, _finite(values), default=_json_value)


def save_head(head: Any, options: FinetuneOptions, model: Any, work: Path, *, own_model: bool = False) -> None:
    """Save ``head`` to ``work/heads/TASK`` naming the model it reads: the run's own model (``--model
    tiny``, or ``own_model``: LoRA adapters belong to this head), saved in ``work/model``, or the
    model folder given.
    """
    own = options.model == "tiny" or own_model
    if own:
        model.save_pretrained(work / "model")
    saved = Path(options.out) / "model" if own else options.model
    head.config.extra["model"] = model_reference(saved, Path(options.out) / "heads" / options.task)
    head.save(work / "heads" / options.task)


def bar(items: Any, *, progress: bool, desc: str, unit: str) -> Any:
    """``items`` behind a tqdm bar when ``progress``."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, leave=False)


def _head_bytes(path: Path, size: int = 65536) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    return value


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
