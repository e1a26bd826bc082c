"""The ASGI layer in front of every route: metrics, API keys, rate limit and body size.

It runs before routing and before any body is parsed, in this order:

1. ``/healthz`` passes untouched (liveness probes carry no key);
2. a missing or wrong ``Authorization: Bearer <key>`` -> 401 (``auth.KeyRing``: keys compared with
   ``hmac.compare_digest`` against every key, so timing tells nothing; keys are never logged; a keys
   file is re-read when it changes). The key's principal (name, document groups) goes into the
   request's state as ``principal``, and its name identifies the caller to the rate limit;
3. ``/v1/*`` requests over the key's token bucket -> 429 with ``Retry-After``;
4. a ``Content-Length`` over ``max_body_bytes`` -> 413 without reading the body; a body sent
   without a length is counted as it arrives and the request answered 413 once it goes over.

Every request, refused or not, is counted in the metrics under its route template.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.routing import Match

from kiban.serve.auth import KeyRing
from kiban.serve.metrics import ServeMetrics
from kiban.serve.schemas import error_payload

__all__ = ["Guard", "TokenBuckets"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

OPEN_PATHS = ("/healthz",)


class TokenBuckets:
    """One token bucket per client: ``rate`` tokens per second, at most ``burst`` stored."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        """Buckets of ``burst`` tokens refilled at ``rate`` per second, read on ``clock``."""
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when the request may go ahead, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware; no keys turns authentication off (the settings allow that on loopback only)."""

    def __init__(
        self,
        app: Any,
        *,
        keys: tuple[str, ...] | KeyRing,
        buckets: TokenBuckets,
        max_body_bytes: int,
        metrics: ServeMetrics,
        routes: Callable[[], list],
    ) -> None:
        """Wrap ``app``; ``routes`` is read lazily because routes are added after the middleware."""
        self.app = app
        self.keys = keys if isinstance(keys, KeyRing) else KeyRing(tuple(keys))
        self.buckets = buckets
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.routes = routes  # the app's routes, read lazily: routes are added after the middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the checks, then the app; count the request in the metrics whatever happens."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = self._route(scope)
        status = {"code": 500}

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted_send)
        finally:
            self.metrics.observe_request(
                route=route,
                method=scope["method"],
                status=status["code"],
                seconds=time.perf_counter() - started,
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        client = self._client(scope)
        if client is None:
            self.metrics.reject("unauthorized")
            await _error(
                send,
                401,
                "missing or invalid API key: send 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"www-authenticate": "Bearer"},
            )
            return
        if path.startswith("/v1/"):
            wait = self.buckets.take(client)
            if wait > 0:
                self.metrics.reject("rate_limited")
                await _error(
                    send,
                    429,
                    f"rate limit of {self.buckets.rate:g} requests/s for this API key "
                    f"exceeded; retry after {math.ceil(wait)} s",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={"retry-after": str(math.ceil(wait))},
                )
                return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            self.metrics.reject("body_too_large")
            await _error(
                send,
                413,
                f"request body of {length} bytes is over the limit max_body_bytes={self.max_body_bytes}",
                type="invalid_request_error",
                code="limit_exceeded",
            )
            return
        await self._limited_body(scope, receive, send)

    async def _limited_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, counting body bytes as they arrive; answer 413 once they go over the limit."""
        received = 0
        app_answered = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: dict) -> None:
            nonlocal app_answered
            if received > self.max_body_bytes:
                return  # the app answered a body it could not read whole; our 413 replaces it
            if message["type"] == "http.response.start":
                app_answered = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:  # _BodyTooLarge, or whatever the framework made of it
            if received <= self.max_body_bytes:
                raise
        if received > self.max_body_bytes and not app_answered:
            self.metrics.reject("body_too_large")
            await _error(
                send,
                413,
                f"request body is over the limit max_body_bytes={self.max_body_bytes}",
                type="invalid_request_error",
                code="limit_exceeded",
            )

    def _client(self, scope: Scope) -> str | None:
        """The caller's name for rate limiting, or None when the key is missing or wrong.

        The caller's principal is left in ``scope["state"]["principal"]`` for the routes.
        """
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        principal = self.keys.lookup(token)
        if principal is None:
            return None
        scope.setdefault("state", {})["principal"] = principal
        return principal.name

    def _route(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match != Match.NONE:  # PARTIAL: the path matches, the method does not (405)
                return getattr(route, "path", "other")
        return "unmatched"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _error(
    send: Send, status: int, message: str, *, type: str, code: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_payload(message, type=type, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
