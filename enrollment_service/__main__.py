"""The command line: `enrollment-service migrate | serve | dev`."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from types import FrameType

import uvicorn

from enrollment_service import migrations
from enrollment_service.app import Service, create_app
from enrollment_service.db import Database
from enrollment_service.observability import configure_logging
from enrollment_service.settings import Settings, SettingsError, load_settings

log = logging.getLogger("enrollment_service")


class GracefulServer(uvicorn.Server):
    """uvicorn, plus: the moment SIGTERM arrives readiness turns 503 and the requests' database
    work gets the grace period as its deadline; a graceful stop exits 0 (uvicorn re-raises the
    signal after stopping, which would make the exit status 143)."""

    def __init__(self, config: uvicorn.Config, service: Service, grace_seconds: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace_seconds = grace_seconds

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("received %s: finishing in-flight requests", signal.Signals(sig).name)
            self.service.start_draining()
            db: Database | None = getattr(self.service.litestar.state, "db", None)
            if db is not None:
                db.drain(self.grace_seconds)
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def serve(settings: Settings, database_url: str) -> int:
    service = create_app(settings, database_url)
    config = uvicorn.Config(
        service,
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
    server = GracefulServer(config, service, settings.shutdown_grace_period)
    server.run()
    return 0 if server.started else 1


def migrate(settings: Settings) -> int:
    url = settings.migrations_url
    if url is None:
        log.error("DATABASE_URL (or MIGRATIONS_DATABASE_URL) must be set to migrate")
        return 2
    try:
        applied = migrations.apply(url)
    except migrations.MigrationError as error:
        log.error("migration failed: %s", error)
        return 1
    log.info("schema up to date (%d applied now)", len(applied))
    return 0


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
