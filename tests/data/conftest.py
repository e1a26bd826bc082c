"""Fixtures for the data-layer tests: real files bundled with scanpy / RDKit / scikit-image, the
shared data folder when present, and small files written on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared real data (read-only); tests using it skip cleanly when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is not present on this machine")
    return SHARED


@pytest.fixture(scope="session")
def pbmc_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Scanpy's bundled pbmc68k_reduced (700 cells x 765 genes), written to a temporary .h5ad."""
    import scanpy as sc

    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k_reduced.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def nci() -> Path:
    """RDKit's bundled NCI molecule files (first_5K.smi, first_200.props.sdf)."""
    import rdkit

    return Path(os.path.dirname(rdkit.__file__)) / "Data" / "NCI"


@pytest.fixture(scope="session")
def skimage_data() -> Path:
    """scikit-image's bundled images (cell.png, ihc.png, multipage.tif, ...)."""
    import skimage.data

    return Path(os.path.dirname(skimage.data.__file__))
