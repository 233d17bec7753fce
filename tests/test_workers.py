"""`serve` with WORKERS > 1, as a real process tree: every worker's requests show on /metrics,
whichever worker answers the scrape. (Draining several workers on SIGTERM is in
test_shutdown.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from enrollment_service import migrations
from tests.conftest import DatabaseFactory, ServeFactory

SCRAPES = 8


def _answered(exposition: str, route: str) -> float:
    """http_requests_total for `route`, over every method and status."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "http_requests"
        for sample in family.samples
        if sample.name == "http_requests_total" and sample.labels["route"] == route
    )


async def test_with_two_workers_metrics_add_up_every_workers_requests(
    database_factory: DatabaseFactory, serve: ServeFactory, tmp_path: Path
) -> None:
    url = await database_factory.create("workers")
    await asyncio.to_thread(migrations.apply, url)
    # TMPDIR: serve's folder for the workers' metric files lands where the test can see it.
    service = await serve(url, WORKERS="2", TMPDIR=str(tmp_path))
    assert len(service.workers()) == 2, service.log_text()

    def counter_files() -> list[Path]:
        # One per worker that has counted a request (prometheus_client's multiprocess files).
        return list(tmp_path.glob("enrollment-service-metrics-*/counter_*.db"))

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
    # The pool gauges are the answering worker's own.
    assert all("db_pool_max_size 10.0" in text for text in scrapes)
