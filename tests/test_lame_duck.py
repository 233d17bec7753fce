"""SHUTDOWN_DELAY against the real `enrollment-service serve`: on SIGTERM readiness answers 503 at
once, while new connections and requests are still served for the delay (a load balancer polling
readiness every few seconds keeps sending traffic meanwhile); then the drain runs and the process
exits 0. With one worker and with two."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.conftest import ServeFactory, assert_problem
from tests.ops_support import RowLock, log_time

DELAY = 2.5


async def _fresh_connection_get(base_url: str, path: str) -> httpx.Response | str:
    """GET on a connection of its own (as a load balancer's new connection would be): the
    response, or the name of the transport error."""
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
            return await client.get(path)
    except httpx.TransportError as error:
        return type(error).__name__


@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_sigterm_with_a_delay_keeps_serving_new_connections_while_readiness_says_503(
    database_url: str, serve: ServeFactory, clean_tables: None, workers: str
) -> None:
    service = await serve(
        database_url, WORKERS=workers, SHUTDOWN_DELAY=str(DELAY), SHUTDOWN_GRACE_PERIOD="10"
    )
    await asyncio.to_thread(service.wait_for_startups, int(workers))
    async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:
        course = (
            await client.post("/courses", json={"code": "LAME-1", "name": "Ducks", "level": "x"})
        ).json()
        student = (
            await client.post("/students", json={"name": "Dee", "email": "dee@example.org"})
        ).json()

    # An enrollment that is still running when the delay ends must finish in the drain.
    lock = await RowLock(database_url, course["id"]).acquire()
    try:
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as held_client:
            signalled_at = time.monotonic()
            os.kill(service.pid, signal.SIGTERM)

            ready = await _fresh_connection_get(service.base_url, "/health/ready")
            assert isinstance(ready, httpx.Response), ready
            body = assert_problem(ready, 503, "not-ready")
            assert body["checks"]["shutdown"] == "draining"
            assert time.monotonic() - signalled_at < 1.0, "readiness did not flip at once"

            # Well inside the delay: new connections and requests are served as usual.
            await asyncio.sleep(DELAY / 2)
            served = [await _fresh_connection_get(service.base_url, "/students") for _ in range(6)]
            assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in served), (
                served
            )
            held = asyncio.create_task(
                held_client.post(
                    f"/students/{student['id']}/courses", json={"course_id": course["id"]}
                )
            )
            assert service.process is not None
            assert service.process.poll() is None

            # After the delay: the port closes and a new connection is refused, not left hanging.
            await asyncio.sleep(DELAY / 2 + 1.0)
            late = await _fresh_connection_get(service.base_url, "/health/live")
            assert late == "ConnectError", late
            assert not held.done(), "the held request is still in PostgreSQL"
            await lock.release()
            enrolled = await asyncio.wait_for(held, timeout=15)
            exit_code = await asyncio.to_thread(service.wait, 30)
    finally:
        await lock.release()

    assert exit_code == 0, service.log_text()
    assert enrolled.status_code == 201, enrolled.text
    records = service.records()
    announced = [r for r in records if r["msg"].startswith("shutting down")]
    drained = [r for r in records if r["msg"].startswith("draining")]
    assert len(announced) == len(drained) == int(workers), service.log_text()
    # The drain began only after the delay, in every worker.
    gap = min(log_time(d) for d in drained) - max(log_time(a) for a in announced)
    assert gap >= DELAY - 0.3, f"drained {gap:.2f}s after the announcement"
    print(f"lame duck (WORKERS={workers}): served during {DELAY}s, drain {gap:.2f}s after 503")
