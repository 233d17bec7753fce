"""Students: the controller for /students and the Structs it reads and writes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.di import NamedDependency
from litestar.params import JSONBody, Parameter
from litestar.response import Response
from msgspec import UNSET, UnsetType

from enrollment_service.conditional import (
    ETAG_HEADER,
    NOT_MODIFIED,
    IfMatch,
    IfNoneMatch,
    delete_if_matching,
    if_match_tags,
    if_none_match_tags,
    tagged,
    tagged_unless_known,
)
from enrollment_service.db import Database, Query
from enrollment_service.health import require_current_schema
from enrollment_service.idempotency import IdempotencyKeyHeader
from enrollment_service.pagination import Cursor, Limit, Page, Pages
from enrollment_service.problems import (
    EmailTaken,
    PreconditionFailed,
    StudentNotFound,
    documented,
)
from enrollment_service.validation import (
    NO_CONTROL_CHARS,
    Email,
    Id,
    Name,
    PathId,
    StrictBody,
    given_or_none,
    path_id,
)

StudentId = Annotated[PathId, path_id("The student's id")]


class NewStudent(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    email: Email


class StudentPatch(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | UnsetType = UNSET
    email: Email | UnsetType = UNSET


class Student(msgspec.Struct, frozen=True):
    id: Id
    name: str
    email: str
    created_at: datetime


class StudentPage(Page[Student], frozen=True):
    pass


CREATE = Query.load("students/create", shape=Student)
GET = Query.load("students/get", shape=Student)
LIST = Query.load("students/list", shape=Student)
LIST_BY_EMAIL = Query.load("students/list_by_email", shape=Student)
PATCH = Query.load("students/patch", shape=Student)
DELETE = Query.load("students/delete")


def to_student(row: asyncpg.Record) -> Student:
    return Student(*row)  # the columns are the fields, in order (see Query.shape)


#: get, create and patch return the Student's fields, then its etag (patch: then `permitted`).
ETAG = len(Student.__struct_fields__)


def to_tagged_student(row: asyncpg.Record) -> Student:
    return Student(*row[:ETAG])


def _refusal(error: asyncpg.UniqueViolationError) -> Exception:
    return EmailTaken() if error.constraint_name == "students_email_key" else error


class StudentController(Controller):
    path = "/students"
    tags = ["students"]
    before_request = staticmethod(require_current_schema)

    @post(
        dto=StrictBody[NewStudent],
        return_dto=None,
        status_code=201,
        summary="Create a student",
        responses=documented(409, body=True, keyed=True),
        response_headers=ETAG_HEADER,
    )
    async def create_student(
        self,
        db: NamedDependency[Database],
        data: JSONBody[NewStudent],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[Student]:
        try:
            row = await db.fetchrow(CREATE, data.name, data.email)
        except asyncpg.UniqueViolationError as error:
            raise _refusal(error) from None
        assert row is not None
        return tagged(to_tagged_student(row), row[ETAG], 201, Location=f"/students/{row[0]}")

    @get(summary="List students by id", responses=documented(400))
    async def list_students(
        self,
        pages: NamedDependency[Pages],
        limit: Limit = 50,
        cursor: Cursor = None,
        email: Annotated[
            str | None,
            Parameter(
                max_length=254, pattern=NO_CONTROL_CHARS, description="Exact email, any case"
            ),
        ] = None,
    ) -> StudentPage:
        listing = "students" if email is None else f"students?email={email.strip().lower()}"
        if email is None:
            rows = await pages.fetch(LIST, listing, cursor, limit)
        else:
            rows = await pages.fetch(LIST_BY_EMAIL, listing, cursor, limit, email.strip())
        return pages.page(StudentPage, rows, limit, to_student, listing)

    @get(
        "/{student_id:str}",
        summary="Get a student",
        responses={**documented(400, 404), **NOT_MODIFIED},
        response_headers=ETAG_HEADER,
    )
    async def get_student(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        if_none_match: IfNoneMatch = None,
    ) -> Response[Student]:
        row = await db.fetchrow(GET, student_id)
        if row is None:
            raise StudentNotFound(student_id)
        return tagged_unless_known(to_tagged_student(row), row[ETAG], if_none_match)

    @patch(
        "/{student_id:str}",
        dto=StrictBody[StudentPatch],
        return_dto=None,
        summary="Change a student's name or email",
        responses=documented(404, 409, 412, body=True, keyed=True),
        response_headers=ETAG_HEADER,
    )
    async def patch_student(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        data: JSONBody[StudentPatch],
        if_match: IfMatch = None,
        if_none_match: IfNoneMatch = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[Student]:
        try:
            row = await db.fetchrow(
                PATCH,
                student_id,
                given_or_none(data.name),
                given_or_none(data.email),
                if_match_tags(if_match),
                if_none_match_tags(if_none_match),
            )
        except asyncpg.UniqueViolationError as error:
            raise _refusal(error) from None
        if row is None:
            raise StudentNotFound(student_id)
        if not row[ETAG + 1]:
            raise PreconditionFailed("Student", student_id)
        return tagged(to_tagged_student(row), row[ETAG])

    @delete(
        "/{student_id:str}",
        summary="Delete a student and their enrollments",
        responses=documented(400, 404, 412, keyed=True),
    )
    async def delete_student(
        self,
        db: NamedDependency[Database],
        student_id: StudentId,
        if_match: IfMatch = None,
        if_none_match: IfNoneMatch = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> None:
        await delete_if_matching(
            db, DELETE, "Student", student_id, if_match, if_none_match, StudentNotFound(student_id)
        )
