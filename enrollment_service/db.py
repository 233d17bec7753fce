"""The asyncpg pool's lifecycle and the named SQL statements loaded from the `sql/` folder."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from enrollment_service.context import REQUEST_ID
from enrollment_service.resources import resource_dir
from enrollment_service.settings import Settings

log = logging.getLogger("enrollment_service.db")

T = TypeVar("T")

SQL_DIR = resource_dir("sql")

#: Errors that mean "the database cannot be reached right now", not "the request is wrong".
#: Not all of InterfaceError: most of it signals a bug in our code, which must stay a 500.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.QueryCanceledError,
)

#: Errors after which a connection is unusable. InternalClientError is asyncpg's "protocol in an
#: unexpected state": what a pooled connection shows when the FATAL of its terminated backend
#: (PostgreSQL shutting down) arrived while it sat idle, before the close did.
BROKEN_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.InternalClientError,
)

#: Errors that running the same statement again may cure.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
RETRY_ATTEMPTS = 4
#: The longest a connection stays kept out of the pool between statements (Database._release).
KEEP_SECONDS = 1.0


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached, timed out, or kept failing a retryable statement."""


class DatabaseEvents(Protocol):
    """What the Database tells whoever watches it (the metrics): called on the request path,
    so each must be cheap."""

    def retried(self, error: str) -> None:
        """A statement failed with `error` (a RETRYABLE_ERRORS class name) and runs again."""

    def gave_up(self) -> None:
        """A statement failed its last attempt with a retryable error."""

    def acquire_waited(self, seconds: float) -> None:
        """A statement waited `seconds` for a pooled connection (got one or not)."""


class _Unwatched:
    def retried(self, error: str) -> None:
        pass

    def gave_up(self) -> None:
        pass

    def acquire_waited(self, seconds: float) -> None:
        pass


class RequestTransaction:
    """One transaction on one pooled connection, which every statement the request runs while
    it is active joins (`Database.transaction`): begun at the first statement, ended by its
    owner with `commit` or `rollback`. A statement that fails marks it `failed`: PostgreSQL has
    aborted it, and only a rollback can end it."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.active = True
        self.failed = False
        self._conn: PoolConnectionProxy | None = None

    @property
    def begun(self) -> bool:
        return self._conn is not None

    async def run(self, work: Callable[[PoolConnectionProxy], Awaitable[T]]) -> T:
        try:
            if self._conn is None:
                conn = await self.db._acquire()
                self._conn = conn
                await conn.execute("begin")
            return await work(self._conn)
        except BaseException as error:
            self.failed = True
            if isinstance(error, BROKEN_CONNECTION_ERRORS) and self._conn is not None:
                with contextlib.suppress(asyncpg.InterfaceError):
                    self._conn.terminate()
            # Inside a transaction a deadlock cannot be retried statement by statement.
            if isinstance(
                error, (*UNAVAILABLE_ERRORS, *BROKEN_CONNECTION_ERRORS, *RETRYABLE_ERRORS)
            ):
                raise DatabaseUnavailable(type(error).__name__) from error
            raise

    async def commit(self) -> None:
        await self._end("rollback" if self.failed else "commit")

    async def rollback(self) -> None:
        await self._end("rollback")

    async def _end(self, command: str) -> None:
        self.active = False
        conn, self._conn = self._conn, None
        if conn is None:
            return
        ended = False
        try:
            if not conn.is_closed():
                await conn.execute(command)
            ended = True
        except (*UNAVAILABLE_ERRORS, *BROKEN_CONNECTION_ERRORS) as error:
            raise DatabaseUnavailable(type(error).__name__) from error
        finally:
            await self.db._release(conn, reusable=ended)


#: The request transaction of the running task, if its owner began one.
_TRANSACTION: contextvars.ContextVar[RequestTransaction | None] = contextvars.ContextVar(
    "request_transaction", default=None
)


@dataclass(frozen=True, slots=True)
class Query:
    """One statement from one file of `sql/`, named by its path (e.g. `students/create`).

    `shape` is the Struct each row becomes when built positionally (`Student(*row)`, five times
    cheaper than `Student(**row)`): a test checks that the statement's columns are exactly its
    fields, in order.

    A statement that writes sets the request id the change feed records with its changes
    (`set_config('enrollment.request_id', $n, true)`, its last parameter): the Database passes
    the current request's id itself, after the caller's arguments."""

    name: str
    text: str
    shape: type[Any] | None = None
    records_changes: bool = False

    @classmethod
    def load(cls, name: str, shape: type[Any] | None = None) -> Query:
        text = (SQL_DIR / f"{name}.sql").read_text(encoding="utf-8")
        return cls(name, text, shape, records_changes=_SETS_REQUEST_ID.search(text) is not None)

    def arguments(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not self.records_changes:
            return args
        request_id = REQUEST_ID.get()
        return (*args, None if request_id == "-" else request_id)


#: How a statement takes the request id: it sets the transaction-local setting the change
#: feed's triggers read, or hands it to a function that does.
_SETS_REQUEST_ID = re.compile(r"set_config\('enrollment\.request_id', \$\d+|request_id => \$\d+")


def all_query_names() -> list[str]:
    """Every statement in `sql/`, for the test that prepares them all against the schema."""
    return sorted(str(path.relative_to(SQL_DIR).with_suffix("")) for path in SQL_DIR.rglob("*.sql"))


class Database:
    """The app's pool, with the one way every request talks to PostgreSQL: a single statement
    on a pooled connection, retried on deadlock or serialization failure, and any failure to
    reach the database turned into DatabaseUnavailable. The pool is the Database's alone: it
    keeps connections between statements and hands them from one statement to the next
    (`_release`), and counts on the pool to have one for it whenever it holds fewer than the
    pool's size."""

    def __init__(self, pool: asyncpg.Pool, acquire_timeout: float) -> None:
        self.pool = pool
        self.acquire_timeout = acquire_timeout
        #: Told of retries and pool waits: the metrics set it once the app has started.
        self.events: DatabaseEvents = _Unwatched()
        self._loop = asyncio.get_running_loop()
        # Set on shutdown: the loop time by which every statement must be done.
        self._deadline: float | None = None
        self._running: set[asyncio.Timeout] = set()
        #: Connections acquired and not yet released: the drain closes those left at its end.
        self._in_use: set[PoolConnectionProxy] = set()
        # Connections out of the pool for statements, in use or kept idle between them, at
        # most the pool's size; and statements waiting for one of them (see `_release`).
        self._held = 0
        self._max_held = pool.get_max_size()
        self._kept: list[PoolConnectionProxy] = []  # newest last
        self._waiters: collections.deque[asyncio.Future[PoolConnectionProxy]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def drain(self, grace_seconds: float) -> None:
        """Shutdown has begun: every statement, running or yet to come, gets `grace_seconds` to
        finish, then fails as DatabaseUnavailable, so that a request the shutdown cannot wait
        for is answered 503 with Retry-After (the server's own cut-off would be a bare 500).
        Safe to call from a signal handler."""
        self._loop.call_soon_threadsafe(self._set_deadline, grace_seconds)

    def _set_deadline(self, grace_seconds: float) -> None:
        self._deadline = self._loop.time() + grace_seconds
        self._return_kept()
        for timeout in self._running:
            timeout.reschedule(self._deadline)
        # Statements begun before the drain have no timeout of their own: at the deadline their
        # connections are closed, which fails them as DatabaseUnavailable too.
        self._loop.call_at(self._deadline, self._cut_off)

    def _cut_off(self) -> None:
        if self._in_use:
            log.warning("shutdown grace period over: %d statement(s) cut off", len(self._in_use))
        for conn in list(self._in_use):
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()

    async def fetch(self, query: Query, *args: Any) -> list[asyncpg.Record]:
        args = query.arguments(args)
        return await self._run(lambda conn: conn.fetch(query.text, *args))

    async def fetchrow(self, query: Query, *args: Any) -> asyncpg.Record | None:
        args = query.arguments(args)
        return await self._run(lambda conn: conn.fetchrow(query.text, *args))

    async def fetchrow_alone(self, query: Query, *args: Any) -> asyncpg.Record | None:
        """One statement as a transaction of its own, even in a task with a request transaction
        (which must not have begun: what ran in it and this statement could not commit as one).
        For a statement that does the whole of a request's change in one round trip."""
        transaction = _TRANSACTION.get()
        if transaction is not None and transaction.begun:
            raise RuntimeError(f"{query.name} must run alone, but the request's transaction began")
        args = query.arguments(args)
        return await self._run(lambda conn: conn.fetchrow(query.text, *args), alone=True)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[RequestTransaction]:
        """Every statement the block runs, in this task, joins one transaction until the owner
        commits or rolls it back; whatever the owner left open is rolled back at the end."""
        transaction = RequestTransaction(self)
        token = _TRANSACTION.set(transaction)
        try:
            yield transaction
        finally:
            _TRANSACTION.reset(token)
            await transaction.rollback()

    async def _run(
        self, work: Callable[[PoolConnectionProxy], Awaitable[T]], *, alone: bool = False
    ) -> T:
        transaction = None if alone else _TRANSACTION.get()
        if self._deadline is None:
            # Not draining: no timeout to keep (entering one cost 5 % of a light request's CPU);
            # should a drain begin meanwhile, `_cut_off` ends the statement at its deadline.
            if transaction is not None and transaction.active:
                return await transaction.run(work)
            return await self._attempts(work)
        try:
            async with asyncio.timeout_at(self._deadline) as timeout:
                self._running.add(timeout)
                try:
                    if transaction is not None and transaction.active:
                        return await transaction.run(work)
                    return await self._attempts(work)
                finally:
                    self._running.discard(timeout)
        except TimeoutError as error:
            # Only the shutdown deadline gets here: _attempts maps every other timeout itself.
            log.warning("shutdown grace period over: a statement was cut off")
            raise DatabaseUnavailable("shutting down") from error

    async def _attempts(self, work: Callable[[PoolConnectionProxy], Awaitable[T]]) -> T:
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return await self._once(work)
            except RETRYABLE_ERRORS as error:
                if attempt == RETRY_ATTEMPTS:
                    log.warning("gave up after %d attempts: %s", attempt, type(error).__name__)
                    self.events.gave_up()
                    raise DatabaseUnavailable(type(error).__name__) from error
                self.events.retried(type(error).__name__)
                await asyncio.sleep(0.005 * 2**attempt)
            except (*UNAVAILABLE_ERRORS, *BROKEN_CONNECTION_ERRORS) as error:
                raise DatabaseUnavailable(type(error).__name__) from error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self) -> PoolConnectionProxy:
        started = time.perf_counter()
        try:
            conn = await self._take()
            self._in_use.add(conn)
            return conn
        finally:
            self.events.acquire_waited(time.perf_counter() - started)

    async def _take(self) -> PoolConnectionProxy:
        """A kept connection; else one from the pool while it has some to give; else the next
        one a statement releases, handed over directly. One lost meanwhile (while kept, or
        between its handover and now) goes back to the pool, which replaces it."""
        while True:
            if self._kept:
                conn = self._kept.pop()
            elif self._held < self._max_held:
                conn = await self._from_pool()
            else:
                conn = await self._handed_over()
            if _is_open(conn):
                return conn
            await self._return(conn)

    async def _handed_over(self) -> PoolConnectionProxy:
        waiter: asyncio.Future[PoolConnectionProxy] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self.acquire_timeout):
                return await waiter
        except BaseException:
            # Handed a connection just as the wait ended (timed out, cancelled): pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                await self._release(waiter.result(), reusable=True)
            raise

    async def _from_pool(self) -> PoolConnectionProxy:
        # asyncio.timeout, not acquire(timeout=): that one runs the wait as a task of its own.
        self._held += 1
        try:
            async with asyncio.timeout(self.acquire_timeout):
                conn: PoolConnectionProxy = await self.pool.acquire()
        except BaseException:
            self._place_freed()
            raise
        return conn

    async def _release(self, conn: PoolConnectionProxy, *, reusable: bool = False) -> None:
        """Done with a connection. One whose statement ended cleanly (`reusable`) goes straight
        to the statement that has waited longest for one, or is kept for the next: asyncpg's
        release runs a task and a timeout of its own, and with its acquire cost a tenth of a
        light request's CPU. The others go back to the pool, and so do kept ones within
        KEEP_SECONDS (so that its idle lifetime and query limits apply to them); once a drain
        begins, none is kept."""
        self._in_use.discard(conn)
        if reusable and _is_open(conn) and not conn.is_in_transaction():
            waiter = self._first_waiter()
            if waiter is not None:
                self._waiters.popleft()
                waiter.set_result(conn)
                return
            if self._deadline is None and not self._closing:
                self._kept.append(conn)
                if self._sweep is None:
                    self._sweep = self._loop.call_later(KEEP_SECONDS, self._return_kept)
                return
        await self._return(conn)

    async def _return(self, conn: PoolConnectionProxy) -> None:
        """A held connection back to the pool, its place counted free only once the pool has
        it: in a task of its own, which a cancelled caller does not interrupt."""
        task = self._spawn(self._give_back(conn))
        await asyncio.shield(task)

    async def _give_back(self, conn: PoolConnectionProxy) -> None:
        try:
            # Bounded as acquire(timeout=) would have bounded it: releasing a connection
            # whose statement was cancelled waits for PostgreSQL to confirm the cancel.
            await self.pool.release(conn, timeout=self.acquire_timeout)
        except Exception as error:
            # The pool has dropped the connection; the statement's outcome stands.
            log.warning("a connection failed to reset and was closed: %r", error)
        finally:
            self._place_freed()

    def _place_freed(self) -> None:
        """A connection's place is free (it went back to the pool, or never came). While
        statements wait, the place passes to a new connection taken from the pool for the one
        that has waited longest (a statement arriving meanwhile must not take it first: they
        wait their turn); once the pool is closing, they fail at once instead."""
        if self._first_waiter() is None:
            self._held -= 1
        elif self.pool.is_closing():
            self._held -= 1
            while (waiter := self._first_waiter()) is not None:
                waiter.set_exception(DatabaseUnavailable("shutting down"))
        else:
            self._spawn(self._refill())

    def _first_waiter(self) -> asyncio.Future[PoolConnectionProxy] | None:
        """The statement that has waited longest and waits still, if any: those that timed out
        or were cancelled meanwhile are dropped from the front of the queue on the way."""
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
        return self._waiters[0] if self._waiters else None

    async def _refill(self) -> None:
        """A connection from the pool, in a place already counted, for the statement that has
        waited longest. If the pool cannot give one, that statement fails with the pool's error
        rather than waiting on, and the place passes on to the next one's attempt."""
        try:
            async with asyncio.timeout(self.acquire_timeout):
                conn: PoolConnectionProxy = await self.pool.acquire()
        except Exception as error:
            waiter = self._first_waiter()
            if waiter is not None and not self.pool.is_closing():
                waiter.set_exception(error)
            self._place_freed()  # closing: every waiter fails as DatabaseUnavailable
            return
        await self._release(conn, reusable=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _return_kept(self) -> None:
        """Every kept connection back to the pool (every KEEP_SECONDS, and when a drain begins)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        kept, self._kept = self._kept, []
        for conn in kept:
            self._spawn(self._give_back(conn))

    def idle_connections(self) -> int:
        """Connections open and idle: in the pool, or kept out of it between statements."""
        return self.pool.get_idle_size() + len(self._kept)

    async def _once(self, work: Callable[[PoolConnectionProxy], Awaitable[T]]) -> T:
        conn = await self._acquire()
        succeeded = False
        try:
            result = await work(conn)
            succeeded = True
        except BROKEN_CONNECTION_ERRORS:
            # Closed here, the pool replaces it; returned as it is, the pool would try to reset
            # it, fail once more, and that error would hide this one. (If the connection saw
            # its own end first, the pool has it back already and says so: nothing to do.)
            with contextlib.suppress(asyncpg.InterfaceError):
                conn.terminate()
            raise
        finally:
            # Only a connection whose statement ended cleanly is handed on or kept.
            await self._release(conn, reusable=succeeded)
        return result

    async def close(self, grace_seconds: float) -> None:
        self._closing = True
        self._return_kept()
        try:
            await asyncio.wait_for(self.pool.close(), grace_seconds)
        except TimeoutError:
            log.warning("pool did not close in %.1fs; terminating its connections", grace_seconds)
            self.pool.terminate()


def _is_open(conn: PoolConnectionProxy) -> bool:
    """Whether a connection can run a statement: one lost while kept is closed, or, once the
    pool has taken it back for that, detached from its proxy."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


async def prune_forever(
    db: Database, query: Query, *args: Any, batch: int, every_seconds: float, what: str
) -> None:
    """Runs for the app's lifetime: every `every_seconds`, runs `query` (a delete of at most
    `batch` rows, given `*args` and then `batch`, answering `deleted`) until it deletes fewer
    than `batch`, so a table does not grow and no delete holds many rows at once."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            while True:
                row = await db.fetchrow(query, *args, batch)
                deleted = row["deleted"] if row is not None else 0
                if deleted:
                    log.debug("pruned %d %s", deleted, what)
                if deleted < batch:
                    break
        except Exception as error:  # the database may be away; try again next time
            log.warning("pruning %s failed: %s", what, type(error).__name__)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset on release. asyncpg's default (unlock advisory locks, close cursors,
    unlisten, reset settings) costs a round trip per request and undoes nothing this service
    does; asyncpg still rolls back any transaction left open."""


async def open_database(settings: Settings, database_url: str) -> Database:
    """Open the pool. When PostgreSQL is down at start-up the service still comes up (live but
    not ready) with an empty pool, and fills it once the database returns."""

    def create(min_size: int) -> asyncpg.Pool:
        return asyncpg.create_pool(
            database_url,
            min_size=min_size,
            max_size=settings.pool_max_size,
            timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            statement_cache_size=settings.statement_cache_size,
            server_settings={"application_name": "enrollment-service"},
            reset=_keep_session,
        )

    try:
        pool = await create(settings.pool_min_size)
    except UNAVAILABLE_ERRORS as error:
        log.warning("database not reachable at start-up (%s); serving as not ready", error)
        pool = await create(0)
    return Database(pool, settings.pool_acquire_timeout)
