"""/health/ready asks PostgreSQL over a connection of its own: a busy pool is not a dead replica,
a slow database says it timed out, the connection comes back after a restart, and the schema gate
answers 503 not-ready (never 500) when the database is slow to say which migrations it has."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service import migrations
from enrollment_service.app import create_app
from enrollment_service.embedded import EmbeddedPostgres
from enrollment_service.settings import Settings, load_settings
from tests.conftest import (
    DatabaseFactory,
    assert_problem,
    create_course,
    create_student,
    enroll,
)
from tests.ops_support import (
    PG_SETTINGS,
    PgBouncer,
    RowLock,
    answer_bound,
    dedicated_postgres,
    timed,
    wait_for_backends,
)

HEALTH_APPLICATION_NAME = "enrollment-service-health"


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this module's own, to pause and restart without disturbing other tests."""
    with dedicated_postgres() as server:
        migrations.apply(server.url)
        yield server


@pytest.fixture
async def migrated_database(database_factory: DatabaseFactory) -> str:
    """A fresh database on the session's server, so no other app's connections are counted."""
    url = await database_factory.create("ready")
    await asyncio.to_thread(migrations.apply, url)
    return url


@contextlib.asynccontextmanager
async def serving(settings: Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, its lifespan running, behind an HTTP client."""
    service = create_app(settings, database_url)
    async with LifespanManager(service, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://enrollment", timeout=30
        ) as client:
            yield client


async def health_backends(database_url: str, *, waiting_on_lock: bool = False) -> list[int]:
    """The pids of the readiness check's connections, as the database sees them."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "select pid from pg_stat_activity"
            " where datname = current_database() and application_name = $1"
            "   and (not $2 or wait_event_type = 'Lock')",
            HEALTH_APPLICATION_NAME,
            waiting_on_lock,
        )
    finally:
        await conn.close()
    return sorted(row["pid"] for row in rows)


async def eventually(condition: Callable[[], Awaitable[bool]], within: float = 10) -> None:
    """Wait until the async callable `condition` returns True."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.1)


async def until_ready(client: httpx.AsyncClient, within: float = 10) -> None:
    async def ready() -> bool:
        return (await client.get("/health/ready")).status_code == 200

    await eventually(ready, within)


def server_processes(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and every process it started (each connection's backend among them)."""
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == postmaster:
                children.append(int(entry.name))
    return [postmaster, *children]


@contextlib.contextmanager
def paused(server: EmbeddedPostgres) -> Iterator[None]:
    """PostgreSQL frozen (SIGSTOP): connections are accepted by the kernel and never answered,
    statements on open connections never finish. What a server stuck on I/O looks like."""
    pids = server_processes(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def test_readiness_answers_200_at_once_while_every_pooled_connection_is_held(
    migrated_database: str,
) -> None:
    """A replica whose pool is exhausted by slow requests is busy, not dead: were readiness to
    wait for the pool (as it once did), it would answer 503 after the acquire timeout and the
    load balancer would pile this replica's load onto the others."""
    settings = load_settings(
        environ={},
        pool_min_size=1,
        pool_max_size=1,
        pool_acquire_timeout=0.5,
        command_timeout=30,
        health_timeout=1.0,
    )
    async with serving(settings, migrated_database) as client:
        student = await create_student(client)
        course = await create_course(client)
        lock = await RowLock(migrated_database, course["id"]).acquire()
        try:
            held = asyncio.create_task(enroll(client, student["id"], course["id"]))
            await wait_for_backends(migrated_database, 1, waiting_on_lock=True)

            # The pool's only connection is taken: a data request is refused after the acquire
            # timeout...
            refused = await client.get(f"/students/{student['id']}")
            assert_problem(refused, 503, "database-unavailable")
            # ...while readiness, on its own connection, answers at once.
            for _ in range(3):
                ready = await timed(client, "GET", "/health/ready")
                assert ready.response is not None
                assert ready.response.status_code == 200, ready.response.text
                assert ready.response.json() == {
                    "status": "ok",
                    "checks": {"database": "ok", "migrations": "ok"},
                }
                assert ready.seconds < settings.health_timeout, f"took {ready.seconds:.2f}s"
        finally:
            await lock.release()
        assert (await held).status_code == 201


async def test_readiness_has_one_connection_of_its_own_reused_by_every_probe_and_closed_at_exit(
    migrated_database: str,
) -> None:
    settings = load_settings(environ={}, pool_min_size=1, pool_max_size=2)
    async with serving(settings, migrated_database) as client:
        assert await health_backends(migrated_database) == [], "opened before the first probe"
        assert (await client.get("/health/ready")).status_code == 200
        first = await health_backends(migrated_database)
        assert len(first) == 1

        # Concurrent probes share one check on that one connection.
        answers = await asyncio.gather(*(client.get("/health/ready") for _ in range(25)))
        assert [a.status_code for a in answers] == [200] * 25
        assert (await client.get("/students")).status_code == 200  # the schema gate too
        assert await health_backends(migrated_database) == first

    async def closed() -> bool:
        return await health_backends(migrated_database) == []

    await eventually(closed, within=5)


@pytest.mark.timeout(120)
async def test_a_frozen_database_answers_503_naming_the_timeout_and_readiness_recovers(
    own_postgres: EmbeddedPostgres,
) -> None:
    timeout = 0.3
    settings = load_settings(
        environ={}, pool_min_size=1, health_timeout=timeout, connect_timeout=1.0
    )
    async with serving(settings, own_postgres.url) as client:
        with paused(own_postgres):
            # A replica starting on a frozen database: the schema gate cannot read the
            # migrations in time, which is 503 not-ready, not a 500.
            gated = await timed(client, "GET", "/students")
            assert gated.response is not None
            body = assert_problem(gated.response, 503, "not-ready")
            assert body["checks"] == {
                "database": f"unavailable: no answer within {timeout}s (connecting)",
                "migrations": "unknown",
            }
            assert gated.seconds < answer_bound(timeout)

            ready = await timed(client, "GET", "/health/ready")
            assert ready.response is not None
            body = assert_problem(ready.response, 503, "not-ready")
            assert body["checks"]["database"] == (
                f"unavailable: no answer within {timeout}s (connecting)"
            )
            assert ready.seconds < answer_bound(timeout)

        await until_ready(client)
        assert (await client.get("/students")).status_code == 200

        # Now the health connection is open; frozen again, its `select 1` never answers.
        with paused(own_postgres):
            ready = await timed(client, "GET", "/health/ready")
            assert ready.response is not None
            body = assert_problem(ready.response, 503, "not-ready")
            assert body["checks"] == {
                "database": f"unavailable: no answer within {timeout}s (select 1)",
                "migrations": "unknown",
            }
            assert ready.seconds < answer_bound(timeout)
        await until_ready(client)


@pytest.mark.timeout(120)
async def test_the_health_connection_is_reopened_after_postgres_restarts(
    own_postgres: EmbeddedPostgres,
) -> None:
    settings = load_settings(environ={}, pool_min_size=1, connect_timeout=1.0)
    async with serving(settings, own_postgres.url) as client:
        assert (await client.get("/health/ready")).status_code == 200
        (before,) = await health_backends(own_postgres.url)

        # Restarted between two probes: the next probe finds its connection dead, opens another
        # and answers 200; no 503 for a restart that is already over.
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.to_thread(own_postgres.start, **PG_SETTINGS)
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        (after,) = await health_backends(own_postgres.url)
        assert after != before

        # Down: 503 naming the refusal (no address, no URL). Up again: ready by itself.
        await asyncio.to_thread(own_postgres.stop)
        body = assert_problem(await client.get("/health/ready"), 503, "not-ready")
        assert body["checks"] == {
            "database": "unavailable: ConnectionRefusedError: Connection refused",
            "migrations": "unknown",
        }
        await asyncio.to_thread(own_postgres.start, **PG_SETTINGS)
        await until_ready(client, within=5)
        assert len(await health_backends(own_postgres.url)) == 1


async def test_the_schema_gate_answers_503_not_ready_when_the_migrations_cannot_be_read_in_time(
    migrated_database: str,
) -> None:
    """`select ... from _yoyo_migration` waits behind a lock (as behind a migration's DDL): the
    gate gives up after HEALTH_TIMEOUT with 503 not-ready, where it once let a TimeoutError
    escape as a 500. The abandoned statement is cancelled, not left waiting in the database."""
    timeout = 0.5
    settings = load_settings(environ={}, health_timeout=timeout)
    async with serving(settings, migrated_database) as client:
        holder = await asyncpg.connect(migrated_database)
        transaction = holder.transaction()
        await transaction.start()
        try:
            await holder.execute("lock table _yoyo_migration in access exclusive mode")

            gated = await timed(client, "GET", "/students")
            assert gated.response is not None
            body = assert_problem(gated.response, 503, "not-ready")
            expected = {
                "database": "ok",
                "migrations": f"unknown: no answer within {timeout}s (migrations)",
            }
            assert body["checks"] == expected
            assert gated.seconds < answer_bound(timeout)
            posted = await client.post("/courses", json={})
            assert_problem(posted, 503, "not-ready")

            ready = await client.get("/health/ready")
            assert assert_problem(ready, 503, "not-ready")["checks"] == expected

            async def nothing_left_waiting() -> bool:
                return await health_backends(migrated_database, waiting_on_lock=True) == []

            await eventually(nothing_left_waiting, within=5)
        finally:
            await transaction.rollback()
            await holder.close()

        async def serving_again() -> bool:
            return (await client.get("/students")).status_code == 200

        await eventually(serving_again, within=5)
        assert (await client.get("/health/ready")).status_code == 200


@pytest.mark.timeout(120)
async def test_readiness_through_pgbouncer_in_transaction_mode_honours_the_statement_cache_size(
    postgres_server: str, migrated_database: str
) -> None:
    """Behind PgBouncer 1.18 each transaction may land on another server connection: the
    health connection, like the pool, must not use named prepared statements there."""
    database = migrated_database.rsplit("/", 1)[1].split("?", 1)[0]
    bouncer = PgBouncer(postgres_server, pool_size=4).start()
    holders: list[asyncpg.Connection] = []
    try:
        settings = load_settings(environ={"DB_STATEMENT_CACHE_SIZE": "0"}, pool_min_size=1)
        url = bouncer.url(database)
        async with serving(settings, url) as client:
            assert (await client.get("/health/ready")).status_code == 200
            # Take the server connections away one by one, so that every probe's statements
            # land on a server connection the previous probe never used.
            for _ in range(3):
                holder = await asyncpg.connect(url, statement_cache_size=0)
                holders.append(holder)
                await holder.execute("begin; select 1")
                ready = await client.get("/health/ready")
                assert ready.status_code == 200, ready.text
    finally:
        for holder in holders:
            await holder.close()
        bouncer.stop()
