"""Applying the plain-SQL migrations of `migrations/` with yoyo, safely from many processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import psycopg
from psycopg.conninfo import conninfo_to_dict
from yoyo import get_backend, read_migrations
from yoyo.exceptions import LockTimeout
from yoyo.migrations import descendants

from enrollment_service.resources import resource_dir

log = logging.getLogger("enrollment_service.migrations")

MIGRATIONS_DIR = resource_dir("migrations")

#: Held (as a PostgreSQL session advisory lock) around all of yoyo's work, so that processes
#: starting at once do not race to create yoyo's own tables, and so that whoever holds it knows
#: every other migrator is either waiting or dead.
ADVISORY_LOCK_KEY = 0x656E726F6C6C  # "enroll"
LOCK_TIMEOUT_SECONDS = 120

#: Waiting for the database to come up: the first delay, and the most any delay grows to.
FIRST_RETRY_DELAY = 0.25
MAX_RETRY_DELAY = 2.0

# Refusals a retry cannot fix: a wrong user or password, no such role, no pg_hba.conf entry,
# no such database.
_FATAL_CONNECT_ERRORS = (
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidCatalogNameError,
)


class MigrationError(RuntimeError):
    """Migrations could not be applied; the message says what the operator should do."""


class Interrupted(SystemExit):
    """SIGTERM or SIGINT arrived while `run` worked. A SystemExit, so that psycopg cancels the
    statement in flight (as it does on Ctrl-C), yoyo rolls back the migration's transaction and
    removes its lock row, and, should it ever escape, the process still exits quietly."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


def migration_ids() -> list[str]:
    """The ids of every migration on disk, in the order they apply."""
    return [migration.id for migration in read_migrations(str(MIGRATIONS_DIR))]


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme: psycopg 3 is the one we ship.
    scheme, _, rest = database_url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        raise MigrationError(f"unsupported database URL scheme {scheme!r}")
    return f"postgresql+psycopg://{rest}"


def _address(database_url: str) -> str:
    """host:port of the URL, for log lines: never the whole URL, which may hold a password."""
    try:
        params = conninfo_to_dict(database_url)
    except psycopg.Error:
        return "the configured address"
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name ({error.strerror})"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno).lower()  # "connection refused", not asyncio's wording
    return str(error) or type(error).__name__


async def _try_connect(database_url: str, within: float) -> None:
    conn = await asyncpg.connect(database_url, timeout=within)
    await conn.close()


def _probe(database_url: str, within: float) -> None:
    """Open and close one connection, raising what asyncpg raised. In a thread of its own, as
    apply() may be called from a thread running an event loop; a daemon, so that a signal that
    stops the wait does not also wait for the attempt."""
    failures: list[BaseException] = []

    def attempt() -> None:
        try:
            asyncio.run(_try_connect(database_url, within))
        except BaseException as error:  # handed to the caller's thread
            failures.append(error)

    thread = threading.Thread(target=attempt, name="migrate-connect", daemon=True)
    thread.start()
    thread.join()
    if failures:
        raise failures[0]


def _wait_for_database(database_url: str, wait_seconds: float) -> None:
    """Return once the database accepts a connection, retrying with capped exponential backoff
    for up to `wait_seconds` (a single attempt when 0): `migrate` may start before PostgreSQL.

    The probe is asyncpg's because it reports a refusal's SQLSTATE (libpq gives psycopg only
    the message text), which tells "not up yet" from a wrong password or database name: those
    will not fix themselves, so they fail at once."""
    address = _address(database_url)
    deadline = time.monotonic() + wait_seconds
    delay = FIRST_RETRY_DELAY
    while True:
        remaining = deadline - time.monotonic()
        try:
            _probe(database_url, within=min(max(remaining, 2.0), 10.0))
            return
        except _FATAL_CONNECT_ERRORS as error:
            hint = (
                "create it, or correct the database name in the URL"
                if isinstance(error, asyncpg.InvalidCatalogNameError)
                else "check the user and password in MIGRATIONS_DATABASE_URL (or DATABASE_URL)"
            )
            raise MigrationError(
                f"cannot connect to the database at {address}: {error}; {hint}"
            ) from None
        except (
            OSError,  # refused, unreachable, a name not resolved yet; TimeoutError is one too
            asyncpg.PostgresError,  # starting up, shutting down, no connection slot left
            asyncpg.ConnectionDoesNotExistError,  # closed by the server mid-handshake
        ) as error:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MigrationError(
                    f"database not reachable at {address} after {wait_seconds:g}s: {_reason(error)}"
                ) from None
            if delay == FIRST_RETRY_DELAY:
                log.info(
                    "database not reachable at %s yet (%s); retrying for up to %gs",
                    address,
                    _reason(error),
                    wait_seconds,
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_RETRY_DELAY)
        except (asyncpg.InterfaceError, ValueError) as error:  # a URL or setting asyncpg refuses
            raise MigrationError(f"cannot connect to the database at {address}: {error}") from None


@contextmanager
def _advisory_lock(database_url: str) -> Iterator[None]:
    # Closing the connection releases the lock, however this block is left: no explicit unlock
    # that could itself fail while an error or a signal is unwinding.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"set lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
        taken = conn.execute("select pg_try_advisory_lock(%s)", (ADVISORY_LOCK_KEY,)).fetchone()
        if not (taken and taken[0]):
            log.info(
                "another migrate holds the migration lock; waiting up to %ds",
                LOCK_TIMEOUT_SECONDS,
            )
            try:
                conn.execute("select pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
            except psycopg.errors.LockNotAvailable:
                raise MigrationError(
                    f"another process held the migration lock for {LOCK_TIMEOUT_SECONDS}s; "
                    "check for a stuck `enrollment-service migrate` and try again"
                ) from None
        yield


@contextmanager
def _backend(database_url: str) -> Iterator[Any]:
    # get_backend creates yoyo_lock when it is missing (a fresh database).
    backend = get_backend(_yoyo_url(database_url))
    try:
        yield backend
    finally:
        backend.connection.close()


def _clear_stale_lock(backend: Any) -> None:
    """Delete yoyo's lock row, if any. Called only under the advisory lock, which every
    migrator takes first: the row's owner is then not running, so the row was left by a
    migrate that was killed mid-run, and would otherwise block every later one."""
    with backend.transaction():
        rows = backend.execute("delete from yoyo_lock returning pid, ctime").fetchall()
    for pid, ctime in rows:
        log.warning(
            "removed a stale migration lock left by process %s at %s UTC (killed mid-run); "
            "its migration, if any, was rolled back with its transaction",
            pid,
            ctime,
        )


@contextmanager
def _locked(database_url: str, connect_timeout: float) -> Iterator[Any]:
    """yoyo's backend, under the advisory lock and yoyo's own lock."""
    _wait_for_database(database_url, connect_timeout)
    with _advisory_lock(database_url), _backend(database_url) as backend:
        _clear_stale_lock(backend)
        try:
            with backend.lock(timeout=LOCK_TIMEOUT_SECONDS):
                yield backend
        except LockTimeout as error:
            # Only a migrator that skips the advisory lock (a hand-run `yoyo`) gets us here.
            raise MigrationError(
                f"{error}. Another tool is migrating this database outside "
                "`enrollment-service migrate`; wait for it and run migrate again"
            ) from None


def apply(
    database_url: str,
    *,
    target: str | None = None,
    migrations_dir: Path = MIGRATIONS_DIR,
    connect_timeout: float = 0.0,
) -> list[str]:
    """Apply every pending migration of `migrations_dir` (or those up to and including
    `target`); return the ids applied. A no-op when the schema is up to date. Waits up to
    `connect_timeout` seconds for the database to accept connections."""
    _yoyo_url(database_url)  # refuse a bad scheme before trying to connect
    migrations = read_migrations(str(migrations_dir))
    if target is not None:
        ids = [m.id for m in migrations]
        if target not in ids:
            raise MigrationError(f"no migration named {target!r}")
        migrations = migrations.filter(lambda m: ids.index(m.id) <= ids.index(target))
    with _locked(database_url, connect_timeout) as backend:
        # The pending list is computed inside the lock: a process that waited for another
        # one's run must see what that run applied.
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    applied = [m.id for m in pending]
    for migration_id in applied:
        log.info("applied migration %s", migration_id)
    return applied


def rollback(
    database_url: str, migration_id: str, *, migrations_dir: Path = MIGRATIONS_DIR
) -> None:
    """Roll back one applied migration and, first, every applied one that depends on it."""
    migrations = read_migrations(str(migrations_dir))
    chosen = [m for m in migrations if m.id == migration_id]
    if not chosen:
        raise MigrationError(f"no migration named {migration_id!r}")
    with _locked(database_url, connect_timeout=0.0) as backend:
        undone_too = descendants(chosen[0], migrations)  # every migration that depends on it
        undone = backend.to_rollback(migrations.filter(lambda m: m is chosen[0] or m in undone_too))
        backend.rollback_migrations(undone)
    for migration in undone:
        log.info("rolled back migration %s", migration.id)


@contextmanager
def _signals_interrupt(signals: tuple[signal.Signals, ...]) -> Iterator[list[int]]:
    """While the block runs, each of `signals` raises Interrupted (in the main thread only:
    elsewhere Python cannot install handlers). Yields the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Interrupted(signum)

    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    for sig in signals:
        previous[sig] = signal.signal(sig, interrupt)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(database_url: str, connect_timeout: float) -> int:
    """`enrollment-service migrate`: wait up to `connect_timeout` seconds for the database,
    apply what is pending, and return the exit status, every failure told in one log line:

    - 0: the schema is up to date;
    - 1: nothing (more) could be applied: database unreachable or refusing us, the migration
      lock held too long, or a migration failed;
    - 143 on SIGTERM (130 on SIGINT): 128 + the signal number, the status a shell reports for
      a process that signal ended, so an orchestrator sees "terminated", not "failed", and,
      being non-zero, nothing gated on a successful migrate starts. The migration in flight
      is rolled back with its transaction, and closing the connection releases the lock.
    """
    with _signals_interrupt((signal.SIGTERM, signal.SIGINT)) as received:
        try:
            applied = apply(database_url, connect_timeout=connect_timeout)
        except (Interrupted, MigrationError, psycopg.Error) as error:
            # Once a signal arrived, what it interrupted may fail in turn (a cancelled
            # statement): the signal is the story.
            if received:
                log.error(
                    "migrate interrupted by %s; nothing half-applied: "
                    "each migration is one transaction",
                    signal.Signals(received[0]).name,
                )
                return 128 + received[0]
            if isinstance(error, MigrationError):
                log.error("%s", error)
            else:
                log.error("migration failed: %s", _one_line(error))
            return 1
    log.info("schema up to date (%d applied now)", len(applied))
    return 0


def _one_line(error: BaseException) -> str:
    sqlstate = getattr(error, "sqlstate", None)
    text = " ".join(str(error).split())
    return f"{text} (SQLSTATE {sqlstate})" if sqlstate else text
