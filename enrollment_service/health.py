"""Liveness, readiness, and the check that shuts data endpoints while migrations are pending."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, get

from enrollment_service.db import Database, DatabaseUnavailable, Query
from enrollment_service.migrations import migration_ids
from enrollment_service.problems import NotReady, documented
from enrollment_service.settings import Settings

PING = Query.load("health/ping")
APPLIED_MIGRATIONS = Query.load("health/applied_migrations")

#: How often a data request may re-check a schema that was found out of date.
SCHEMA_RECHECK_SECONDS = 1.0


class Live(msgspec.Struct, frozen=True):
    status: str


class Ready(msgspec.Struct, frozen=True):
    status: str
    checks: dict[str, str]


class Readiness:
    """What /health/ready reports, shared with the schema gate and the shutdown handler."""

    def __init__(self, db: Database, settings: Settings, database_url: str) -> None:
        self.db = db
        self.timeout = settings.health_timeout
        self.expected = migration_ids()
        self.draining = False
        self.schema_current = False
        self._schema_checked_at = 0.0
        self._pending: list[str] = []
        self._schema_lock = asyncio.Lock()

    async def close(self) -> None:
        """Called once at shutdown, after the last request."""

    async def _pending_migrations(self) -> list[str]:
        try:
            rows = await asyncio.wait_for(self.db.fetch(APPLIED_MIGRATIONS), self.timeout)
        except asyncpg.UndefinedTableError:
            return list(self.expected)
        applied = {row["migration_id"] for row in rows}
        pending = [m for m in self.expected if m not in applied]
        self.schema_current = not pending
        return pending

    async def checks(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(self.db.fetchrow(PING), self.timeout)
            checks["database"] = "ok"
        except (DatabaseUnavailable, TimeoutError) as error:
            checks["database"] = f"unavailable: {error or 'timeout'}"
            checks["migrations"] = "unknown"
        else:
            try:
                pending = await self._pending_migrations()
                checks["migrations"] = "pending: " + ", ".join(pending) if pending else "ok"
            except (DatabaseUnavailable, TimeoutError):
                checks["migrations"] = "unknown"
        if self.draining:
            checks["shutdown"] = "draining"
        return checks

    async def ensure_schema_current(self) -> None:
        """Raise NotReady while migrations are pending, re-checking at most once a second."""
        if self.schema_current:
            return
        # Requests that arrive while a check runs wait for its answer rather than being
        # turned away before anyone knows.
        async with self._schema_lock:
            if self.schema_current:
                return
            now = time.monotonic()
            if now - self._schema_checked_at >= SCHEMA_RECHECK_SECONDS:
                self._schema_checked_at = now
                self._pending = await self._pending_migrations()
                if not self._pending:
                    return
        raise NotReady({"database": "ok", "migrations": "pending: " + ", ".join(self._pending)})


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
