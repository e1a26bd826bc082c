"""Packaging and the library/recipe boundary."""

import json
import subprocess
import sys
from pathlib import Path

import kiban

ROOT = Path(kiban.__file__).parent


def _run_python(code: str) -> str:
    # run outside the checkout, so that its folders are not importable from the working directory
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/").stdout


def test_library_modules_import_neither_lightning_nor_deepspeed():
    out = _run_python(
        "import sys, kiban, kiban.encoders, kiban.fusion, kiban.tiny\n"
        "from kiban.encoders import list_encoders\n"
        "list_encoders()\n"
        "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'deepspeed')])"
    )
    assert out.strip() == "[]"


def test_repository_folders_import_as_kiban_subpackages_and_nothing_leaks():
    out = _run_python(
        "import importlib.util, json\n"
        "names = ['kiban.encoders', 'kiban.fusion', 'kiban.data', 'kiban.tasks', 'kiban.hpc', "
        "'encoders', 'fusion', 'data', 'tasks', 'hpc']\n"
        "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))"
    )
    found = json.loads(out)
    assert all(found[f"kiban.{n}"] for n in ("encoders", "fusion", "data", "tasks", "hpc"))
    assert not any(found[n] for n in ("encoders", "fusion", "data", "tasks", "hpc")), found


def test_console_command_lists_the_six_encoders_and_property_conditions():
    kiban_cli = Path(sys.executable).parent / "kiban"
    out = subprocess.run([str(kiban_cli), "encoders"], check=True, capture_output=True, text=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == ["cell", "dna", "image", "molecule", "properties", "protein", "text"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line).strip()
    assert test_command in readme


def test_the_wheel_holds_every_subpackage_and_its_data(tmp_path):
    """Build the wheel from a copy of the source; every folder with an ``__init__.py`` must be in it.

    ``[tool.setuptools] packages`` is a list: a new subpackage missing from it would silently miss
    the wheel (and every ``pip install .``), while an editable install hides that.
    """
    import shutil
    import zipfile

    source = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "runs")
    shutil.copytree(ROOT, source, ignore=skip)
    skipped = {"tests", "benchmarks", "bin", "docs", "configs"}
    packages = [
        init.parent.relative_to(source)
        for init in source.rglob("__init__.py")
        if not (set(init.relative_to(source).parts) & skipped) and not init.relative_to(source).parts[0].startswith(".")
    ]
    assert len(packages) >= 9
    modules = [p.relative_to(source) for p in source.rglob("*.py") if p.parent.relative_to(source) in packages]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("kiban-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [str(p) for p in packages if str(Path("kiban", p, "__init__.py")) not in names]
    assert not missing, f"subpackages missing from the wheel (add them to [tool.setuptools] packages): {missing}"
    lost = [str(m) for m in modules if str(Path("kiban", m)) not in names]
    assert not lost, f"modules missing from the wheel: {lost}"
    assert {"kiban/configs/smoke.yaml", "kiban/hpc/presets/deepspeed_stage_2.json"} <= names
    assert not any(n.split("/")[0] in ("encoders", "fusion", "data", "tasks") for n in names)  # nothing leaks


def test_the_package_docstrings_import_works():
    out = _run_python(
        "import sys, kiban\n"
        "lazy = 'kiban.fusion.model' not in sys.modules\n"
        "from kiban import KibanModel, KibanConfig\n"
        "print(lazy, KibanModel.__module__, KibanConfig.__module__)"
    )
    assert out.split() == ["True", "kiban.fusion.model", "kiban.fusion.config"]
