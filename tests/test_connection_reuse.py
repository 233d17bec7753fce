"""Connections kept between statements (Database._release): a statement that ended cleanly
leaves its connection for the next one instead of going through asyncpg's release, without
starving statements that wait for the pool, without handing out a connection lost meanwhile,
and with every connection back in the pool within KEEP_SECONDS, at a drain, and at close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from enrollment_service.db import KEEP_SECONDS, Database, DatabaseUnavailable, Query, _keep_session

BACKEND_PID = Query("test/backend-pid", "select pg_backend_pid() as pid")
BRIEF_SLEEP = Query("test/brief-sleep", "select pg_sleep(0.002)")
FAILING = Query("test/failing", "select pg_sleep(0.002), 1 / 0")


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A Database on a pool of two connections: fewer than the statements the tests run at once."""
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2, reset=_keep_session)
    database = Database(pool, acquire_timeout=5.0)
    yield database
    await database.close(grace_seconds=5)


def kept(db: Database) -> int:
    """Connections idle but kept out of the pool."""
    return db.idle_connections() - db.pool.get_idle_size()


async def test_a_kept_connection_goes_back_to_the_pool_within_a_second(db: Database) -> None:
    first = await db.fetchrow(BACKEND_PID)
    assert kept(db) == 1
    second = await db.fetchrow(BACKEND_PID)
    assert first is not None
    assert second is not None
    assert first["pid"] == second["pid"]  # the same connection, taken again
    await asyncio.sleep(KEEP_SECONDS + 0.5)
    assert kept(db) == 0
    assert db.pool.get_idle_size() == db.pool.get_size() == 1


async def test_statements_waiting_for_the_pool_get_the_connections_that_free_up(
    db: Database,
) -> None:
    async def in_a_transaction() -> None:
        async with db.transaction() as transaction:
            await db.fetchrow(BRIEF_SLEEP)
            await db.fetchrow(BRIEF_SLEEP)
            await transaction.commit()

    # 200 statements and 40 two-statement transactions on two connections: any connection kept
    # while a statement waits for the pool would leave it to time out as DatabaseUnavailable.
    await asyncio.gather(
        *(db.fetchrow(BRIEF_SLEEP) for _ in range(200)),
        *(in_a_transaction() for _ in range(40)),
    )
    assert db.pool.get_size() <= 2
    assert db.idle_connections() == db.pool.get_size()


async def test_statements_waiting_get_connections_when_failing_ones_go_back_to_the_pool(
    db: Database,
) -> None:
    # A failed statement's connection goes back to the pool, not to a waiting statement: the
    # waiting one must then get a connection from the pool.
    results = await asyncio.gather(
        *(db.fetchrow(FAILING if n % 3 == 0 else BRIEF_SLEEP) for n in range(90)),
        return_exceptions=True,
    )
    failed = [n for n, result in enumerate(results) if isinstance(result, BaseException)]
    assert failed == list(range(0, 90, 3))
    assert all(isinstance(results[n], asyncpg.DivisionByZeroError) for n in failed)
    assert db.idle_connections() == db.pool.get_size() <= 2


async def test_a_failed_statements_place_goes_to_a_waiting_statement_not_a_newcomer(
    database_url: str,
) -> None:
    # Six workers on two connections, running statements one after another for longer than
    # the acquire timeout; the very first one fails, which returns its connection to the pool
    # while others wait. The new connection taken for them must not go to the failed worker's
    # next statement instead, leaving a wait on the pool that ends, at the acquire timeout, by
    # failing a waiting statement.
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2, reset=_keep_session)
    db = Database(pool, acquire_timeout=0.5)

    async def worker(first: Query) -> int:
        statements, loop = 0, asyncio.get_running_loop()
        until = loop.time() + 1.5
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await db.fetchrow(first)
        while loop.time() < until:
            await db.fetchrow(BRIEF_SLEEP)
            statements += 1
        return statements

    try:
        done = await asyncio.gather(worker(FAILING), *(worker(BRIEF_SLEEP) for _ in range(5)))
        assert all(statements > 0 for statements in done)
        assert db.idle_connections() == db.pool.get_size() <= 2
    finally:
        await db.close(grace_seconds=5)


async def test_a_connection_lost_while_kept_is_replaced_not_used(
    db: Database, pool: asyncpg.Pool
) -> None:
    row = await db.fetchrow(BACKEND_PID)
    assert row is not None
    assert kept(db) == 1
    assert await pool.fetchval("select pg_terminate_backend($1)", row["pid"])
    await asyncio.sleep(0.2)  # the client reads the server's goodbye
    again = await db.fetchrow(BACKEND_PID)
    assert again is not None
    assert again["pid"] != row["pid"]


async def test_a_drain_gives_every_kept_connection_back(db: Database) -> None:
    await asyncio.gather(*(db.fetchrow(BRIEF_SLEEP) for _ in range(4)))
    assert kept(db) >= 1
    db.drain(grace_seconds=5)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if kept(db) == 0:
            break
    assert kept(db) == 0
    await db.fetchrow(BRIEF_SLEEP)  # while draining, nothing is kept
    assert kept(db) == 0


async def test_close_with_kept_connections_closes_the_pool_at_once(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2, reset=_keep_session)
    db = Database(pool, acquire_timeout=5.0)
    await asyncio.gather(*(db.fetchrow(BRIEF_SLEEP) for _ in range(4)))
    assert kept(db) >= 1
    with caplog.at_level(logging.WARNING, logger="enrollment_service.db"):
        await db.close(grace_seconds=5)
    assert pool.is_closing()
    assert "did not close" not in caplog.text


async def test_a_released_connection_skips_statements_that_gave_up_waiting(
    database_url: str,
) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=1, reset=_keep_session)
    db = Database(pool, acquire_timeout=0.2)
    holding, done = asyncio.Event(), asyncio.Event()

    async def hold_the_only_connection() -> None:
        async with db.transaction() as transaction:
            await db.fetchrow(BRIEF_SLEEP)
            holding.set()
            await done.wait()
            await transaction.commit()

    holder = asyncio.create_task(hold_the_only_connection())
    try:
        await holding.wait()
        gave_up = await asyncio.gather(
            *(db.fetchrow(BRIEF_SLEEP) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(error, DatabaseUnavailable) for error in gave_up)
        waiting = asyncio.create_task(db.fetchrow(BACKEND_PID))
        await asyncio.sleep(0.05)  # queued behind the five that gave up
        done.set()
        await holder
        assert await waiting is not None
    finally:
        done.set()
        await db.close(grace_seconds=5)


async def test_a_statement_queued_behind_a_cancelled_connect_gets_its_place(
    database_url: str,
) -> None:
    # The pool's only place is taken by a statement still connecting; a second statement
    # queues for it; the first is cancelled (its client left). The place must pass to the
    # queued one, not sit free while it waits out the acquire timeout.
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=1, reset=_keep_session)
    db = Database(pool, acquire_timeout=1.0)
    try:
        first = asyncio.create_task(db.fetchrow(BACKEND_PID))
        await asyncio.sleep(0)  # connecting
        second = asyncio.create_task(db.fetchrow(BACKEND_PID))
        await asyncio.sleep(0)  # queued
        first.cancel()
        assert await second is not None
        with contextlib.suppress(asyncio.CancelledError):
            await first
    finally:
        await db.close(grace_seconds=5)
