"""Prometheus metrics of one server, in a registry of its own (so several apps can share a process).

    kiban_http_requests_total{route, method, status}     every request, by route template
    kiban_http_request_duration_seconds{route}           latency histogram (streams: until the last event)
    kiban_batch_rows{kind}                               rows per forward pass (generate, embed, predict)
    kiban_queue_depth                                    requests waiting for the model
    kiban_rejects_total{reason}                          refused requests: unauthorized, body_too_large,
                                                         rate_limited, queue_full, timeout, not_ready,
                                                         invalid_request
    kiban_completions_total{finish_reason}               finished generations: stop, length, cancelled
    kiban_completion_tokens_total                        generated tokens (cancelled rows included)
    kiban_model_ready                                    1 once the model is loaded

Labels are route templates (``/v1/predict/{task}``) and fixed reasons, never raw paths or keys, so
the number of series stays bounded whatever clients send.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServeMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """The server's Prometheus metrics, in a registry of their own."""
    def __init__(self, *, queue_depth: Callable[[], float], ready: Callable[[], bool]) -> None:
        """Create the metrics; the queue depth and readiness gauges read the callables given."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiban_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kiban_http_request_duration_seconds",
            "HTTP request latency",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "kiban_batch_rows",
            "rows per forward pass",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.rejects = Counter(
            "kiban_rejects", "refused requests by reason", ["reason"], registry=self.registry
        )
        self.completions = Counter(
            "kiban_completions",
            "finished generations by finish reason",
            ["finish_reason"],
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "kiban_completion_tokens", "generated tokens", registry=self.registry
        )
        Gauge("kiban_queue_depth", "requests waiting for the model", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("kiban_model_ready", "1 once the model is loaded", registry=self.registry).set_function(
            lambda: float(ready())
        )

    def observe_request(self, *, route: str, method: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency under its route template."""
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_batch(self, kind: str, rows: int) -> None:
        """Record the rows of one forward pass."""
        self.batch_rows.labels(kind).observe(rows)

    def observe_completion(self, finish_reason: str, tokens: int) -> None:
        """Count one finished generation and its tokens."""
        self.completions.labels(finish_reason).inc()
        self.completion_tokens.inc(tokens)

    def reject(self, reason: str) -> None:
        """Count one refused request under its reason."""
        self.rejects.labels(reason).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
