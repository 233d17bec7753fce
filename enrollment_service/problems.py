"""Every domain outcome and every framework error, turned into an RFC 9457 problem document here
and nowhere else."""

from __future__ import annotations

import http
import logging
import re
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotFoundException,
    ValidationException,
)
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_400_BAD_REQUEST, HTTP_413_REQUEST_ENTITY_TOO_LARGE

from enrollment_service.db import DatabaseUnavailable

log = logging.getLogger("enrollment_service.problems")

PROBLEM_BASE = "https://enrollment-service/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class Problem(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of every error response."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    checks: dict[str, str] | None = None
    failures: list[BatchFailure] | None = None


class BatchFailure(msgspec.Struct, frozen=True):
    """One item of an atomic batch that would fail: its 0-based index, and the problem document
    the item alone would have been answered with."""

    index: int
    problem: Problem


# --- Domain errors: small classes carrying ids, raised where the outcome is known. ----------


class DomainError(Exception):
    """An outcome with its place in the contract. `detail` is a template filled from the
    instance's fields; a subclass with more to say overrides `describe`."""

    status = 500
    slug = "internal-error"
    title = "Internal error"
    detail = "The service failed to handle the request"

    def describe(self) -> str:
        return self.detail.format_map(vars(self))

    def headers(self) -> dict[str, str]:
        return {}


@dataclass(eq=False)
class ValidationFailed(DomainError):
    errors: list[FieldError]
    status, slug, title = 400, "validation-error", "Invalid request"

    def describe(self) -> str:
        names = ", ".join(dict.fromkeys(error.field for error in self.errors))
        return f"Invalid value for {names}"


@dataclass(eq=False)
class StudentNotFound(DomainError):
    student_id: int
    status, slug, title = 404, "student-not-found", "Student not found"
    detail = "Student {student_id} does not exist"


@dataclass(eq=False)
class CourseNotFound(DomainError):
    course_id: int
    status, slug, title = 404, "course-not-found", "Course not found"
    detail = "Course {course_id} does not exist"


@dataclass(eq=False)
class EnrollmentNotFound(DomainError):
    student_id: int
    course_id: int
    status, slug, title = 404, "enrollment-not-found", "Enrollment not found"
    detail = "Student {student_id} is not enrolled in course {course_id}"


@dataclass(eq=False)
class EmailTaken(DomainError):
    status, slug, title = 409, "email-taken", "Email taken"
    detail = "Another student already has this email (compared case-insensitively)"


@dataclass(eq=False)
class CodeTaken(DomainError):
    code: str
    status, slug, title = 409, "code-taken", "Code taken"
    detail = "Another course already has code {code!r} (compared case-insensitively)"


@dataclass(eq=False)
class AlreadyEnrolled(DomainError):
    student_id: int
    course_id: int
    status, slug, title = 409, "already-enrolled", "Already enrolled"
    detail = "Student {student_id} is already enrolled in course {course_id}"


@dataclass(eq=False)
class CourseFull(DomainError):
    course_id: int
    status, slug, title = 409, "course-full", "Course full"
    detail = "Course {course_id} has no free seat"


@dataclass(eq=False)
class CapacityBelowEnrolled(DomainError):
    course_id: int
    capacity: int
    status, slug, title = 409, "capacity-below-enrolled", "Capacity below enrolled count"
    detail = "Course {course_id} has more students enrolled than the requested capacity {capacity}"


@dataclass(eq=False)
class PreconditionFailed(DomainError):
    resource: str  # "Student", "Course"
    resource_id: int
    status, slug, title = 412, "precondition-failed", "Precondition failed"
    detail = (
        "{resource} {resource_id} has an ETag that fails the request's If-Match or "
        "If-None-Match; nothing was changed"
    )


@dataclass(eq=False)
class EnrollmentExists(DomainError):
    """412 for a create-only PUT (`If-None-Match: *`) of a pair already enrolled."""

    student_id: int
    course_id: int
    status, slug, title = 412, "precondition-failed", "Precondition failed"
    detail = (
        "Student {student_id} is already enrolled in course {course_id}, and "
        "If-None-Match: * allows only a new enrollment; nothing was changed"
    )


@dataclass(eq=False)
class CursorExpired(DomainError):
    status, slug, title = 410, "cursor-expired", "Cursor expired"
    detail = (
        "Changes after this cursor are older than the feed's retention and were pruned; "
        "start again from GET /changes/head after copying the current state from the list "
        "endpoints"
    )


@dataclass(eq=False)
class Unauthorized(DomainError):
    status, slug, title = 401, "unauthorized", "Unauthorized"
    detail = "Send a valid token as 'Authorization: Bearer <token>'"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="enrollment-service"'}


@dataclass(eq=False)
class UnsupportedMediaType(DomainError):
    content_type: str
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"

    def describe(self) -> str:
        if not self.content_type:
            return "The request body needs Content-Type: application/json"
        return f"The request body must be application/json, not {self.content_type}"


@dataclass(eq=False)
class NotReady(DomainError):
    checks: dict[str, str]
    status, slug, title = 503, "not-ready", "Not ready"

    def describe(self) -> str:
        failing = ", ".join(name for name, result in self.checks.items() if result != "ok")
        return f"The service is not ready: {failing}"


@dataclass(eq=False)
class RetryLater(DomainError):
    """An outcome the caller should try again after `retry_after` seconds (Retry-After)."""

    retry_after: int

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


@dataclass(eq=False)
class Unavailable(RetryLater):
    status, slug, title = 503, "database-unavailable", "Database unavailable"
    detail = "The database cannot be reached right now; retry later"


@dataclass(eq=False)
class RouteNotFound(DomainError):
    path: str
    status, slug, title = 404, "not-found", "Not found"
    detail = "No route matches {path}"


@dataclass(eq=False)
class MethodNotAllowed(DomainError):
    method: str
    path: str
    status, slug, title = 405, "method-not-allowed", "Method not allowed"
    detail = "{method} is not allowed on {path}"


@dataclass(eq=False)
class IdempotencyKeyReused(DomainError):
    status, slug, title = 422, "idempotency-key-reused", "Idempotency key reused"
    detail = (
        "This Idempotency-Key was already used for a different request (another method, path "
        "or body); use a new key for a new request"
    )


@dataclass(eq=False)
class IdempotencyKeyInUse(RetryLater):
    status, slug, title = 409, "idempotency-key-in-use", "Idempotency key in use"
    detail = "A request with this Idempotency-Key is still being processed; retry later"


@dataclass(eq=False)
class BatchRejected(DomainError):
    failures: list[BatchFailure]
    status, slug, title = 409, "batch-rejected", "Batch rejected"

    def describe(self) -> str:
        indexes = ", ".join(str(failure.index) for failure in self.failures[:20])
        more = f" and {len(self.failures) - 20} more" if len(self.failures) > 20 else ""
        items = "item" if len(self.failures) == 1 else "items"
        return f"Nothing was changed: the atomic batch's {items} {indexes}{more} would fail"


@dataclass(eq=False)
class PayloadTooLarge(DomainError):
    status, slug, title = 413, "payload-too-large", "Payload too large"
    detail = "The request body exceeds 1 MiB"


#: The contract's slug and title for the statuses it names; any other status is named after its
#: HTTP reason phrase (429 "Too Many Requests" -> too-many-requests).
_CONTRACT_NAMES = {
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    500: (DomainError.slug, DomainError.title),
}


def _status_names(status: int) -> tuple[str, str]:
    """A status's slug and title: the contract's, or else made from its reason phrase."""
    if status in _CONTRACT_NAMES:
        return _CONTRACT_NAMES[status]
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Client error" if status < 500 else "Server error"
    slug = re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-")
    first, *rest = phrase.split(" ")
    # Sentence case like the contract's titles, keeping acronyms ("HTTP version not supported").
    words = [word if word[1:].lower() != word[1:] else word.lower() for word in rest]
    return slug, " ".join([first, *words])


class HttpError(DomainError):
    """A framework's HTTP error (403, 429, ...): its status, and its headers (Retry-After,
    Allow), in a problem document. A 5xx says no more than its status."""

    def __init__(
        self, status: int, slug: str, title: str, message: str, headers: dict[str, str]
    ) -> None:
        super().__init__(message)
        self.status, self.slug, self.title = status, slug, title
        self.message = message
        self.extra_headers = headers

    @classmethod
    def of(cls, exc: HTTPException) -> HttpError:
        status = exc.status_code
        slug, title = _status_names(status)
        headers = dict(exc.headers or {})
        if status == 401 and not any(name.lower() == "www-authenticate" for name in headers):
            headers.update(Unauthorized().headers())
        message = exc.detail if status < 500 else f"The service answered {status} {title}"
        return cls(status, slug, title, message, headers)

    def describe(self) -> str:
        return self.message

    def headers(self) -> dict[str, str]:
        return self.extra_headers


# --- Turning errors into responses. --------------------------------------------------------


def problem_document(error: DomainError) -> Problem:
    errors = error.errors if isinstance(error, ValidationFailed) else None
    checks = error.checks if isinstance(error, NotReady) else None
    failures = error.failures if isinstance(error, BatchRejected) else None
    return Problem(
        type=PROBLEM_BASE + error.slug,
        title=error.title,
        status=error.status,
        detail=error.describe(),
        errors=errors,
        checks=checks,
        failures=failures,
    )


def problem_response(error: DomainError) -> Response[Problem]:
    document = problem_document(error)
    return Response(
        document,
        status_code=document.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=error.headers(),
    )


def _from_framework(request: Request[Any, Any, Any], exc: Exception) -> DomainError:
    if isinstance(exc, DomainError):
        return exc
    if isinstance(exc, DatabaseUnavailable):
        return Unavailable(retry_after=request.app.state.settings.retry_after_seconds)
    if isinstance(exc, ValidationException):
        return ValidationFailed(_field_errors(request, exc))
    if isinstance(exc, NotFoundException):
        return RouteNotFound(request.url.path)
    if isinstance(exc, MethodNotAllowedException):
        return MethodNotAllowed(request.method, request.url.path)
    if isinstance(exc, HTTPException) and 400 <= exc.status_code < 600:
        status = exc.status_code
        if status == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
            return PayloadTooLarge()
        if status == HTTP_400_BAD_REQUEST:
            # The contract's every 400 is a validation-error (e.g. an invalid Host or
            # Content-Length header, found by Litestar before any handler runs).
            return ValidationFailed(_field_errors(request, exc, default_field="request"))
        if status >= 500:
            _log_unhandled(request)
        return HttpError.of(exc)
    _log_unhandled(request)
    return DomainError()


def _log_unhandled(request: Request[Any, Any, Any]) -> None:
    log.exception("unhandled error on %s %s", request.method, request.scope.get("path_template"))


def handle_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[Problem]:
    error = _from_framework(request, exc)
    response = problem_response(error)
    if isinstance(exc, MethodNotAllowedException) and exc.headers:
        response.headers.update(exc.headers)
    if error.status == 503:
        # The metrics count 503s by cause (database-unavailable, not-ready, ...).
        metrics = getattr(request.app.state, "metrics", None)
        if metrics is not None:
            metrics.unavailable(request.scope.get("path_template") or "", error.slug)
    return response


def _field_errors(
    request: Request[Any, Any, Any], exc: HTTPException, default_field: str = "body"
) -> list[FieldError]:
    errors: list[FieldError] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if not isinstance(item, dict):
            continue
        key = str(item.get("key") or "body")
        if key == "data":
            errors.append(FieldError("body", "a JSON object is required"))
            continue
        message = _clean_message(str(item.get("message", "is invalid")))
        errors.append(FieldError(_FIELD_NAMES.get(key, key), message))
    if not errors:
        errors.append(FieldError(default_field, _clean_message(exc.detail)))
    return errors


#: The contract's name for a field where Litestar reports the parameter's.
IDEMPOTENCY_KEY_FIELD = "Idempotency-Key"
_FIELD_NAMES = {"idempotency_key": IDEMPOTENCY_KEY_FIELD}


def _clean_message(message: str) -> str:
    return message.split(" - at `", 1)[0]


# --- What the OpenAPI document says each handler may answer. ------------------------------

_DESCRIPTIONS = {
    400: "validation-error: a malformed body, a wrong type, a missing, unknown or out-of-range "
    "field, or a bad limit, cursor or id; `errors` names each bad field",
    401: "unauthorized: tokens are configured and the request has no valid bearer token",
    404: "not found: the slug says which of student-not-found, course-not-found, "
    "enrollment-not-found",
    409: "conflict: the slug says which of email-taken, code-taken, already-enrolled, "
    "course-full, capacity-below-enrolled, batch-rejected, idempotency-key-in-use",
    410: "cursor-expired: changes after the cursor were pruned (older than CHANGES_RETENTION)",
    412: "precondition-failed: If-Match names no current ETag (a weak or malformed tag never "
    "matches), or If-None-Match names the current one; nothing changed",
    413: "payload-too-large: the body exceeds 1 MiB",
    415: "unsupported-media-type: the body is not application/json",
    422: "idempotency-key-reused: the Idempotency-Key was already used for a different request "
    "(another method, path or body); nothing changed",
    500: "internal-error: never expected",
    503: "database-unavailable (with Retry-After), or not-ready while migrations are pending",
}
_ALWAYS = (401, 500, 503)
_WITH_BODY = (400, 413, 415)


_KEYED = (400, 409, 422)


def documented(*statuses: int, body: bool = False, keyed: bool = False) -> dict[int, ResponseSpec]:
    """The problem responses a handler declares in the OpenAPI document; `keyed` for one that
    takes an Idempotency-Key (a bad key is a 400, a reused one 422, one in flight 409)."""
    extra = (*(_WITH_BODY if body else ()), *(_KEYED if keyed else ()))
    codes = sorted({*statuses, *_ALWAYS, *extra})
    return {
        code: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_MEDIA_TYPE,
            description=_DESCRIPTIONS[code],
            generate_examples=False,
        )
        for code in codes
    }
