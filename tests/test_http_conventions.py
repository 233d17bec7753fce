"""The contract's conventions that hold for every endpoint: request ids, problem documents for
routing and media-type errors, the body limit, bearer tokens, metrics and the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.settings import Settings, load_settings
from tests.conftest import DatabaseFactory, assert_problem, create_student, error_fields


async def test_every_response_carries_a_request_id(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/health/live"), ("GET", "/nope"), ("POST", "/students")]:
        response = await client.request(method, path)
        assert len(response.headers["x-request-id"]) >= 16
    ids = {(await client.get("/health/live")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_a_sane_caller_request_id_is_echoed_and_a_bad_one_replaced(
    client: httpx.AsyncClient,
) -> None:
    sane = "caller-1.2_3"
    response = await client.get("/health/live", headers={"X-Request-ID": sane})
    assert response.headers["x-request-id"] == sane
    for bad in ["has space", "x" * 129, "semi;colon", ""]:
        response = await client.get("/health/live", headers={"X-Request-ID": bad})
        assert response.headers["x-request-id"] not in (bad, "")


async def test_the_request_id_is_on_the_access_log_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="enrollment_service.access"):
        await client.get("/students/12345", headers={"X-Request-ID": "trace-me-42"})
    lines = [r for r in caplog.records if r.name == "enrollment_service.access"]
    assert lines
    record = lines[-1]
    assert record.__dict__["route"] == "/students/{student_id}"
    assert record.__dict__["status"] == 404
    assert record.__dict__["request_id"] == "trace-me-42"


async def test_successful_health_probes_are_not_access_logged_but_failures_are(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="enrollment_service.access"):
        await client.get("/health/live", headers={"X-Request-ID": "probe-ok"})
        await client.get("/health/ready", headers={"X-Request-ID": "ready-ok"})
        await client.get("/health/nope", headers={"X-Request-ID": "probe-404"})
        await client.get("/students", headers={"X-Request-ID": "data"})
    logged = {r.__dict__["request_id"] for r in caplog.records if r.name.endswith(".access")}
    assert {"probe-404", "data"} <= logged
    assert not {"probe-ok", "ready-ok"} & logged


async def test_an_unknown_route_answers_404_not_found(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/teachers"), 404, "not-found")
    assert_problem(await client.get("/students/1/grades"), 404, "not-found")


async def test_a_known_route_with_the_wrong_method_answers_405(client: httpx.AsyncClient) -> None:
    response = await client.put("/students/1", json={})
    assert_problem(response, 405, "method-not-allowed")
    assert_problem(await client.delete("/students"), 405, "method-not-allowed")


async def test_a_trailing_slash_answers_as_the_path_without_it(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    response = await client.get(f"/students/{student['id']}/")
    assert response.status_code == 200
    assert response.json() == student
    assert (await client.get("/students/")).status_code == 200


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
async def test_a_body_that_is_not_json_answers_415(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post(
        "/students", content=b'{"name": "a", "email": "a@b.c"}', headers=headers
    )
    body = assert_problem(response, 415, "unsupported-media-type")
    assert "application/json" in body["detail"]


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "application/merge-patch+json"],
)
async def test_json_media_types_with_parameters_or_suffix_are_accepted(
    client: httpx.AsyncClient, content_type: str
) -> None:
    response = await client.post(
        "/students",
        content=b'{"name": "a", "email": "a@b.c"}',
        headers={"content-type": content_type},
    )
    assert response.status_code == 201, response.text


async def test_a_body_over_one_mebibyte_answers_413(client: httpx.AsyncClient) -> None:
    body = b'{"name": "' + b"a" * (1024 * 1024) + b'", "email": "a@b.c"}'
    response = await client.post(
        "/students", content=body, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "payload-too-large")


async def test_a_body_just_under_the_limit_is_parsed(client: httpx.AsyncClient) -> None:
    body = b'{"name": "' + b"a" * (1024 * 1024 - 100) + b'", "email": "a@b.c"}'
    response = await client.post(
        "/students", content=body, headers={"content-type": "application/json"}
    )
    assert error_fields(response) == {"name"}


async def test_metrics_expose_requests_by_route_template_and_pool_gauges(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    await client.get(f"/students/{student['id']}")
    await client.get("/students/999999999")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert (
        'enrollment_http_requests_total{method="GET",route="/students/{student_id}",status="200"}'
        in text
    )
    assert 'route="/students/{student_id}",status="404"' in text
    assert "enrollment_http_request_duration_seconds_bucket" in text
    assert "enrollment_db_pool_size_connections" in text
    assert "enrollment_db_pool_in_use_connections" in text
    assert f'/students/{student["id"]}"' not in text, "raw paths must not become series"


async def test_the_openapi_document_declares_every_path_and_problem_response(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    expected = {
        "/students": {"get", "post"},
        "/students/{student_id}": {"get", "patch", "delete"},
        "/courses": {"get", "post"},
        "/courses/{course_id}": {"get", "patch", "delete"},
        "/students/{student_id}/courses": {"get", "post"},
        "/students/{student_id}/courses/{course_id}": {"get", "delete"},
        "/courses/{course_id}/students": {"get"},
        "/health/live": {"get"},
        "/health/ready": {"get"},
        "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert set(document["paths"][path]) >= methods, path
    enroll = document["paths"]["/students/{student_id}/courses"]["post"]
    assert {"201", "400", "404", "409", "415", "503"} <= set(enroll["responses"])
    assert "application/problem+json" in enroll["responses"]["409"]["content"]
    assert enroll["requestBody"]["content"]["application/json"]["schema"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert "text/plain; version=0.0.4" in metrics["200"]["content"]


@pytest.fixture
async def guarded_client(settings: Settings, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    service = create_app(load_settings(environ={"API_TOKENS": "alpha, beta"}), database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://enrollment") as client:
            yield client


async def test_with_tokens_configured_requests_need_a_valid_bearer_token(
    guarded_client: httpx.AsyncClient,
) -> None:
    for headers in [{}, {"Authorization": "Bearer gamma"}, {"Authorization": "alpha"},
                    {"Authorization": "Basic alpha"}, {"Authorization": "Bearer "}]:  # fmt: skip
        response = await guarded_client.get("/students", headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    # 401 comes before the route is even looked up.
    assert_problem(await guarded_client.get("/no-such-route"), 401, "unauthorized")
    for token in ("alpha", "beta"):
        ok = await guarded_client.get("/students", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    assert (await guarded_client.get("/health/live")).status_code == 200
    assert (await guarded_client.get("/health/ready")).status_code == 200
    assert_problem(await guarded_client.get("/metrics"), 401, "unauthorized")


async def test_data_endpoints_answer_503_not_ready_while_migrations_are_pending(
    database_factory: DatabaseFactory,
) -> None:
    url = await database_factory.create("pending")
    await asyncio.to_thread(migrations.apply, url, target="0001.students-and-courses")
    service: Service = create_app(load_settings(environ={}), url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            ready = await client.get("/health/ready")
            body = assert_problem(ready, 503, "not-ready")
            # Every migration after the first, by name, in order.
            after_first = "pending: " + ", ".join(migrations.migration_ids()[1:])
            assert after_first.startswith("pending: 0002.student-courses, ")
            assert body["checks"] == {"database": "ok", "migrations": after_first}
            assert "migrations" in body["detail"]
            gated = assert_problem(await client.get("/students"), 503, "not-ready")
            assert gated["checks"]["migrations"] == after_first
            enroll = await client.post("/students/1/courses", json={"course_id": 1})
            assert_problem(enroll, 503, "not-ready")
            # Before validation too: callers see one answer while the schema is behind.
            assert_problem(await client.get("/students/0"), 503, "not-ready")
            assert_problem(await client.post("/courses", json={}), 503, "not-ready")
            assert (await client.get("/health/live")).status_code == 200

            await asyncio.to_thread(migrations.apply, url)
            await asyncio.sleep(1.1)
            assert (await client.get("/students")).status_code == 200
            assert (await client.get("/health/ready")).status_code == 200


async def test_readiness_before_any_migration_names_them_all(
    database_factory: DatabaseFactory,
) -> None:
    url = await database_factory.create("bare")
    service = create_app(load_settings(environ={}), url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            body = assert_problem(await client.get("/health/ready"), 503, "not-ready")
            assert body["checks"]["migrations"] == "pending: " + ", ".join(
                migrations.migration_ids()
            )
            assert body["checks"]["migrations"].startswith(
                "pending: 0001.students-and-courses, 0002.student-courses, "
            )
            service.begin_shutdown(grace_seconds=5)
            draining = assert_problem(await client.get("/health/ready"), 503, "not-ready")
            assert draining["checks"]["shutdown"] == "draining"
