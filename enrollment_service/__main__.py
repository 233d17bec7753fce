"""The command line: `enrollment-service migrate | serve | dev`."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
from types import FrameType

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.observability import MULTIPROCESS_DIR_VARIABLE, configure_logging
from enrollment_service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("enrollment_service")


class GracefulServer(uvicorn.Server):
    """uvicorn, exiting 0 after a graceful stop: it re-raises the signal once stopped, which
    would make the exit status 143."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serving_app(settings: Settings, database_url: str | None = None) -> Service:
    """The app as `serve` runs it: on SIGTERM or SIGINT it begins a graceful shutdown before
    uvicorn stops taking requests. The handler is chained onto uvicorn's own, which uvicorn
    installs before the app starts up (and restores when it stops)."""
    service = create_app(settings, database_url)

    def drain_on_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            chained = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, chained: object = chained) -> None:
                log.info("received %s", signal.Signals(signum).name)
                service.begin_shutdown(settings.shutdown_grace_period)
                if callable(chained):
                    chained(signum, frame)

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
    """uvicorn's supervisor, closing its own copy of the listening socket the moment SIGTERM or
    SIGINT arrives (uvicorn reads its signal queue only every half second, and keeps the socket
    until the workers exit): otherwise, while the workers drain, new connections are accepted by
    the kernel, never served, and reset at exit instead of being refused at once."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stop_listening()
        self.signal_queue.append(sig)  # what uvicorn's own handler does

    def _stop_listening(self) -> None:
        for sock in self.sockets:
            sock.close()

    def terminate_all(self) -> None:
        self._stop_listening()
        super().terminate_all()


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
        supervisor = _Supervisor(config, sockets=[config.bind_socket()])
        log.info("serving with %d worker processes", settings.workers)
        supervisor.run()
    finally:
        os.environ.pop(MULTIPROCESS_DIR_VARIABLE, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(worker.exitcode == STARTUP_FAILURE for worker in supervisor.processes):
        return 1
    return 0


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


def _dev_postgres_port(settings: Settings) -> int:
    # A fixed port derived from the API's, so a restart finds the same server address; never
    # the API's own port (PORT=54321 would otherwise give PostgreSQL 54321 as well).
    port = 54000 + settings.port % 1000
    return port if port != settings.port else port + 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enrollment-service", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending migrations to DATABASE_URL, then exit")
    commands.add_parser("serve", help="serve the API on HOST:PORT against DATABASE_URL")
    commands.add_parser("dev", help="serve on an embedded PostgreSQL; needs no configuration")
    args = parser.parse_args(argv)

    try:
        # `dev` is read by a person: readable logs unless LOG_FORMAT says otherwise.
        settings = load_settings(defaults={"log_format": "text"} if args.command == "dev" else {})
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
        return serve(settings, settings.database_url)
    return dev(settings)


if __name__ == "__main__":
    sys.exit(main())
