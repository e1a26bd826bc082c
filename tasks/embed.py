"""``kiban embed``: pooled fused states of every input of a file, for use outside kiban.

h5ad: the whole AnnData is written back out with ``obsm["X_kiban"]`` [n_obs, H] (scverse
convention; rows of rejected cells are NaN) and ``uns["kiban"]``: the model, kiban's version, the
width, how many cells were embedded or rejected and why, and the gene-match statistics. ``X`` and
everything else are left exactly as read. The output is a new file (default ``NAME.kiban.h5ad``
beside the input); the input is never modified.

Other inputs (FASTA, SMILES CSV, ...): ``NAME.kiban.npz`` beside the input, holding ``ids`` and
``embeddings`` [N, H], with ``NAME.kiban.json`` for the provenance and reject counts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from kiban.atomic import staged_file, write_json
from kiban.version import __version__

__all__ = ["embed_file"]


def _default_out(data: Path) -> Path:
    name = data.name[: -len(".gz")] if data.name.endswith(".gz") else data.name
    stem = name.rsplit(".", 1)[0]
    return data.with_name(f"{stem}.kiban.h5ad" if data.suffix == ".h5ad" else f"{stem}.kiban.npz")


def embed_file(
    data: str | Path,
    *,
    model: str = "tiny",
    out: str | Path | None = None,
    use_raw: bool = False,
    progress: bool = False,
    quantize: str | None = None,
    placement: Any = None,
) -> Path:
    """Embed every input of ``data``; returns the path written (see the module docstring).
    ``placement``: where the model runs (``kiban.device.resolve_device``; None: the CPU in float32);
    it is placed before it is quantised (``quantize``, or as the saved model says).
    """
    from kiban.adapt.quantize import quantize_model, saved_float_layers, saved_quantization
    from kiban.data import Rejects, read, read_h5ad
    from kiban.tasks.models import build_model, embed_items

    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"no such file: {data}")
    out = Path(out) if out else _default_out(data)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out")
    if out.resolve() == data.resolve():
        raise ValueError("the output must be a new file; the input is never overwritten")
    fused = build_model(model, data, use_raw=use_raw, placement=placement)
    saved = saved_quantization(model) if model != "tiny" else None
    float_layers = saved_float_layers(model) if model != "tiny" else None
    # kiban.adapt.quantize: None leaves it float
    fused = quantize_model(fused, quantize or saved, float_layers=float_layers)
    rejects = Rejects()
    if data.suffix == ".h5ad":
        records = list(
            read_h5ad(data, vocab=fused.encoders["cell"].featurizer.vocab, use_raw=use_raw, rejects=rejects)
        )
        match = rejects.notes.get("gene_match", {})
        if match.get("matched", 1) == 0:
            raise ValueError(f"{data}: no gene overlaps the model's vocabulary: {match.get('summary', '')}")
        modality = "cell"
    else:
        records = list(read(data, rejects=rejects))
        modality = records[0].modality if records else "?"
    if not records:
        raise ValueError(
            f"{data}: nothing to embed ({rejects.rejected} input(s) rejected: {dict(rejects.by_reason)})"
        )
    embeddings = embed_items(fused, modality, [r.item for r in records], progress=progress).numpy()
    provenance = {
        "model": model if model == "tiny" else str(Path(model).resolve()),
        "kiban_version": __version__,
        "modality": modality,
        "width": int(embeddings.shape[1]),
        "pooling": "mean of the LLM's last hidden states over the input's positions (KibanModel.embed)",
        "source": str(data),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_embedded": len(records),
        "n_rejected": rejects.rejected,
        "rejected_by_reason": dict(rejects.by_reason),
        "quantize": getattr(fused, "quantization", None),
    }
    if modality == "cell":
        with staged_file(out) as staged:
            _write_h5ad(
                data,
                staged,
                records,
                embeddings,
                {**provenance, "gene_match": _plain(rejects.notes.get("gene_match", {}))},
            )
    else:
        write_json(out.with_suffix(".json"), provenance)
        with staged_file(out) as staged:
            np.savez(staged, ids=np.array([r.id for r in records]), embeddings=embeddings)
    return out


def _write_h5ad(
    data: Path, out: Path, records: list[Any], embeddings: np.ndarray, provenance: dict[str, Any]
) -> None:
    import anndata

    adata = anndata.read_h5ad(data)
    row_of = {name: k for k, name in enumerate(adata.obs_names)}
    matrix = np.full((adata.n_obs, embeddings.shape[1]), np.nan, dtype=np.float32)
    matrix[[row_of[r.id] for r in records]] = embeddings
    adata.obsm["X_kiban"] = matrix
    adata.uns["kiban"] = provenance
    adata.write_h5ad(out)


def _plain(values: Any) -> Any:
    """JSON-like values h5py can store (no None, lists of strings as-is)."""
    if isinstance(values, dict):
        return {k: _plain(v) for k, v in values.items() if v is not None}
    if isinstance(values, list):
        return [str(v) for v in values]
    return values
