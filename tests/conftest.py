"""The test harness: one real PostgreSQL per session, a fresh migrated database on it, the real app
over HTTP, and clean tables before every test.

The server is chosen in this order: TEST_DATABASE_URL if set; a testcontainers PostgreSQL if a
Docker engine answers; else an embedded throwaway PostgreSQL. If none can be had the session
fails loudly: never a mock, never a silent skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.settings import Settings, load_settings
from tests.ops_support import ServiceProcess

log = logging.getLogger("tests")


def _docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        client.ping()
        return True
    except Exception:  # any failure means "no engine here"
        return False


@contextlib.contextmanager
def _postgres_server() -> Iterator[str]:
    """Yield an admin URL of a PostgreSQL server for the whole session."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        log.info("using TEST_DATABASE_URL")
        yield url
        return
    if _docker_engine_answers():
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer("postgres:17", driver=None) as container:
            yield container.get_connection_url()
        return
    from enrollment_service.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="enrollment-test-pg-"))
    server = EmbeddedPostgres(data_dir / "data")
    try:
        server.start(fsync="off", synchronous_commit="off", full_page_writes="off")
    except Exception as error:
        pytest.fail(
            "No PostgreSQL for the tests: TEST_DATABASE_URL is unset, no Docker engine answers, "
            f"and the embedded server failed to start: {error}",
            pytrace=False,
        )
    try:
        yield server.url
    finally:
        server.destroy()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    prefix = base.rsplit("/", 1)[0]
    return f"{prefix}/{name}" + (f"?{query}" if query else "")


ServeFactory = Callable[..., Awaitable[ServiceProcess]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[ServeFactory]:
    """`await serve(database_url, **settings)`: `enrollment-service serve` with those settings,
    ready for requests. Every process a test starts is stopped afterwards, whatever happened."""
    started: list[ServiceProcess] = []

    async def start(database_url: str, **settings: str) -> ServiceProcess:
        service = ServiceProcess(database_url, tmp_path, **settings).start()
        started.append(service)
        await asyncio.to_thread(service.wait_until_ready)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    with _postgres_server() as url:
        yield url


class DatabaseFactory:
    """Creates throwaway databases on the session's server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    async def create(self, prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return _with_database(self.admin_url, name)

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for name in self.created:
                await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()


@pytest.fixture(scope="session")
async def database_factory(postgres_server: str) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(postgres_server)
    yield factory
    await factory.drop_all()


@pytest.fixture(scope="session")
async def database_url(database_factory: DatabaseFactory) -> str:
    """A fresh database for the session, with every migration applied."""
    url = await database_factory.create("enrollment")
    migrations.apply(url)
    return url


@pytest.fixture(scope="session")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool of the tests' own, to arrange and inspect rows directly."""
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as pool:
        yield pool


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings(environ={}, pool_max_size=20)


@pytest.fixture(scope="session")
async def app(settings: Settings, database_url: str) -> AsyncIterator[Service]:
    service = create_app(settings, database_url)
    async with LifespanManager(service):
        yield service


@pytest.fixture
async def clean_tables(pool: asyncpg.Pool) -> None:
    await pool.execute("truncate student_courses, students, courses")


@pytest.fixture
async def client(app: Service, clean_tables: None) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the real app, its lifespan running, on freshly emptied tables."""
    # The app itself, not LifespanManager's wrapper: that one would share one scope state dict
    # across requests, which no real server does.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://enrollment") as client:
        yield client


# --- Small factories, so tests arrange through the API in one line. ------------------------


async def create_student(
    client: httpx.AsyncClient, name: str = "Ada Lovelace", email: str | None = None
) -> dict[str, Any]:
    email = email or f"student-{uuid.uuid4().hex[:10]}@example.org"
    response = await client.post("/students", json={"name": name, "email": email})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def create_course(
    client: httpx.AsyncClient, code: str | None = None, capacity: int | None = None, **fields: Any
) -> dict[str, Any]:
    payload = {
        "code": code or f"C{uuid.uuid4().hex[:8]}",
        "name": fields.pop("name", "Intro to CS"),
        "level": fields.pop("level", "beginner"),
        "capacity": capacity,
        **fields,
    }
    response = await client.post("/courses", json=payload)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def enroll(client: httpx.AsyncClient, student_id: int, course_id: int) -> httpx.Response:
    return await client.post(f"/students/{student_id}/courses", json={"course_id": course_id})


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is the contract's problem document with this status and slug."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["type"].rsplit("/", 1)[-1] == slug
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body


def error_fields(response: httpx.Response) -> set[str]:
    body = assert_problem(response, 400, "validation-error")
    return {error["field"] for error in body["errors"]}
