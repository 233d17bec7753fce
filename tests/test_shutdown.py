"""SIGTERM against the real `enrollment-service serve`: readiness turns 503 at once, new
connections stop, every request already accepted finishes with a non-5xx answer, the pool
closes after the last of them, and the process exits 0, within the grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from enrollment_service import migrations
from tests.conftest import DatabaseFactory, ServeFactory, assert_problem
from tests.ops_support import (
    RowLock,
    log_time,
    service_backends,
    wait_for_backends,
)

#: Enrollments held in flight when SIGTERM arrives: POOL_SIZE of them inside PostgreSQL (blocked
#: on the test's row lock), the rest waiting for a pooled connection.
IN_FLIGHT = 50
POOL_SIZE = 20
BACKGROUND_WORKERS = 8
GRACE_SECONDS = 15
#: How long the in-flight requests are kept waiting after SIGTERM.
HOLD_AFTER_SIGTERM = 1.5
#: How a request that never reached the server fails on the client.
NOT_DELIVERED = ("ConnectError", "RemoteProtocolError", "ReadError", "WriteError")


@dataclass
class Outcome:
    request_id: str
    response: httpx.Response | None = None
    error: str | None = None

    @property
    def status(self) -> int | None:
        return None if self.response is None else self.response.status_code


@pytest.fixture
async def database(database_factory: DatabaseFactory) -> str:
    url = await database_factory.create("shutdown")
    await asyncio.to_thread(migrations.apply, url)
    return url


async def _course_and_students(url: str, students: int) -> tuple[int, list[int]]:
    conn = await asyncpg.connect(url)
    try:
        course_id: int = await conn.fetchval(
            "insert into courses (code, name, level) values ('SIG-1', 'Signals', 'advanced')"
            " returning id"
        )
        rows = await conn.fetch(
            "insert into students (name, email)"
            " select 'Student ' || n, 'student' || n || '@example.org'"
            " from generate_series(1, $1) as n returning id",
            students,
        )
    finally:
        await conn.close()
    return course_id, [row["id"] for row in rows]


async def _request(
    client: httpx.AsyncClient, method: str, path: str, request_id: str, **kwargs: object
) -> Outcome:
    outcome = Outcome(request_id)
    try:
        response = await client.request(
            method,
            path,
            headers={"X-Request-ID": request_id},
            **kwargs,  # type: ignore[arg-type]
        )
        outcome.response = response
    except httpx.TransportError as error:
        outcome.error = type(error).__name__
    return outcome


def _enroll_each(
    client: httpx.AsyncClient, student_ids: list[int], course_id: int
) -> list[asyncio.Task[Outcome]]:
    """One enrollment request per student, all started at once."""
    return [
        asyncio.create_task(
            _request(
                client,
                "POST",
                f"/students/{student_id}/courses",
                f"enroll-{student_id}",
                json={"course_id": course_id},
            )
        )
        for student_id in student_ids
    ]


async def _background_traffic(
    base_url: str, worker: int, outcomes: list[Outcome], stop: asyncio.Event
) -> None:
    """Keep-alive requests in a loop until the server refuses a new connection."""
    paths = ("/health/live", "/metrics")
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        for n in range(5000):
            if stop.is_set():
                return
            outcome = await _request(client, "GET", paths[n % 2], f"bg-{worker}-{n}")
            outcomes.append(outcome)
            if outcome.error == "ConnectError":
                return
            await asyncio.sleep(0.005)


async def _probe_readiness(base_url: str) -> Outcome:
    """/health/ready on a new connection."""
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        return await _request(client, "GET", "/health/ready", f"probe-{time.monotonic_ns()}")


@pytest.mark.timeout(90)
async def test_sigterm_finishes_every_accepted_request_then_exits_0(
    database: str, serve: ServeFactory
) -> None:
    course_id, student_ids = await _course_and_students(database, IN_FLIGHT)
    service = await serve(
        database,
        DB_POOL_MIN_SIZE="2",
        DB_POOL_MAX_SIZE=str(POOL_SIZE),
        DB_POOL_ACQUIRE_TIMEOUT="30",
        DB_COMMAND_TIMEOUT="30",
        SHUTDOWN_GRACE_PERIOD=str(GRACE_SECONDS),
    )

    lock = await RowLock(database, course_id).acquire()
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    background: list[Outcome] = []
    stop_background = asyncio.Event()
    try:
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=60, limits=limits
        ) as client:
            enrollments = _enroll_each(client, student_ids, course_id)
            workers = [
                asyncio.create_task(
                    _background_traffic(service.base_url, worker, background, stop_background)
                )
                for worker in range(BACKGROUND_WORKERS)
            ]
            # Every pooled connection blocked inside PostgreSQL, the other requests queued.
            await wait_for_backends(database, POOL_SIZE, waiting_on_lock=True)
            await asyncio.sleep(0.5)
            assert not any(task.done() for task in enrollments)

            signalled_at = time.time()
            os.kill(service.pid, signal.SIGTERM)
            probe = await _probe_readiness(service.base_url)
            await asyncio.sleep(HOLD_AFTER_SIGTERM)
            # Still draining: the process waits for the requests it accepted.
            assert service.process is not None
            assert service.process.poll() is None, service.log_text()
            assert not any(task.done() for task in enrollments)

            await lock.release()
            answers = await asyncio.wait_for(asyncio.gather(*enrollments), timeout=30)
            exit_code = await asyncio.to_thread(service.wait, GRACE_SECONDS + 10)
            exited_at = time.time()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=15)
    finally:
        stop_background.set()
        await lock.release()

    log = service.log_text()
    assert exit_code == 0, log
    assert [a.status for a in answers] == [201] * IN_FLIGHT, answers

    # Readiness said 503 from the signal on, or the connection was no longer taken; never 200.
    if probe.response is not None:
        assert_problem(probe.response, 503, "not-ready")
        assert probe.response.json()["checks"]["shutdown"] == "draining"
    else:
        assert probe.error in NOT_DELIVERED, probe
    records = service.records()
    draining = next(r for r in records if r["msg"].startswith("draining"))
    assert log_time(draining) - signalled_at < 1.0, "readiness did not flip at once"

    # Every request the app saw was answered, and never with a 5xx; every request it did not
    # see failed to reach it (a refused connection, or a keep-alive connection it had closed).
    access = service.access_log()
    if probe.response is None:
        assert probe.request_id not in access, "the probe reached the app but got no answer"
    answered = {o.request_id: o for o in [*answers, *background] if o.status is not None}
    for request_id, record in access.items():
        if request_id == probe.request_id:
            continue  # readiness: 503 while draining is its point
        assert record["status"] < 500, record
        if request_id in answered:
            assert answered[request_id].status == record["status"], record
    for outcome in background:
        if outcome.error is not None:
            assert outcome.request_id not in access, outcome
            # Refused, or a keep-alive connection closed (or reset) as the request went out.
            assert outcome.error in NOT_DELIVERED, outcome
    # New connections stopped: every background worker ended on a refused connection.
    assert all(
        any(o.error == "ConnectError" for o in background if o.request_id.startswith(f"bg-{w}-"))
        for w in range(BACKGROUND_WORKERS)
    )

    # The pool closed after the last request, and nothing of the service is left connected.
    closed = next(r for r in records if r["msg"] == "pool closed")
    assert max(log_time(r) for r in access.values()) <= log_time(closed)
    await wait_for_backends(database, 0)
    assert exited_at - signalled_at < GRACE_SECONDS

    conn = await asyncpg.connect(database)
    try:
        enrolled = await conn.fetchval(
            "select enrolled_count from courses where id = $1", course_id
        )
    finally:
        await conn.close()
    assert enrolled == IN_FLIGHT
    flip_ms = max(0.0, 1000 * (log_time(draining) - signalled_at))
    print(
        f"shutdown: readiness flipped {flip_ms:.0f} ms after "
        f"SIGTERM; a new connection then got {probe.status or probe.error}; {IN_FLIGHT} held "
        f"requests answered 201 after {HOLD_AFTER_SIGTERM}s; exit 0 "
        f"{exited_at - signalled_at:.2f}s after SIGTERM"
    )


@pytest.mark.timeout(60)
async def test_a_request_outlasting_the_grace_period_does_not_hold_up_the_exit(
    database: str, serve: ServeFactory
) -> None:
    grace = 1
    course_id, (student_id,) = await _course_and_students(database, 1)
    service = await serve(
        database,
        DB_COMMAND_TIMEOUT="60",
        SHUTDOWN_GRACE_PERIOD=str(grace),
    )

    lock = await RowLock(database, course_id).acquire()
    try:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as client:
            stuck = asyncio.create_task(
                _request(
                    client,
                    "POST",
                    f"/students/{student_id}/courses",
                    "stuck",
                    json={"course_id": course_id},
                )
            )
            await wait_for_backends(database, 1, waiting_on_lock=True)
            signalled_at = time.monotonic()
            os.kill(service.pid, signal.SIGTERM)
            exit_code = await asyncio.to_thread(service.wait, grace + 15)
            exit_seconds = time.monotonic() - signalled_at
            outcome = await asyncio.wait_for(stuck, timeout=5)
    finally:
        await lock.release()

    assert exit_code == 0, service.log_text()
    assert exit_seconds < grace + 10, f"exit took {exit_seconds:.1f}s"
    # Cut off at the end of the grace period with the contract's retryable answer, not the
    # server's bare 500.
    assert outcome.response is not None, outcome
    assert_problem(outcome.response, 503, "database-unavailable")
    assert 1 <= int(outcome.response.headers["retry-after"]) <= 30
    await wait_for_backends(database, 0)
    print(f"grace bound: cut off with 503 and exit 0 {exit_seconds:.2f}s after SIGTERM (grace 1s)")


@pytest.mark.timeout(90)
async def test_with_two_workers_both_serve_and_sigterm_drains_both_then_exits_0(
    database: str, serve: ServeFactory
) -> None:
    pool_size, in_flight = 4, 16
    course_id, student_ids = await _course_and_students(database, in_flight)
    service = await serve(
        database,
        WORKERS="2",
        DB_POOL_MIN_SIZE="1",
        DB_POOL_MAX_SIZE=str(pool_size),
        DB_POOL_ACQUIRE_TIMEOUT="30",
        SHUTDOWN_GRACE_PERIOD="15",
    )
    assert len(service.workers()) == 2, service.log_text()
    await asyncio.to_thread(service.wait_for_startups, 2)

    lock = await RowLock(database, course_id).acquire()
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    try:
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=60, limits=limits
        ) as client:
            enrollments = _enroll_each(client, student_ids, course_id)
            # At least one worker's whole pool blocked inside PostgreSQL, the rest queued.
            # (Which worker accepts which connection is the kernel's choice.)
            for _ in range(300):
                if await service_backends(database, waiting_on_lock=True) >= pool_size:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the enrollments never reached PostgreSQL")

            os.kill(service.pid, signal.SIGTERM)
            await asyncio.sleep(1.0)
            assert service.process is not None
            assert service.process.poll() is None, "exited before its requests were answered"
            # Draining, and no longer listening: a new connection is refused, not left hanging.
            late = await _probe_readiness(service.base_url)
            assert late.error == "ConnectError", late
            await lock.release()
            answers = await asyncio.wait_for(asyncio.gather(*enrollments), timeout=30)
            exit_code = await asyncio.to_thread(service.wait, 30)
    finally:
        await lock.release()

    assert exit_code == 0, service.log_text()
    assert [a.status for a in answers] == [201] * in_flight, answers
    drained = [r for r in service.records() if r["msg"].startswith("draining")]
    assert len(drained) == 2, "each worker drains on its own"
    await wait_for_backends(database, 0)
