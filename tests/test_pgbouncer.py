"""The service behind a real PgBouncer in transaction-pooling mode (Debian's 1.18, configured by
`deploy/pgbouncer/pgbouncer.ini`): the enrollment flow and the concurrency guarantees hold with
DB_STATEMENT_CACHE_SIZE=0, while the migrations go over their own direct connection."""

from __future__ import annotations

import asyncio
import configparser
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from asyncpg.transaction import Transaction

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.db import Database
from enrollment_service.settings import load_settings
from tests.conftest import (
    DatabaseFactory,
    assert_problem,
    create_course,
    create_student,
    enroll,
)
from tests.ops_support import (
    PGBOUNCER_INI,
    PgBouncer,
    ServiceProcess,
    dedicated_postgres,
    free_port,
    outage_scenario,
    service_backends,
    service_command,
    service_environment,
)

#: Server connections PgBouncer may open: far fewer than the service's pool, so that every
#: server connection is shared by several of the service's connections, a transaction at a time.
SERVER_POOL = 4
SERVICE_POOL = 20


@pytest.fixture(scope="module")
def pgbouncer(postgres_server: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(postgres_server, pool_size=SERVER_POOL).start()
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="module")
async def direct_url(database_factory: DatabaseFactory) -> str:
    """A database migrated over a direct connection, never through PgBouncer."""
    url = await database_factory.create("bouncer")
    await asyncio.to_thread(migrations.apply, url)
    return url


def _database_name(url: str) -> str:
    return urllib.parse.urlsplit(url).path.lstrip("/")


@pytest.fixture(scope="module")
async def pooled_app(pgbouncer: PgBouncer, direct_url: str) -> AsyncIterator[Service]:
    # The settings as a deployment behind PgBouncer 1.18 gives them, through the environment.
    settings = load_settings(
        environ={
            "DB_STATEMENT_CACHE_SIZE": "0",
            "DB_POOL_MAX_SIZE": str(SERVICE_POOL),
            "MIGRATIONS_DATABASE_URL": direct_url,
        }
    )
    service = create_app(settings, pgbouncer.url(_database_name(direct_url)))
    async with LifespanManager(service):
        yield service


@pytest.fixture
async def client(pooled_app: Service, direct_url: str) -> AsyncIterator[httpx.AsyncClient]:
    conn = await asyncpg.connect(direct_url)
    try:
        await conn.execute("truncate student_courses, students, courses")
    finally:
        await conn.close()
    transport = httpx.ASGITransport(app=pooled_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://enrollment") as client:
        yield client


async def test_the_enrollment_flow_works_through_pgbouncer(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=2)
    sid, cid = student["id"], course["id"]

    enrolled = await enroll(client, sid, cid)
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.headers["location"] == f"/students/{sid}/courses/{cid}"
    got = await client.get(f"/students/{sid}/courses/{cid}")
    assert got.status_code == 200
    assert got.json()["enrolled_at"] == enrolled.json()["enrolled_at"]

    courses = (await client.get(f"/students/{sid}/courses")).json()
    assert [c["id"] for c in courses["items"]] == [cid]
    assert courses["items"][0]["enrolled_count"] == 1
    roster = (await client.get(f"/courses/{cid}/students")).json()
    assert [s["id"] for s in roster["items"]] == [sid]

    assert_problem(await enroll(client, sid, cid), 409, "already-enrolled")
    assert (await client.delete(f"/students/{sid}/courses/{cid}")).status_code == 204
    assert_problem(await client.get(f"/students/{sid}/courses/{cid}"), 404, "enrollment-not-found")
    assert (await client.get(f"/courses/{cid}")).json()["enrolled_count"] == 0

    ready = await client.get("/health/ready")
    assert ready.status_code == 200, ready.text


async def test_the_change_feed_and_its_long_poll_work_through_pgbouncer(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    head = (await client.get("/changes/head")).json()["next_cursor"]

    async def write_later() -> float:
        await asyncio.sleep(0.5)
        assert (await client.delete(f"/students/{student['id']}")).status_code == 204
        return time.monotonic()

    waited, committed_at = await asyncio.gather(
        client.get("/changes", params={"after": head, "wait": 10}), write_later()
    )
    assert time.monotonic() - committed_at < 1.0
    items = waited.json()["items"]
    assert [(c["type"], c["student_id"]) for c in items] == [("student.deleted", student["id"])]
    everything = (await client.get("/changes", params={"student_id": student["id"]})).json()
    assert [c["type"] for c in everything["items"]] == ["student.created", "student.deleted"]


async def test_concurrent_enrollments_of_one_pair_through_pgbouncer_give_exactly_one_201(
    client: httpx.AsyncClient, pooled_app: Service, direct_url: str
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    answers = await asyncio.gather(
        *(enroll(client, student["id"], course["id"]) for _ in range(40))
    )

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] + [409] * 39
    for answer in answers:
        if answer.status_code == 409:
            assert_problem(answer, 409, "already-enrolled")
    # The service really spread its work over more connections than PgBouncer has servers.
    db: Database = pooled_app.litestar.state.db
    assert db.pool.get_size() > SERVER_POOL
    assert await service_backends(direct_url) <= SERVER_POOL


async def test_a_capacity_race_through_pgbouncer_seats_exactly_the_capacity(
    client: httpx.AsyncClient, direct_url: str
) -> None:
    capacity, racers = 7, 30
    course = await create_course(client, capacity=capacity)
    students = await asyncio.gather(*(create_student(client) for _ in range(racers)))
    answers = await asyncio.gather(*(enroll(client, s["id"], course["id"]) for s in students))

    assert sum(a.status_code == 201 for a in answers) == capacity
    for answer in answers:
        if answer.status_code != 201:
            assert_problem(answer, 409, "course-full")
    conn = await asyncpg.connect(direct_url)
    try:
        seats = await conn.fetchrow(
            "select c.enrolled_count, (select count(*) from student_courses sc"
            " where sc.course_id = c.id) as rows from courses c where c.id = $1",
            course["id"],
        )
    finally:
        await conn.close()
    assert seats is not None
    assert (seats["enrolled_count"], seats["rows"]) == (capacity, capacity)


async def test_the_test_pgbouncer_really_pools_by_transaction(
    pgbouncer: PgBouncer, direct_url: str
) -> None:
    """Why DB_STATEMENT_CACHE_SIZE=0: a client with asyncpg's default named prepared statements
    breaks as soon as its next transaction lands on a server connection that never saw them."""
    url = pgbouncer.url(_database_name(direct_url))
    cached = await asyncpg.connect(url)  # statement_cache_size left at its default
    # Clients that take server connections away, one open transaction each (never all of them,
    # or `cached` would wait for a server).
    holders = [await asyncpg.connect(url) for _ in range(SERVER_POOL - 1)]
    transactions: list[Transaction] = []

    async def take_servers_one_by_one() -> None:
        await cached.fetchval("select 1 + 1")  # prepared on one server, and cached
        for holder in holders:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("select 1")
            transactions.append(transaction)
            await cached.fetchval("select 1 + 1")

    try:
        with pytest.raises(asyncpg.InvalidSQLStatementNameError):
            await take_servers_one_by_one()
    finally:
        for transaction in transactions:
            await transaction.rollback()
        for conn in [cached, *holders]:
            await conn.close()


async def test_migrate_uses_the_direct_url_not_the_pooled_one(
    database_factory: DatabaseFactory, tmp_path: Path
) -> None:
    """`enrollment-service migrate` takes MIGRATIONS_DATABASE_URL when it is set: the pooled
    DATABASE_URL here leads nowhere, and the migration still succeeds."""
    fresh = await database_factory.create("migrate_direct")
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{_database_name(fresh)}"
    result = await asyncio.to_thread(
        subprocess.run,
        [*service_command(), "migrate"],
        env=service_environment(DATABASE_URL=nowhere, MIGRATIONS_DATABASE_URL=fresh),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    conn = await asyncpg.connect(fresh)
    try:
        applied = [
            r["migration_id"] for r in await conn.fetch("select migration_id from _yoyo_migration")
        ]
    finally:
        await conn.close()
    assert sorted(applied) == sorted(migrations.migration_ids())


@pytest.mark.timeout(120)
async def test_an_outage_behind_pgbouncer_answers_503_then_recovers_by_itself(
    tmp_path: Path,
) -> None:
    """PgBouncer keeps accepting clients while PostgreSQL is down: the service must still
    answer 503 within PgBouncer's query_wait_timeout, and recover once PostgreSQL is back."""
    config = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    config.read(PGBOUNCER_INI, encoding="utf-8")
    query_wait_timeout = float(config["pgbouncer"]["query_wait_timeout"])
    acquire_timeout = 1.0
    with dedicated_postgres() as server:
        await asyncio.to_thread(migrations.apply, server.url)
        bouncer = PgBouncer(server.url, pool_size=SERVER_POOL).start()
        service = ServiceProcess(
            bouncer.url("postgres"),
            tmp_path,
            DB_STATEMENT_CACHE_SIZE="0",
            DB_POOL_ACQUIRE_TIMEOUT=str(acquire_timeout),
            DB_CONNECT_TIMEOUT="1",
            HEALTH_TIMEOUT="0.5",
        ).start()
        try:
            await asyncio.to_thread(service.wait_until_ready)
            wait = max(acquire_timeout, query_wait_timeout)
            report = await outage_scenario(server, service, wait_seconds=wait)
        finally:
            service.stop()
            bouncer.stop()
    print(f"through PgBouncer: {report}")
