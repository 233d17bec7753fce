"""Keyset pagination: pages ordered by id, and opaque cursors that name where the last page ended.

A cursor is the last id of a page plus a keyed tag over that id and the listing it came from,
base64url-encoded. The tag makes an edited or invented cursor, or one taken from another listing,
a 400 instead of a silently different page. Walking pages by `id > last id`
returns every row that exists for the whole walk exactly once, whatever is inserted or deleted
meanwhile, and costs the same on page 10,000 as on page 1.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from asyncpg import Record
from litestar.params import Parameter

from enrollment_service.db import Database, Query
from enrollment_service.problems import FieldError, ValidationFailed
from enrollment_service.validation import MAX_ID

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_TAG_BYTES = 8

Limit = Annotated[
    int,
    Parameter(ge=1, le=MAX_LIMIT, description=f"Page size, 1-{MAX_LIMIT}"),
]
Cursor = Annotated[
    str | None,
    Parameter(pattern=r"^[A-Za-z0-9_-]{22}$", description="The next_cursor of the previous page"),
]


class Page(msgspec.Struct, Generic[T], frozen=True):
    """Subclass it per item type (`class StudentPage(Page[Student])`): the OpenAPI document
    then names each page schema plainly."""

    items: list[T]
    next_cursor: str | None


P = TypeVar("P", bound=Page[Any])


class Cursors:
    """Encodes and checks cursors with the service's secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(secret.encode()).digest()

    def _tag(self, payload: bytes, listing: str) -> bytes:
        message = payload + listing.encode()
        return hmac.digest(self._key, message, "sha256")[:_TAG_BYTES]

    def encode(self, last_id: int, listing: str) -> str:
        payload = last_id.to_bytes(8, "big")
        tag = self._tag(payload, listing)
        return base64.urlsafe_b64encode(payload + tag).rstrip(b"=").decode()

    def decode(self, cursor: str | None, listing: str) -> int:
        """The id a page of `listing` starts after (0 for the first page); ValidationFailed if
        the cursor was not issued for this listing."""
        if cursor is None:
            return 0
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        payload, tag = raw[:8], raw[8:]
        if len(raw) != 8 + _TAG_BYTES or not hmac.compare_digest(tag, self._tag(payload, listing)):
            raise ValidationFailed(
                [FieldError("cursor", "is not a cursor this service issued for this listing")]
            )
        last_id = int.from_bytes(payload, "big")
        if not 1 <= last_id <= MAX_ID:  # pragma: no cover - only reachable with the secret
            raise ValidationFailed([FieldError("cursor", "is out of range")])
        return last_id


class Pages:
    """What a list handler needs, as its one dependency: the database and the cursors. (Given two
    dependencies, Litestar resolves them in a task group of their own on every request, which
    cost a fifth of a list request's CPU.)"""

    def __init__(self, db: Database, cursors: Cursors) -> None:
        self.db = db
        self.cursors = cursors

    async def fetch(
        self, query: Query, listing: str, cursor: str | None, limit: int, *args: Any
    ) -> list[Record]:
        """The rows for one page of `listing`: `query` run with `*args`, then the id the page
        starts after, then how many rows to fetch (one more than the page holds)."""
        return await self.db.fetch(query, *args, self.cursors.decode(cursor, listing), limit + 1)

    async def fetch_json(
        self, query: Query, listing: str, cursor: str | None, limit: int, owner_id: int
    ) -> bytes | None:
        """One page of `listing`, the owner's, as the JSON body its page Struct encodes to, the
        items written by PostgreSQL: `query` is run with `owner_id`, the id the page starts
        after and how many rows to fetch (one more than the page holds), and answers `items`
        (the page's items, a JSON array), `last_id` and `more` (whether a next page exists), or
        no row when the owner does not exist (then None)."""
        after = self.cursors.decode(cursor, listing)
        row = await self.db.fetchrow(query, owner_id, after, limit + 1)
        if row is None:
            return None
        if row["more"]:
            next_cursor = b'"%s"' % self.cursors.encode(row["last_id"], listing).encode()
        else:
            next_cursor = b"null"
        return b'{"items":%s,"next_cursor":%s}' % (row["items"], next_cursor)

    def page(
        self,
        page_type: type[P],
        rows: Sequence[Record],
        limit: int,
        to_item: Callable[[Record], Any],
        listing: str,
    ) -> P:
        """Build a page from up to `limit + 1` rows ordered by their `id` column: the extra row
        only says that a next page exists."""
        kept = rows[:limit]
        next_cursor = self.cursors.encode(kept[-1]["id"], listing) if len(rows) > limit else None
        return page_type(items=[to_item(row) for row in kept], next_cursor=next_cursor)
