"""`serve` with WORKERS > 1, as a real process tree: every worker's requests show on /metrics,
whichever worker answers the scrape. (Draining several workers on SIGTERM is in
test_shutdown.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from enrollment_service import migrations
from tests.conftest import DatabaseFactory
from tests.ops_support import ServiceProcess

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
    database_factory: DatabaseFactory, services: list[ServiceProcess], tmp_path: Path
) -> None:
    url = await database_factory.create("workers")
    await asyncio.to_thread(migrations.apply, url)
    service = ServiceProcess(url, tmp_path, WORKERS="2").start()
    services.append(service)
    await asyncio.to_thread(service.wait_until_ready)
    assert len(service.workers()) == 2, service.log_text()

    requests = 60
    # A new connection for every request, so that the kernel hands some to each worker.
    one_shot = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=service.base_url, limits=one_shot) as client:
        for _ in range(requests):
            assert (await client.get("/students")).status_code == 200
        scrapes = [(await client.get("/metrics")).text for _ in range(SCRAPES)]

    assert [_answered(text, "/students") for text in scrapes] == [requests] * SCRAPES
    # The pool gauges are the answering worker's own.
    assert all("db_pool_max_size 10.0" in text for text in scrapes)
