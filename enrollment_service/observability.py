"""What wraps every request before routing: the request id, bearer-token check, one access-log
line, and the Prometheus metrics that /metrics exposes."""

from __future__ import annotations

import contextvars
import hmac
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from enrollment_service.problems import PROBLEM_MEDIA_TYPE, Unauthorized, problem_document
from enrollment_service.settings import ApiToken

# Plain ASGI types: this wrapper sits outside Litestar and speaks ASGI itself.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: Who is calling: the name of the bearer token the request carried ("-" without tokens).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="-")
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
UNAUTHENTICATED_PATHS = frozenset({"/health/live", "/health/ready"})
UNMATCHED_ROUTE = "(unmatched)"

access_log = logging.getLogger("enrollment_service.access")

#: Where prometheus_client keeps each worker process's metrics (its own variable name).
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


# --- Logging -------------------------------------------------------------------------------


def _install_request_id_on_every_record() -> None:
    """Every log record, from any logger and to any handler, carries the current request id and
    the caller's name."""
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "adds_request_id", False):
        return

    def make_record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        record.caller = CALLER.get()
        return record

    make_record_with_request_id.adds_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record_with_request_id)


_install_request_id_on_every_record()


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed as `extra=` are kept, nothing else is added.
    Encoded by msgspec (values it cannot encode become their str()), with one strftime per second:
    json.dumps and a strftime per line cost about 55 us of a list request, this about 22 us."""

    # uvicorn adds a `color_message` to some records: colour codes have no place in JSON.
    _STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {
        "message",
        "request_id",
        "caller",
        "color_message",
    }
    _encoder = msgspec.json.Encoder(enc_hook=str)

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._second_text = ""

    def _timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        caller = getattr(record, "caller", "-")
        if caller != "-":
            entry["caller"] = caller
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s [%(request_id)s] %(name)s: %(message)s")


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own access log would repeat ours without the request id.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


# --- Metrics -------------------------------------------------------------------------------


class _PoolCollector(Collector):
    def __init__(self, app_state: Any) -> None:
        self._state = app_state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        db = getattr(self._state, "db", None)
        if db is None:
            return
        size = db.pool.get_size()
        idle = db.pool.get_idle_size()
        yield GaugeMetricFamily("db_pool_size", "Connections open in the pool", value=size)
        yield GaugeMetricFamily(
            "db_pool_in_use", "Connections checked out of the pool", value=size - idle
        )
        yield GaugeMetricFamily(
            "db_pool_max_size", "The pool's maximum size", value=db.pool.get_max_size()
        )


class Metrics:
    """One registry per app, so that several apps in one process (the tests) never collide."""

    def __init__(self, app_state: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to answer, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._pool = _PoolCollector(app_state)
        self.registry.register(self._pool)
        # Labelled children by (method, route template, status): a bounded set, looked up once.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def exposition(self) -> bytes:
        """What /metrics answers. Under several worker processes (`serve` with WORKERS > 1 sets
        PROMETHEUS_MULTIPROC_DIR for them) the request metrics are every worker's, summed from
        the files prometheus_client keeps per process; the pool gauges are the answering
        worker's."""
        directory = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
        if not directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        registry.register(self._pool)
        return generate_latest(registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._children.get((method, route, status))
        if children is None:
            labels = (method, route, str(status))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._children[(method, route, status)] = children
        children[0].inc()
        children[1].observe(seconds)


# --- The wrapper ---------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestObserver:
    """ASGI middleware around the whole Litestar app, so that it also sees the requests that
    match no route (401 must come before 404, and every answer carries X-Request-ID)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, api_tokens: tuple[ApiToken, ...]) -> None:
        self.app = app
        self.metrics = metrics
        self._tokens = [(token.name, token.secret.encode()) for token in api_tokens]

    def _caller(self, scope: Scope) -> str | None:
        """The name of the token the request carries; "-" when no token is needed; None when
        one is needed and the request has no valid one."""
        if not self._tokens or scope["path"].rstrip("/") in UNAUTHENTICATED_PATHS:
            return "-"
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        # Compare with every token, always, so timing says nothing about which one matched.
        caller = None
        for name, secret in self._tokens:
            if hmac.compare_digest(given, secret):
                caller = name
        return caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent_id = _header(scope, b"x-request-id")
        request_id = (
            sent_id if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id) else secrets.token_hex(16)
        )
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        caller = self._caller(scope)
        caller_token = CALLER.set(caller or "-")
        try:
            if caller is not None:
                await self.app(scope, receive, send_with_id)
            else:
                await _send_problem(send_with_id, Unauthorized())
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("path_template") or UNMATCHED_ROUTE
            method = scope["method"]
            health_probe = route.startswith("/health")
            if not health_probe and route != "/metrics":
                self.metrics.observe(method, route, status, seconds)
            # A load balancer's successful health probes would drown the log; failed ones stay.
            if not health_probe or status >= 400:
                access_log.info(
                    "%s %s %d %.1fms",
                    method,
                    route,
                    status,
                    seconds * 1000,
                    extra={
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 2),
                    },
                )
            CALLER.reset(caller_token)
            REQUEST_ID.reset(token)


async def _send_problem(send: Send, error: Unauthorized) -> None:
    body = msgspec.json.encode(problem_document(error))
    headers = [
        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
