"""`serve` with WORKERS > 1, as a real process tree: every worker's requests and pool show on
/metrics, whichever worker answers the scrape. (Draining several workers on SIGTERM is in
test_shutdown.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from enrollment_service import migrations
from tests.conftest import DatabaseFactory, ServeFactory

SCRAPES = 8
POOL_MIN_SIZE = 2
POOL_MAX_SIZE = 7


def _answered(exposition: str, route: str) -> float:
    """enrollment_http_requests_total for `route`, over every method and status."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "enrollment_http_requests"
        for sample in family.samples
        if sample.name == "enrollment_http_requests_total" and sample.labels["route"] == route
    )


def _samples(exposition: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.name == name
    ]


def _value(exposition: str, name: str) -> float:
    [(labels, value)] = _samples(exposition, name)
    assert labels == {}, labels
    return value


async def test_with_two_workers_metrics_add_up_every_workers_requests(
    database_factory: DatabaseFactory, serve: ServeFactory, tmp_path: Path
) -> None:
    url = await database_factory.create("workers")
    await asyncio.to_thread(migrations.apply, url)
    # TMPDIR: serve's folder for the workers' metric files lands where the test can see it.
    service = await serve(
        url,
        WORKERS="2",
        TMPDIR=str(tmp_path),
        DB_POOL_MIN_SIZE=str(POOL_MIN_SIZE),
        DB_POOL_MAX_SIZE=str(POOL_MAX_SIZE),
    )
    assert len(service.workers()) == 2, service.log_text()

    def counter_files() -> list[Path]:
        """One per worker that has counted a request to /students (prometheus_client's
        multiprocess files; a worker's file exists from its start, holding counters at 0)."""
        return [
            path
            for path in tmp_path.glob("enrollment-service-metrics-*/counter_*.db")
            if any(
                sample.value > 0
                for family in MultiProcessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
                for sample in family.samples
                if sample.name == "enrollment_http_requests_total"
                and sample.labels["route"] == "/students"
            )
        ]

    requests = 0
    # A new connection for every request, so that the kernel hands some to each worker; which
    # one gets a connection is its choice, so go on until both have answered some.
    one_shot = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=service.base_url, limits=one_shot) as client:
        while requests < 600 and len(await asyncio.to_thread(counter_files)) < 2:
            for _ in range(20):
                assert (await client.get("/students")).status_code == 200
            requests += 20
        scrapes = [(await client.get("/metrics")).text for _ in range(SCRAPES)]

    assert len(await asyncio.to_thread(counter_files)) == 2, "one worker took every connection"
    # Every scrape, whichever worker answered it, counts both workers' requests.
    assert [_answered(text, "/students") for text in scrapes] == [requests] * SCRAPES
    # The pool gauges add up both workers' pools, whichever worker answered.
    for text in scrapes:
        assert _value(text, "enrollment_db_pool_max_connections") == 2 * POOL_MAX_SIZE
        size = _value(text, "enrollment_db_pool_size_connections")
        assert 2 * POOL_MIN_SIZE <= size <= 2 * POOL_MAX_SIZE
        in_use = _value(text, "enrollment_db_pool_in_use_connections")
        assert in_use + _value(text, "enrollment_db_pool_idle_connections") == size
        # The process metrics are the answering worker's, named by its pid.
        [(labels, rss)] = _samples(text, "process_resident_memory_bytes")
        assert int(labels["pid"]) in service.workers()
        assert rss > 0
    assert {_samples(text, "process_cpu_seconds_total")[0][0]["pid"] for text in scrapes} <= {
        str(pid) for pid in service.workers()
    }
    assert _samples(scrapes[0], "enrollment_build_info")[0][1] == 1
