"""Applying the plain-SQL migrations of `migrations/` with yoyo, safely from many processes."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from yoyo import get_backend, read_migrations
from yoyo.exceptions import LockTimeout

from enrollment_service.resources import resource_dir

log = logging.getLogger("enrollment_service.migrations")

MIGRATIONS_DIR = resource_dir("migrations")

#: Held (as a PostgreSQL session advisory lock) around all of yoyo's work, so that processes
#: starting at once do not race to create yoyo's own tables; yoyo's row lock guards the rest.
ADVISORY_LOCK_KEY = 0x656E726F6C6C  # "enroll"
LOCK_TIMEOUT_SECONDS = 120


class MigrationError(RuntimeError):
    """Migrations could not be applied; the message says what the operator should do."""


def migration_ids() -> list[str]:
    """The ids of every migration on disk, in the order they apply."""
    return [migration.id for migration in read_migrations(str(MIGRATIONS_DIR))]


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme: psycopg 3 is the one we ship.
    scheme, _, rest = database_url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        raise MigrationError(f"unsupported database URL scheme {scheme!r}")
    return f"postgresql+psycopg://{rest}"


@contextmanager
def _advisory_lock(database_url: str) -> Iterator[None]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"set lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
        try:
            conn.execute("select pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        except psycopg.errors.LockNotAvailable:
            raise MigrationError(
                f"another process held the migration lock for {LOCK_TIMEOUT_SECONDS}s; "
                "check for a stuck `enrollment-service migrate` and try again"
            ) from None
        try:
            yield
        finally:
            conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))


@contextmanager
def _backend(database_url: str) -> Iterator[Any]:
    backend = get_backend(_yoyo_url(database_url))
    try:
        yield backend
    finally:
        backend.connection.close()


def apply(database_url: str, *, target: str | None = None) -> list[str]:
    """Apply every pending migration (or those up to and including `target`); return the ids
    applied. A no-op when the schema is up to date."""
    migrations = read_migrations(str(MIGRATIONS_DIR))
    if target is not None:
        ids = [m.id for m in migrations]
        if target not in ids:
            raise MigrationError(f"no migration named {target!r}")
        migrations = migrations.filter(lambda m: ids.index(m.id) <= ids.index(target))
    with _advisory_lock(database_url), _backend(database_url) as backend:
        try:
            with backend.lock(timeout=LOCK_TIMEOUT_SECONDS):
                # The pending list is computed inside the lock: a process that waited for
                # another one's run must see what that run applied.
                pending = backend.to_apply(migrations)
                backend.apply_migrations(pending)
        except LockTimeout as error:
            raise MigrationError(
                f"{error}. If no migration is running, a killed run left its lock behind: "
                "remove it with `yoyo break-lock --database <url>` and run migrate again"
            ) from None
    applied = [m.id for m in pending]
    for migration_id in applied:
        log.info("applied migration %s", migration_id)
    return applied


def rollback(database_url: str, migration_id: str) -> None:
    """Roll back one applied migration (and any that depend on it)."""
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with (
        _advisory_lock(database_url),
        _backend(database_url) as backend,
        backend.lock(timeout=LOCK_TIMEOUT_SECONDS),
    ):
        chosen = backend.to_rollback(migrations.filter(lambda m: m.id == migration_id))
        backend.rollback_migrations(chosen)
    log.info("rolled back migration %s", migration_id)


def run(database_url: str, connect_timeout: float) -> int:
    """`enrollment-service migrate`: apply what is pending; the exit status for the command."""
    try:
        applied = apply(database_url)
    except MigrationError as error:
        log.error("migration failed: %s", error)
        return 1
    log.info("schema up to date (%d applied now)", len(applied))
    return 0
