"""Fit a cell encoder's profile token to training files: ``kiban data fit-profile``.

    kiban data fit-profile train.yaml --data donor1.h5ad donor2.h5ad --out train.fitted.yaml

reads the cell encoder of a training config (``model.encoders.cell``, with ``profile_token``
"first" or "only"), streams every cell of the files through its featurizer in CSR batches (each
file's genes matched to the vocabulary once), and writes the config again with
``profile_mean`` / ``profile_std`` filled in (``kiban.encoders.cell_profile``): the profile token
then starts as the z-scores of the most dispersed genes instead of a random projection. Give it
training cells only; statistics of the cells a head is scored on would leak them into the model.
Refused cells go to the rejects file with their reason; read = accepted + rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from kiban.data.cell_batches import CellBatchFeaturizer
from kiban.data.cells import H5adReader
from kiban.data.rejects import Rejects
from kiban.encoders.cell import CellFeaturizer
from kiban.encoders.cell_profile import ProfileMoments, ProfileStatistics, chosen_genes, profile_statistics

__all__ = ["config_featurizer", "file_profile_statistics", "fit_profile_config", "fitted_profile_settings"]


def file_profile_statistics(
    featurizer: Any,
    paths: Sequence[str | Path],
    *,
    use_raw: bool = False,
    layer: str | None = None,
    gene_key: str = "auto",
    batch_size: int = 1024,
    rejects: Rejects | None = None,
) -> ProfileStatistics:
    """Per-gene statistics of every cell of the h5ad ``paths`` as ``featurizer``'s profile token sees
    them; refused cells are counted (and reported to ``rejects``).
    """
    if not getattr(featurizer, "profile", False):
        raise ValueError("the cell encoder has no profile token (profile_token 'first' or 'only') to fit")
    moments = ProfileMoments(featurizer.vocab_size)
    batches = CellBatchFeaturizer(featurizer)
    for path in paths:
        reader = H5adReader(path, vocab=featurizer.vocab, gene_key=gene_key, layer=layer, use_raw=use_raw)
        try:
            reader.prepare()
            n = len(reader)
            pools = [  # 16 batches read at once (the compiled path's unit of work)
                [
                    range(s, min(s + batch_size, n))
                    for s in range(start, min(start + 16 * batch_size, n), batch_size)
                ]
                for start in range(0, n, 16 * batch_size)
            ]
            for _, batch, refused in (result for pool in pools for result in batches.read_pool(reader, pool)):
                if batch is not None:
                    moments.add_batch(batch)
                for reject in refused:
                    moments.add_rejected(reject.id or reject.location, f"{reject.reason}: {reject.detail}")
                    if rejects is not None:
                        rejects.reject(
                            id=reject.id, location=reject.location, reason=reject.reason, detail=reject.detail
                        )
        finally:
            reader.close()
    return moments.result()


def config_featurizer(config: Mapping[str, Any]) -> tuple[dict[str, Any], Any, int]:
    """(the cell encoder settings without profile statistics, its featurizer, the token's width) of
    a training config. ValueError naming the problem when it has no cell encoder with a profile
    token. Cheap: call it to refuse a config before anything is written.
    """
    from kiban.fusion.config import EncoderSpec

    model = config.get("model")
    encoders = model.get("encoders") if isinstance(model, Mapping) else None
    settings = encoders.get("cell") if isinstance(encoders, Mapping) else None
    if not isinstance(settings, Mapping):
        raise ValueError("the config has no model.encoders.cell to fit a profile token for")
    plain = {key: value for key, value in settings.items() if key not in ("profile_mean", "profile_std")}
    encoder_config = EncoderSpec.parse("cell", plain, path="model.encoders.cell").encoder_config("cell")
    featurizer = CellFeaturizer.from_config(encoder_config)
    if not featurizer.profile:
        raise ValueError(
            "the config's cell encoder has no profile token (profile_token 'first' or 'only') to fit"
        )
    return plain, featurizer, encoder_config.width


def fit_profile_config(
    config: dict[str, Any],
    paths: Sequence[str | Path],
    *,
    use_raw: bool = False,
    layer: str | None = None,
    rejects: Rejects | None = None,
) -> tuple[dict[str, Any], ProfileStatistics, int]:
    """(the training config with its cell encoder's profile statistics set, the statistics, how many
    genes the fitted token keeps). ``config`` is the plain YAML mapping ``kiban fit`` reads.
    """
    plain, featurizer, width = config_featurizer(config)
    stats = file_profile_statistics(featurizer, paths, use_raw=use_raw, layer=layer, rejects=rejects)
    fitted = {**plain, "profile_mean": stats.mean.tolist(), "profile_std": stats.std.tolist()}
    out = {
        **config,
        "model": {**config["model"], "encoders": {**config["model"]["encoders"], "cell": fitted}},
    }
    return out, stats, len(chosen_genes(stats.mean, stats.std, width))


def fitted_profile_settings(
    settings: Mapping[str, Any], adata: Any, *, rows: Sequence[int] | None = None
) -> dict[str, Any]:
    """``{"profile_mean": ..., "profile_std": ...}`` for cell encoder ``settings`` (a model config's
    ``encoders.cell`` entry: preset and overrides), from the cells ``rows`` of ``adata`` (all by
    default): merge them into the settings to start that encoder's profile token from the data.

    Fit on training cells only: statistics of test cells would leak them into the model.
    """
    from kiban.fusion.config import EncoderSpec

    plain = {key: value for key, value in settings.items() if key not in ("profile_mean", "profile_std")}
    config = EncoderSpec.parse("cell", plain, path="encoders.cell").encoder_config("cell")
    featurizer = CellFeaturizer.from_config(config)
    # (row, gene names) pairs: the same values the featurizer reads from one-row AnnData views,
    # without building 10^5 views
    genes = list(adata.var_names if config.gene_column is None else adata.var[config.gene_column])
    matrix = adata.X if config.layer is None else adata.layers[config.layer]
    matrix = scipy.sparse.csr_matrix(matrix) if scipy.sparse.issparse(matrix) else np.asarray(matrix)
    chosen = range(adata.n_obs) if rows is None else rows
    stats = profile_statistics(featurizer, ((matrix[row : row + 1], genes) for row in chosen))
    if stats.n_rejected:
        raise ValueError(
            f"{stats.n_rejected} of the {stats.n_rejected + stats.n_cells} cells to fit the profile token on "
            f"were refused, e.g. {stats.rejects[0][0]}: {stats.rejects[0][1]}"
        )
    return {"profile_mean": tuple(stats.mean.tolist()), "profile_std": tuple(stats.std.tolist())}
