"""Litestar's own HTTP errors leave through problems.py like every other error: with their status
(401, 403, 405, 429, ...), their headers (Allow, Retry-After), the contract's slug where it names
one, and no "unhandled error" log line unless they are a 5xx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from asgi_lifespan import LifespanManager
from litestar import get
from litestar.exceptions import (
    HTTPException,
    InternalServerException,
    NotAuthorizedException,
    PermissionDeniedException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.params import Parameter
from prometheus_client.parser import text_string_to_metric_families

from enrollment_service.app import create_app
from enrollment_service.settings import load_settings
from tests.conftest import assert_problem

#: What a Litestar middleware or handler may raise (rate limiting, CSRF, JWT auth, ...), by the
#: status it carries.
FRAMEWORK_ERRORS: dict[int, HTTPException] = {
    401: NotAuthorizedException("Invalid token"),
    403: PermissionDeniedException("CSRF token verification failed"),
    410: HTTPException(status_code=410, detail="This resource is no more"),
    415: HTTPException(status_code=415, detail="Send JSON"),
    429: TooManyRequestsException("Slow down", headers={"Retry-After": "7"}),
    500: InternalServerException("the secret is hunter2"),
    503: ServiceUnavailableException("the secret is hunter2", headers={"Retry-After": "3"}),
}


@get("/test/raise/{status:int}", include_in_schema=False, sync_to_thread=False)
def raise_framework_error(status: Annotated[int, Parameter(title="status")]) -> None:
    raise FRAMEWORK_ERRORS[status]


@pytest.fixture(scope="module")
async def raising_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, with one more route that raises a framework error."""
    service = create_app(load_settings(environ={}), database_url)
    service.litestar.register(raise_framework_error)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            yield client


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_invalid_host_header_answers_400_validation_error_not_500(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.get("/students", headers={"Host": "bad host"})
    body = assert_problem(response, 400, "validation-error")
    assert body["errors"] == [{"field": "request", "message": "Invalid host header"}]
    assert not _errors_logged(caplog)


async def test_an_invalid_content_length_answers_400_validation_error_not_500(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    response = await client.post(
        "/students",
        content=b"{}",
        headers={"Content-Type": "application/json", "Content-Length": "abc"},
    )
    body = assert_problem(response, 400, "validation-error")
    assert "content-length" in body["errors"][0]["message"].lower()
    assert not _errors_logged(caplog)


@pytest.mark.parametrize(
    ("status", "slug", "title"),
    [
        (401, "unauthorized", "Unauthorized"),
        (403, "forbidden", "Forbidden"),
        (410, "gone", "Gone"),
        (415, "unsupported-media-type", "Unsupported media type"),
        (429, "too-many-requests", "Too many requests"),
    ],
)
async def test_a_framework_4xx_keeps_its_status_and_is_not_logged_as_an_error(
    raising_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    status: int,
    slug: str,
    title: str,
) -> None:
    response = await raising_client.get(f"/test/raise/{status}")
    body = assert_problem(response, status, slug)
    assert body["title"] == title
    assert body["detail"] == FRAMEWORK_ERRORS[status].detail
    assert not _errors_logged(caplog)


async def test_a_framework_error_keeps_its_headers(raising_client: httpx.AsyncClient) -> None:
    assert (await raising_client.get("/test/raise/429")).headers["retry-after"] == "7"
    not_allowed = await raising_client.put("/test/raise/429")
    assert_problem(not_allowed, 405, "method-not-allowed")
    assert "GET" in not_allowed.headers["allow"]
    assert (await raising_client.get("/test/raise/503")).headers["retry-after"] == "3"
    # A 401 always says how to authenticate.
    unauthorized = await raising_client.get("/test/raise/401")
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("status", "slug"), [(500, "internal-error"), (503, "service-unavailable")]
)
async def test_a_framework_5xx_stays_5xx_is_logged_and_tells_nothing_more(
    raising_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    status: int,
    slug: str,
) -> None:
    response = await raising_client.get(f"/test/raise/{status}")
    body = assert_problem(response, status, slug)
    assert "hunter2" not in response.text
    assert str(status) in body["detail"]
    assert [m for m in _errors_logged(caplog) if m.startswith("unhandled error")]


async def test_every_503_is_counted_by_its_cause(raising_client: httpx.AsyncClient) -> None:
    def counted(text: str) -> float:
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "enrollment_http_unavailable_responses_total"
            and sample.labels["cause"] == "service-unavailable"
        )

    before = counted((await raising_client.get("/metrics")).text)
    for _ in range(2):
        assert (await raising_client.get("/test/raise/503")).status_code == 503
    assert counted((await raising_client.get("/metrics")).text) == before + 2
