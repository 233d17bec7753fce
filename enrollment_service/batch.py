"""POST /enrollments/batch: many enrolls and drops, applied in one transaction by one statement."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import JSONBody
from msgspec import Meta

from enrollment_service.db import Database, Query
from enrollment_service.enrollments import Enrollment
from enrollment_service.health import require_current_schema
from enrollment_service.idempotency import IdempotencyKeyHeader
from enrollment_service.problems import (
    PROBLEM_MEDIA_TYPE,
    BatchFailure,
    BatchRejected,
    CourseFull,
    CourseNotFound,
    DomainError,
    EnrollmentNotFound,
    FieldError,
    Problem,
    StudentNotFound,
    UnsupportedMediaType,
    ValidationFailed,
    documented,
    problem_document,
)
from enrollment_service.validation import Id, StrictBody, is_json_media_type

MAX_ITEMS = 1000

APPLY = Query.load("enrollments/batch")


class BatchItem(msgspec.Struct, forbid_unknown_fields=True):
    student_id: Id
    course_id: Id
    action: Literal["enroll", "drop"] = "enroll"


class NewBatch(msgspec.Struct, forbid_unknown_fields=True):
    items: Annotated[
        list[BatchItem],
        Meta(
            min_length=1,
            max_length=MAX_ITEMS,
            description=f"1-{MAX_ITEMS} items, applied in this order",
        ),
    ]
    atomic: bool = False


class BatchResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """One item's outcome: what PUT (enroll) or DELETE (drop) of the pair would have answered.
    201 and 200 carry `enrollment`; 204 carries nothing; 404 and 409 carry `problem`."""

    status: int
    enrollment: Enrollment | None = None
    problem: Problem | None = None


class BatchSummary(msgspec.Struct, frozen=True):
    created: int
    unchanged: int
    dropped: int
    failed: int


class BatchOutcome(msgspec.Struct, frozen=True):
    results: list[BatchResult]
    summary: BatchSummary


# --- Strict decoding that names every bad field, nested ones as `items[3].course_id`. --------


def decode_batch(raw: bytes) -> NewBatch | list[FieldError]:
    """The whole body converted at once (strict types, unknown fields refused); only a body that
    fails is gone through field by field, so that every bad field is named."""
    try:
        return msgspec.json.decode(raw, type=NewBatch)
    except msgspec.ValidationError:
        pass
    except (msgspec.DecodeError, UnicodeDecodeError):
        return [FieldError("body", "is not valid JSON in UTF-8")]
    data = msgspec.json.decode(raw)  # valid JSON: only the types failed
    if not isinstance(data, dict):
        return [FieldError("body", "must be a JSON object")]
    errors = _struct_errors(data, NewBatch, "", skip=frozenset({"items"}))
    if "items" not in data:
        return [*errors, FieldError("items", "is required")]
    items = data["items"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        message = _message(items, _fields(NewBatch)["items"].type) or "is invalid"
        return [*errors, FieldError("items", message)]
    for index, item in enumerate(items):
        name = f"items[{index}]"
        if not isinstance(item, dict):
            errors.append(FieldError(name, "must be a JSON object"))
        else:
            errors += _struct_errors(item, BatchItem, f"{name}.")
    return errors or [FieldError("body", "is invalid")]


@functools.cache
def _fields(model: type[msgspec.Struct]) -> dict[str, msgspec.structs.FieldInfo]:
    return {field.encode_name: field for field in msgspec.structs.fields(model)}


def _struct_errors(
    data: dict[str, Any],
    model: type[msgspec.Struct],
    prefix: str,
    skip: frozenset[str] = frozenset(),
) -> list[FieldError]:
    fields = _fields(model)
    errors = [FieldError(prefix + key, "is not a known field") for key in data if key not in fields]
    for name, field in fields.items():
        if name in skip:
            continue
        if name not in data:
            if field.required:
                errors.append(FieldError(prefix + name, "is required"))
        elif (message := _message(data[name], field.type)) is not None:
            errors.append(FieldError(prefix + name, message))
    return errors


def _message(value: Any, annotation: Any) -> str | None:
    try:
        msgspec.convert(value, annotation, strict=True)
    except msgspec.ValidationError as error:
        return str(error).split(" - at `", 1)[0]
    return None


class BatchBody(StrictBody[NewBatch]):
    """The batch's body: a JSON type, then `decode_batch`."""

    def decode_bytes(self, value: bytes) -> Any:
        content_type = self.asgi_connection.headers.get("content-type", "")
        if not is_json_media_type(content_type):
            raise UnsupportedMediaType(content_type)
        result = decode_batch(value)
        if isinstance(result, list):
            raise ValidationFailed(result)
        return result


# --- From the statement's outcome codes to the single endpoints' answers. ------------------


def _failure(outcome: str, item: BatchItem) -> DomainError:
    match outcome:
        case "student-not-found":
            return StudentNotFound(item.student_id)
        case "course-not-found":
            return CourseNotFound(item.course_id)
        case "enrollment-not-found":
            return EnrollmentNotFound(item.student_id, item.course_id)
        case "course-full":
            return CourseFull(item.course_id)
    raise ValueError(f"enrollment_batch answered an unknown outcome {outcome!r}")


_DROPPED = BatchResult(204)


class BatchController(Controller):
    path = "/enrollments"
    tags = ["enrollments"]
    before_request = staticmethod(require_current_schema)

    @post(
        "/batch",
        dto=BatchBody,
        return_dto=None,
        status_code=200,
        summary="Enroll and drop many pairs in one transaction",
        description=(
            "Items apply in order, each as PUT (enroll) or DELETE (drop) of "
            "/students/{student_id}/courses/{course_id} would at that point. Non-atomic: 200 "
            "with one result per item, failed items changing nothing. Atomic: if any item would "
            "fail, 409 batch-rejected listing every failing item, and nothing changes."
        ),
        responses={
            **documented(409, body=True, keyed=True),
            409: ResponseSpec(
                data_container=Problem,
                media_type=PROBLEM_MEDIA_TYPE,
                description="batch-rejected: an atomic batch had items that would fail "
                "(`failures` lists each one's index and problem document); or "
                "idempotency-key-in-use",
                generate_examples=False,
            ),
        },
    )
    async def apply_batch(
        self,
        db: NamedDependency[Database],
        data: JSONBody[NewBatch],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> BatchOutcome:
        items = data.items
        rows = await db.fetch(
            APPLY,
            [item.student_id for item in items],
            [item.course_id for item in items],
            [item.action == "drop" for item in items],
            data.atomic,
        )
        results: list[BatchResult] = []
        failures: list[BatchFailure] = []
        counts = dict.fromkeys(("created", "unchanged", "dropped"), 0)
        for item, (index, outcome, enrolled_at) in zip(items, rows, strict=True):
            if outcome in counts:
                counts[outcome] += 1
                results.append(_success(outcome, item, enrolled_at))
                continue
            problem = problem_document(_failure(outcome, item))
            failures.append(BatchFailure(index, problem))
            results.append(BatchResult(problem.status, problem=problem))
        if data.atomic and failures:
            raise BatchRejected(failures)
        return BatchOutcome(results, BatchSummary(**counts, failed=len(failures)))


def _success(outcome: str, item: BatchItem, enrolled_at: datetime | None) -> BatchResult:
    if outcome == "dropped":
        return _DROPPED
    assert enrolled_at is not None
    enrollment = Enrollment(item.student_id, item.course_id, enrolled_at)
    return BatchResult(201 if outcome == "created" else 200, enrollment=enrollment)
