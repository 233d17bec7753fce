"""Running the service under test: by default exactly as production does (`enrollment-service
serve`, production settings), or as a variant (uvicorn or granian with N workers) for the
comparison that chose the production configuration."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True)
class Variant:
    """How the service is served: `serve` is the production command; `uvicorn` and `granian`
    serve `bench.asgi:app` with `workers` processes."""

    server: str = "serve"
    workers: int = 1
    pool_min: int | None = None
    pool_max: int | None = None

    @property
    def label(self) -> str:
        pool = f", pool {self.pool_max}" if self.pool_max else ""
        return f"{self.server} x{self.workers}{pool}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(variant: Variant, port: int) -> list[str]:
    if variant.server == "serve":
        return [str(BIN / "enrollment-service"), "serve"]  # WORKERS is set in the environment
    if variant.server == "uvicorn":
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.asgi:app",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--workers={variant.workers}",
            "--loop=uvloop",
            "--http=httptools",
            "--no-access-log",
            "--no-server-header",
            "--timeout-keep-alive=5",
        ]
    if variant.server == "granian":
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface=asgi",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--workers={variant.workers}",
            "--loop=uvloop",
            "--http=1",
            "--no-ws",
            "bench.asgi:app",
        ]
    raise ValueError(f"unknown server {variant.server!r}")


class Service:
    """One running service process (tree) on 127.0.0.1 and a free port."""

    def __init__(self, database_url: str, variant: Variant, log: IO[bytes]) -> None:
        self.port = _free_port()
        self.variant = variant
        # Production's logging (one JSON access-log line per request) unless the caller's
        # environment says otherwise, e.g. LOG_LEVEL=WARNING to measure what logging costs.
        env = {"LOG_FORMAT": "json", "LOG_LEVEL": "INFO", **os.environ}
        env.update(DATABASE_URL=database_url, HOST="127.0.0.1", PORT=str(self.port))
        if variant.pool_min is not None:
            env["DB_POOL_MIN_SIZE"] = str(variant.pool_min)
        if variant.pool_max is not None:
            env["DB_POOL_MAX_SIZE"] = str(variant.pool_max)
        if variant.server == "serve":
            env["WORKERS"] = str(variant.workers)
        self.process = subprocess.Popen(
            _command(variant, self.port),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with status {self.process.returncode}")
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                connection.request("GET", "/health/ready")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            finally:
                connection.close()
            time.sleep(0.1)
        raise RuntimeError("the service did not become ready")

    def tree(self) -> list[int]:
        """The service's process and its descendants (workers)."""
        parents: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(parents.get(pid, []))
        return found

    def peak_rss_mb(self) -> list[float]:
        """Peak resident memory (VmHWM) of each process that serves requests: the one process of
        a one-process server, or each worker of a multi-worker one."""
        peaks: dict[int, float] = {}
        for pid in self.tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" in command:
                continue  # multiprocessing's helper, not a worker
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = round(int(line.split()[1]) / 1024, 1)
        workers = [mb for pid, mb in peaks.items() if pid != self.process.pid]
        if self.variant.workers == 1 or not workers:
            return [peaks.get(self.process.pid, 0.0)]
        return workers

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode
