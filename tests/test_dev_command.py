"""`enrollment-service dev`: needs no configuration, serves on an embedded PostgreSQL that keeps
its data across restarts, and stops everything on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from enrollment_service.embedded import EmbeddedPostgres
from tests.ops_support import free_port


def _start_dev(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    env.pop("HOST", None)  # dev's own default: loopback only
    env.update({"PORT": str(port), "DATA_DIR": str(data_dir)})
    return subprocess.Popen(
        [sys.executable, "-m", "enrollment_service", "dev"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_ready(base: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{base}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"dev server never became ready: {process.communicate()[0]}")


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at `port`, from the kernel's own table."""
    addresses = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                addresses.add(address)
    return addresses


def _interrupt(process: subprocess.Popen[str]) -> str:
    """Ctrl-C in a terminal: SIGINT to the whole foreground process group."""
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    return output


def test_dev_serves_on_embedded_postgres_keeps_data_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    process = _start_dev(data_dir, port)
    try:
        _wait_ready(base, process)
        # 127.0.0.1 only, as the kernel stores it (little-endian hex): not 0.0.0.0 or ::.
        assert _listening_addresses(port) == {"0100007F"}
        created = httpx.post(f"{base}/students", json={"name": "Ada", "email": "ada@example.org"})
        assert created.status_code == 201
    finally:
        output = _interrupt(process)
    assert "embedded PostgreSQL stopped" in output
    assert not EmbeddedPostgres(data_dir).is_running()

    process = _start_dev(data_dir, port)
    try:
        _wait_ready(base, process)
        again = httpx.get(f"{base}/students/{created.json()['id']}")
        assert again.status_code == 200
        assert again.json() == created.json()
    finally:
        _interrupt(process)


def test_the_embedded_postgres_port_is_never_the_api_port() -> None:
    from enrollment_service.__main__ import _dev_postgres_port
    from enrollment_service.settings import load_settings

    for api_port in (8000, 54321, 54000, 54999, 65535):
        settings = load_settings(environ={"PORT": str(api_port)})
        assert _dev_postgres_port(settings) != api_port
        assert _dev_postgres_port(settings) == _dev_postgres_port(settings)


def test_the_embedded_postgres_takes_a_free_port_when_its_own_is_taken() -> None:
    import socket

    from enrollment_service.__main__ import _dev_postgres_port
    from enrollment_service.settings import load_settings

    settings = load_settings(environ={"PORT": "8765"})
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 54765))
        holder.listen()
        assert _dev_postgres_port(settings) is None
    assert _dev_postgres_port(settings) == 54765
