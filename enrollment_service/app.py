"""The application factory: routes, dependencies, lifespan and error mapping in one place."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin

from enrollment_service.batch import BatchController
from enrollment_service.changes import ChangeController, ChangeFeed, prune_old_changes
from enrollment_service.courses import CourseController
from enrollment_service.db import Database, open_database
from enrollment_service.enrollments import EnrollmentController, RosterController
from enrollment_service.health import HealthController, Readiness
from enrollment_service.idempotency import TYPE_DECODERS as IDEMPOTENCY_KEY_DECODERS
from enrollment_service.idempotency import IdempotencyMiddleware, prune_expired_keys
from enrollment_service.observability import Metrics, RequestObserver
from enrollment_service.pagination import Cursors, Pages
from enrollment_service.problems import documented, handle_exception
from enrollment_service.settings import Settings
from enrollment_service.students import StudentController
from enrollment_service.validation import TYPE_DECODERS

log = logging.getLogger("enrollment_service.app")

MAX_BODY_BYTES = 1024 * 1024


class Service(RequestObserver):
    """The ASGI app that servers run: the Litestar app inside the request observer."""

    def __init__(self, litestar: Litestar, metrics: Metrics, settings: Settings) -> None:
        super().__init__(litestar, metrics, settings.api_tokens)
        self.litestar = litestar
        self.settings = settings
        self._draining = False

    def announce_shutdown(self, delay_seconds: float) -> None:
        """The lame-duck step of a shutdown with SHUTDOWN_DELAY: /health/ready answers 503 from
        now on, so the load balancer takes this replica out, while every connection and request
        is still served as before; `begin_shutdown` follows after `delay_seconds`."""
        readiness: Readiness | None = getattr(self.litestar.state, "readiness", None)
        if readiness is None or readiness.draining:
            return
        readiness.draining = True
        log.info(
            "shutting down: readiness now answers 503; still serving for %gs before draining",
            delay_seconds,
        )

    def begin_shutdown(self, grace_seconds: float) -> None:
        """The drain: /health/ready answers 503 (if it did not already), the server stops
        taking connections, and every statement, running or yet to come, gets
        `grace_seconds` to finish (then 503)."""
        readiness: Readiness | None = getattr(self.litestar.state, "readiness", None)
        if readiness is None or self._draining:
            return
        self._draining = readiness.draining = True
        db: Database = self.litestar.state.db
        db.drain(grace_seconds)
        feed: ChangeFeed = self.litestar.state.feed
        feed.notifier.close()
        log.info("draining: readiness now answers 503; finishing in-flight requests")


@get(
    "/metrics",
    sync_to_thread=False,
    tags=["operations"],
    summary="Prometheus text exposition of the service's metrics",
    media_type="text/plain; version=0.0.4",
    responses=documented(),
)
def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    metrics: Metrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")


def create_app(settings: Settings, database_url: str | None = None) -> Service:
    url = database_url or settings.database_url
    if url is None:
        raise ValueError("DATABASE_URL is not set")

    @asynccontextmanager
    async def database(app: Litestar) -> AsyncIterator[None]:
        db = await open_database(settings, url)
        app.state.db = db
        app.state.pages = Pages(db, Cursors(settings.cursor_secret))
        app.state.readiness = readiness = Readiness(settings, url)
        log.info("pool open (min %d, max %d)", settings.pool_min_size, settings.pool_max_size)
        app.state.feed = feed = ChangeFeed(db)
        retention = settings.changes_retention
        pruning = [
            asyncio.create_task(
                prune_expired_keys(db, every_seconds=min(60, settings.idempotency_key_ttl))
            ),
            asyncio.create_task(prune_old_changes(db, retention, every_seconds=min(60, retention))),
        ]
        try:
            yield
        finally:
            for task in pruning:
                task.cancel()
            await asyncio.gather(*pruning, return_exceptions=True)
            await feed.notifier.aclose()
            await readiness.close()
            await db.close(grace_seconds=settings.shutdown_grace_period or 5.0)
            log.info("pool closed")

    state = State({"settings": settings})
    metrics = Metrics(state)
    state.metrics = metrics

    # The providers read the app's state directly: a provider that takes `state` as a parameter
    # has it parsed out of the request on every call.
    def provide_db() -> Database:
        db: Database = state.db
        return db

    def provide_pages() -> Pages:
        pages: Pages = state.pages
        return pages

    def provide_feed() -> ChangeFeed:
        feed: ChangeFeed = state.feed
        return feed

    data_controllers = [
        StudentController,
        CourseController,
        EnrollmentController,
        RosterController,
        BatchController,
        ChangeController,
    ]
    litestar = Litestar(
        route_handlers=[*data_controllers, HealthController, metrics_endpoint],
        dependencies={
            "db": Provide(provide_db, sync_to_thread=False),
            "pages": Provide(provide_pages, sync_to_thread=False),
            "feed": Provide(provide_feed, sync_to_thread=False),
        },
        lifespan=[database],
        # Plain ASGI types, as RequestObserver uses.
        middleware=[DefineMiddleware(IdempotencyMiddleware, state=state)],  # type: ignore[arg-type]
        state=state,
        exception_handlers={Exception: handle_exception},
        request_max_body_size=MAX_BODY_BYTES,
        type_decoders=[*TYPE_DECODERS, *IDEMPOTENCY_KEY_DECODERS],
        openapi_config=OpenAPIConfig(
            title="enrollment-service",
            version="1.0.0",
            description="Students, courses, and the enrollments between them.",
            path="/schema",
            render_plugins=[JsonRenderPlugin()],
            use_handler_docstrings=False,
        ),
        logging_config=None,
        debug=False,
    )
    return Service(litestar, metrics, settings)
