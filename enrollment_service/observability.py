"""What wraps every request before routing: the request id, bearer-token check, one access-log
line, and the Prometheus metrics that /metrics exposes."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import itertools
import logging
import os
import platform
import re
import secrets
import select
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, TextIO

import msgspec
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from enrollment_service.context import CALLER, REQUEST_ID
from enrollment_service.db import RETRY_ATTEMPTS, RETRYABLE_ERRORS, Database
from enrollment_service.problems import PROBLEM_MEDIA_TYPE, Unauthorized, problem_document
from enrollment_service.settings import ApiToken

# Plain ASGI types: this wrapper sits outside Litestar and speaks ASGI itself.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


class _RequestIds:
    """Fresh request ids, 32 hex digits: 16 random to this process, then a counter. Unique
    across processes and restarts like 128 random bits, without reading the system's random
    source for every request (which cost 3 % of a light request's CPU)."""

    def __init__(self) -> None:
        self.reseed()

    def reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_new_request_id = _RequestIds()
# A forked child must not repeat its parent's ids.
os.register_at_fork(after_in_child=_new_request_id.reseed)
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


#: The most bytes one write to a pipe keeps whole when other processes write to it too (POSIX
#: guarantees at least 512; Linux 4096): several workers share the container's stderr.
ATOMIC_WRITE_BYTES = getattr(select, "PIPE_BUF", 512)


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that, on the event loop's thread, writes its lines at the end of the
    loop's current pass, together: under load several requests end in one pass, and one write
    per access-log line cost a tenth of the line. Each write holds whole lines and at most
    ATOMIC_WRITE_BYTES (unless one line is longer), so that lines of several workers on one
    pipe never interleave. Elsewhere (other threads, no loop) and at exit (`logging.shutdown`
    flushes every handler) it writes at once, as StreamHandler does. A process killed outright
    loses at most the lines of one pass."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop whose current pass ends with a flush, if any.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: write now
            self.flush()
            return
        if self._flush_on is not loop:
            loop.call_soon(self.flush)
            self._flush_on = loop

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            pending, self._pending = self._pending, []
            for chunk in _whole_lines_at_most(pending, ATOMIC_WRITE_BYTES):
                try:
                    self.stream.write(chunk)
                    super().flush()
                except Exception:  # as StreamHandler: never let logging break the caller
                    self.handleError(logging.makeLogRecord({"msg": chunk}))


def _whole_lines_at_most(lines: list[str], limit: int) -> Iterator[str]:
    """`lines` joined into as few chunks as can each hold at most `limit` bytes (UTF-8), a line
    longer than that on its own."""
    chunk: list[str] = []
    size = 0
    for line in lines:
        # As stderr encodes it: a lone surrogate (an undecodable file name) is escaped.
        length = len(line) if line.isascii() else len(line.encode(errors="backslashreplace"))
        if chunk and size + length > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += length
    if chunk:
        yield "".join(chunk)


def configure_logging(level: str, log_format: str) -> None:
    # Neither formatter writes where a line was logged from, nor the thread's or process's name:
    # not collecting them for every record (logging's documented switches) saves a tenth of
    # the access log's cost.
    logging._srcfile = None  # findCaller, a stack walk per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(sys.stderr)
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

#: How often each worker writes its pool's state for the scrapes other workers answer.
POOL_GAUGES_REFRESH_SECONDS = 1.0

_POOL_GAUGES = (
    ("enrollment_db_pool_size_connections", "Connections open in the pool"),
    ("enrollment_db_pool_in_use_connections", "Connections checked out of the pool"),
    ("enrollment_db_pool_idle_connections", "Connections open and idle in the pool"),
    ("enrollment_db_pool_max_connections", "The most connections the pool may open"),
)
_ACROSS_WORKERS = ", summed over the live worker processes"
_THIS_WORKER = " (of the worker process that answered this scrape, named by the pid label)"
_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _pool_readings(db: Database) -> tuple[int, int, int, int]:
    """size, in use, idle, max: what _POOL_GAUGES report, in that order."""
    size = db.pool.get_size()
    idle = db.idle_connections()
    return size, size - idle, idle, db.pool.get_max_size()


class _PoolCollector(Collector):
    """The pool gauges of a single process, read from the pool at scrape time."""

    def __init__(self, app_state: Any) -> None:
        self._state = app_state

    def collect(self) -> Iterable[GaugeMetricFamily]:
        db: Database | None = getattr(self._state, "db", None)
        if db is None:
            return
        for (name, documentation), value in zip(_POOL_GAUGES, _pool_readings(db), strict=True):
            yield GaugeMetricFamily(name, documentation, value=value)


class _BuildInfo(Collector):
    def __init__(self) -> None:
        try:
            version = importlib.metadata.version("enrollment-service")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run uninstalled
            version = "unknown"
        family = GaugeMetricFamily(
            "enrollment_build_info",
            "The running build: the package version and the Python version; always 1",
            labels=["version", "python"],
        )
        family.add_metric([version, platform.python_version()], 1)
        self._families = [family]

    def collect(self) -> Iterable[Metric]:
        return self._families


class _ProcessCollector(Collector):
    """The process's resources (prometheus_client's standard process_* names: RSS, CPU seconds,
    open fds, start time) and its garbage collections (python_gc_*).

    Under several workers a scrape reaches just one of them and these can only be its own: they
    then carry a `pid` label, so that each worker's counters stay one monotonic series (a series
    that jumped from worker to worker would look like a counter reset at every scrape)."""

    def __init__(self, label_pid: bool) -> None:
        self._process = ProcessCollector(registry=None)
        # GCCollector registers itself where it is told; this registry only keeps it quiet.
        self._gc = GCCollector(registry=CollectorRegistry())
        self._label_pid = label_pid

    def collect(self) -> Iterable[Metric]:
        families = [*self._process.collect(), *self._gc.collect()]
        if not self._label_pid:
            yield from families
            return
        pid = str(os.getpid())
        for family in families:
            labelled = Metric(family.name, family.documentation + _THIS_WORKER, family.type)
            for sample in family.samples:
                labels = {**sample.labels, "pid": pid}
                labelled.add_sample(sample.name, labels, sample.value, sample.timestamp)
            yield labelled


class DatabaseMetrics:
    """The DatabaseEvents the Database reports: statement retries, give-ups, pool waits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._retries = Counter(
            "enrollment_db_retries",
            "Statements run again after a deadlock or serialization failure, by error class",
            ["error"],
            registry=registry,
        )
        # Every retryable error's series exists from the start, at 0.
        self._retries_by_error = {
            error.__name__: self._retries.labels(error.__name__) for error in RETRYABLE_ERRORS
        }
        self._give_ups = Counter(
            "enrollment_db_retry_give_ups",
            f"Statements that failed all {RETRY_ATTEMPTS} attempts with a retryable error "
            "(answered 503 database-unavailable)",
            registry=registry,
        )
        self._acquire_wait = Histogram(
            "enrollment_db_pool_acquire_wait_seconds",
            "Time a statement waited for a pooled connection, including waits that timed out "
            "or failed to connect",
            registry=registry,
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2),
        )

    def retried(self, error: str) -> None:
        child = self._retries_by_error.get(error)
        if child is None:
            child = self._retries_by_error[error] = self._retries.labels(error)
        child.inc()

    def gave_up(self) -> None:
        self._give_ups.inc()

    def acquire_waited(self, seconds: float) -> None:
        self._acquire_wait.observe(seconds)


class _WorkersFiles(Collector):
    """Every worker's metric files, added up as prometheus_client's MultiProcessCollector does,
    but without the empty ones: a starting worker creates each file empty and sizes it next, and
    MultiProcessCollector, reading one in between, fails the whole scrape."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = []
        for entry in os.scandir(self._directory):
            with contextlib.suppress(FileNotFoundError):  # a dead worker's, just forgotten
                if entry.name.endswith(".db") and entry.stat().st_size > 0:
                    files.append(entry.path)
        metrics: Iterable[Metric] = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
        return metrics


def _forget_dead_workers(directory: str) -> None:
    """A worker that has died must leave the "live" gauges: prometheus_client counts on whoever
    runs the workers to call mark_process_dead, and uvicorn's supervisor does not."""
    for name in os.listdir(directory):
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match is None:
            continue
        pid = int(match[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):  # another worker was quicker
                mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:  # alive, under another user
            pass


class Metrics:
    """One registry per app, so that several apps in one process (the tests) never collide.

    Under several worker processes (`serve` with WORKERS > 1 sets PROMETHEUS_MULTIPROC_DIR for
    them) the counters and histograms are every worker's, summed from the files
    prometheus_client keeps per process; the pool gauges are summed over the live workers, each
    writing its own every POOL_GAUGES_REFRESH_SECONDS (and the answering one at the scrape)."""

    def __init__(self, app_state: Any) -> None:
        self._state = app_state
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "enrollment_http_requests",
            "HTTP requests answered, by route template and status (not /health/*, /metrics)",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "enrollment_http_request_duration_seconds",
            "Time to answer, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        unavailable = Counter(
            "enrollment_http_unavailable_responses",
            "503 responses by cause (the problem's slug), health probes excepted",
            ["cause"],
            registry=self.registry,
        )
        self._unavailable = {
            cause: unavailable.labels(cause) for cause in ("database-unavailable", "not-ready")
        }
        self._unavailable_counter = unavailable
        self.database = DatabaseMetrics(self.registry)
        # Labelled children by (method, route template, status): a bounded set, looked up once.
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

        self._multiprocess_dir = os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None
        runtime: list[Collector] = [
            _BuildInfo(),
            PlatformCollector(registry=None),
            _ProcessCollector(label_pid=self._multiprocess_dir is not None),
        ]
        self._pool_gauges: tuple[Gauge, ...] = ()
        self._pool_refresh: asyncio.Task[None] | None = None
        if self._multiprocess_dir is None:
            self._exposed = self.registry
            for collector in (_PoolCollector(app_state), *runtime):
                self.registry.register(collector)
        else:
            self._exposed = CollectorRegistry()
            self._exposed.register(_WorkersFiles(self._multiprocess_dir))
            for collector in runtime:
                self._exposed.register(collector)
            self._pool_gauges = tuple(
                Gauge(
                    name,
                    documentation + _ACROSS_WORKERS,
                    multiprocess_mode="livesum",
                    registry=None,
                )
                for name, documentation in _POOL_GAUGES
            )

    def exposition(self) -> bytes:
        """What /metrics answers."""
        if self._multiprocess_dir is not None:
            self._write_pool_gauges()
            _forget_dead_workers(self._multiprocess_dir)
        return generate_latest(self._exposed)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        children = self._children.get((method, route, status))
        if children is None:
            labels = (method, route, str(status))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._children[(method, route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def unavailable(self, route: str, cause: str) -> None:
        """A 503 answered, `cause` its problem's slug. Health probes are not counted, as in the
        request metrics: the causes then add up to enrollment_http_requests_total{status="503"}."""
        if route.startswith("/health"):
            return
        child = self._unavailable.get(cause)
        if child is None:
            child = self._unavailable[cause] = self._unavailable_counter.labels(cause)
        child.inc()

    # The app's lifespan opens the pool before it reports startup.complete and closes it before
    # it reports shutdown.complete: RequestObserver calls these then.

    def start(self) -> None:
        db: Database | None = getattr(self._state, "db", None)
        if db is None:
            return
        db.events = self.database
        if self._pool_gauges:
            self._write_pool_gauges()
            self._pool_refresh = asyncio.get_running_loop().create_task(self._refresh_pool())

    def stop(self) -> None:
        if self._pool_refresh is not None:
            self._pool_refresh.cancel()
            self._pool_refresh = None
        for gauge in self._pool_gauges:  # the pool is closed
            gauge.set(0)

    def _write_pool_gauges(self) -> None:
        db: Database | None = getattr(self._state, "db", None)
        if db is None:
            return
        for gauge, value in zip(self._pool_gauges, _pool_readings(db), strict=True):
            gauge.set(value)

    async def _refresh_pool(self) -> None:
        while True:
            await asyncio.sleep(POOL_GAUGES_REFRESH_SECONDS)
            self._write_pool_gauges()


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

    def _watching_lifespan(self, send: Send) -> Send:
        """The metrics start watching the pool once the app has opened it, and stop once it has
        closed it."""

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                self.metrics.start()
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.metrics.stop()
            await send(message)

        return send_and_watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._watching_lifespan(send)
            await self.app(scope, receive, send)
            return
        sent_id = _header(scope, b"x-request-id")
        request_id = (
            sent_id if sent_id and _SANE_REQUEST_ID.fullmatch(sent_id) else _new_request_id()
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
