"""``kiban serve MODEL_DIR``: the inference API over a saved model, on uvicorn.

The port opens once the Python packages are imported (a few seconds) and ``/healthz`` answers
while the model loads in the background; ``/readyz`` turns 200 when it is loaded. SIGTERM refuses
new work, lets running requests finish for ``--drain-s`` seconds, cancels what is left (a
generation stops at its next step) and exits. A model directory that fails to load ends the process
with exit code 1 (the error is logged), so a supervisor sees it instead of a server that is never
ready. Binds 127.0.0.1 unless ``--host`` says otherwise; another host needs ``--api-keys-file``.
"""

from __future__ import annotations

import argparse
import logging
import re

from kiban.cli import arguments, command

__all__ = ["serve"]

log = logging.getLogger("kiban.serve")


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    from kiban.device import add_device_argument
    from kiban.serve.settings import BatchingOptions, Limits, ServeSettings

    batching, limits, server = BatchingOptions(), Limits(), ServeSettings()
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="a directory written by KibanModel.save_pretrained (task heads in MODEL_DIR/heads/<task>/)",
    )
    parser.add_argument("--host", default=server.host, help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=server.port, help="port (default: %(default)s)")
    parser.add_argument(
        "--api-keys-file",
        help="file with one bearer API key per line ('#' comments allowed), optionally followed by "
        "name=NAME groups=G1,G2 (the document groups the key reads); re-read when it changes. "
        "Without it the server needs no key and binds loopback only",
    )
    parser.add_argument(
        "--index",
        metavar="DIR_OR_URL",
        help="a document index (kiban index) to serve /v1/search and chat 'retrieval' from; "
        "each key reads the groups its line in --api-keys-file grants",
    )
    parser.add_argument("--reranker", metavar="DIR", help="a local cross-encoder folder that re-ranks passages")
    parser.add_argument(
        "--model-name", default=server.model_name, help="model id in /v1/models (default: %(default)s)"
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="weight-only quantised backbone (torchao); default: as the model was saved, else float32",
    )
    group = parser.add_argument_group("batching")
    group.add_argument(
        "--max-batch",
        type=int,
        default=batching.max_batch,
        help="most rows per forward pass; 1 turns batching off (default: %(default)s)",
    )
    group.add_argument(
        "--max-wait-ms",
        type=float,
        default=batching.max_wait_ms,
        help="how long a request waits for others to batch with (default: %(default)s)",
    )
    group.add_argument(
        "--max-queue",
        type=int,
        default=batching.max_queue,
        help="most requests waiting; more get 503 + Retry-After (default: %(default)s)",
    )
    group.add_argument(
        "--timeout-s",
        type=float,
        default=batching.timeout_s,
        help="per-request timeout in seconds, answered 504; work past it stops (default: %(default)s)",
    )
    group.add_argument(
        "--drain-s",
        type=float,
        default=batching.drain_s,
        help="on SIGTERM, seconds running requests may take to finish before they are cancelled "
        "(default: %(default)s)",
    )
    group = parser.add_argument_group("limits")
    group.add_argument(
        "--rate-limit",
        type=float,
        default=server.rate_limit,
        help="requests per second per API key on /v1/*, 0 = off (default: %(default)s)",
    )
    group.add_argument(
        "--rate-burst",
        type=int,
        default=server.rate_burst,
        help="requests a key may send at once after idling (default: %(default)s)",
    )
    for name, help_text in (
        ("max_body_bytes", "request body size, answered 413"),
        ("max_sequence_length", "characters of one sequence or SMILES, genes of one cell"),
        ("max_inputs", "modality inputs per chat request; inputs per embeddings/predict request"),
        ("max_image_voxels", "values of one decoded image, every axis counted (H x W x channels x slices)"),
        ("max_image_passes", "image-encoder passes of one image (one per z-slice)"),
        ("max_tokens", "most tokens a chat completion may ask for"),
        ("default_max_tokens", "tokens generated when a request does not say"),
        ("max_text_chars", "characters of all text in one request"),
    ):
        default = getattr(limits, name)
        if name == "default_max_tokens":  # None: the usual default, lowered to --max-tokens if that is lower
            help_text += f" (default: {default}, or --max-tokens if lower)"
            default = None
        else:
            help_text += " (default: %(default)s)"
        group.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=help_text)
    group = parser.add_argument_group("process")
    add_device_argument(group)
    group.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default")
    group.add_argument(
        "--max-connections",
        type=int,
        default=512,
        help="open connections uvicorn accepts before answering 503 (default: %(default)s)",
    )
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    group.add_argument("--no-access-log", action="store_true", help="do not log one line per request")


_QUERY_VALUE = re.compile(r"=[^&#]*")


def _redact_query(record: logging.LogRecord) -> bool:
    """Blank every query-string value in an access-log line.

    Blank every query-string value in an access-log line: a client may put a key in the URL
    (``?api_key=...``), and no key may reach a log in any form.
    """
    if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
        path, mark, query = record.args[2].partition("?")
        if mark:
            record.args = (*record.args[:2], f"{path}?{_QUERY_VALUE.sub('=<redacted>', query)}", *record.args[3:])
    return True


@command(
    "serve", help="serve a saved model over HTTP: OpenAI-compatible chat and embeddings, task predictions"
)
@arguments(_serve_arguments)
def serve(args: argparse.Namespace) -> int:
    """Run ``kiban serve`` with the parsed command line; the process's exit code."""
    import asyncio

    from kiban.device import resolve_device
    from kiban.serve.loading import check_model_dir
    from kiban.serve.settings import BatchingOptions, Limits, ServeSettings, read_api_keys

    logging.getLogger("kiban").setLevel(getattr(logging, args.log_level.upper()))
    if args.default_max_tokens is None:
        args.default_max_tokens = min(Limits().default_max_tokens, args.max_tokens)
    limits = Limits(**{name: getattr(args, name) for name in Limits.__dataclass_fields__})
    settings = ServeSettings(
        host=args.host,
        port=args.port,
        api_keys=read_api_keys(args.api_keys_file) if args.api_keys_file else (),
        api_keys_file=args.api_keys_file,
        index=args.index,
        reranker=args.reranker,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        limits=limits,
        model_name=args.model_name,
    )
    options = BatchingOptions(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        timeout_s=args.timeout_s,
        drain_s=args.drain_s,
    )
    args.placement = resolve_device(args.device)  # a GPU that is not there: one line, before anything
    check_model_dir(args.model_dir)  # so is a wrong directory
    if args.index:  # and a wrong index location
        from kiban.index.store import open_store

        open_store(args.index, create=False).close()
    if not settings.api_keys:
        log.warning("no --api-keys-file: every route is open to anyone who can reach %s", settings.host)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return asyncio.run(_run(args, settings, options))


async def _run(args: argparse.Namespace, settings, options) -> int:
    import asyncio

    import uvicorn

    from kiban.serve.app import create_app
    from kiban.serve.engine import InferenceEngine, NotReady

    engine = InferenceEngine(
        model_dir=args.model_dir, options=options, quantize=args.quantize, placement=args.placement
    )
    app = create_app(engine, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=not args.no_access_log,
        limit_concurrency=args.max_connections,
        # the engine drains and cancels first (below), so connections close before uvicorn gives up
        timeout_graceful_shutdown=options.drain_s + 5,
        server_header=False,
    )
    logging.getLogger("uvicorn.access").addFilter(_redact_query)
    server = uvicorn.Server(config)
    await engine.start()
    failed = False

    async def exit_if_loading_fails() -> None:
        nonlocal failed
        try:
            await engine.wait_ready()
            log.info(
                "ready: serving %s on http://%s:%d, on %s",
                args.model_dir,
                settings.host,
                settings.port,
                args.placement.describe(),
            )
        except NotReady as error:
            log.error("the model could not be loaded, stopping: %s", error)
            failed = True
            server.should_exit = True

    async def drain_on_signal() -> None:
        # uvicorn sets should_exit on SIGTERM / SIGINT and then waits for open requests: make them end
        while not server.should_exit:
            await asyncio.sleep(0.05)
        await engine.begin_shutdown()

    watcher = asyncio.create_task(exit_if_loading_fails())
    drainer = asyncio.create_task(drain_on_signal())
    try:
        await server.serve()
    finally:
        watcher.cancel()
        drainer.cancel()
        await engine.stop()
    return 1 if failed else 0
