"""Embeddings over HTTP: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with
dynamic batching on (``--max-batch 32``) and off (``--max-batch 1``), in one run on one saved model.

Each configuration is a real ``kiban serve`` process on a free loopback port, both up at once and
measured in alternating turns; clients are asyncio tasks in this process (httpx), each sending one
embeddings request at a time (closed loop). A request embeds one protein, drawn from real PDB chains in
``../shared/data/protein/sequences`` when present (else synthetic lengths), so batches mix
lengths as real traffic does. The server's mean rows per forward pass is read from ``/metrics``.
Prints a Markdown table; writes nothing but a temporary model directory.

    .venv/bin/python benchmarks/serve_embeddings.py [--model default|small|PATH] [--seconds 15]

``default`` is the offline default model (six encoders + SmolLM2-135M), ``small`` the tiny encoders
over a 4-layer 128-wide Llama (seconds to build; HTTP overhead dominates), PATH any saved model.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("serve_embeddings")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "protein" / "sequences"
AMINO = "ACDEFGHIKLMNPQRSTVWY"
KEY = "benchmark-key-000000000000000000"
LEVELS = (1, 8, 32)


def proteins(n: int, *, max_length: int) -> tuple[list[str], str]:
    source = SHARED / "secondary_structure_pdb_2000.csv"
    rng = random.Random(0)
    if source.is_file():
        with source.open() as handle:
            seqs = [row["sequence"] for row in csv.DictReader(handle)]
        seqs = [s for s in seqs if set(s) <= set(AMINO) and 0 < len(s) <= max_length]
        rng.shuffle(seqs)
        return seqs[:n], f"real PDB chains <= {max_length} aa"
    lengths = [min(max_length, max(20, int(rng.lognormvariate(5.0, 0.5)))) for _ in range(n)]
    return ["".join(rng.choice(AMINO) for _ in range(k)) for k in lengths], "synthetic lengths"


def build_model(choice: str, directory: Path) -> tuple[Path, str]:
    import torch

    from kiban.fusion import KibanModel, default_config
    from kiban.tiny import tiny_config

    if choice not in ("default", "small"):
        return Path(choice), f"saved model {choice}"
    torch.manual_seed(0)
    if choice == "default":
        config, name = default_config(), "default model: six encoders (ESM-2 8M for proteins) + SmolLM2-135M"
    else:
        config = tiny_config()
        config.backbone.hf_config.update(hidden_size=128, intermediate_size=256, num_hidden_layers=4)
        name = "small model: tiny encoders + 4-layer 128-wide Llama"
    KibanModel.from_config(config).save_pretrained(directory)
    return directory, name


class Server:
    """One ``kiban serve`` subprocess on a free loopback port."""

    def __init__(self, model_dir: Path, keys: Path, log_path: Path, *flags: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "import sys; from kiban.cli import main; sys.exit(main())", "serve"]
        command += [str(model_dir), "--port", str(self.port), "--api-keys-file", str(keys), "--no-access-log"]
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen([*command, *flags], stdout=out, stderr=subprocess.STDOUT)
        until = time.monotonic() + 300
        while time.monotonic() < until and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/readyz", headers=_auth(), timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not get ready; see {log_path}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def _batch_stats(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", headers=_auth()).text
    count = re.search(r'kiban_batch_rows_count{kind="embed"} (\S+)', text)
    total = re.search(r'kiban_batch_rows_sum{kind="embed"} (\S+)', text)
    return (float(count.group(1)), float(total.group(1))) if count else (0.0, 0.0)


async def load(url: str, seqs: list[str], *, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` closed-loop clients for ``seconds``: latencies in ms, elapsed seconds, errors."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=_auth(), timeout=120, limits=limits) as http:

        async def client(c: int) -> None:
            nonlocal errors
            i = c
            while time.perf_counter() < stop:
                body = {"input": [{"type": "protein", "protein": {"sequence": seqs[i % len(seqs)]}}]}
                sent = time.perf_counter()
                response = await http.post("/v1/embeddings", json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1
                i += clients

        started = time.perf_counter()
        stop = started + seconds
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return {"latencies": np.array(latencies) * 1000, "elapsed": elapsed, "errors": errors}


def start(model_dir: Path, keys: Path, work: Path, *, max_batch: int) -> Server:
    flags = ["--max-batch", str(max_batch), "--max-wait-ms", "5" if max_batch > 1 else "0"]
    flags += ["--max-queue", "256", "--rate-limit", "0", "--timeout-s", "300"]
    return Server(model_dir, keys, work / f"server-batch{max_batch}.log", *flags)


def measure(servers: dict[str, Server], seqs: list[str], *, seconds: float, rounds: int) -> dict:
    """Per level, the servers take turns (``rounds`` turns each), so background load on a shared
    machine falls on both alike; only the server being measured has work.
    """
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in servers}
    for server in servers.values():  # warm-up: first shapes, allocator arenas
        asyncio.run(load(server.url, seqs, clients=8, seconds=5))
    for clients in LEVELS:
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for _ in range(rounds):
            for name, server in servers.items():
                before = _batch_stats(server.url)
                run = asyncio.run(load(server.url, seqs, clients=clients, seconds=seconds / rounds))
                after = _batch_stats(server.url)
                run["passes"], run["rows"] = after[0] - before[0], after[1] - before[1]
                runs[name].append(run)
        for name, parts in runs.items():
            latencies = np.concatenate([p.pop("latencies") for p in parts])
            elapsed = sum(p["elapsed"] for p in parts)
            results[name][clients] = {
                "rps": len(latencies) / elapsed,
                "p50": float(np.percentile(latencies, 50)),
                "p99": float(np.percentile(latencies, 99)),
                "rows_per_pass": sum(p["rows"] for p in parts) / max(1.0, sum(p["passes"] for p in parts)),
                "errors": sum(p["errors"] for p in parts),
            }
            log.info("%s, %d clients: %s", name, clients, results[name][clients])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="default | small | PATH of a saved model")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured seconds per level and configuration"
    )
    parser.add_argument("--rounds", type=int, default=4, help="turns the two servers take per level")
    parser.add_argument(
        "--max-length",
        type=int,
        default=120,
        help="longest protein sent, in residues (the default model's cost grows with length)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so that `finally` stops the servers
    seqs, source = proteins(512, max_length=args.max_length)
    with tempfile.TemporaryDirectory(prefix="kiban-serve-bench-") as tmp:
        work = Path(tmp)
        keys = work / "keys.txt"
        keys.write_text(KEY + "\n")
        log.info("building the model ...")
        model_dir, name = build_model(args.model, work / "model")
        servers = {
            "on": start(model_dir, keys, work, max_batch=32),
            "off": start(model_dir, keys, work, max_batch=1),
        }
        try:
            results = measure(servers, seqs, seconds=args.seconds, rounds=args.rounds)
        finally:
            for server in servers.values():
                server.stop()
        on, off = results["on"], results["off"]

    lengths = [len(s) for s in seqs]
    print(
        f"\nPOST /v1/embeddings, one protein per request ({source}, median {int(np.median(lengths))} aa); "
        f"{name}; {args.seconds:g} s per level and configuration, in {args.rounds} alternating turns\n"
    )
    print("| clients | batching | requests/s | p50 ms | p99 ms | rows per forward | throughput on/off |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for clients in LEVELS:
        for label, result in (("on (max 32, 5 ms)", on[clients]), ("off (max 1)", off[clients])):
            ratio = f"x{on[clients]['rps'] / off[clients]['rps']:.2f}" if label.startswith("on") else ""
            print(
                f"| {clients} | {label} | {result['rps']:.1f} | {result['p50']:.0f} | {result['p99']:.0f} | "
                f"{result['rows_per_pass']:.1f} | {ratio} |"
            )
    failed = sum(r["errors"] for r in [*on.values(), *off.values()])
    if failed:
        print(f"\n{failed} requests failed (not counted above)")


if __name__ == "__main__":
    main()
