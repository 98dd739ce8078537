"""What the server has been doing, for `GET /metrics` in Prometheus' text format.

Each app has its own registry (tests start many apps in one process). Requests are counted
by an ASGI wrapper around the whole app, so that every answer is counted with the status
it went out with, refusals and streams included.
"""

from __future__ import annotations

from typing import Any, Callable

# The paths counted by name; any other is counted as "other" (a scanner's random paths
# must not grow the number of series).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
             "/")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("instructlm_requests", "HTTP requests answered, by endpoint "
                                "and status", ["endpoint", "status"], registry=r)
        self.tokens = Counter("instructlm_generated_tokens", "Answer tokens generated",
                              ["model"], registry=r)
        self.queue = Gauge("instructlm_queue_depth", "Requests waiting for a place in the "
                           "decoding batch", ["model"], registry=r)
        self.batch = Gauge("instructlm_batch_size", "Answers decoding together now",
                           ["model"], registry=r)
        self.step_rows = Histogram("instructlm_decode_step_rows", "Answers decoded together "
                                   "in one step", ["model"], buckets=ROW_BUCKETS, registry=r)
        self.first_token = Histogram("instructlm_time_to_first_token_seconds", "From a "
                                     "request's arrival to its first answer token",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("instructlm_request_duration_seconds", "From a request's "
                                 "arrival to its last answer token", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)

    def observer(self, model: str) -> Callable[[str, float], None]:
        """What a model's decoding loop reports: queue depth, batch size, rows a step and
        the tokens of each answer that ended."""
        queue, batch = self.queue.labels(model), self.batch.labels(model)
        step_rows, tokens = self.step_rows.labels(model), self.tokens.labels(model)

        def observe(kind: str, value: float) -> None:
            if kind == "queue":
                queue.set(value)
            elif kind == "batch":
                batch.set(value)
            elif kind == "step":
                step_rows.observe(value)
            elif kind == "tokens":
                tokens.inc(value)
        return observe

    def answered(self, model: str, first_token_s: float | None, total_s: float) -> None:
        if first_token_s is not None:
            self.first_token.labels(model).observe(first_token_s)
        self.latency.labels(model).observe(total_s)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class CountRequests:
    """ASGI middleware: every HTTP response counted by endpoint and the status it went out
    with (a request that failed before answering counts as 500)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def sending(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(_endpoint(scope.get("path", "")), str(status)).inc()


def _endpoint(path: str) -> str:
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
