"""Enrollments: the student_courses relationship, seen from either side."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Request, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import HeaderParameter, JSONBody
from litestar.response import Response

from enrollment_service.conditional import WILDCARD, if_none_match_tags
from enrollment_service.courses import Course, CourseId
from enrollment_service.db import Database, Query
from enrollment_service.health import require_current_schema
from enrollment_service.idempotency import (
    KEY_CONSTRAINT,
    IdempotencyKeyHeader,
    KeyedRequest,
    keyed_request,
)
from enrollment_service.pagination import Cursor, Limit, Page, Pages
from enrollment_service.problems import (
    PROBLEM_MEDIA_TYPE,
    AlreadyEnrolled,
    CourseFull,
    CourseNotFound,
    EnrollmentExists,
    EnrollmentNotFound,
    Problem,
    StudentNotFound,
    UnsupportedMediaType,
    ValidationFailed,
    documented,
)
from enrollment_service.students import Student, StudentId
from enrollment_service.validation import (
    Id,
    StrictBody,
    decode_strict,
    is_json_media_type,
    path_id_errors,
)

ENROLL = Query.load("enrollments/enroll")
ENROLL_KEYED = Query.load("enrollments/enroll_keyed")
GET = Query.load("enrollments/get")
DROP = Query.load("enrollments/drop")


class NewEnrollment(msgspec.Struct, forbid_unknown_fields=True):
    course_id: Id


#: PUT's If-None-Match: only `*` means anything, since an enrollment has no ETag to name.
CreateOnly = Annotated[
    str | None,
    HeaderParameter(
        name="If-None-Match",
        required=False,
        description="`*`: enroll only if not enrolled already, else 412 (nothing changes); "
        "an enrollment has no ETag, so any other value never matches and is ignored",
    ),
]


class NoBody(msgspec.Struct, forbid_unknown_fields=True):
    """PUT's body, when one is sent: `{}`."""


class Enrollment(msgspec.Struct, frozen=True):
    student_id: int
    course_id: int
    enrolled_at: datetime


class EnrolledCourse(Course, frozen=True):
    """A course as one student sees it: the Course fields plus when they enrolled."""

    enrolled_at: datetime


class EnrolledStudent(Student, frozen=True):
    """A student on a course's roster: the Student fields plus when they enrolled."""

    enrolled_at: datetime


class EnrolledCoursePage(Page[EnrolledCourse], frozen=True):
    """The shape of a page whose JSON PostgreSQL writes (sql/enrollments/list_for_student):
    what the OpenAPI document says, and what tests/test_json_pages.py holds that JSON to."""


class RosterPage(Page[EnrolledStudent], frozen=True):
    """The same, for sql/enrollments/roster."""


LIST_FOR_STUDENT = Query.load("enrollments/list_for_student")
ROSTER = Query.load("enrollments/roster")


def _refusal(
    error: asyncpg.IntegrityConstraintViolationError, student_id: int, course_id: int
) -> Exception:
    """The enroll statement reports every refusal as the constraint that refused it."""
    match error.constraint_name:
        case "student_courses_student_id_fkey":
            return StudentNotFound(student_id)
        case "student_courses_course_id_fkey":
            return CourseNotFound(course_id)
        case "courses_enrolled_within_capacity":
            return CourseFull(course_id)
    return error


async def _enroll_keyed(
    db: Database, keyed: KeyedRequest, student_id: int, course_id: int, location: str
) -> tuple[asyncpg.Record, bytes | None]:
    """A keyed enroll: the enrollment and its 201 stored under the key in one statement, which
    answers the stored body (None when it created nothing). When the key is held already, the
    plain statement runs in the request's transaction instead, and the middleware replays or
    stores as the key's state says."""
    try:
        row = await db.fetchrow_alone(
            ENROLL_KEYED, student_id, course_id, *keyed.store_arguments(), location
        )
    except asyncpg.UniqueViolationError as error:
        if error.constraint_name != KEY_CONSTRAINT:
            raise
        row = await db.fetchrow(ENROLL, student_id, course_id)
        assert row is not None
        return row, None
    assert row is not None
    body: bytes | None = row["body"]
    keyed.stored = body is not None
    return row, body


def _json_response(
    body: bytes, status_code: int, headers: dict[str, str] | None = None
) -> Response[Any]:
    """A response whose JSON body is already encoded."""
    return Response(body, status_code=status_code, headers=headers, media_type="application/json")


@dataclass
class EmptyBodyOperation(Operation):
    """PUT's operation: its body, which the handler reads itself, is `{}` or nothing."""

    def __post_init__(self) -> None:
        empty = Schema(type=OpenAPIType.OBJECT, max_properties=0, description="`{}`, or no body")
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=empty)}, required=False
        )


async def _empty_body_only(request: Request[Any, Any, Any]) -> None:
    """PUT's `before_request`: the schema gate, then the body, if any, must be `{}`. Read here,
    before Litestar checks the path, so that 415 comes before 400 and a bad body is reported
    with the bad ids."""
    await require_current_schema(request)
    raw = await request.body()
    if not raw:
        return
    content_type = request.headers.get("content-type", "")
    if not is_json_media_type(content_type):
        raise UnsupportedMediaType(content_type)
    decoded = decode_strict(raw, NoBody)
    if isinstance(decoded, list):
        raise ValidationFailed(path_id_errors(request.path_params) + decoded)


class EnrollmentController(Controller):
    path = "/students/{student_id:str}/courses"
    tags = ["enrollments"]
    before_request = staticmethod(require_current_schema)

    @post(
        dto=StrictBody[NewEnrollment],
        return_dto=None,
        status_code=201,
        summary="Enroll a student in a course",
        responses=documented(404, 409, body=True, keyed=True),
    )
    async def enroll(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        data: JSONBody[NewEnrollment],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[Enrollment]:
        location = f"/students/{student_id}/courses/{data.course_id}"
        keyed = keyed_request()
        stored: bytes | None = None
        try:
            if keyed is None:
                row = await db.fetchrow(ENROLL, student_id, data.course_id)
            else:
                row, stored = await _enroll_keyed(db, keyed, student_id, data.course_id, location)
        except (asyncpg.ForeignKeyViolationError, asyncpg.CheckViolationError) as error:
            raise _refusal(error, student_id, data.course_id) from None
        assert row is not None
        if not row["created"]:
            raise AlreadyEnrolled(student_id, data.course_id)
        if stored is not None:
            # The stored bytes themselves, so that the answer and its replays are one.
            return _json_response(stored, status_code=201, headers={"Location": location})
        enrollment = Enrollment(int(student_id), data.course_id, row["enrolled_at"])
        return Response(enrollment, status_code=201, headers={"Location": location})

    @put(
        "/{course_id:str}",
        status_code=201,
        summary="Enroll a student in a course, idempotently",
        before_request=_empty_body_only,
        operation_class=EmptyBodyOperation,
        description="201 when it enrolls; 200 with the enrollment as it was when the student "
        "is enrolled already (with `If-None-Match: *`, 412 instead). The body, if any, is `{}`.",
        responses={
            200: ResponseSpec(
                data_container=Enrollment,
                description="Already enrolled: the enrollment, with its original enrolled_at",
                generate_examples=False,
            ),
            **documented(404, 409, body=True),
            412: ResponseSpec(
                data_container=Problem,
                media_type=PROBLEM_MEDIA_TYPE,
                description="precondition-failed: `If-None-Match: *` and the student is "
                "enrolled already; nothing changed",
                generate_examples=False,
            ),
        },
    )
    async def put_enrollment(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        course_id: CourseId,
        if_none_match: CreateOnly = None,
    ) -> Response[Enrollment]:
        # Enrolling again is the statement's "do update" of nothing: no seat is taken twice.
        try:
            row = await db.fetchrow(ENROLL, student_id, course_id)
        except (asyncpg.ForeignKeyViolationError, asyncpg.CheckViolationError) as error:
            raise _refusal(error, student_id, course_id) from None
        assert row is not None
        enrollment = Enrollment(int(student_id), int(course_id), row["enrolled_at"])
        if row["created"]:
            location = f"/students/{student_id}/courses/{course_id}"
            return Response(enrollment, status_code=201, headers={"Location": location})
        if if_none_match is not None and if_none_match_tags(if_none_match) == [WILDCARD]:
            # Create-only, and the pair was there: the update wrote the row as it was.
            raise EnrollmentExists(int(student_id), int(course_id))
        return Response(enrollment, status_code=200)

    @get(summary="List a student's courses by course id", responses=documented(400, 404))
    async def list_courses_of_student(
        self,
        pages: NamedDependency[Pages],
        student_id: StudentId,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> Response[EnrolledCoursePage]:
        # The page's JSON comes written by PostgreSQL (tests/test_json_pages.py holds it to the
        # encoder): building it from rows and Structs cost a fifth of the request's CPU.
        listing = f"students/{student_id}/courses"
        body = await pages.fetch_json(LIST_FOR_STUDENT, listing, cursor, limit, student_id)
        if body is None:
            raise StudentNotFound(student_id)
        return _json_response(body, status_code=200)

    @get("/{course_id:str}", summary="Get one enrollment", responses=documented(400, 404))
    async def get_enrollment(
        self, db: NamedDependency[Database], student_id: StudentId, course_id: CourseId
    ) -> Enrollment:
        row = await db.fetchrow(GET, student_id, course_id)
        if row is None:
            raise StudentNotFound(student_id)
        if row["enrolled_at"] is None:
            raise EnrollmentNotFound(student_id, course_id)
        return Enrollment(int(student_id), int(course_id), row["enrolled_at"])

    @delete(
        "/{course_id:str}",
        summary="Unenroll a student from a course",
        responses=documented(400, 404, keyed=True),
    )
    async def unenroll(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        course_id: CourseId,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> None:
        row = await db.fetchrow(DROP, student_id, course_id)
        assert row is not None
        if not row["student_exists"]:
            raise StudentNotFound(student_id)
        if not row["dropped"]:
            raise EnrollmentNotFound(student_id, course_id)


class RosterController(Controller):
    path = "/courses/{course_id:str}/students"
    tags = ["enrollments"]
    before_request = staticmethod(require_current_schema)

    @get(summary="List a course's students by student id", responses=documented(400, 404))
    async def roster(
        self,
        pages: NamedDependency[Pages],
        course_id: CourseId,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> Response[RosterPage]:
        # Written by PostgreSQL, as a student's courses are.
        listing = f"courses/{course_id}/students"
        body = await pages.fetch_json(ROSTER, listing, cursor, limit, course_id)
        if body is None:
            raise CourseNotFound(course_id)
        return _json_response(body, status_code=200)
