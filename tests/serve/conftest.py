"""Fixtures for the inference-API tests: tiny saved models with task heads, API keys, and real
``kiban serve`` processes on free loopback ports (each stopped, by its own pid, at the end).

The tiny model's LLM weights are scaled up (x20) before saving. At their random init (std 0.02) the
logits are nearly flat and greedy decoding repeats one token whatever the prompt; scaled, answers
depend on the inputs, so a test can tell one request's answer from another's.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from kiban.serve.launch import ServerProcess as _ServerProcess
from kiban.tasks import HeadConfig, PooledHead
from kiban.tiny import tiny_model

KEYS = (
    "kiban-test-key-0000000000000001",
    "kiban-test-key-0000000000000002",
    "kiban-test-key-0000000000000003",
)

# The main server: batching on, no rate limit (the fuzzer sends many requests), small limits that
# the bad-input tests can reach cheaply.
MAIN_FLAGS = tuple(
    "--max-batch 8 --max-wait-ms 20 --max-queue 64 --rate-limit 0 --max-body-bytes 1000000 "
    "--max-tokens 2000 --default-max-tokens 8 --max-sequence-length 2000 --max-image-voxels 750000 --max-image-passes 4 "
    "--max-inputs 8 --timeout-s 30".split()
)

# The small server: protein and molecule only, a queue of 4 and a per-key rate limit, so that a
# bounded number of clients can overrun both.
SMALL_FLAGS = tuple(
    "--max-batch 4 --max-wait-ms 10 --max-queue 4 --rate-limit 60 --rate-burst 12 --max-tokens 64 "
    "--timeout-s 20 --no-access-log".split()
)


def build_model_dir(path: Path, modalities: list[str] | None = None) -> Path:
    """Save a tiny model (sharpened, see the module docstring) with a classification and a regression head."""
    model = tiny_model(modalities, seed=0).eval()
    with torch.no_grad():
        for param in model.llm.parameters():
            if param.dim() == 2:
                param.mul_(20.0)
    model.save_pretrained(path)
    width = model.llm.get_input_embeddings().embedding_dim
    torch.manual_seed(1)
    PooledHead(
        HeadConfig(
            task="toxicity",
            modality="molecule",
            kind="classification",
            labels=["non-toxic", "toxic"],
            input_dim=width,
        )
    ).save(path / "heads" / "toxicity")
    PooledHead(
        HeadConfig(
            task="stability",
            modality="protein",
            kind="regression",
            labels=["tm", "ddg"],
            input_dim=width,
            hidden_dim=16,
        )
    ).save(path / "heads" / "stability")
    return path


class ServerProcess(_ServerProcess):
    """``kiban.serve.launch.ServerProcess`` whose clients use the first test key by default."""

    def client(self, key: str | None = KEYS[0], **options) -> httpx.Client:
        return super().client(key, **options)


@pytest.fixture(scope="session")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    path.write_text("# test keys\n" + "\n".join(KEYS) + "\n")
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, keys_file):
    """Factory: ``start_server(model_dir, *flags, keys=True)`` -> a ready ServerProcess; all are
    stopped at the end of the session.
    """
    started: list[ServerProcess] = []

    def start(model_dir: Path, *flags: str, keys: bool = True) -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(model_dir, keys_file if keys else None, log_path, *flags)
        started.append(server)
        server.wait_ready(key=KEYS[0] if keys else None)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, model_dir) -> ServerProcess:
    """The main server over the full tiny model (every registered modality, two heads)."""
    return start_server(model_dir, *MAIN_FLAGS)


@pytest.fixture(scope="session")
def small_server(start_server, tmp_path_factory) -> ServerProcess:
    """A server over a protein + molecule model with a small queue and a rate limit."""
    model_dir = build_model_dir(tmp_path_factory.mktemp("model") / "small", ["protein", "molecule"])
    return start_server(model_dir, *SMALL_FLAGS)


@pytest.fixture
def api(server):
    with server.client() as client:
        yield client


def data_url(image: np.ndarray, *, fmt: str = "PNG") -> str:
    """An image as a base64 data URL (PNG/JPEG with PIL, TIFF with tifffile)."""
    buffer = io.BytesIO()
    if fmt == "TIFF":
        import tifffile

        tifffile.imwrite(buffer, image)
        mime = "image/tiff"
    else:
        from PIL import Image

        Image.fromarray(image).save(buffer, format=fmt)
        mime = f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


@pytest.fixture(scope="session")
def png_url() -> str:
    return data_url(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def api_keys() -> tuple[str, ...]:
    return KEYS


@pytest.fixture(scope="session")
def make_data_url():
    return data_url


@pytest.fixture(scope="session")
def build_model():
    """``build_model(path, modalities)``: save another tiny model (with heads) for a server of its own."""
    return build_model_dir
