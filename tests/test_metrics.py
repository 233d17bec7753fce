"""/metrics, read over HTTP from the real app on a real PostgreSQL: Prometheus's naming conventions,
the build and process metrics, 503s by cause, deadlock retries, pool waits, and pool gauges that
are exact in one process and add up over live workers under several."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import signal
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client.parser import text_string_to_metric_families

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.db import Database, DatabaseUnavailable, Query
from enrollment_service.settings import Settings, load_settings
from tests.conftest import DatabaseFactory, ServeFactory, assert_problem, create_student

OUR_FAMILIES = {
    "enrollment_http_requests": "counter",
    "enrollment_http_request_duration_seconds": "histogram",
    "enrollment_http_unavailable_responses": "counter",
    "enrollment_db_retries": "counter",
    "enrollment_db_retry_give_ups": "counter",
    "enrollment_db_pool_acquire_wait_seconds": "histogram",
    "enrollment_db_pool_size_connections": "gauge",
    "enrollment_db_pool_in_use_connections": "gauge",
    "enrollment_db_pool_idle_connections": "gauge",
    "enrollment_db_pool_max_connections": "gauge",
    "enrollment_build_info": "gauge",
}


class Scrape:
    """One /metrics answer, parsed."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` that carry these labels."""
        matching = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert matching, f"no sample {name}{labels}"
        return sum(matching)


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return Scrape(response.text)


@pytest.fixture
def db(app: Service) -> Database:
    """The app's own Database (the one its requests use), to run statements the API has not."""
    database: Database = app.litestar.state.db
    return database


async def test_every_metric_follows_prometheus_naming(client: httpx.AsyncClient) -> None:
    await create_student(client)
    metrics = await scrape(client)
    for name, kind in OUR_FAMILIES.items():
        assert metrics.families[name].type == kind, name
    for family in metrics.families.values():
        assert family.name.startswith(("enrollment_", "process_", "python_")), family.name
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {
                family.name + "_total",
                family.name + "_created",
            }
    for old in ("http_requests", "http_request_duration_seconds", "db_pool_size", "db_pool_in_use"):
        assert old not in metrics.families


async def test_build_info_names_the_package_and_python_versions(
    client: httpx.AsyncClient,
) -> None:
    [sample] = (await scrape(client)).families["enrollment_build_info"].samples
    assert sample.labels == {
        "version": importlib.metadata.version("enrollment-service"),
        "python": platform.python_version(),
    }
    assert sample.value == 1


async def test_process_metrics_describe_the_serving_process(client: httpx.AsyncClient) -> None:
    metrics = await scrape(client)
    assert metrics.value("process_resident_memory_bytes") > 10 * 1024 * 1024
    cpu = os.times()
    assert metrics.value("process_cpu_seconds_total") == pytest.approx(
        cpu.user + cpu.system, abs=1.0
    )
    assert 0 < metrics.value("process_open_fds") < metrics.value("process_max_fds")
    started = metrics.value("process_start_time_seconds")
    assert time.time() - 24 * 3600 < started <= time.time()
    assert metrics.value("python_info", version=platform.python_version()) == 1
    assert metrics.value("python_gc_collections_total") > 0
    # One process: no pid label (that is for several workers).
    assert "pid" not in metrics.families["process_resident_memory_bytes"].samples[0].labels


async def test_pool_gauges_are_exact_at_scrape_time(
    client: httpx.AsyncClient, db: Database, settings: Settings
) -> None:
    held = [await db.pool.acquire() for _ in range(2)]
    try:
        # The app's pruning tasks take a connection for a moment now and then: a scrape that
        # meets one of them is taken again.
        metrics = await scrape_until(client, "enrollment_db_pool_in_use_connections", 2)
        assert metrics.value("enrollment_db_pool_in_use_connections") == 2
        size = metrics.value("enrollment_db_pool_size_connections")
        assert metrics.value("enrollment_db_pool_idle_connections") == size - 2
        assert metrics.value("enrollment_db_pool_max_connections") == settings.pool_max_size
    finally:
        for conn in held:
            await db.pool.release(conn)
    metrics = await scrape_until(client, "enrollment_db_pool_in_use_connections", 0)
    assert metrics.value("enrollment_db_pool_in_use_connections") == 0


async def scrape_until(client: httpx.AsyncClient, name: str, expected: float) -> Scrape:
    """A scrape showing `expected` for `name`, or the last of a second's tries."""
    for _ in range(20):
        metrics = await scrape(client)
        if metrics.value(name) == expected:
            break
        await asyncio.sleep(0.05)
    return metrics


async def test_every_statement_observes_its_wait_for_a_connection(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    before = await scrape(client)
    for _ in range(5):
        assert (await client.get(f"/students/{student['id']}")).status_code == 200
    after = await scrape(client)
    waits = "enrollment_db_pool_acquire_wait_seconds"
    assert after.value(f"{waits}_count") - before.value(f"{waits}_count") >= 5
    assert after.value(f"{waits}_sum") > before.value(f"{waits}_sum")
    assert after.value(f"{waits}_bucket", le="+Inf") == after.value(f"{waits}_count")


SELECT_ONE = Query("test/select-one", "select 1")


# Two statements taking the same two advisory locks in opposite orders: a real deadlock, which
# PostgreSQL breaks (after deadlock_timeout) by failing one of them.
LOCK_ONE_THEN_TWO = Query(
    "test/lock-one-then-two",
    "select pg_advisory_xact_lock(7301, 1), pg_sleep(0.3), pg_advisory_xact_lock(7301, 2)",
)
LOCK_TWO_THEN_ONE = Query(
    "test/lock-two-then-one",
    "select pg_advisory_xact_lock(7301, 2), pg_sleep(0.3), pg_advisory_xact_lock(7301, 1)",
)


async def test_a_real_deadlock_is_retried_and_counted(
    client: httpx.AsyncClient, db: Database
) -> None:
    before = await scrape(client)
    rows = await asyncio.gather(db.fetchrow(LOCK_ONE_THEN_TWO), db.fetchrow(LOCK_TWO_THEN_ONE))
    assert all(row is not None for row in rows), "the retry did not succeed"
    after = await scrape(client)
    retries = "enrollment_db_retries_total"
    deadlocks = after.value(retries, error="DeadlockDetectedError") - before.value(
        retries, error="DeadlockDetectedError"
    )
    assert deadlocks >= 1
    gave_up = "enrollment_db_retry_give_ups_total"
    assert after.value(gave_up) == before.value(gave_up)


ALWAYS_FAILS_TO_SERIALIZE = Query(
    "test/always-fails-to-serialize",
    "do $$ begin raise exception 'could not serialize' using errcode = '40001'; end $$",
)


async def test_a_statement_that_never_succeeds_counts_each_retry_and_one_give_up(
    client: httpx.AsyncClient, db: Database
) -> None:
    before = await scrape(client)
    with pytest.raises(DatabaseUnavailable, match="SerializationError"):
        await db.fetchrow(ALWAYS_FAILS_TO_SERIALIZE)
    after = await scrape(client)
    retries = "enrollment_db_retries_total"
    assert (
        after.value(retries, error="SerializationError")
        - before.value(retries, error="SerializationError")
        == 3
    )
    gave_up = "enrollment_db_retry_give_ups_total"
    assert after.value(gave_up) - before.value(gave_up) == 1


async def _client_for(url: str, **environ: str) -> tuple[Service, httpx.AsyncClient]:
    service = create_app(load_settings(environ=environ), url)
    return service, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=service), base_url="http://e"
    )


async def test_503_not_ready_is_counted_by_cause(database_factory: DatabaseFactory) -> None:
    url = await database_factory.create("pending")
    await asyncio.to_thread(migrations.apply, url, target="0001.students-and-courses")
    service, client = await _client_for(url)
    async with LifespanManager(service), client:
        for request in (client.get("/students"), client.post("/courses", json={}),
                        client.get("/students/1/courses")):  # fmt: skip
            assert_problem(await request, 503, "not-ready")
        # Readiness probes are left out, as they are of the request metrics.
        assert_problem(await client.get("/health/ready"), 503, "not-ready")
        metrics = await scrape(client)
    unavailable = "enrollment_http_unavailable_responses_total"
    assert metrics.value(unavailable, cause="not-ready") == 3
    assert metrics.value(unavailable, cause="database-unavailable") == 0
    assert metrics.value(unavailable) == metrics.value(
        "enrollment_http_requests_total", status="503"
    )


async def test_503_database_unavailable_is_counted_by_cause(database_url: str) -> None:
    service, client = await _client_for(
        database_url, DB_POOL_MIN_SIZE="1", DB_POOL_MAX_SIZE="1", DB_POOL_ACQUIRE_TIMEOUT="0.2"
    )
    async with LifespanManager(service), client:
        assert (await client.get("/students")).status_code == 200
        db: Database = service.litestar.state.db
        # The pool's only connection held by a transaction of the app's Database (the pool is
        # the Database's alone), in a task of its own: requests wait the acquire timeout, then
        # get 503.
        holding, done = asyncio.Event(), asyncio.Event()

        async def hold_the_connection() -> None:
            async with db.transaction():
                await db.fetchrow(SELECT_ONE)
                holding.set()
                await done.wait()

        holder = asyncio.create_task(hold_the_connection())
        await holding.wait()
        try:
            for _ in range(2):
                assert_problem(await client.get("/students"), 503, "database-unavailable")
        finally:
            done.set()
            await holder
        metrics = await scrape(client)
    unavailable = "enrollment_http_unavailable_responses_total"
    assert metrics.value(unavailable, cause="database-unavailable") == 2
    assert metrics.value(unavailable, cause="not-ready") == 0
    assert metrics.value(unavailable) == metrics.value(
        "enrollment_http_requests_total", status="503"
    )
    # Waits that timed out are waits too.
    waits = "enrollment_db_pool_acquire_wait_seconds"
    assert metrics.value(f"{waits}_bucket", le="0.1") < metrics.value(f"{waits}_count")
    assert metrics.value(f"{waits}_sum") >= 2 * 0.2


async def _answered_by(client: httpx.AsyncClient, workers: set[int]) -> None:
    """Scrape until each of these workers has answered one, so each has started (a scrape's
    process metrics carry the pid of the worker that answered it)."""
    waiting = {str(pid) for pid in workers}
    deadline = time.monotonic() + 60
    while waiting:
        assert time.monotonic() < deadline, f"workers {waiting} never answered"
        answer = (await scrape(client)).families["process_start_time_seconds"]
        waiting.discard(answer.samples[0].labels["pid"])


def _metrics_dirs(tmp_path: Path) -> list[Path]:
    """The folder `serve` made for prometheus_client's per-process files (TMPDIR=tmp_path)."""
    return list(tmp_path.glob("enrollment-service-metrics-*"))


@pytest.mark.timeout(120)
async def test_with_two_workers_a_dead_worker_leaves_the_pool_gauges_but_not_the_counts(
    database_factory: DatabaseFactory, serve: ServeFactory, tmp_path: Path
) -> None:
    url = await database_factory.create("workers")
    await asyncio.to_thread(migrations.apply, url)
    service = await serve(url, WORKERS="2", TMPDIR=str(tmp_path), DB_POOL_MAX_SIZE="4")
    old = set(service.workers())
    assert len(old) == 2, service.log_text()
    [metrics_dir] = await asyncio.to_thread(_metrics_dirs, tmp_path)

    # A new connection for every request, so that the kernel hands some to each worker.
    one_shot = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=service.base_url, limits=one_shot) as client:
        for _ in range(10):
            assert (await client.get("/students")).status_code == 200
        await _answered_by(client, old)

        killed = old.pop()
        os.kill(killed, signal.SIGKILL)
        # uvicorn's supervisor replaces it: wait until the new worker has started.
        deadline = time.monotonic() + 60
        while not (new := set(service.workers()) - old - {killed}):
            assert time.monotonic() < deadline, service.log_text()
            await asyncio.sleep(0.1)
        await _answered_by(client, new)

        for _ in range(6):
            metrics = await scrape(client)
            # Two live pools of 4, not three: the dead worker's pool is gone with it ...
            assert metrics.value("enrollment_db_pool_max_connections") == 8
            # ... while every request it answered still counts.
            assert metrics.value("enrollment_http_requests_total", route="/students") == 10
    dead_gauges = metrics_dir / f"gauge_livesum_{killed}.db"
    assert not await asyncio.to_thread(dead_gauges.exists)
