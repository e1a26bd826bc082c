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


def test_console_command_lists_the_six_encoders():
    kiban_cli = Path(sys.executable).parent / "kiban"
    out = subprocess.run([str(kiban_cli), "encoders"], check=True, capture_output=True, text=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == ["cell", "dna", "image", "molecule", "protein", "text"]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line).strip()
    assert test_command in readme
