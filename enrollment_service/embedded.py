"""An embedded PostgreSQL for `enrollment-service dev`, the tests and the benchmark.

It runs the server binaries that the `pgserver` wheel ships, on 127.0.0.1 and a free port, in a
data folder of our choosing. Nothing gets in without a password: the superuser's is generated
when the folder is initialised and kept inside it (`PASSWORD_FILE`), and `url` carries it.

PostgreSQL refuses to run as root, so as root (CI, containers) the server runs as the
unprivileged user `pgserver` creates for that purpose, and no permission outside the data folder
is changed for it: the server runs inside its folder and names it `/proc/self/cwd` (so the
folder's parents may stay closed to that user, as /root is), and where the user cannot reach the
binaries it runs a copy of them in `BINARY_CACHE`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

log = logging.getLogger("enrollment_service.embedded")

SYSTEM_BIN_DIRS = (Path("/usr/lib/postgresql/16/bin"), Path("/usr/lib/postgresql/15/bin"))
SERVER_USER = "pgserver"
SUPERUSER = "postgres"
#: The superuser's password, inside the data folder (mode 0600), read by `url`.
PASSWORD_FILE = "enrollment-service.password"  # noqa: S105 - the file's name
#: Where, as root, the binaries are copied (once per build) when the server's user cannot
#: reach pgserver's own, e.g. in a checkout under /root.
BINARY_CACHE = Path("/var/cache/enrollment-service")
#: What of pgserver's wheel the server needs, relative to site-packages: the binaries, their
#: libraries and data, and the libpq that auditwheel put beside the package.
PGSERVER_TREES = (
    "pgserver/pginstall/bin",
    "pgserver/pginstall/lib",
    "pgserver/pginstall/share",
    "pgserver.libs",
)

#: TCP from this machine only, with a password; no line for the Unix socket, which is off.
PG_HBA = """\
# Written by enrollment-service: TCP from this machine only, with the superuser's password (kept
# in enrollment-service.password beside this file). No Unix socket is opened.
# TYPE  DATABASE  USER  ADDRESS       METHOD
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


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


def _runs(bin_dir: Path, run_as: dict[str, Any]) -> bool:
    """Whether the server's user can run the binaries in `bin_dir` (reach and execute them)."""
    try:
        result = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            timeout=30,
            check=False,
            **run_as,
        )
    except OSError:
        return False
    return result.returncode == 0


def reachable_bin_dir(bin_dir: Path, run_as: dict[str, Any]) -> Path:
    """`bin_dir` if the server's user can run it; else a copy of pgserver's install in
    `BINARY_CACHE`, made once per build and shared by every data folder."""
    if _runs(bin_dir, run_as):
        return bin_dir
    if bin_dir.parts[-3:] != tuple(PGSERVER_TREES[0].split("/")):
        raise EmbeddedPostgresError(
            f"user {SERVER_USER!r} cannot run the PostgreSQL binaries in {bin_dir}"
        )
    site_packages = bin_dir.parents[2]
    digest = hashlib.sha256((bin_dir / "postgres").read_bytes()).hexdigest()[:16]
    target = BINARY_CACHE / f"pgserver-{digest}"
    if not (target / PGSERVER_TREES[0]).is_dir():
        started = time.monotonic()
        BINARY_CACHE.mkdir(parents=True, exist_ok=True)
        BINARY_CACHE.chmod(0o755)  # ours: open to the server's user whatever root's umask
        staging = Path(tempfile.mkdtemp(prefix=".copying-", dir=BINARY_CACHE))
        try:
            for tree in PGSERVER_TREES:
                if (site_packages / tree).is_dir():
                    shutil.copytree(
                        site_packages / tree,
                        staging / tree,
                        symlinks=True,
                        ignore=shutil.ignore_patterns("*.a"),
                    )
            # Folders open to the server's user whatever root's umask; files keep their modes.
            for folder, _, _ in os.walk(staging):
                os.chmod(folder, 0o755)  # noqa: S103 - binaries for another user
            # Atomic, so that servers starting at the same time never run a half-made copy.
            staging.rename(target)
        except OSError:
            if not (target / PGSERVER_TREES[0]).is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "copied the PostgreSQL binaries to %s (%.1fs): user %r cannot reach %s",
            target,
            time.monotonic() - started,
            SERVER_USER,
            bin_dir,
        )
    copy = target / PGSERVER_TREES[0]
    if not _runs(copy, run_as):
        raise EmbeddedPostgresError(f"user {SERVER_USER!r} cannot run the binaries in {copy}")
    return copy


class EmbeddedPostgres:
    """One PostgreSQL server in `data_dir`, reachable at `url` while running."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or _free_port()
        self.bin_dir = _bin_dir()
        #: The data folder as the server's programs name it.
        self._pgdata = str(self.data_dir)
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._prepare_for_root()

    @property
    def password_file(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    @property
    def url(self) -> str:
        """The superuser's URL, password included; known once the server has been started."""
        try:
            password = self.password_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError as error:
            raise EmbeddedPostgresError(f"{self.data_dir} has no password yet: start it") from error
        quoted = urllib.parse.quote(password, safe="")
        return f"postgresql://{SUPERUSER}:{quoted}@127.0.0.1:{self.port}/postgres"

    def _prepare_for_root(self) -> None:
        import pwd

        try:
            from pgserver.utils import ensure_user_exists
        except ImportError as error:
            raise EmbeddedPostgresError("running as root needs the 'pgserver' package") from error
        if not Path("/proc/self/cwd").exists():
            raise EmbeddedPostgresError("running as root needs Linux's /proc")
        ensure_user_exists(SERVER_USER)
        user = pwd.getpwnam(SERVER_USER)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        # The child changes into the data folder while still root, then drops to the user; the
        # kernel resolves /proc/self/cwd without checking the folder's parents, so they need
        # not be opened to that user. No supplementary groups: not root's.
        self._run_as = {
            "user": user.pw_uid,
            "group": user.pw_gid,
            "extra_groups": [],
            "umask": 0o077,
            "cwd": self.data_dir,
        }
        self._pgdata = "/proc/self/cwd"
        self.bin_dir = reachable_bin_dir(self.bin_dir, self._run_as)

    def _pg(self, program: str, *args: str, timeout: float = 60, stdin: str | None = None) -> str:
        command = [str(self.bin_dir / program), *args]
        # A session of its own: Ctrl-C in the terminal reaches our process, which then stops
        # PostgreSQL cleanly, instead of reaching the server directly mid-request.
        result: subprocess.CompletedProcess[str] = subprocess.run(
            command,
            input=stdin,
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
        return result.stdout + result.stderr

    def init(self) -> None:
        """Initialise the data folder if it is new, and give it a password if it has none."""
        if not (self.data_dir / "PG_VERSION").exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            log.info("initialising embedded PostgreSQL in %s", self.data_dir)
            # Every login refused until _set_password() opens TCP to the password.
            self._pg(
                "initdb",
                "-D",
                self._pgdata,
                "-U",
                SUPERUSER,
                "--auth=reject",
                "--encoding=UTF8",
                "--locale=C",
            )
        if not self.password_file.exists():
            self._set_password()

    def _set_password(self) -> None:
        """A generated password for the superuser, then TCP logins with it only. Also upgrades a
        folder that an older version initialised with `trust` and no password. The server must
        be stopped: single-user mode needs no login, and leaves no moment without a password."""
        log.info("setting a generated superuser password in %s", self.password_file)
        password = secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: nothing to escape in SQL or URLs
        output = self._pg(
            "postgres",
            "--single",
            "-D",
            self._pgdata,
            "postgres",
            stdin=f"alter role {SUPERUSER} password '{password}'\n",
        )
        if "ERROR:" in output or "FATAL:" in output:
            shown = output.replace(password, "...")
            raise EmbeddedPostgresError(f"could not set the superuser's password: {shown}")
        self._write_private("pg_hba.conf", PG_HBA)
        # Last: its presence means the password is set and required.
        self._write_private(PASSWORD_FILE, password + "\n")

    def _write_private(self, name: str, text: str) -> None:
        """Replace `name` in the data folder atomically, mode 0600, owned by the server's user.
        O_EXCL: as root, never follow a link that user may have left in its own folder."""
        path = self.data_dir / name
        temporary = path.with_name(f"{name}.new")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            if self._run_as:
                os.fchown(fd, self._run_as["user"], self._run_as["group"])
            file.write(text)
        os.replace(temporary, path)

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
        if self.is_running():
            self._pg("pg_ctl", "-D", self._pgdata, "-m", "fast", "-w", "stop")
        self.init()
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
            self._pgdata,
            "-l",
            f"{self._pgdata}/server.log",
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
            self._pg("pg_ctl", "-D", self._pgdata, "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
