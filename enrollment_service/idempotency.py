"""Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): a POST, PATCH or DELETE sent
with a key is answered once and replayed after, however often it is retried.

The request runs as usual, but inside one transaction (`Database.transaction`); its outcome,
when it is one the contract stores (2xx, 404, 409, 412), is then written under the key in that
same transaction, so an outcome is stored if and only if its change committed. Writing the key
last is also what settles races: a concurrent request with the same key waits on the first's
uncommitted key row, finds it taken once the first commits, rolls its own work back and
replays the first's answer. No lookup happens before the work; the store is the check.

A handler may instead store its own outcome in the very statement that makes its change (the
keyed enroll does: one round trip instead of four). It finds the key's particulars with
`keyed_request()`, runs that statement alone (`Database.fetchrow_alone`), and marks the request
`stored`; anything else it sends, refusals included, is stored here as usual.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from litestar.params import HeaderParameter

from enrollment_service.context import CALLER
from enrollment_service.db import Database, Query, prune_forever
from enrollment_service.observability import ASGIApp, Message, Receive, Scope, Send
from enrollment_service.problems import (
    PROBLEM_MEDIA_TYPE,
    DomainError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    RetryLater,
    problem_document,
)

log = logging.getLogger("enrollment_service.idempotency")

HEADER = b"idempotency-key"
KEYED_METHODS = frozenset({"POST", "PATCH", "DELETE"})
#: Outcomes of the request itself ("domain outcomes"): a 400, 401, 413, 415 or 5xx means the
#: request never ran, or may succeed when retried, so it is not stored.
STORED_STATUSES = frozenset({404, 409, 412})

STORE = Query.load("idempotency/store")
FIND = Query.load("idempotency/find")
PRUNE = Query.load("idempotency/prune")
PRUNE_BATCH = 1000

_BARE_KEY = re.compile(r"[!-~]{1,255}")
_QUOTED_KEY = re.compile(r'"((?:[^"\\]|\\["\\])*)"')
#: The constraint a statement that stores its own outcome fails on when the key is held already.
KEY_CONSTRAINT = "idempotency_keys_pkey"
KEY_MESSAGE = (
    "must be one key of 1-255 visible ASCII characters (! to ~), bare or as a quoted string"
)


class IdempotencyKey(str):
    """The `Idempotency-Key` header as handlers declare it: its own type, so that Litestar hands
    the raw text to `to_idempotency_key` and reports a bad key with the other bad fields."""


def parse_key(raw: str) -> str | None:
    """The key a header value names, or None when the value is not a valid key."""
    quoted = _QUOTED_KEY.fullmatch(raw)
    if quoted:
        key = re.sub(r"\\(.)", r"\1", quoted.group(1))
        return key if _BARE_KEY.fullmatch(key) else None
    if raw.startswith('"'):
        return None  # a structured-field string that does not parse
    return raw if _BARE_KEY.fullmatch(raw) else None


def to_idempotency_key(_: type, raw: Any) -> IdempotencyKey:
    key = parse_key(raw) if isinstance(raw, str) else None
    if key is None:
        raise ValueError(KEY_MESSAGE)
    return IdempotencyKey(key)


#: For Litestar's `type_decoders`.
TYPE_DECODERS = [(lambda annotation: annotation is IdempotencyKey, to_idempotency_key)]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A response as it is stored and replayed."""

    status: int
    content_type: str
    location: str | None
    etag: str | None
    body: bytes
    replayed: bool = False
    retry_after: int | None = None

    def messages(self) -> list[Message]:
        headers = []
        if self.status != 204:  # a 204 has neither (RFC 9110 8.6)
            headers.append((b"content-type", self.content_type.encode()))
            headers.append((b"content-length", str(len(self.body)).encode()))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.location is not None:
            headers.append((b"location", self.location.encode()))
        if self.etag is not None:
            headers.append((b"etag", self.etag.encode()))
        if self.replayed:
            headers.append((b"idempotent-replayed", b"true"))
        return [
            {"type": "http.response.start", "status": self.status, "headers": headers},
            {"type": "http.response.body", "body": self.body, "more_body": False},
        ]


def _problem(error: DomainError) -> Outcome:
    body = msgspec.json.encode(problem_document(error))
    retry_after = error.retry_after if isinstance(error, RetryLater) else None
    return Outcome(error.status, PROBLEM_MEDIA_TYPE, None, None, body, retry_after=retry_after)


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """What makes two requests "the same": method, path, and the body as JSON, so that key
    order and whitespace do not matter. A body that is not JSON is compared byte for byte (such
    a request answers 400 and is never stored anyway)."""
    try:
        canonical = msgspec.json.encode(msgspec.json.decode(body), order="sorted") if body else b""
    except msgspec.DecodeError:
        canonical = body
    digest = hashlib.sha256(method.encode())
    digest.update(b"\n" + path.rstrip("/").encode() + b"\n")
    digest.update(canonical)
    return digest.digest()


@dataclass(slots=True)
class KeyedRequest:
    """The request being served under a key, for a handler that stores its own outcome."""

    method: str
    path: str
    key: str
    ttl_seconds: int
    body: bytearray = field(default_factory=bytearray)
    #: Set by a handler whose statement stored the outcome with the change.
    stored: bool = False

    def store_arguments(self) -> tuple[str, str, bytes, int]:
        """The scope, key, fingerprint and seconds to keep, in the order of the statements that
        store an outcome. Called once the handler has its input, so the body has been read."""
        stamp = fingerprint(self.method, self.path, bytes(self.body))
        return CALLER.get(), self.key, stamp, self.ttl_seconds


_KEYED: contextvars.ContextVar[KeyedRequest | None] = contextvars.ContextVar(
    "keyed_request", default=None
)


def keyed_request() -> KeyedRequest | None:
    """The request this task serves, when it came with a valid Idempotency-Key."""
    return _KEYED.get()


class IdempotencyMiddleware:
    """ASGI middleware inside the Litestar app (after routing: a route's 404 or 405 never gets
    here, so it is never stored). Requests without a key pass straight through."""

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self._state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in KEYED_METHODS:
            await self.app(scope, receive, send)
            return
        values = [value for name, value in scope["headers"] if name == HEADER]
        if not values:
            await self.app(scope, receive, send)
            return
        if len(values) > 1:
            # Two fields are one field with the values joined (RFC 9110 5.3), which is no key:
            # validation then answers 400 naming Idempotency-Key with the other bad fields.
            joined = b", ".join(values)
            scope["headers"] = [(n, v) for n, v in scope["headers"] if n != HEADER]
            scope["headers"].append((HEADER, joined))
            await self.app(scope, receive, send)
            return
        key = parse_key(values[0].decode("latin-1"))
        if key is None:
            await self.app(scope, receive, send)  # validation answers 400
            return
        await self._keyed(scope, receive, send, key)

    async def _keyed(self, scope: Scope, receive: Receive, send: Send, key: str) -> None:
        db: Database = self._state.db
        keyed = KeyedRequest(
            scope["method"], scope["path"], key, self._state.settings.idempotency_key_ttl
        )

        async def receive_and_keep() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                keyed.body.extend(message.get("body", b""))
            return message

        response: list[Message] = []

        async def hold(message: Message) -> None:
            response.append(message)

        async with db.transaction() as transaction:
            token = _KEYED.set(keyed)
            try:
                await self.app(scope, receive_and_keep, hold)
            finally:
                _KEYED.reset(token)
            outcome = _outcome_of(response)
            if keyed.stored or outcome is None or not _stored(outcome.status):
                await transaction.rollback()
                for message in response:
                    await send(message)
                return
            scope_name, key, stamp, ttl_seconds = keyed.store_arguments()
            arguments = (
                scope_name,
                key,
                stamp,
                outcome.status,
                outcome.content_type,
                outcome.location,
                outcome.etag,
                outcome.body,
                ttl_seconds,
            )
            if transaction.failed or not transaction.begun:
                # The request's statement failed (a 404 or 409 told by a constraint), or it ran
                # none: nothing changed, so its outcome is stored on its own.
                await transaction.rollback()
            stored = await db.fetchrow(STORE, *arguments)
            if stored is not None:
                await transaction.commit()
                for message in response:
                    await send(message)
                return
            # The key is taken: this request's work, if any, is undone and the first answer
            # given instead.
            await transaction.rollback()
        for message in (await self._earlier(db, scope_name, key, stamp)).messages():
            await send(message)

    async def _earlier(self, db: Database, scope_name: str, key: str, stamp: bytes) -> Outcome:
        row = await db.fetchrow(FIND, scope_name, key)
        if row is None:
            # Expired and pruned between the two statements: the caller should simply retry.
            return _problem(IdempotencyKeyInUse(self._state.settings.retry_after_seconds))
        if row["fingerprint"] != stamp:
            return _problem(IdempotencyKeyReused())
        return Outcome(
            row["status"],
            row["content_type"],
            row["location"],
            row["etag"],
            row["body"],
            replayed=True,
        )


def _stored(status: int) -> bool:
    return 200 <= status < 300 or status in STORED_STATUSES


def _outcome_of(messages: list[Message]) -> Outcome | None:
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    if start is None:
        return None
    headers = {name.lower(): value.decode("latin-1") for name, value in start.get("headers", [])}
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return Outcome(
        start["status"],
        headers.get(b"content-type", "application/json"),
        headers.get(b"location"),
        headers.get(b"etag"),
        body,
    )


async def prune_expired_keys(db: Database, every_seconds: float) -> None:
    """Runs for the app's lifetime: deletes expired outcomes, a thousand at a time."""
    await prune_forever(
        db, PRUNE, batch=PRUNE_BATCH, every_seconds=every_seconds, what="expired idempotency keys"
    )


#: The parameter every POST, PATCH and DELETE handler declares: so that a bad key is a 400
#: naming `Idempotency-Key` along with every other bad field, and the OpenAPI document shows it.
IdempotencyKeyHeader = Annotated[
    IdempotencyKey | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        schema_extra={"type": "string"},
        description=(
            "Makes the request safe to retry: 1-255 visible ASCII characters, bare or as a "
            "quoted string. The first outcome is stored for IDEMPOTENCY_KEY_TTL seconds and "
            "answered again, with `Idempotent-Replayed: true`, to the same request under the "
            "same key."
        ),
    ),
]
