"""Fixtures for the task-head tests: the shared real data (skipped cleanly when absent), scanpy's
bundled pbmc68k_reduced, and small files written on the fly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder {SHARED} is not present on this machine")
    return SHARED


@pytest.fixture(scope="session")
def pbmc():
    """Scanpy's bundled pbmc68k_reduced: 700 cells, 10 annotated types in obs.bulk_labels."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


@pytest.fixture(scope="session")
def pbmc_h5ad(tmp_path_factory: pytest.TempPathFactory, pbmc) -> Path:
    path = tmp_path_factory.mktemp("pbmc") / "pbmc68k_reduced.h5ad"
    pbmc.write_h5ad(path)
    return path
