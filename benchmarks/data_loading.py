"""Data loading side by side: single-cell minibatches from one large h5ad, and molecule featurization.

1. Generates (once, cached in --workdir) a sparse h5ad of --cells x --genes (default 200,000 x
   20,000, about --genes-per-cell non-zero genes a cell) with ``kiban.data.synthetic``.
2. Runs every loader in its own process on the same file and the same workload, shuffled
   minibatches of --batch-size cells, and reports cells/s and peak resident memory (and the
   resident memory right after imports, so the data's share is visible):
     kiban       ShardedStream over H5adReader (chunk-shuffled plan), records as the model takes them;
                 and the same through the cell featurizer (scGPT-style tokens, padded tensors): per
                 record; vectorised over CSR batches (kiban.data.cell_batches) by numpy
                 (KIBAN_NATIVE=off) and by the compiled kernel (kiban.data.cell_kernel), the latter
                 with 0 and 2 DataLoader workers
     anndata     backed mode, one sorted fancy-index read per shuffled batch
     in-memory   anndata.read_h5ad into memory (load time reported), then batches by fancy index
     annbatch    annbatch.Loader (chunk_size 256, shuffle) over the file converted to its sharded zarr
                 (it does not read h5ad); conversion time reported       [peers venv, Python >= 3.12]
     bionemo-scdl SingleCellMemMapDataset over the file converted to SCDL's memory-mapped format
                 (conversion time reported) + torch DataLoader, shuffle  [peers venv]
   Conversions run in their own process, so the peak memory shown is the loading pass's.
   Loaders that cannot read all cells within --max-seconds are measured over what they read.
3. Molecules/s of RDKit graph featurization over RDKit's 5,000 NCI SMILES: kiban's
   MoleculeFeaturizer vs. chemprop's SimpleMoleculeMolGraphFeaturizer [peers venv], each in its
   own venv (best of three passes), then both in one process of chemprop's venv taking turns.

Peers are installed with pip into throwaway virtual environments under --peers-dir (default
/tmp/kiban-bench-peers), never into kiban's: py311/ for bionemo-scdl and chemprop, py312/ for
annbatch (which needs Python >= 3.12). The py311 one borrows kiban's torch through a .pth file
appended to its path, so pip does not download a second multi-GB CUDA torch; everything else it
installs is its own. A peer that does not install is reported as such.

    .venv/bin/python benchmarks/data_loading.py [--cells 200000] [--genes 20000] [--skip-peers] [--part molecules]

This module imports only the standard library at the top: the peer processes run it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
KIBAN_SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, MiB.

    VmHWM (peak resident set) belongs to this process image alone; getrusage's ru_maxrss is kept
    across fork + exec on Linux and would show the driver's own size.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _current_rss_mib() -> float:
    return _status_mib("VmRSS")


# ----------------------------------------------------------------------------------------------
# Child processes: one loader each, printing one JSON line


def _timed(batches, *, max_seconds: float, size) -> dict:
    """Iterate ``batches`` until exhausted or out of time: cells, seconds, cells/s."""
    cells, started = 0, time.perf_counter()
    for batch in batches:
        cells += size(batch)
        if time.perf_counter() - started > max_seconds:
            break
    seconds = time.perf_counter() - started
    return {"cells": cells, "seconds": round(seconds, 2), "per_s": cells / seconds if seconds else 0.0}


def child_kiban(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    from torch.utils.data import DataLoader

    from kiban.data import FeaturizerTransform, H5adReader, ShardedStream
    from kiban.encoders.cell import CellFeaturizer, synthetic_gene_names

    baseline = _current_rss_mib()
    reader = H5adReader(path, chunk_size=256)
    transform = None
    if variant != "records":
        featurizer = CellFeaturizer(synthetic_gene_names(reader.n_vars), max_genes=1200)
        # "per record": the featurizer called once per cell, then collate (the pre-batch path)
        transform = FeaturizerTransform(featurizer, vectorised="per record" not in variant)
    stream = ShardedStream(
        reader,
        transform=transform,
        batch_size=batch_size,
        plan="chunks",
        chunk_size=256,
        pool_batches=64,
        seed=0,
    )
    workers = 2 if variant.endswith("2 workers") else 0
    batches = DataLoader(stream, batch_size=None, num_workers=workers) if workers else stream
    size = (lambda b: len(b)) if transform is None else (lambda b: b["gene_ids"].shape[0])
    return {**_timed(batches, max_seconds=max_seconds, size=size), "baseline_mib": baseline}


def _permutation(n: int, batch_size: int):
    import numpy as np

    order = np.random.default_rng(0).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def child_anndata_backed(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    import anndata
    import numpy as np

    baseline = _current_rss_mib()
    adata = anndata.read_h5ad(path, backed="r")
    batches = (adata.X[np.sort(idx)] for idx in _permutation(adata.n_obs, batch_size))
    return {**_timed(batches, max_seconds=max_seconds, size=lambda b: b.shape[0]), "baseline_mib": baseline}


def child_in_memory(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    import anndata

    baseline = _current_rss_mib()
    started = time.perf_counter()
    adata = anndata.read_h5ad(path)
    setup = time.perf_counter() - started
    batches = (adata.X[idx] for idx in _permutation(adata.n_obs, batch_size))
    result = _timed(batches, max_seconds=max_seconds, size=lambda b: b.shape[0])
    return {**result, "setup_s": round(setup, 1), "baseline_mib": baseline}


def child_annbatch(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    """Variant "convert": the h5ad to annbatch's sharded zarr (it reads zarr, not h5ad); "load": batches."""
    import anndata
    import zarr

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})  # annbatch's advice for local disks
    store = Path(path).with_suffix(".annbatch.zarr")
    if variant == "convert":
        from annbatch import write_sharded

        started = time.perf_counter()
        if not store.exists():  # written beside, then renamed: a failed conversion leaves no store behind
            partial = store.with_suffix(".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_sharded(zarr.open_group(partial, mode="w"), anndata.read_h5ad(path))
            partial.rename(store)
        return {"setup_s": round(time.perf_counter() - started, 1)}
    from annbatch import Loader

    baseline = _current_rss_mib()
    group = zarr.open_group(store, mode="r")
    loader = Loader(
        batch_size=batch_size, chunk_size=256, preload_nchunks=64, shuffle=True, preload_to_gpu=False
    )
    loader.add_dataset(anndata.io.sparse_dataset(group["X"]))

    def size(batch):
        data = batch["X"] if isinstance(batch, dict) else batch[0] if isinstance(batch, tuple) else batch
        return data.shape[0]

    return {**_timed(iter(loader), max_seconds=max_seconds, size=size), "baseline_mib": baseline}


def child_scdl(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    """Variant "convert": the h5ad to SCDL's memory-mapped format; "load": shuffled batches through torch."""
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset

    target = Path(path).with_suffix(".scdl")
    if variant == "convert":
        started = time.perf_counter()
        if not target.exists():
            SingleCellMemMapDataset(str(target), h5ad_path=path, use_X_not_raw=True)
        return {"setup_s": round(time.perf_counter() - started, 1)}
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import DataLoader

    baseline = _current_rss_mib()
    dataset = SingleCellMemMapDataset(str(target))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_sparse_matrix_batch)
    return {**_timed(loader, max_seconds=max_seconds, size=lambda b: b.shape[0]), "baseline_mib": baseline}


def _nci_smiles(path: str) -> list[str]:
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def _kiban_molecule_pass(path: str):
    from kiban.encoders.base import InvalidInput
    from kiban.encoders.molecule import MoleculeFeaturizer

    featurizer, smiles = MoleculeFeaturizer(), _nci_smiles(path)

    def one_pass() -> int:
        done = 0
        for text in smiles:
            try:
                featurizer(text)
                done += 1
            except InvalidInput:
                pass
        return done

    return one_pass


def child_molecules_kiban(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    return _best_pass(_kiban_molecule_pass(path))


def _chemprop_molecule_pass(path: str):
    from chemprop.featurizers import SimpleMoleculeMolGraphFeaturizer
    from chemprop.utils import make_mol
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    featurizer, smiles = SimpleMoleculeMolGraphFeaturizer(), _nci_smiles(path)

    def one_pass() -> int:
        done = 0
        for text in smiles:
            try:
                mol = make_mol(text, keep_h=False, add_h=False)
            except Exception:  # chemprop raises on SMILES RDKit cannot sanitize
                continue
            if mol is not None:
                featurizer(mol)
                done += 1
        return done

    return one_pass


def child_molecules_chemprop(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    return _best_pass(_chemprop_molecule_pass(path))


def child_molecules_same_process(path: str, batch_size: int, max_seconds: float, variant: str) -> dict:
    """Both featurizers in one process on one RDKit (chemprop's venv), whole-file passes taking turns.

    The steadiest comparison: no second interpreter, no second RDKit build, and a slow second of
    the machine falls on both sides of a round. kiban is imported from its own venv's site folder
    (``KIBAN_BENCH_SITE``), appended after this venv's packages, so RDKit is chemprop's.
    """
    import site
    import statistics

    site.addsitedir(os.environ["KIBAN_BENCH_SITE"])
    import rdkit

    kiban_pass, chemprop_pass = _kiban_molecule_pass(path), _chemprop_molecule_pass(path)
    kiban_pass(), chemprop_pass()  # warm: imports, the compiled reader's first load
    rounds = []
    for _ in range(6):
        started = time.perf_counter()
        done = kiban_pass()
        kiban_s = time.perf_counter() - started
        started = time.perf_counter()
        chemprop_done = chemprop_pass()
        rounds.append((done / kiban_s, chemprop_done / (time.perf_counter() - started)))
    ratios = [k / c for k, c in rounds]
    return {
        "rdkit": rdkit.__version__,
        "kiban_per_s": statistics.median(k for k, _ in rounds),
        "chemprop_per_s": statistics.median(c for _, c in rounds),
        "ratios": [round(r, 2) for r in ratios],
        "median_ratio": statistics.median(ratios),
    }


def _best_pass(one_pass, passes: int = 3) -> dict:
    """The fastest of ``passes`` passes over the file (one pass takes seconds: a stall skews it)."""
    best = None
    for _ in range(passes):
        started = time.perf_counter()
        done = one_pass()
        seconds = time.perf_counter() - started
        if best is None or seconds < best["seconds"]:
            best = {"molecules": done, "seconds": round(seconds, 2), "per_s": done / seconds}
    return {**best, "passes": passes}


CHILDREN = {
    "kiban": child_kiban,
    "anndata-backed": child_anndata_backed,
    "in-memory": child_in_memory,
    "annbatch": child_annbatch,
    "bionemo-scdl": child_scdl,
    "molecules-kiban": child_molecules_kiban,
    "molecules-chemprop": child_molecules_chemprop,
    "molecules-same-process": child_molecules_same_process,
}


# ----------------------------------------------------------------------------------------------
# The driver


def _peers(peers_dir: Path, *, cells: bool = True) -> dict[str, Path | str]:
    """Interpreter per peer package, or the reason it is not available (chemprop only without ``cells``)."""
    found: dict[str, Path | str] = {}
    py311 = peers_dir / "py311"
    if not (py311 / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(py311)], check=True)
        site = next((py311 / "lib").glob("python3.*")) / "site-packages"
        (site / "zz-kiban-torch.pth").write_text(str(KIBAN_SITE) + "\n")  # torch (and others) as a fallback
    for package, module in (("bionemo-scdl", "bionemo.scdl"), ("chemprop", "chemprop"))[0 if cells else 1 :]:
        found[package] = _install(py311 / "bin" / "python", package, module)
    if not cells:
        return found
    py312 = peers_dir / "py312"
    python312 = _python312()
    if not (py312 / "bin" / "python").exists():
        made = (
            subprocess.run(
                [python312 or "python3.12", "-m", "venv", str(py312)], capture_output=True, text=True
            )
            if python312
            else None
        )
        if made is None or made.returncode:
            found["annbatch"] = "needs Python >= 3.12, and no working python3.12 was found"
    if "annbatch" not in found:
        # the [zarrs] extra: the child selects zarrs' codec pipeline (annbatch's advice for local disks),
        # which zarr only finds once the zarrs package is installed
        found["annbatch"] = _install(py312 / "bin" / "python", "annbatch[zarrs]", "annbatch, zarrs")
    return found


def _python312() -> str | None:
    """A real Python 3.12+ interpreter: pyenv's versions first (its shims need PYENV_VERSION), then PATH."""
    for pattern in ("3.13*", "3.12*"):
        for candidate in sorted((Path.home() / ".pyenv" / "versions").glob(pattern)):
            binary = candidate / "bin" / "python3"
            if binary.exists():
                return str(binary)
    for name in ("python3.13", "python3.12"):
        found = shutil.which(name)
        if found and subprocess.run([found, "-c", "import sys"], capture_output=True).returncode == 0:
            return found
    return None


def _install(python: Path, package: str, module: str) -> Path | str:
    check = [str(python), "-c", f"import {module}"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {package} into {python.parent.parent} ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", package], capture_output=True, text=True
    )
    if done.returncode or subprocess.run(check, capture_output=True).returncode:
        tail = (done.stderr.strip().splitlines() or ["import failed after install"])[-1]
        return f"did not install here: {tail}"
    return python


def _run(
    python: Path | str,
    name: str,
    data: Path,
    args: argparse.Namespace,
    variant: str = "",
    env: dict | None = None,
) -> dict:
    command = [
        str(python),
        str(HERE),
        "--child",
        name,
        "--path",
        str(data),
        "--batch-size",
        str(args.batch_size),
        "--max-seconds",
        str(args.max_seconds),
        "--variant",
        variant,
    ]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(lines[-1])


def _cells(args: argparse.Namespace, peers: dict) -> None:
    """Part 1 and 2: the h5ad (generated once) read by every loader, one table."""
    from kiban.atomic import staged_file
    from kiban.data.synthetic import write_sparse_h5ad

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"cells_{args.cells}x{args.genes}_{args.genes_per_cell}.h5ad"
    if not data.exists():
        started = time.perf_counter()
        with staged_file(data) as staged:
            write_sparse_h5ad(
                staged, n_cells=args.cells, n_genes=args.genes, genes_per_cell=args.genes_per_cell
            )
        print(f"generated {data} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    nnz = args.cells * args.genes_per_cell
    print(
        f"h5ad: {args.cells:,} cells x {args.genes:,} genes, ~{nnz / 1e6:.0f}M non-zeros "
        f"({data.stat().st_size / 2**20:,.0f} MiB on disk; dense float32 would be "
        f"{args.cells * args.genes * 4 / 2**30:,.1f} GiB); shuffled minibatches of {args.batch_size}; "
        f"each loader stops after {args.max_seconds:.0f}s"
    )
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")

    rows = [
        ("kiban stream, records", _run(sys.executable, "kiban", data, args, "records")),
        (
            "kiban stream + featurizer per record",
            _run(sys.executable, "kiban", data, args, "tokens per record"),
        ),
        (
            "kiban stream + batch featurizer, numpy",
            _run(sys.executable, "kiban", data, args, "tokens", env={"KIBAN_NATIVE": "off"}),
        ),
        ("kiban stream + batch featurizer, compiled", _run(sys.executable, "kiban", data, args, "tokens")),
        (
            "kiban ... compiled, 2 workers",
            _run(sys.executable, "kiban", data, args, "tokens, 2 workers"),
        ),
        ("anndata backed rows", _run(sys.executable, "anndata-backed", data, args)),
        ("anndata in memory", _run(sys.executable, "in-memory", data, args)),
    ]
    for name in ("annbatch", "bionemo-scdl"):
        where = peers.get(name, "skipped (--skip-peers)")
        if not isinstance(where, Path):
            rows.append((name, {"error": where}))
            continue
        converted = _run(where, name, data, args, "convert")  # its own format first, in its own process
        loaded = _run(where, name, data, args, "load") if "error" not in converted else converted
        rows.append((name, {**loaded, "setup_s": converted.get("setup_s", "")}))

    annbatch = dict(rows).get("annbatch", {}).get("per_s")
    print(
        f"{'loader':<41} {'cells/s':>10} {'x annbatch':>10} {'cells':>9} {'setup s':>8} {'peak RSS MiB':>13} "
        f"{'after imports':>14}"
    )
    for name, result in rows:
        if "error" in result:
            print(f"{name:<41} {result['error']}")
            continue
        ratio = f"{result['per_s'] / annbatch:.2f}" if annbatch else ""
        print(
            f"{name:<41} {result['per_s']:>10,.0f} {ratio:>10} {result['cells']:>9,} {result.get('setup_s', ''):>8} "
            f"{result['peak_mib']:>13,.0f} {result['baseline_mib']:>14,.0f}"
        )


def _molecules(args: argparse.Namespace, peers: dict) -> None:
    """Part 3: molecule graph featurization, kiban against chemprop."""
    import rdkit

    smiles = Path(rdkit.__file__).parent / "Data" / "NCI" / "first_5K.smi"
    print(
        f"\nmolecule graph featurization, {smiles.name} (4,999 SMILES; the ones RDKit rejects are skipped):"
    )
    chem = peers.get("chemprop", "skipped (--skip-peers)")
    for name, result in (
        ("kiban MoleculeFeaturizer", _run(sys.executable, "molecules-kiban", smiles, args)),
        (
            "chemprop SimpleMoleculeMolGraphFeaturizer",
            _run(chem, "molecules-chemprop", smiles, args) if isinstance(chem, Path) else {"error": chem},
        ),
    ):
        if "error" in result:
            print(f"  {name:<44} {result['error']}")
        else:
            print(
                f"  {name:<44} {result['per_s']:>8,.0f} molecules/s "
                f"({result['molecules']:,} in {result['seconds']}s, best of {result['passes']} passes)"
            )
    if isinstance(chem, Path):
        same = _run(chem, "molecules-same-process", smiles, args, env={"KIBAN_BENCH_SITE": str(KIBAN_SITE)})
        if "error" in same:
            print(f"  one process, chemprop's venv: {same['error']}")
        else:
            print(
                f"  one process, chemprop's venv (RDKit {same['rdkit']}), six rounds taking turns: kiban "
                f"{same['kiban_per_s']:,.0f}, chemprop {same['chemprop_per_s']:,.0f} molecules/s (medians); "
                f"kiban / chemprop per round {same['ratios']}, median x{same['median_ratio']:.2f}"
            )



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--genes-per-cell", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time limit of one loader's pass")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kiban-bench-data"))
    parser.add_argument("--peers-dir", type=Path, default=Path("/tmp/kiban-bench-peers"))
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--part", choices=("all", "cells", "molecules"), default="all", help="run one part only")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = CHILDREN[args.child](args.path, args.batch_size, args.max_seconds, args.variant)
        print(json.dumps({**result, "peak_mib": _status_mib("VmHWM")}))
        return

    peers = {} if args.skip_peers else _peers(args.peers_dir, cells=args.part != "molecules")
    if args.part in ("all", "cells"):
        _cells(args, peers)
    if args.part in ("all", "molecules"):
        _molecules(args, peers)


if __name__ == "__main__":
    main()
