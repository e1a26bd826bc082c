"""Start ``kiban serve`` in a child process and wait until it answers: for notebooks, pipelines and
tests that need a real server on a loopback port and must stop exactly the process they started.

    with ServerProcess("runs/quickstart/model", keys_file="api-keys.txt", log_path="serve.log") as server:
        server.wait_ready(key=key)
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=key).chat.completions.create(...)

The server's output goes to a file (a pipe that nobody reads could fill up and stall it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One ``kiban serve MODEL_DIR`` child process on a free loopback port (``.url``, ``.pid``)."""

    def __init__(
        self, model_dir: str | Path, keys_file: str | Path | None, log_path: str | Path, *flags: str
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        # not ``-m kiban.cli``: run as __main__, cli.py's registry would be a second copy of the module
        command = [
            sys.executable,
            "-c",
            "import sys; from kiban.cli import main; sys.exit(main())",
            "serve",
            str(model_dir),
            "--port",
            str(self.port),
            *flags,
        ]
        if keys_file is not None:
            command += ["--api-keys-file", str(keys_file)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.process.pid

    def wait_ready(self, *, key: str | None, timeout: float = 90.0) -> None:
        """Poll ``/readyz`` until the model is loaded; raises (with the log's tail) if the process
        exits or is not ready within ``timeout`` seconds (and then stops it).
        """
        import httpx

        headers = {"authorization": f"Bearer {key}"} if key else {}
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"kiban serve exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"kiban serve was not ready within {timeout} s:\n{self.log()[-3000:]}")

    def client(self, key: str | None, **options: Any) -> Any:
        """An ``httpx.Client`` on the server's URL, with the bearer key when given."""
        import httpx

        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=options.pop("timeout", 60), **options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM (the server drains and exits), SIGKILL after 15 s; only this process."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
