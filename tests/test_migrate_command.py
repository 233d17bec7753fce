"""`enrollment-service migrate` as deployments run it: it waits for a database that is not up
yet, fails fast and in one log line when waiting cannot help, gets past the lock a killed run
left behind, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from enrollment_service import migrations
from enrollment_service.embedded import EmbeddedPostgres
from tests.conftest import DatabaseFactory

INTERRUPTED = (
    "migrate interrupted by SIGTERM; nothing half-applied: each migration is one transaction"
)


class Migrate:
    """`enrollment-service migrate` in a subprocess, its log lines (JSON) collected as they come."""

    def __init__(self, database_url: str, **settings: str) -> None:
        env = {**os.environ, "DATABASE_URL": database_url, "LOG_FORMAT": "json", **settings}
        env.pop("MIGRATIONS_DATABASE_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "enrollment_service", "migrate"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def messages(self, level: str | None = None) -> list[str]:
        records = [json.loads(line) for line in self.lines if line.startswith("{")]
        return [r["msg"] for r in records if level is None or r["level"] == level]

    async def wait_for_message(self, fragment: str, within: float = 30) -> None:
        deadline = time.monotonic() + within
        while not any(fragment in message for message in self.messages()):
            assert self.process.poll() is None, self.output
            assert time.monotonic() < deadline, f"no {fragment!r} in:\n{self.output}"
            await asyncio.sleep(0.05)

    async def finish(self, within: float = 60) -> int:
        returncode = await asyncio.to_thread(self.process.wait, within)
        await asyncio.to_thread(self._reader.join, 5)
        return returncode


@pytest.fixture
def migrate() -> Iterator[type[Migrate]]:
    """The Migrate class; every process a test starts is killed afterwards, whatever happened."""
    started: list[Migrate] = []

    class Tracked(Migrate):
        def __init__(self, database_url: str, **settings: str) -> None:
            super().__init__(database_url, **settings)
            started.append(self)

    yield Tracked
    for run in started:
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()


@pytest.fixture
async def empty_database(database_factory: DatabaseFactory) -> str:
    return await database_factory.create("migrate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _with_address(url: str, host: str, port: int, userinfo: str | None = None) -> str:
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0] if userinfo is None else userinfo
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _applied(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("select migration_id from _yoyo_migration order by 1")
    finally:
        await conn.close()
    return [row["migration_id"] for row in rows]


async def _lock_waiters(conn: asyncpg.Connection, objid: int) -> int:
    """Sessions of this database waiting for the advisory lock whose low 32 bits are `objid`."""
    waiting: int = await conn.fetchval(
        "select count(*) from pg_locks where locktype = 'advisory' and not granted"
        " and objid = $1 and database = (select oid from pg_database"
        " where datname = current_database())",
        objid,
    )
    return waiting


# --- Waiting for the database ------------------------------------------------------------------


async def _forward(listen_port: int, to_host: str, to_port: int) -> asyncio.Server:
    """A TCP forwarder to the real server: the database "comes up" when it starts listening."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(to_host, to_port)
        await asyncio.gather(pipe(reader, server_writer), pipe(server_reader, writer))

    return await asyncio.start_server(connect, "127.0.0.1", listen_port)


async def test_migrate_waits_for_a_database_that_comes_up_late(
    empty_database: str, migrate: type[Migrate]
) -> None:
    real = urlsplit(empty_database)
    assert real.hostname is not None
    assert real.port is not None
    port = _free_port()
    run = migrate(_with_address(empty_database, "127.0.0.1", port), MIGRATE_CONNECT_TIMEOUT="30")

    await run.wait_for_message(f"database not reachable at 127.0.0.1:{port} yet")
    await asyncio.sleep(1)  # a few refused attempts more
    forwarder = await _forward(port, real.hostname, real.port)
    try:
        assert await run.finish() == 0, run.output
    finally:
        forwarder.close()

    assert await _applied(empty_database) == migrations.migration_ids()
    assert "Traceback" not in run.output


async def test_migrate_gives_up_after_MIGRATE_CONNECT_TIMEOUT_in_one_line(
    migrate: type[Migrate],
) -> None:
    port = _free_port()
    url = f"postgresql://app:hunter2-not-for-logs@127.0.0.1:{port}/enrollment"
    started = time.monotonic()
    run = migrate(url, MIGRATE_CONNECT_TIMEOUT="1.5")

    assert await run.finish() == 1, run.output
    assert time.monotonic() - started < 15
    assert run.messages("error") == [
        f"database not reachable at 127.0.0.1:{port} after 1.5s: connection refused"
    ]
    assert "Traceback" not in run.output
    assert "hunter2" not in run.output


async def test_an_unknown_database_fails_at_once_saying_so(
    postgres_server: str, migrate: type[Migrate]
) -> None:
    url = postgres_server.rsplit("/", 1)[0] + "/no_such_database"
    started = time.monotonic()
    run = migrate(url, MIGRATE_CONNECT_TIMEOUT="60")

    assert await run.finish() == 1, run.output
    assert time.monotonic() - started < 15  # not the 60 s of waiting for a database to start
    [error] = run.messages("error")
    assert 'database "no_such_database" does not exist' in error
    assert "create it" in error
    assert "Traceback" not in run.output


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """A PostgreSQL of this module's own, whatever server the session uses: the embedded one,
    which lets nobody in without the superuser's password. Yields that superuser's URL."""
    parent = Path(tempfile.mkdtemp(prefix="enrollment-test-password-"))
    server = EmbeddedPostgres(parent / "data")
    server.start(fsync="off")
    try:
        yield server.url
    finally:
        server.destroy()
        shutil.rmtree(parent, ignore_errors=True)


async def test_a_wrong_password_fails_at_once_saying_so(
    password_server: str, migrate: type[Migrate]
) -> None:
    address = urlsplit(password_server)
    assert address.hostname is not None
    assert address.port is not None
    assert address.username is not None
    assert await _can_connect(password_server)  # only the password will be wrong
    wrong = _with_address(
        password_server, address.hostname, address.port, f"{address.username}:not-the-one"
    )
    started = time.monotonic()
    run = migrate(wrong, MIGRATE_CONNECT_TIMEOUT="60")

    assert await run.finish() == 1, run.output
    assert time.monotonic() - started < 15
    [error] = run.messages("error")
    assert f'password authentication failed for user "{address.username}"' in error
    assert "check the user and password" in error
    assert "Traceback" not in run.output
    assert "not-the-one" not in run.output


async def _can_connect(url: str) -> bool:
    conn = await asyncpg.connect(url)
    await conn.close()
    return True


# --- Locks -------------------------------------------------------------------------------------


def _apply_in_subprocess(database_url: str, migrations_dir: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys, pathlib; from enrollment_service import migrations; "
        "migrations.apply(sys.argv[1], migrations_dir=pathlib.Path(sys.argv[2]))"
    )
    return subprocess.Popen([sys.executable, "-c", code, database_url, str(migrations_dir)])


async def test_a_migrate_killed_mid_run_does_not_block_the_next_one(
    empty_database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # A migration that waits for a lock this test holds: the run can be killed mid-migration,
    # holding both locks, as a node failure or an OOM kill would.
    gate = 4242
    (tmp_path / "0001.waits-for-the-test.sql").write_text(
        f"create table made_by_the_migration (id int);\nselect pg_advisory_xact_lock({gate});\n"
    )
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("select pg_advisory_lock($1)", gate)
        process = _apply_in_subprocess(empty_database, tmp_path)
        try:
            deadline = time.monotonic() + 30
            while await _lock_waiters(conn, gate) == 0:
                assert process.poll() is None
                assert time.monotonic() < deadline, "the migration never started"
                await asyncio.sleep(0.05)
            assert await conn.fetchval("select array_agg(pid) from yoyo_lock") == [process.pid]
        finally:
            process.kill()
            process.wait()
        assert process.returncode == -signal.SIGKILL
        # The server-side session ends (releasing the advisory lock, rolling the migration
        # back) once its statement finishes and it finds the client gone; yoyo's row stays.
        await conn.execute("select pg_advisory_unlock($1)", gate)
        assert await conn.fetchval("select array_agg(pid) from yoyo_lock") == [process.pid]
    finally:
        await conn.close()

    # Without clearing the stale row, this would wait out yoyo's lock timeout and fail.
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT_SECONDS", 30)
    caplog.set_level(logging.INFO, logger="enrollment_service.migrations")
    started = time.monotonic()
    applied = await asyncio.to_thread(migrations.apply, empty_database, migrations_dir=tmp_path)

    assert applied == ["0001.waits-for-the-test"]
    assert time.monotonic() - started < 20
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"removed a stale migration lock left by process {process.pid}" in warning
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("select count(*) from yoyo_lock") == 0
        assert await conn.fetchval("select to_regclass('made_by_the_migration') is not null")
    finally:
        await conn.close()


@pytest.fixture
async def migration_lock_held(empty_database: str) -> AsyncIterator[asyncpg.Connection]:
    """The advisory lock every migrator takes, held by the test, as a stuck migrate would."""
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute("select pg_advisory_lock($1)", migrations.ADVISORY_LOCK_KEY)
        yield conn
    finally:
        await conn.close()


async def test_a_lock_held_too_long_fails_in_one_line(
    empty_database: str,
    migration_lock_held: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
) -> None:
    monkeypatch.setattr(migrations, "LOCK_TIMEOUT_SECONDS", 1)
    caplog.set_level(logging.INFO, logger="enrollment_service.migrations")

    status = await asyncio.to_thread(migrations.run, empty_database, connect_timeout=5)

    assert status == 1
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert messages == [
        ("INFO", "another migrate holds the migration lock; waiting up to 1s"),
        (
            "ERROR",
            "another process held the migration lock for 1s; "
            "check for a stuck `enrollment-service migrate` and try again",
        ),
    ]


# --- SIGTERM -----------------------------------------------------------------------------------


async def test_sigterm_while_waiting_for_the_migration_lock_exits_143_cleanly(
    empty_database: str, migration_lock_held: asyncpg.Connection, migrate: type[Migrate]
) -> None:
    run = migrate(empty_database)
    await run.wait_for_message("another migrate holds the migration lock")
    low_bits = migrations.ADVISORY_LOCK_KEY & 0xFFFFFFFF
    assert await _lock_waiters(migration_lock_held, low_bits) == 1

    run.process.send_signal(signal.SIGTERM)

    assert await run.finish(within=15) == 143, run.output
    assert run.messages("error") == [INTERRUPTED]
    assert "Traceback" not in run.output
    # Its session is gone, waiting no more; it touched nothing.
    assert await _lock_waiters(migration_lock_held, low_bits) == 0
    assert await migration_lock_held.fetchval("select to_regclass('yoyo_lock')") is None


async def test_sigterm_while_waiting_for_the_database_exits_143_cleanly(
    migrate: type[Migrate],
) -> None:
    run = migrate(f"postgresql://app@127.0.0.1:{_free_port()}/enrollment")
    await run.wait_for_message("database not reachable at")

    run.process.send_signal(signal.SIGTERM)

    assert await run.finish(within=15) == 143, run.output
    assert run.messages("error") == [INTERRUPTED]
    assert "Traceback" not in run.output


async def test_sigterm_mid_migration_rolls_it_back_and_exits_143(
    empty_database: str, migrate: type[Migrate]
) -> None:
    await asyncio.to_thread(migrations.apply, empty_database, target="0001.students-and-courses")
    conn = await asyncpg.connect(empty_database)
    try:
        async with conn.transaction():
            # 0002 needs courses: it stops there, inside its transaction, holding both locks.
            await conn.execute("lock table courses in access exclusive mode")
            run = migrate(empty_database)
            deadline = time.monotonic() + 30
            while not await conn.fetchval(
                "select count(*) from pg_locks where relation = 'courses'::regclass and not granted"
            ):
                assert run.process.poll() is None, run.output
                assert time.monotonic() < deadline, run.output
                await asyncio.sleep(0.05)

            run.process.send_signal(signal.SIGTERM)

            assert await run.finish(within=15) == 143, run.output
        assert run.messages("error") == [INTERRUPTED]
        assert "Traceback" not in run.output
        assert await conn.fetchval("select to_regclass('student_courses')") is None
        assert await conn.fetchval("select count(*) from yoyo_lock") == 0
    finally:
        await conn.close()
    assert await _applied(empty_database) == ["0001.students-and-courses"]
    # Nothing is left to get in the way of the next run.
    assert (
        await asyncio.to_thread(migrations.apply, empty_database) == migrations.migration_ids()[1:]
    )
