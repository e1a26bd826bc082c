"""Every failure as an OpenAI-shaped error: ``{"error": {"message", "type", "param", "code"}}``.

Exception -> status: malformed JSON 400; schema violations, refused requests (``decode.RequestError``,
which names the broken limit) and bad inputs (``InvalidInput``, raised by featurizers) 422; unknown
model or task 404; queue full or model not loaded 503 with ``Retry-After``; deadline 504; anything
unexpected 500 with a fixed message (the traceback goes to the server log, never to the client).

Schema violations are summarised for people: pydantic reports a failed union once per member it
tried ("should be a valid string", "should be an object", ...), so only the member that got
furthest is reported, with JSON-path locations such as ``messages[0].content[1].protein.sequence``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiban.encoders.base import InvalidInput
from kiban.serve.decode import RequestError
from kiban.serve.engine import NotReady, Overloaded, RequestTimeout, UnknownTask
from kiban.serve.metrics import ServeMetrics
from kiban.serve.schemas import error_payload

__all__ = ["add_error_handlers", "describe_validation_errors", "error_response"]

log = logging.getLogger(__name__)

# How pydantic names the members of a union in an error location.
_PRIMITIVE_MEMBERS = {"str", "int", "float", "bool", "none", "bytes"}


def _is_member(part: Any) -> bool:
    return isinstance(part, str) and (part in _PRIMITIVE_MEMBERS or "[" in part)


def _location(loc: tuple) -> str:
    """``("body", "messages", 0, "content", "list[...]", 1, "protein", "protein", "sequence")`` ->
    ``messages[0].content[1].protein.sequence``.
    """
    out, skip_tag = "", False
    for part in loc:
        if skip_tag:  # a tagged union names the tag right after itself; the field follows
            skip_tag = False
            continue
        if part == "body" and not out:
            continue
        if _is_member(part):
            skip_tag = "tagged-union" in part
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _score(loc: tuple) -> float:
    # the deepest member got furthest; a primitive member ("str") reached no field at all
    return len(loc) - (0.5 if loc and loc[-1] in _PRIMITIVE_MEMBERS else 0)


def describe_validation_errors(problems: list[dict[str, Any]]) -> tuple[str, str]:
    """(message, param) for pydantic errors, keeping per union the member that got furthest."""
    best: dict[tuple, float] = {}
    for problem in problems:
        loc = tuple(problem.get("loc", ()))
        union = next((i for i, part in enumerate(loc) if _is_member(part)), None)
        key = loc[:union] if union is not None else loc
        best[key] = max(best.get(key, float("-inf")), _score(loc))
    kept = []
    for problem in problems:
        loc = tuple(problem.get("loc", ()))
        union = next((i for i, part in enumerate(loc) if _is_member(part)), None)
        if union is None or _score(loc) == best[loc[:union]]:
            kept.append(problem)
    kept.sort(key=lambda p: p.get("type") != "union_tag_invalid")  # an unknown part type says the most
    lines = list(
        dict.fromkeys(
            f"{_location(tuple(p.get('loc', ())))}: {str(p.get('msg', '')).removeprefix('Value error, ')}"
            for p in kept
        )
    )
    message = "; ".join(lines[:4]) + (f"; and {len(lines) - 4} more" if len(lines) > 4 else "")
    return message, _location(tuple(kept[0].get("loc", ()))) if kept else "body"


def error_response(
    status: int,
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_payload(message, type=type, param=param, code=code), status_code=status, headers=headers
    )


def add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, error: RequestValidationError) -> JSONResponse:
        metrics.reject("invalid_request")
        problems = error.errors()
        broken = [p for p in problems if p.get("type") == "json_invalid"]
        if broken:
            reason = (broken[0].get("ctx") or {}).get("error", "not JSON")
            position = broken[0].get("loc", ("body", None))[-1]
            where = f" at character {position}" if isinstance(position, int) else ""
            return error_response(
                400,
                f"the request body is not valid JSON: {reason}{where}",
                type="invalid_request_error",
                code="malformed_json",
            )
        message, param = describe_validation_errors(problems)
        return error_response(422, message, type="invalid_request_error", param=param, code="invalid_request")

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        metrics.reject("invalid_request")
        return error_response(
            error.status, str(error), type="invalid_request_error", param=error.param, code=error.code
        )

    @app.exception_handler(InvalidInput)
    async def invalid_input(request: Request, error: InvalidInput) -> JSONResponse:
        metrics.reject("invalid_request")
        return error_response(422, str(error), type="invalid_request_error", code="invalid_input")

    @app.exception_handler(UnknownTask)
    async def unknown_task(request: Request, error: UnknownTask) -> JSONResponse:
        return error_response(
            404, str(error.args[0]), type="invalid_request_error", param="task", code="task_not_found"
        )

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded) -> JSONResponse:
        return error_response(
            503,
            str(error),
            type="overloaded",
            code="queue_full",
            headers={"retry-after": str(int(error.retry_after))},
        )

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, error: NotReady) -> JSONResponse:
        metrics.reject("not_ready")
        return error_response(
            503, f"not ready: {error}", type="not_ready", code="not_ready", headers={"retry-after": "5"}
        )

    @app.exception_handler(RequestTimeout)
    async def timeout(request: Request, error: RequestTimeout) -> JSONResponse:
        return error_response(504, str(error), type="timeout", code="timeout")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(
            error.status_code, str(error.detail), type="invalid_request_error", headers=error.headers
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error (logged on the server)", type="server_error")
