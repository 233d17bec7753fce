"""Real processes for the operations tests: a dedicated PostgreSQL, a PgBouncer, and the service
itself run as `enrollment-service serve`; each on 127.0.0.1 and a free port, each stopped by the
test that started it. Nothing here is a stand-in: if a program is missing, the test fails and
says how to get it."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asyncpg.transaction import Transaction

from enrollment_service.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER_INI = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"
PGBOUNCER_ENTRYPOINT = ROOT / "deploy" / "pgbouncer" / "entrypoint.sh"

#: The service's own environment variables: never inherited from the developer's shell, so a
#: stray API_TOKENS or DATABASE_URL cannot change what a test sees.
SERVICE_VARIABLES = frozenset(
    {
        "DATABASE_URL",
        "MIGRATIONS_DATABASE_URL",
        "HOST",
        "PORT",
        "WORKERS",
        "API_TOKENS",
        "DB_POOL_MIN_SIZE",
        "DB_POOL_MAX_SIZE",
        "DB_POOL_ACQUIRE_TIMEOUT",
        "DB_CONNECT_TIMEOUT",
        "DB_COMMAND_TIMEOUT",
        "DB_STATEMENT_CACHE_SIZE",
        "HEALTH_TIMEOUT",
        "SHUTDOWN_DELAY",
        "SHUTDOWN_GRACE_PERIOD",
        "MIGRATE_CONNECT_TIMEOUT",
        "RETRY_AFTER_SECONDS",
        "IDEMPOTENCY_KEY_TTL",
        "CHANGES_RETENTION",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "CURSOR_SECRET",
        "DATA_DIR",
    }
)

#: The unprivileged account that runs PgBouncer when the tests run as root (CI does).
UNPRIVILEGED_USER = "nobody"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout}s")


def stop_process(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Stop one process we started: `sig` first, SIGKILL if it lingers past `grace` seconds."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# --- PostgreSQL ----------------------------------------------------------------------------

#: A throwaway server's settings: durability off, for speed.
PG_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@contextlib.contextmanager
def dedicated_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server of the test's own, which it may stop and start at will without
    disturbing the session's shared server."""
    data_dir = Path(tempfile.mkdtemp(prefix="enrollment-ops-pg-")) / "data"
    server = EmbeddedPostgres(data_dir)
    try:
        server.start(**PG_SETTINGS)
    except Exception as error:
        shutil.rmtree(data_dir.parent, ignore_errors=True)
        pytest.fail(f"the dedicated PostgreSQL did not start: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(data_dir.parent, ignore_errors=True)


@dataclass(frozen=True)
class ServerAddress:
    """The parts of a postgresql:// URL that PgBouncer needs."""

    host: str
    port: int
    user: str
    password: str | None
    database: str

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        parts = urllib.parse.urlsplit(url)
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=urllib.parse.unquote(parts.username or "postgres"),
            password=urllib.parse.unquote(parts.password) if parts.password else None,
            database=parts.path.lstrip("/") or "postgres",
        )


# --- PgBouncer -----------------------------------------------------------------------------


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if found is None:
        pytest.fail(
            "pgbouncer is not installed. `.ci/run` installs it (Debian's package); "
            "for a local run: apt-get update && apt-get install -y pgbouncer",
            pytrace=False,
        )
    return found


def _unprivileged() -> dict[str, Any]:
    """Popen arguments that drop root: PgBouncer refuses to run as root."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


class PgBouncer:
    """Debian's pgbouncer, started as the compose image starts it (`deploy/pgbouncer/`: its
    entrypoint writes the auth file, its pgbouncer.ini sets the pooling), with only the
    addresses, file paths and pool size of this run changed. Clients log in with `password`
    (SCRAM); PgBouncer logs in to the upstream server as the same user, with the same password
    if the upstream wants one."""

    def __init__(self, upstream_url: str, *, pool_size: int = 4) -> None:
        self.upstream = ServerAddress.parse(upstream_url)
        self.password = self.upstream.password or "bouncer-test-password"
        self.port = free_port()
        self.pool_size = pool_size
        self.workdir = Path(tempfile.mkdtemp(prefix="enrollment-pgbouncer-"))
        self.log_path = self.workdir / "pgbouncer.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        user = urllib.parse.quote(self.upstream.user, safe="")
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def _write_config(self) -> Path:
        config = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
        config.optionxform = str  # type: ignore[assignment,method-assign]
        config.read(PGBOUNCER_INI, encoding="utf-8")
        config["databases"] = {
            "*": f"host={self.upstream.host} port={self.upstream.port}",
        }
        config["pgbouncer"].update(
            {
                "listen_addr": "127.0.0.1",
                "listen_port": str(self.port),
                "unix_socket_dir": "",
                "auth_file": str(self.workdir / "userlist.txt"),
                "pidfile": str(self.workdir / "pgbouncer.pid"),
                "logfile": "",
                "default_pool_size": str(self.pool_size),
                "min_pool_size": "0",
                "reserve_pool_size": "0",
            }
        )
        ini = self.workdir / "pgbouncer.ini"
        with ini.open("w", encoding="utf-8") as file:
            config.write(file)
        return ini

    def start(self) -> PgBouncer:
        binary = pgbouncer_binary()
        ini = self._write_config()
        # A copy the unprivileged user can read wherever the checkout lives.
        entrypoint = self.workdir / "entrypoint.sh"
        shutil.copyfile(PGBOUNCER_ENTRYPOINT, entrypoint)
        run_as = _unprivileged()
        if run_as:
            for path in (self.workdir, *self.workdir.iterdir()):
                os.chown(path, run_as["user"], run_as["group"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "DB_USER": self.upstream.user,
            "DB_PASSWORD": self.password,
            "PGBOUNCER_AUTH_FILE": str(self.workdir / "userlist.txt"),
        }
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["sh", str(entrypoint), binary, str(ini)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                **run_as,
            )
        try:
            wait_for_port(self.port, timeout=15, process=self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            pytest.fail(f"pgbouncer did not start: {error}\n{self.log()}", pytrace=False)
        return self

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        # SIGINT is PgBouncer 1.18's "safe shutdown"; SIGTERM would drop clients at once.
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, grace=5)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- The service ---------------------------------------------------------------------------


def service_command() -> list[str]:
    """The installed console script, as production runs it."""
    script = Path(sys.executable).with_name("enrollment-service")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "enrollment_service"]


def service_environment(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
    env.update(settings)
    return env


class ServiceProcess:
    """`enrollment-service serve` on 127.0.0.1 and a free port, logging JSON to a file."""

    def __init__(self, database_url: str, workdir: Path, **settings: str) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.log_path = workdir / f"serve-{self.port}.log"
        defaults = {"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
        self.env = service_environment(
            DATABASE_URL=database_url,
            HOST="127.0.0.1",
            PORT=str(self.port),
            **{**defaults, **settings},
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServiceProcess:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*service_command(), "serve"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        return self

    def wait_until_ready(self, timeout: float = 30) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(
                        f"serve exited with {self.process.returncode} before it was ready:\n"
                        + self.log_text(),
                        pytrace=False,
                    )
                try:
                    if client.get("/health/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        pytest.fail(f"serve was not ready within {timeout}s:\n{self.log_text()}", pytrace=False)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line the process wrote."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def access_log(self) -> dict[str, dict[str, Any]]:
        """The access-log records, by request id."""
        return {
            record["request_id"]: record
            for record in self.records()
            if record.get("logger") == "enrollment_service.access"
        }

    def wait_for_startups(self, count: int, timeout: float = 30) -> None:
        """Until `count` processes have finished starting the app: with WORKERS > 1 readiness
        answers as soon as one worker does, and a worker still starting when SIGTERM arrives
        simply stops once started (it has nothing to drain)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            started = [r for r in self.records() if r["msg"] == "Application startup complete."]
            if len(started) >= count:
                return
            time.sleep(0.05)
        pytest.fail(f"{count} workers did not start within {timeout}s:\n{self.log_text()}")

    def workers(self) -> list[int]:
        """The pids of the worker processes `serve` started when WORKERS > 1 (its children
        started by multiprocessing's spawn, not multiprocessing's resource tracker)."""
        workers = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == self.pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    workers.append(int(entry.name))
        return workers

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, signal.SIGTERM, grace=15)


def log_time(record: dict[str, Any]) -> float:
    """A JSON log record's timestamp, as seconds since the epoch."""
    stamp = datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=UTC).timestamp()


# --- Holding the service's connections busy ------------------------------------------------


class RowLock:
    """A course row held `for update` by a transaction of the test's own: every enrollment into
    that course then waits inside PostgreSQL (its foreign-key check needs a share lock on the
    row), holding one of the service's pooled connections, until `release()`."""

    def __init__(self, database_url: str, course_id: int) -> None:
        self.database_url = database_url
        self.course_id = course_id
        self._conn: asyncpg.Connection | None = None
        self._transaction: Transaction | None = None

    async def acquire(self) -> RowLock:
        self._conn = await asyncpg.connect(self.database_url)
        self._transaction = self._conn.transaction()
        await self._transaction.start()
        await self._conn.execute("select 1 from courses where id = $1 for update", self.course_id)
        return self

    async def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            if self._transaction is not None:
                await self._transaction.rollback()
        finally:
            await conn.close()


async def service_backends(database_url: str, *, waiting_on_lock: bool = False) -> int:
    """How many of the service's connections the database sees (only those blocked on a lock,
    if asked)."""
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "select count(*) from pg_stat_activity"
            " where datname = current_database()"
            "   and application_name = 'enrollment-service'"
            "   and (not $1 or wait_event_type = 'Lock')",
            waiting_on_lock,
        )
    finally:
        await conn.close()
    return count


async def wait_for_backends(
    database_url: str, count: int, *, waiting_on_lock: bool = False, within: float = 15
) -> None:
    """Wait until the service has exactly `count` connections (blocked on a lock, if asked)."""
    deadline = time.monotonic() + within
    seen = -1
    while time.monotonic() < deadline:
        seen = await service_backends(database_url, waiting_on_lock=waiting_on_lock)
        if seen == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"expected {count} service connections, saw {seen} after {within}s")


# --- Answers while the database is away ----------------------------------------------------


@dataclass
class Timed:
    response: httpx.Response | None
    error: str | None
    seconds: float


async def timed(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Timed:
    started = time.monotonic()
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.TransportError as error:
        return Timed(None, type(error).__name__, time.monotonic() - started)
    return Timed(response, None, time.monotonic() - started)


def new_student() -> dict[str, str]:
    return {"name": "Grace Hopper", "email": f"grace-{uuid.uuid4().hex[:10]}@example.org"}


def answer_bound(wait_seconds: float) -> float:
    """The correctness bound on an answer while the database is away or the pool exhausted:
    the longest wait the configuration allows plus scheduling slack on a busy 2-core machine.
    A hang exceeds it."""
    return wait_seconds + 4


def assert_unavailable(answer: Timed, wait_seconds: float) -> None:
    """The contract's answer while the database cannot be reached, in bounded time."""
    assert answer.response is not None, answer
    assert answer.response.status_code == 503, answer.response.text
    assert answer.response.headers["content-type"].startswith("application/problem+json")
    body = answer.response.json()
    assert body["type"].rsplit("/", 1)[-1] == "database-unavailable", body
    assert 1 <= int(answer.response.headers["retry-after"]) <= 30
    assert answer.seconds < answer_bound(wait_seconds), f"took {answer.seconds:.2f}s"


async def _traffic(
    client: httpx.AsyncClient, student_id: int, answers: list[Timed], stop: asyncio.Event
) -> None:
    """Reads and writes in a loop for as long as the outage lasts (bounded in count)."""
    for n in range(3000):
        if stop.is_set():
            return
        if n % 2:
            answers.append(await timed(client, "GET", f"/students/{student_id}"))
        else:
            answers.append(await timed(client, "POST", "/students", json=new_student()))
        await asyncio.sleep(0.02)


@dataclass
class OutageReport:
    first_503_seconds: float
    recovery_seconds: float
    background_answers: int
    background_503: int
    slowest_background_seconds: float

    def __str__(self) -> str:
        return (
            f"first 503 {self.first_503_seconds:.2f}s after PostgreSQL stopped; 2xx again "
            f"{self.recovery_seconds:.2f}s after it accepted connections; "
            f"{self.background_answers} answers under load, {self.background_503} of them 503, "
            f"the slowest {self.slowest_background_seconds:.2f}s"
        )


#: "Recovers within a few seconds" once PostgreSQL accepts connections again.
RECOVERY_BOUND = 10.0


async def outage_scenario(
    server: EmbeddedPostgres, service: ServiceProcess, *, wait_seconds: float
) -> OutageReport:
    """Stop `server` under the running, ready `service` while traffic flows; check every answer
    is a success or the contract's 503 within `wait_seconds` (the longest wait configured)
    and that readiness fails and liveness holds; start `server` again and check the service
    answers 2xx within seconds, without a restart."""
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        created = await client.post("/students", json=new_student())
        assert created.status_code == 201, created.text
        student_id = created.json()["id"]

        background: list[Timed] = []
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(_traffic(client, student_id, background, stop)) for _ in range(4)
        ]
        await asyncio.sleep(0.3)
        try:
            await asyncio.to_thread(server.stop)

            # Every kind of request is refused the same way while the database is away.
            first = await timed(client, "GET", f"/students/{student_id}")
            assert_unavailable(first, wait_seconds)
            for _ in range(2):
                assert_unavailable(
                    await timed(client, "POST", "/students", json=new_student()), wait_seconds
                )
                assert_unavailable(await timed(client, "GET", "/courses"), wait_seconds)
            ready = await timed(client, "GET", "/health/ready")
            assert ready.response is not None
            assert ready.response.status_code == 503, ready.response.text
            body = ready.response.json()
            assert body["type"].endswith("/not-ready"), body
            assert body["checks"]["database"].startswith("unavailable"), body
            assert ready.seconds < answer_bound(wait_seconds)
            live = await timed(client, "GET", "/health/live")
            assert live.response is not None
            assert live.response.status_code == 200
            assert live.response.json() == {"status": "ok"}

            await asyncio.to_thread(server.start, **PG_SETTINGS)
            up_at = time.monotonic()
            while True:
                answer = await timed(client, "GET", f"/students/{student_id}")
                if answer.response is not None and answer.response.status_code == 200:
                    break
                assert_unavailable(answer, wait_seconds)
                assert time.monotonic() - up_at < RECOVERY_BOUND, "did not recover"
                await asyncio.sleep(0.1)
            recovery_seconds = time.monotonic() - up_at
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=30)

        assert (await client.post("/students", json=new_student())).status_code == 201
        assert (await client.get("/health/ready")).status_code == 200

    # Through the whole outage, every answer was a success or the contract's 503: no 500, no
    # hang, no dropped connection.
    assert background, "no background traffic ran"
    for answer in background:
        assert answer.response is not None, answer
        if answer.response.status_code >= 400:
            assert_unavailable(answer, wait_seconds)
    unavailable = sum(1 for a in background if a.response and a.response.status_code == 503)
    assert unavailable > 0, "the background traffic never saw the outage"
    return OutageReport(
        first_503_seconds=first.seconds,
        recovery_seconds=recovery_seconds,
        background_answers=len(background),
        background_503=unavailable,
        slowest_background_seconds=max(a.seconds for a in background),
    )
