"""Shared test settings: nothing may reach a hub, torch stays on two threads, and the de-quantised
GGUF backbone is cached for this session only (the first test that loads it writes the cache, the
rest, subprocesses and Slurm jobs included, read it; the folder is removed at exit).
"""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
if "KIBAN_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kiban-test-cache-")
    os.environ["KIBAN_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Property tests run the same examples on every CI run (a failure reproduces exactly);
# `pytest --hypothesis-profile=explore` searches afresh with more examples.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("ci")
