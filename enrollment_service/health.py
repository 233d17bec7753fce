"""Liveness, readiness, and the check that shuts data endpoints while migrations are pending.

Readiness asks PostgreSQL over a connection of its own, never one from the request pool: a
replica whose pool is busy with slow requests is busy, not dead, and must not say it is dead
(the load balancer would move its load onto the other replicas, which would fill up in turn)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, get

from enrollment_service.db import Query
from enrollment_service.migrations import migration_ids
from enrollment_service.problems import NotReady, documented
from enrollment_service.settings import Settings

log = logging.getLogger("enrollment_service.health")

PING = Query.load("health/ping")
APPLIED_MIGRATIONS = Query.load("health/applied_migrations")

#: How the health connection shows in pg_stat_activity (the pool's is "enrollment-service").
APPLICATION_NAME = "enrollment-service-health"

#: How often a data request may re-check a schema that was found out of date.
SCHEMA_RECHECK_SECONDS = 1.0

#: What a failed check may say about the database. Everything asyncpg raises for a server that
#: is down, refusing, restarting or broken mid-statement; a bug of ours stays a 500.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

#: The longest reason a check reports: enough for a server's one-line message.
MAX_REASON = 120


class Live(msgspec.Struct, frozen=True):
    status: str


class Ready(msgspec.Struct, frozen=True):
    status: str
    checks: dict[str, str]


class Readiness:
    """What /health/ready reports, shared with the schema gate and the shutdown handler.

    One connection of its own, opened on the first check, reused by every later one, and
    replaced after any failure. Checks never overlap: a probe or gated request that arrives
    while a check runs awaits that check's answer."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        self.timeout = settings.health_timeout
        self.expected = migration_ids()
        self.draining = False
        self.schema_current = False
        self._url = database_url
        self._password = urllib.parse.urlsplit(database_url).password
        self._connect_timeout = min(settings.connect_timeout, settings.health_timeout)
        # A discarded connection may be running a statement that must be cancelled first,
        # which takes a connection of its own: bounded like opening one.
        self._close_timeout = settings.connect_timeout
        self._statement_cache_size = settings.statement_cache_size
        self._conn: asyncpg.Connection | None = None
        self._running: asyncio.Task[dict[str, str]] | None = None
        self._last: dict[str, str] | None = None
        self._last_at = 0.0
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Where the running check is, for its message on failure: connecting, select 1, ...
        self._step = "connecting"

    async def close(self) -> None:
        """Called once at shutdown, after the last request."""
        self._closed = True
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
        self._discard()
        await asyncio.gather(*self._closing, return_exceptions=True)

    # --- The check itself. ----------------------------------------------------------------

    async def _database_checks(self) -> dict[str, str]:
        """`database` and `migrations`, from the check running now or from a new one."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check())
        # Shielded: a probe whose caller hung up must not cancel the answer others await.
        return await asyncio.shield(self._running)

    async def _check(self) -> dict[str, str]:
        """One check, connecting and querying within HEALTH_TIMEOUT together."""
        self._step = "connecting"
        try:
            if self._closed:
                raise asyncpg.InterfaceError("shutting down")
            async with asyncio.timeout(self.timeout):
                conn = await self._ping()
                self._step = "migrations"
                pending = await self._pending_migrations(conn)
        except TimeoutError:
            self._discard()
            result = self._failed(f"no answer within {self.timeout}s ({self._step})")
        except DATABASE_ERRORS as error:
            self._discard()
            result = self._failed(self._describe(error))
        else:
            self.schema_current = not pending
            migrations = "pending: " + ", ".join(pending) if pending else "ok"
            result = {"database": "ok", "migrations": migrations}
        self._remember(result)
        return result

    def _failed(self, reason: str) -> dict[str, str]:
        if self._step == "migrations":
            # PostgreSQL answered `select 1`: it is up, but the migrations could not be read.
            return {"database": "ok", "migrations": f"unknown: {reason}"}
        return {"database": f"unavailable: {reason}", "migrations": "unknown"}

    async def _ping(self) -> asyncpg.Connection:
        """`select 1` on the health connection, opening one if there is none. One that PostgreSQL
        closed (a restart) shows as closed here and is replaced before use; one that failed in
        another way was discarded by the check that saw it fail."""
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = conn = await self._connect()
        self._step = "select 1"
        await conn.fetchval(PING.text)
        return conn

    async def _connect(self) -> asyncpg.Connection:
        # The pool's options (db.open_database). The URL may lead to PgBouncer in transaction
        # mode, where only DB_STATEMENT_CACHE_SIZE=0 keeps prepared statements working.
        conn: asyncpg.Connection = await asyncpg.connect(
            self._url,
            timeout=self._connect_timeout,
            command_timeout=self.timeout,
            statement_cache_size=self._statement_cache_size,
            server_settings={"application_name": APPLICATION_NAME},
        )
        return conn

    async def _pending_migrations(self, conn: asyncpg.Connection) -> list[str]:
        try:
            rows = await conn.fetch(APPLIED_MIGRATIONS.text)
        except asyncpg.UndefinedTableError:
            return list(self.expected)
        applied = {row["migration_id"] for row in rows}
        return [m for m in self.expected if m not in applied]

    def _discard(self) -> None:
        """Drop the health connection; the next check opens a new one. A statement it may still
        be running is cancelled in the background, so that the server does not keep it going."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        task = asyncio.create_task(self._close_quietly(conn))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=self._close_timeout)
        except Exception as error:  # asyncpg has aborted the connection: nothing left to do
            log.debug("the health connection did not close cleanly: %s", type(error).__name__)

    def _describe(self, error: BaseException) -> str:
        """The error's class and a short reason: never the URL, never a password."""
        reason = ""
        if isinstance(error, asyncpg.PostgresError | asyncpg.InterfaceError):
            reason = str(error.args[0]) if error.args else ""
        elif isinstance(error, OSError) and error.errno:
            # asyncio's own message names the address; the errno's text does not.
            reason = os.strerror(error.errno)
        reason = reason.split("\n", 1)[0].strip()
        if "://" in reason or (self._password and self._password in reason):
            reason = ""
        if len(reason) > MAX_REASON:
            reason = reason[: MAX_REASON - 1] + "…"
        name = type(error).__name__
        return f"{name}: {reason}" if reason else name

    def _remember(self, result: dict[str, str]) -> None:
        before = self._last
        self._last, self._last_at = result, time.monotonic()
        if before is not None and before == result:
            return
        if result["database"] == "ok" and result["migrations"] == "ok":
            if before is not None:
                log.info("readiness: the database answers and every migration is applied")
        else:
            log.warning(
                "readiness: database %s; migrations %s", result["database"], result["migrations"]
            )

    # --- What the endpoints and the gate ask. ---------------------------------------------

    async def checks(self) -> dict[str, str]:
        checks = dict(await self._database_checks())
        if self.draining:
            checks["shutdown"] = "draining"
        return checks

    async def ensure_schema_current(self) -> None:
        """Raise NotReady while migrations are pending or cannot be read, re-checking at most
        once a second. Requests that arrive while a check runs wait for its answer rather than
        being turned away before anyone knows."""
        if self.schema_current:
            return
        running = self._running is not None and not self._running.done()
        fresh = time.monotonic() - self._last_at < SCHEMA_RECHECK_SECONDS
        checks = self._last if fresh and not running else None
        if checks is None:
            checks = await self._database_checks()
        if not self.schema_current:
            raise NotReady(dict(checks))


async def require_current_schema(request: Request[Any, Any, Any]) -> None:
    """The data controllers' `before_request` hook: 503 not-ready until every migration is
    applied, before the request is even validated. (A hook, not a route guard: Litestar copies
    the handler for every guard call, 4 % of a request's CPU.)"""
    readiness: Readiness = request.app.state.readiness
    if not readiness.schema_current:
        await readiness.ensure_schema_current()


class HealthController(Controller):
    path = "/health"
    tags = ["operations"]
    include_in_schema = True

    @get("/live", summary="The process can serve HTTP (never touches the database)")
    async def live(self) -> Live:
        return Live(status="ok")

    @get(
        "/ready",
        summary="PostgreSQL answers and every migration is applied",
        responses=documented(503),
    )
    async def ready(self, request: Request[Any, Any, Any]) -> Ready:
        readiness: Readiness = request.app.state.readiness
        checks = await readiness.checks()
        if any(result != "ok" for result in checks.values()):
            raise NotReady(checks)
        return Ready(status="ok", checks=checks)
