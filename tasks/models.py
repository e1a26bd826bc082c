"""The frozen model a task head reads, and its states in batches.

Shared by ``kiban finetune``, ``kiban embed``, ``kiban predict`` and the pair heads, so none of
them imports the fine-tuning pipeline: ``build_model`` (a saved model folder, or a tiny random
model with the encoders a data file needs) and ``embed_items`` (pooled fused states [N, H]).

Both take the model wherever ``--device`` put it (``placement``, ``kiban.device.resolve_device``):
``build_model`` moves it there, and the states ``embed_items`` returns are float32 on the CPU, where
the heads train and score, whatever device the model runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_model", "embed_items", "model_with"]


def build_model(
    spec: str,
    data: Path,
    *,
    use_raw: bool = False,
    seed: int = 0,
    lora: bool = False,
    modalities: tuple[str, ...] = ("molecule",),
    placement: Any = None,
) -> Any:
    """A saved model folder, or "tiny": a tiny random model with the encoder ``data`` needs (an
    h5ad: a cell encoder over the file's genes; else the tiny encoders of ``modalities``; "text"
    needs none, the backbone reads it). ``placement`` (a ``kiban.device.Placement``): the device
    and dtype it is moved to; None leaves it on the CPU in float32.
    """
    model = _built_model(spec, data, use_raw=use_raw, seed=seed, lora=lora, modalities=modalities)
    if placement is None:
        return model
    from kiban.device import place_model

    return place_model(model, placement)


def _built_model(
    spec: str, data: Path, *, use_raw: bool, seed: int, lora: bool, modalities: tuple[str, ...]
) -> Any:
    from kiban.fusion import KibanModel

    if spec != "tiny":
        return KibanModel.from_pretrained(spec).eval()
    from kiban.fusion.model import KibanConfig
    from kiban.tiny import tiny_backbone_config

    data = Path(data)
    if data.suffix == ".h5ad":
        # A tiny random model knows no genes: give it the file's own (smoke tests only).
        import anndata

        from kiban.encoders.cell import vocab_from_adata

        adata = anndata.read_h5ad(data, backed="r")
        vocab = vocab_from_adata(adata.raw if use_raw else adata)  # Raw has var_names too (backed-safe)
        adata.file.close()
        encoders = {"cell": {"preset": "tiny", "gene_vocab": tuple(vocab)}}
    else:
        # text needs no encoder, but a KibanConfig needs one: a text-only tiny model carries a molecule one
        encoders = {m: {"preset": "tiny"} for m in modalities if m != "text"} or {"molecule": {"preset": "tiny"}}
    torch.manual_seed(seed)
    config = KibanConfig(
        encoders=encoders,
        backbone=tiny_backbone_config(lora=lora),
        default_projector={"kind": "mlp2", "num_tokens": 4, "depth": 1, "num_heads": 4},
    )
    return KibanModel.from_config(config).eval()


def model_with(
    spec: str,
    data: Path,
    modalities: Sequence[str],
    *,
    seed: int = 0,
    lora: bool = False,
    use_raw: bool = False,
    placement: Any = None,
    loaded: Any = None,
) -> Any:
    """``build_model`` for inputs of ``modalities`` (or ``loaded``, the model ``spec`` names, already
    loaded); a model without one of their encoders is a ValueError naming it (text needs no
    encoder: the backbone reads it).
    """
    model = loaded
    if model is None:
        model = build_model(
            spec, data, seed=seed, lora=lora, use_raw=use_raw, modalities=tuple(modalities), placement=placement
        )
    missing = [m for m in modalities if m != "text" and m not in model.encoders]
    if missing:
        raise ValueError(f"{spec} has no {' or '.join(missing)} encoder (it has: {', '.join(model.encoders)})")
    return model


def embed_items(
    model: Any,
    modality: str,
    items: list[Any],
    *,
    batch_size: int = 64,
    layer: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Pooled fused states [N, H] of the frozen model, in batches (with a progress bar); ``layer``
    as ``KibanModel.embed``'s. float32 on the CPU, whatever the model's device and dtype.
    """
    batches = range(0, len(items), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"embedding {len(items)} {modality} inputs", unit="batch", leave=False)
    with torch.no_grad():
        return torch.cat(
            [
                model.embed([(modality, item) for item in items[i : i + batch_size]], layer=layer).float().cpu()
                for i in batches
            ]
        )
