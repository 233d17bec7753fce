"""The change feed: every committed change to students, courses and enrollments, exactly once and
in commit order (GET /changes), and the cursor that is "now" (GET /changes/head).

The changes are recorded by triggers in the transaction that makes them and stamped at commit;
migrations/0008.change-feed.sql says why the order holds. Here: reading pages of them, holding a
long-poll until a change arrives (one poller per process, however many readers wait), and pruning
what is older than CHANGES_RETENTION.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from enrollment_service.courses import Course
from enrollment_service.db import Database, Query, prune_forever
from enrollment_service.enrollments import Enrollment
from enrollment_service.health import require_current_schema
from enrollment_service.problems import CursorExpired, FieldError, ValidationFailed, documented
from enrollment_service.students import Student
from enrollment_service.validation import MAX_ID

log = logging.getLogger("enrollment_service.changes")

PAGE = Query.load("changes/page")
PAGE_ABOUT = Query.load("changes/page_about")
HEAD = Query.load("changes/head")
PRUNE = Query.load("changes/prune")
PRUNE_BATCH = 1000

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_WAIT = 30
#: How often a process looks for new changes while any reader waits: well inside the contract's
#: one second, at one cheap statement per tick per process.
POLL_SECONDS = 0.2

#: The Struct each type's `data` is, so that its timestamps read as in every other response.
DATA_SHAPES: dict[str, type[Any]] = {
    "student.created": Student,
    "student.updated": Student,
    "course.created": Course,
    "course.updated": Course,
    "enrollment.created": Enrollment,
}


class Change(msgspec.Struct, frozen=True):
    position: int
    type: str
    occurred_at: datetime
    student_id: int | None
    course_id: int | None
    request_id: str | None
    #: A Student, Course or Enrollment (a union of Structs has no OpenAPI schema in Litestar).
    data: Annotated[
        Any,
        msgspec.Meta(
            description="The Student (student.created, student.updated), Course "
            "(course.created, course.updated) or Enrollment (enrollment.created) after the "
            "change; null for the deletions"
        ),
    ]


class ChangePage(msgspec.Struct, frozen=True):
    items: list[Change]
    next_cursor: str


class Head(msgspec.Struct, frozen=True):
    next_cursor: str


# --- Cursors ---------------------------------------------------------------------------------
#
# A feed cursor is a position with a check: base64url of 8 bytes of position and 4 of SHA-256.
# Not keyed with CURSOR_SECRET, unlike the list cursors: a consumer keeps its cursor for days,
# and rotating the secret must not cut it off. An invented position is harmless: every position
# is a valid place in the feed. The check catches a cursor that was cut short or edited.

_CHECK_BYTES = 4


def _check(payload: bytes) -> bytes:
    return hashlib.sha256(b"changes:" + payload).digest()[:_CHECK_BYTES]


def encode_cursor(position: int) -> str:
    payload = position.to_bytes(8, "big")
    return base64.urlsafe_b64encode(payload + _check(payload)).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    payload, check = raw[:8], raw[8:]
    if len(raw) != 8 + _CHECK_BYTES or check != _check(payload):
        raise ValidationFailed([FieldError("after", "is not a change-feed cursor")])
    position = int.from_bytes(payload, "big")
    if position > MAX_ID:
        raise ValidationFailed([FieldError("after", "is not a change-feed cursor")])
    return position


# --- Reading ---------------------------------------------------------------------------------


def to_change(row: asyncpg.Record) -> Change:
    raw = row["data"]
    shape = DATA_SHAPES.get(row["type"])
    data = msgspec.json.decode(raw, type=shape) if shape is not None and raw is not None else None
    return Change(
        row["position"],
        row["type"],
        row["occurred_at"],
        row["student_id"],
        row["course_id"],
        row["request_id"],
        data,
    )


class ChangeNotifier:
    """Wakes the readers waiting for a change, with one statement per tick per process: while
    anyone waits, it reads the head every POLL_SECONDS and wakes them when it moves. Works
    wherever a statement does (PgBouncer in transaction mode included: no LISTEN).

    A reader compares the head its own page read saw with the notifier's, trusting only a head
    read after its page began (`polls`): an older one may be from before a change the reader has
    seen, or from before the database was restored to an earlier point."""

    def __init__(self, db: Database, poll_seconds: float = POLL_SECONDS) -> None:
        self._db = db
        self._loop = asyncio.get_running_loop()
        self._poll_seconds = poll_seconds
        self._head: int | None = None
        #: How many times the head was read: taken by a reader before its page read.
        self.polls = 0
        self._moved = asyncio.Event()
        self._waiting = 0
        self._poller: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_beyond(self, seen: int, polls_before: int, seconds: float) -> None:
        """Returns once the head differs from `seen` (the head of a page read begun when
        `polls` was `polls_before`), after `seconds`, or at shutdown, whichever comes first."""
        if self.polls > polls_before and self._head != seen:
            return  # the head moved between the page read and now
        self._waiting += 1
        try:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.create_task(self._poll(), name="change-feed-poller")
            async with asyncio.timeout(seconds):
                while not self._closed:
                    await self._moved.wait()
                    if self._head != seen:
                        return
        except TimeoutError:
            pass
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Shutdown: every waiting reader answers now, with what it has. Safe to call from a
        signal handler."""
        self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        self._closed = True
        self._moved.set()

    async def aclose(self) -> None:
        self._close()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)

    async def _poll(self) -> None:
        while self._waiting and not self._closed:
            try:
                row = await self._db.fetchrow(HEAD)
            except Exception as error:  # the database may be away: readers time out as usual
                if not self._failing:  # once per outage, not five times a second
                    log.warning("change feed: reading the head failed: %s", type(error).__name__)
                self._failing = True
            else:
                if self._failing:
                    log.info("change feed: reading the head works again")
                self._failing = False
                head: int = row["head"] if row is not None else 0
                self.polls += 1
                if head != self._head:
                    self._head = head
                    self._moved.set()
                    self._moved = asyncio.Event()
            await asyncio.sleep(self._poll_seconds)


class ChangeFeed:
    """What the handlers need, as one dependency: the database and the notifier."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.notifier = ChangeNotifier(db)

    async def page(
        self,
        after: int | None,
        limit: int,
        student_id: int | None,
        course_id: int | None,
        wait: float,
    ) -> ChangePage:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            polls_before = self.notifier.polls
            rows = await self._read(after, limit, student_id, course_id)
            if rows[0]["expired"]:
                raise CursorExpired()
            items = [to_change(row) for row in rows if row["position"] is not None]
            remaining = deadline - loop.time()
            if items or remaining <= 0 or self.notifier.closed:
                break
            await self.notifier.wait_beyond(rows[0]["head"], polls_before, remaining)
        last: int = items[-1].position if items else rows[0]["after"]
        return ChangePage(items, encode_cursor(last))

    async def _read(
        self, after: int | None, limit: int, student_id: int | None, course_id: int | None
    ) -> list[asyncpg.Record]:
        if student_id is None and course_id is None:
            return await self.db.fetch(PAGE, after, limit)
        return await self.db.fetch(PAGE_ABOUT, after, limit, student_id, course_id)

    async def head(self) -> Head:
        row = await self.db.fetchrow(HEAD)
        return Head(encode_cursor(row["head"] if row is not None else 0))


async def prune_old_changes(db: Database, retention_seconds: int, every_seconds: float) -> None:
    """Runs for the app's lifetime: deletes changes older than the retention, a thousand
    transactions' worth at a time, oldest first, so no delete holds many rows or blocks a
    writer."""
    await prune_forever(
        db,
        PRUNE,
        retention_seconds,
        batch=PRUNE_BATCH,
        every_seconds=every_seconds,
        what="transactions' changes from the feed",
    )


# --- HTTP ------------------------------------------------------------------------------------

FeedLimit = Annotated[
    int, Parameter(ge=1, le=MAX_LIMIT, description=f"Page size, 1-{MAX_LIMIT} (default 100)")
]
Wait = Annotated[
    float,
    Parameter(
        ge=0,
        le=MAX_WAIT,
        description=f"Seconds (0-{MAX_WAIT}, fractions allowed) to hold the answer while "
        "nothing is newer than the cursor",
    ),
]
After = Annotated[
    str | None,
    Parameter(description="A next_cursor from /changes or /changes/head; none: the oldest change"),
]
AboutStudent = Annotated[
    int | None,
    Parameter(ge=1, le=MAX_ID, description="Only the changes about this student"),
]
AboutCourse = Annotated[
    int | None,
    Parameter(ge=1, le=MAX_ID, description="Only the changes about this course"),
]


class ChangeController(Controller):
    path = "/changes"
    tags = ["changes"]
    before_request = staticmethod(require_current_schema)

    @get(
        summary="The changes after a cursor, in commit order",
        responses=documented(400, 410),
    )
    async def list_changes(
        self,
        feed: NamedDependency[ChangeFeed],
        after: After = None,
        limit: FeedLimit = DEFAULT_LIMIT,
        wait: Wait = 0,
        student_id: AboutStudent = None,
        course_id: AboutCourse = None,
    ) -> ChangePage:
        position = decode_cursor(after) if after is not None else None
        return await feed.page(position, limit, student_id, course_id, wait)

    @get("/head", summary="The cursor after every change committed so far", responses=documented())
    async def head(self, feed: NamedDependency[ChangeFeed]) -> Head:
        return await feed.head()
