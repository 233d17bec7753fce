"""The command line: `enrollment-service migrate | serve | dev`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.observability import MULTIPROCESS_DIR_VARIABLE, configure_logging
from enrollment_service.settings import (
    DEFAULT_CURSOR_SECRET,
    Settings,
    SettingsError,
    load_settings,
)

log = logging.getLogger("enrollment_service")


class GracefulServer(uvicorn.Server):
    """uvicorn, exiting 0 after a graceful stop: it re-raises the signal once stopped, which
    would make the exit status 143."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serving_app(settings: Settings, database_url: str | None = None) -> Service:
    """The app as `serve` runs it. On SIGTERM or SIGINT: readiness answers 503 at once; the
    server keeps taking connections and requests for SHUTDOWN_DELAY seconds (the load balancer's
    time to notice), then stops listening and drains. The handler is chained onto uvicorn's own,
    which uvicorn installs before the app starts up (and restores when it stops)."""
    service = create_app(settings, database_url)
    delay = settings.shutdown_delay

    def drain_on_signals() -> None:
        loop = asyncio.get_running_loop()
        signalled = False

        for sig in (signal.SIGTERM, signal.SIGINT):
            stop_server = signal.getsignal(sig)

            def drain(signum: int, stop_server: object = stop_server) -> None:
                service.begin_shutdown(settings.shutdown_grace_period)
                if callable(stop_server):
                    stop_server(signum, None)

            def handler(signum: int, frame: FrameType | None, drain: Any = drain) -> None:
                nonlocal signalled
                if signalled and delay > 0:
                    # WORKERS > 1: the supervisor passes the signal on as it gets it, and again
                    # as it stops; the first one started the delay, which runs its course.
                    return
                signalled = True
                log.info("received %s", signal.Signals(signum).name)
                if delay > 0:
                    service.announce_shutdown(delay)
                    loop.call_soon_threadsafe(loop.call_later, delay, drain, signum)
                else:
                    drain(signum)

            signal.signal(sig, handler)

    service.litestar.on_startup.append(drain_on_signals)
    return service


def worker_app() -> Service:
    """What each of WORKERS processes serves; uvicorn imports it by name in every worker, which
    reads the same environment as the parent."""
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return serving_app(settings)


def _uvicorn_config(settings: Settings, app: Service | str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        factory=isinstance(app, str),
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
        # The grace period bounds the requests' database work (Database.drain answers 503 when
        # it ends); uvicorn's own cut-off, a bare 500, comes a second later as a last resort.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_period) + 1,
        timeout_keep_alive=5,
    )


def serve(settings: Settings, database_url: str) -> int:
    if settings.workers > 1:
        return _serve_workers(settings, database_url)
    server = GracefulServer(_uvicorn_config(settings, serving_app(settings, database_url)))
    server.run()
    return 0 if server.started else 1


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, with the shutdown `serve` promises. On SIGTERM or SIGINT it passes
    the signal to every worker at once (uvicorn would only after its next half-second tick), so
    each turns readiness to 503 and starts its SHUTDOWN_DELAY together; and it closes its own
    copy of the listening socket when that delay ends, as the workers close theirs: kept
    longer, new connections would be accepted by the kernel, never served, and reset at exit
    instead of being refused."""

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], shutdown_delay: float
    ) -> None:
        super().__init__(config, sockets)
        self._shutdown_delay = shutdown_delay
        self._listen_until: float | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        if self._listen_until is None:
            self._listen_until = time.monotonic() + self._shutdown_delay
            for process in self.processes:
                # Not process.terminate(): that also closes the pipes the supervisor's loop may
                # be pinging the worker through at this very moment.
                if process.pid is not None and process.exitcode is None:
                    os.kill(process.pid, signal.SIGTERM)
            if self._shutdown_delay <= 0:
                self._stop_listening()
        self.signal_queue.append(sig)  # what uvicorn's own handler does

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()

    def terminate_all(self) -> None:
        if self._listen_until is None:  # stopping for another reason than a signal
            self._stop_listening()
            super().terminate_all()
            return
        time.sleep(max(0.0, self._listen_until - time.monotonic()))
        self._stop_listening()


def _serve_workers(settings: Settings, database_url: str) -> int:
    """WORKERS processes on one listening socket, under uvicorn's supervisor, which restarts a
    worker that dies and passes SIGTERM/SIGINT on to every worker (each drains as above)."""
    # The workers are fresh interpreters that read the environment: give them what this
    # process resolved (`dev` picks the database and the log format itself).
    os.environ["DATABASE_URL"] = database_url
    os.environ["LOG_FORMAT"] = settings.log_format
    # A fresh folder per run for prometheus_client's per-process metric files, so that /metrics
    # sums every worker's (a folder left from an earlier run would add its counts).
    metrics_dir = tempfile.mkdtemp(prefix="enrollment-service-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = metrics_dir
    try:
        config = _uvicorn_config(settings, "enrollment_service.__main__:worker_app")
        supervisor = _Supervisor(
            config, sockets=[config.bind_socket()], shutdown_delay=settings.shutdown_delay
        )
        log.info("serving with %d worker processes", settings.workers)
        supervisor.run()
    finally:
        os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        return 1
    return 0


def warn_about_unsafe_defaults(settings: Settings) -> None:
    """Once at start-up: the defaults that suit `dev` but not a service others can reach."""
    if not settings.api_tokens:
        log.warning("API_TOKENS is not set: every endpoint answers without authentication")
    if settings.cursor_secret == DEFAULT_CURSOR_SECRET:
        log.warning(
            "CURSOR_SECRET is the built-in value: anyone can forge pagination cursors; "
            "set the same secret on every replica"
        )


def migrate(settings: Settings) -> int:
    url = settings.migrations_url
    if url is None:
        log.error("DATABASE_URL (or MIGRATIONS_DATABASE_URL) must be set to migrate")
        return 2
    return migrations.run(url, connect_timeout=settings.migrate_connect_timeout)


def dev(settings: Settings) -> int:
    """Serve on the embedded PostgreSQL (unless DATABASE_URL is set), migrated first."""
    if settings.database_url is not None:
        return migrate(settings) or serve(settings, settings.database_url)
    from enrollment_service.embedded import EmbeddedPostgres

    postgres = EmbeddedPostgres(settings.data_dir, port=_dev_postgres_port(settings))
    postgres.start()
    log.info("embedded PostgreSQL data in %s (survives restarts)", settings.data_dir)
    try:
        migrations.apply(postgres.url)
        return serve(settings, postgres.url)
    finally:
        postgres.stop()
        log.info("embedded PostgreSQL stopped")


def _dev_postgres_port(settings: Settings) -> int | None:
    """A port derived from the API's, so that the server's address is the same run after run
    (never the API's own: PORT=54321 would otherwise give PostgreSQL 54321 as well); any free
    one when another program holds it."""
    port = 54000 + settings.port % 1000
    port = port if port != settings.port else port + 1000
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            log.info("port %d is taken: the embedded PostgreSQL takes a free one", port)
            return None
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enrollment-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending migrations to DATABASE_URL, then exit")
    commands.add_parser("serve", help="serve the API on HOST:PORT against DATABASE_URL")
    commands.add_parser("dev", help="serve on an embedded PostgreSQL; needs no configuration")
    args = parser.parse_args(argv)

    try:
        # `dev` is read by a person: readable logs unless LOG_FORMAT says otherwise.
        # `dev` is for the person at this machine: listen on loopback unless HOST says otherwise.
        dev_defaults = {"log_format": "text", "host": "127.0.0.1"}
        settings = load_settings(defaults=dev_defaults if args.command == "dev" else {})
    except SettingsError as error:
        print(f"enrollment-service: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    if args.command == "migrate":
        return migrate(settings)
    if args.command == "serve":
        if settings.database_url is None:
            print("enrollment-service: DATABASE_URL: must be set to serve", file=sys.stderr)
            return 2
        warn_about_unsafe_defaults(settings)
        return serve(settings, settings.database_url)
    return dev(settings)


if __name__ == "__main__":
    sys.exit(main())
