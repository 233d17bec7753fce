"""The embedded PostgreSQL of `dev` and the tests: TCP logins need the generated password kept
in the data folder, the folder keeps it across restarts, a folder an older version initialised
with `trust` gets one, and no permission outside the data folder changes, even as root with
the folder under a parent closed to the server's user."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from enrollment_service.embedded import (
    BINARY_CACHE,
    PASSWORD_FILE,
    PGSERVER_TREES,
    SERVER_USER,
    EmbeddedPostgres,
    _bin_dir,
    reachable_bin_dir,
)

FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@pytest.fixture
def closed_parent() -> Iterator[Path]:
    """A folder only root (or the test's own user) may enter, as /root is: mode 0700."""
    parent = Path(tempfile.mkdtemp(prefix="enrollment-embedded-"))
    assert _mode(parent) == 0o700
    yield parent
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def servers() -> Iterator[list[EmbeddedPostgres]]:
    """Every server a test appends is stopped afterwards."""
    started: list[EmbeddedPostgres] = []
    yield started
    for server in started:
        server.stop(mode="immediate")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _without_password(server: EmbeddedPostgres) -> str:
    return f"postgresql://postgres@127.0.0.1:{server.port}/postgres"


def _ancestors(path: Path) -> dict[Path, tuple[int, int, int]]:
    """Mode, owner and group of every folder above `path`, up to /."""
    return {
        parent: (parent.stat().st_mode, parent.stat().st_uid, parent.stat().st_gid)
        for parent in path.parents
    }


async def _refused_without_password(server: EmbeddedPostgres) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(_without_password(server))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(_without_password(server).replace("postgres@", "postgres:guess@"))


async def test_tcp_needs_the_password_that_the_url_carries(
    closed_parent: Path, servers: list[EmbeddedPostgres]
) -> None:
    server = EmbeddedPostgres(closed_parent / "data")
    servers.append(server.start(**FAST))

    await _refused_without_password(server)
    conn = await asyncpg.connect(server.url)
    try:
        assert await conn.fetchval("select current_user") == "postgres"
    finally:
        await conn.close()


async def test_the_password_is_a_0600_file_in_the_data_folder_and_no_login_is_trusted(
    closed_parent: Path, servers: list[EmbeddedPostgres]
) -> None:
    data_dir = closed_parent / "data"
    servers.append(EmbeddedPostgres(data_dir).start(**FAST))

    password_file = data_dir / PASSWORD_FILE
    assert _mode(password_file) == 0o600
    assert password_file.stat().st_uid == data_dir.stat().st_uid
    password = password_file.read_text().strip()
    assert len(password) >= 32
    assert f":{password}@" in servers[0].url
    hba = [
        line.split()
        for line in (data_dir / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert hba
    assert {fields[-1] for fields in hba} == {"scram-sha-256"}
    assert {fields[0] for fields in hba} == {"host"}


async def test_a_restart_of_the_same_folder_keeps_the_password_and_the_data(
    closed_parent: Path, servers: list[EmbeddedPostgres]
) -> None:
    data_dir = closed_parent / "data"
    first = EmbeddedPostgres(data_dir).start(**FAST)
    servers.append(first)
    conn = await asyncpg.connect(first.url)
    await conn.execute("create table kept (note text); insert into kept values ('still here')")
    await conn.close()
    first.stop()

    again = EmbeddedPostgres(data_dir, port=first.port)
    servers.append(again.start(**FAST))

    assert again.url == first.url
    conn = await asyncpg.connect(again.url)
    try:
        assert await conn.fetchval("select note from kept") == "still here"
    finally:
        await conn.close()
    await _refused_without_password(again)


async def test_no_permission_outside_the_data_folder_changes(
    closed_parent: Path, servers: list[EmbeddedPostgres]
) -> None:
    data_dir = closed_parent / "nested" / "data"
    data_dir.parent.mkdir(mode=0o700)
    bin_dir = _bin_dir()
    before = {**_ancestors(data_dir), **_ancestors(bin_dir / "postgres")}

    server = EmbeddedPostgres(data_dir)
    servers.append(server.start(**FAST))
    conn = await asyncpg.connect(server.url)
    await conn.close()
    server.stop()

    assert {**_ancestors(data_dir), **_ancestors(bin_dir / "postgres")} == before
    assert _mode(closed_parent) == 0o700


async def test_a_folder_initialised_with_trust_gets_a_password_on_start(
    closed_parent: Path, servers: list[EmbeddedPostgres]
) -> None:
    data_dir = closed_parent / "data"
    legacy = EmbeddedPostgres(data_dir)
    # What the older version did: initdb --auth=trust, no password, started and used as is.
    legacy._pg("initdb", "-D", legacy._pgdata, "-U", "postgres", "--auth=trust", "--locale=C")
    options = f"-c port={legacy.port} -c unix_socket_directories="
    log_file = f"{legacy._pgdata}/server.log"
    legacy._pg("pg_ctl", "-D", legacy._pgdata, "-l", log_file, "-o", options, "-w", "start")
    servers.append(legacy)
    conn = await asyncpg.connect(_without_password(legacy))
    await conn.execute("create table kept (note text); insert into kept values ('from trust')")
    await conn.close()
    assert not (data_dir / PASSWORD_FILE).exists()

    upgraded = EmbeddedPostgres(data_dir, port=legacy.port)
    servers.append(upgraded.start(**FAST))

    await _refused_without_password(upgraded)
    assert _mode(data_dir / PASSWORD_FILE) == 0o600
    assert "trust" not in (data_dir / "pg_hba.conf").read_text()
    conn = await asyncpg.connect(upgraded.url)
    try:
        assert await conn.fetchval("select note from kept") == "from trust"
    finally:
        await conn.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_as_root_binaries_the_server_user_cannot_reach_are_run_from_a_copy(
    closed_parent: Path,
) -> None:
    import pwd

    # pgserver's install as it would sit in a checkout under /root: behind a 0700 folder.
    site_packages = _bin_dir().parents[2]
    hidden = closed_parent / "site-packages"
    for tree in ("pgserver", "pgserver.libs"):
        (hidden / tree).parent.mkdir(parents=True, exist_ok=True)
        (hidden / tree).symlink_to(site_packages / tree)
    user = pwd.getpwnam(SERVER_USER)
    run_as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    before = _ancestors(hidden)

    copy = reachable_bin_dir(hidden / PGSERVER_TREES[0], run_as)

    assert copy.is_relative_to(BINARY_CACHE)
    assert (copy / "initdb").exists()
    assert reachable_bin_dir(copy, run_as) == copy
    assert reachable_bin_dir(hidden / PGSERVER_TREES[0], run_as) == copy  # made once
    assert _ancestors(hidden) == before
