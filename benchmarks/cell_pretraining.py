"""The cell pretraining evidence of docs/results.md: its pretraining set and the two models compared.

``set OUT.h5ad``: the pbmc68k_reduced cells the quickstart's cell-type head trains on (the training
side of ``random_split(700, seed=0)``, the split ``kiban finetune --type cells --seed 0`` draws), with
``X`` = the file's ``raw`` (log-normalised, all 765 genes), so that no validation or test cell of that
head is seen in pretraining. Tabula Muris (``../shared/data/single_cell``) is read as it is.

``models ENCODER_DIR OUT_DIR``: two saved kiban models that differ only in the cell encoder's
weights: ``OUT_DIR/pretrained`` reads ENCODER_DIR (``kiban pretrain``'s encoder/) through
``weights_path``, ``OUT_DIR/random`` is the same architecture (and vocabulary) at random
initialisation. Both carry the tiny random backbone and projector of ``kiban finetune --model tiny``,
built under the same seed, so a head on either reads the same random fusion and only the encoder
differs.

    python benchmarks/cell_pretraining.py set OUT.h5ad
    python benchmarks/cell_pretraining.py models ENCODER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write_set(out: str) -> None:
    """Write OUT.h5ad: the head's training cells of pbmc68k_reduced, raw expression as X."""
    import anndata

    from kiban.quickstart.corpus import pbmc_path
    from kiban.tasks.splits import random_split

    adata = anndata.read_h5ad(pbmc_path())
    split = random_split(adata.n_obs, seed=0)
    raw = adata.raw.to_adata()
    train = anndata.AnnData(X=raw.X[split.train], obs=adata.obs.iloc[split.train][["bulk_labels"]].copy(), var=raw.var[[]].copy())
    train.write_h5ad(out)
    print(f"{train.n_obs} of {adata.n_obs} cells ({len(split.valid)} valid, {len(split.test)} test left out) written to {out}")


def write_models(encoder_dir: str, out: str) -> None:
    """Save the pretrained-encoder and random-encoder models under OUT."""
    from kiban.tiny import tiny_model

    saved = json.loads((Path(encoder_dir) / "config.json").read_text())["config"]
    saved.pop("weights_path", None)
    saved.pop("checkpoint_dir", None)
    for name, weights in (("pretrained", {"weights_path": str(Path(encoder_dir).resolve())}), ("random", saved)):
        model = tiny_model(encoders={"cell": {"config": weights}}, seed=0)
        model.save_pretrained(Path(out) / name)
        print(f"saved {Path(out) / name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["set"]:
        write_set(sys.argv[2])
    elif sys.argv[1:2] == ["models"]:
        write_models(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
