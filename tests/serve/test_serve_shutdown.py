"""SIGTERM on a real ``kiban serve`` that is busy: it stops taking work, lets the running request
drain for ``--drain-s``, cancels what is left (a generation stops at its next step) and exits 0,
instead of computing to the end or hanging. This module's server is its own: the test ends it.
"""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx

from kiban.fusion.backbone import byte_tokenizer

NO_EOS = {str(byte_tokenizer().eos_token_id): -100}


def test_sigterm_drains_cancels_and_exits(start_server, model_dir):
    server = start_server(model_dir, "--drain-s", "1", "--max-tokens", "4000", "--timeout-s", "600")
    body = {
        "messages": [{"role": "user", "content": "Tell me everything."}],
        "max_tokens": 4000,
        "logit_bias": NO_EOS,  # would run all 4000 steps
    }
    outcome: dict[str, object] = {}

    def long_request() -> None:
        try:
            with server.client(timeout=120) as api:
                outcome["response"] = api.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as error:  # the server closed the connection on its way out
            outcome["response"] = error

    thread = threading.Thread(target=long_request)
    thread.start()
    with server.client() as api:
        until = time.monotonic() + 60
        while not re.search(r'^kiban_batch_rows_count\{kind="generate"\} [1-9]', api.get("/metrics").text, re.M):
            assert time.monotonic() < until, "the generation never started"
            time.sleep(0.05)
    server.process.terminate()  # SIGTERM, to this server's pid only
    exit_code = server.process.wait(timeout=60)  # a bound on a hang, not a speed check
    thread.join(timeout=60)
    # uvicorn re-raises the signal it caught once it has shut down cleanly
    assert exit_code in (0, -signal.SIGTERM), server.log()[-2000:]
    log = server.log()
    assert "cancelled 1 running request(s) still at work after drain_s=1 s" in log, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    response = outcome["response"]
    assert isinstance(response, httpx.Response), response  # answered, not dropped
    assert response.status_code == 503 and "shutting down" in response.text, response.text
