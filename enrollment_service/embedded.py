"""An embedded PostgreSQL for `enrollment-service dev`, the tests and the benchmark.

It runs the server binaries that the `pgserver` wheel ships, on 127.0.0.1 and a free port, in a
data folder of our choosing. PostgreSQL refuses to run as root, so as root (CI, containers) the
server runs as the unprivileged user `pgserver` creates for that purpose.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("enrollment_service.embedded")

SYSTEM_BIN_DIRS = (Path("/usr/lib/postgresql/16/bin"), Path("/usr/lib/postgresql/15/bin"))
SERVER_USER = "pgserver"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be found, initialised or started."""


def _bin_dir() -> Path:
    candidates = list(SYSTEM_BIN_DIRS)
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.insert(0, Path(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    for candidate in candidates:
        if (candidate / "pg_ctl").exists() and (candidate / "initdb").exists():
            return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL binaries found: install the 'pgserver' package "
        "(pip install 'enrollment-service[embedded]') or set DATABASE_URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedPostgres:
    """One PostgreSQL server in `data_dir`, reachable at `url` while running."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or _free_port()
        self.bin_dir = _bin_dir()
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._prepare_for_root()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_for_root(self) -> None:
        import pwd

        try:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists
        except ImportError as error:
            raise EmbeddedPostgresError("running as root needs the 'pgserver' package") from error
        ensure_user_exists(SERVER_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(self.bin_dir)
        user = pwd.getpwnam(SERVER_USER)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self._run_as = {"user": user.pw_uid, "group": user.pw_gid}

    def _pg(self, program: str, *args: str, timeout: float = 60) -> None:
        command = [str(self.bin_dir / program), *args]
        # A session of its own: Ctrl-C in the terminal reaches our process, which then stops
        # PostgreSQL cleanly, instead of reaching the server directly mid-request.
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
            **self._run_as,
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{program} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log.info("initialising embedded PostgreSQL in %s", self.data_dir)
        self._pg(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        )

    def is_running(self) -> bool:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text().split("\n", 1)[0]), 0)
        except (ValueError, ProcessLookupError):
            return False
        except PermissionError:
            return True
        return True

    def start(self, **settings: str) -> EmbeddedPostgres:
        """Initialise if needed and start; `settings` become `-c name=value` server options."""
        self.init()
        if self.is_running():
            self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            **settings,
        }
        server_options = " ".join(f"-c {name}={value}" for name, value in options.items())
        self._pg(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            server_options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._wait_until_accepting()
        log.info("embedded PostgreSQL listening on 127.0.0.1:%d", self.port)
        return self

    def _wait_until_accepting(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise EmbeddedPostgresError(f"PostgreSQL did not accept connections on port {self.port}")

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._pg("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
