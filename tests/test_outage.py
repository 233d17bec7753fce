"""The database going away under the running `enrollment-service serve`: requests answer 503
database-unavailable with Retry-After within the acquire timeout (never a hang, never a 500),
readiness fails while liveness holds, and the service recovers by itself when PostgreSQL
returns. Likewise when every pooled connection is busy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from enrollment_service import migrations
from enrollment_service.embedded import EmbeddedPostgres
from tests.conftest import DatabaseFactory, ServeFactory
from tests.ops_support import (
    RowLock,
    answer_bound,
    assert_unavailable,
    dedicated_postgres,
    outage_scenario,
    timed,
    wait_for_backends,
)

ACQUIRE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def outage_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this module's own, so that stopping it disturbs no other test."""
    with dedicated_postgres() as server:
        migrations.apply(server.url)
        yield server


@pytest.mark.timeout(120)
async def test_postgres_stopping_under_load_answers_503_then_recovers_by_itself(
    outage_postgres: EmbeddedPostgres, serve: ServeFactory
) -> None:
    service = await serve(
        outage_postgres.url,
        DB_POOL_MIN_SIZE="2",
        DB_POOL_MAX_SIZE="5",
        DB_POOL_ACQUIRE_TIMEOUT=str(ACQUIRE_TIMEOUT),
        DB_CONNECT_TIMEOUT="1",
        HEALTH_TIMEOUT="0.5",
    )

    report = await outage_scenario(outage_postgres, service, wait_seconds=ACQUIRE_TIMEOUT)
    print(f"direct: {report}")


@pytest.fixture
async def exhaustion_database(database_factory: DatabaseFactory) -> str:
    url = await database_factory.create("exhaustion")
    await asyncio.to_thread(migrations.apply, url)
    return url


@pytest.mark.timeout(90)
async def test_an_exhausted_pool_answers_503_within_the_acquire_timeout_and_recovers(
    exhaustion_database: str, serve: ServeFactory
) -> None:
    pool_size = 3
    conn = await asyncpg.connect(exhaustion_database)
    try:
        course_id = await conn.fetchval(
            "insert into courses (code, name, level) values ('BUSY-1', 'Queues', 'beginner')"
            " returning id"
        )
        student_ids = [
            row["id"]
            for row in await conn.fetch(
                "insert into students (name, email)"
                " select 'Student ' || n, 'busy' || n || '@example.org'"
                " from generate_series(1, $1) as n returning id",
                pool_size + 1,
            )
        ]
    finally:
        await conn.close()
    holders, spare = student_ids[:pool_size], student_ids[pool_size]

    service = await serve(
        exhaustion_database,
        DB_POOL_MIN_SIZE="1",
        DB_POOL_MAX_SIZE=str(pool_size),
        DB_POOL_ACQUIRE_TIMEOUT=str(ACQUIRE_TIMEOUT),
        DB_COMMAND_TIMEOUT="30",
        HEALTH_TIMEOUT="0.5",
    )

    lock = await RowLock(exhaustion_database, course_id).acquire()
    try:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
            held = [
                asyncio.create_task(
                    client.post(f"/students/{s}/courses", json={"course_id": course_id})
                )
                for s in holders
            ]
            await wait_for_backends(exhaustion_database, pool_size, waiting_on_lock=True)

            # Every connection is held: a request that needs one waits the acquire timeout,
            # no longer, and is told to come back.
            refused = await timed(client, "GET", f"/students/{spare}")
            assert_unavailable(refused, ACQUIRE_TIMEOUT)
            assert refused.seconds >= ACQUIRE_TIMEOUT * 0.9, "answered before the timeout"
            live = await timed(client, "GET", "/health/live")
            assert live.response is not None
            assert live.response.status_code == 200
            assert live.seconds < answer_bound(ACQUIRE_TIMEOUT)
            # Busy is not dead: readiness has a connection of its own, so the load balancer
            # does not move this replica's load onto the others.
            ready = await timed(client, "GET", "/health/ready")
            assert ready.response is not None
            assert ready.response.status_code == 200, ready.response.text
            assert ready.seconds < answer_bound(ACQUIRE_TIMEOUT)
            in_use = "enrollment_db_pool_in_use_connections"
            assert f"{in_use} {pool_size:.1f}" in (await client.get("/metrics")).text

            await lock.release()
            assert [r.status_code for r in await asyncio.gather(*held)] == [201] * pool_size

            # Fully recovered: a burst larger than the pool is served, and every connection
            # went back to the pool.
            burst = await asyncio.gather(
                *(client.get(f"/students/{s}") for s in student_ids * 5),
                client.post(f"/students/{spare}/courses", json={"course_id": course_id}),
            )
            assert [r.status_code for r in burst] == [200] * len(student_ids) * 5 + [201]
            assert (await client.get("/health/ready")).status_code == 200
            assert f"{in_use} 0.0" in (await client.get("/metrics")).text
    finally:
        await lock.release()
    print(f"exhaustion: 503 after {refused.seconds:.2f}s (acquire timeout {ACQUIRE_TIMEOUT}s)")
