"""Courses: the controller for /courses and the Structs it reads and writes."""

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
    CapacityBelowEnrolled,
    CodeTaken,
    CourseNotFound,
    PreconditionFailed,
    documented,
)
from enrollment_service.validation import (
    NO_CONTROL_CHARS,
    Capacity,
    Code,
    Id,
    Level,
    Name,
    PathId,
    StrictBody,
    given_or_none,
    path_id,
)

CourseId = Annotated[PathId, path_id("The course's id")]


class NewCourse(msgspec.Struct, forbid_unknown_fields=True):
    code: Code
    name: Name
    level: Level
    capacity: Capacity | None = None


class CoursePatch(msgspec.Struct, forbid_unknown_fields=True):
    code: Code | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    level: Level | UnsetType = UNSET
    capacity: Capacity | UnsetType | None = UNSET


class Course(msgspec.Struct, frozen=True):
    id: Id
    code: str
    name: str
    level: str
    capacity: int | None
    enrolled_count: int
    created_at: datetime


class CoursePage(Page[Course], frozen=True):
    pass


CREATE = Query.load("courses/create", shape=Course)
GET = Query.load("courses/get", shape=Course)
LIST = Query.load("courses/list", shape=Course)
LIST_BY_CODE = Query.load("courses/list_by_code", shape=Course)
PATCH = Query.load("courses/patch", shape=Course)
DELETE = Query.load("courses/delete")


def to_course(row: asyncpg.Record) -> Course:
    return Course(*row)  # the columns are the fields, in order (see Query.shape)


#: get, create and patch return the Course's fields, then its etag (patch: then `permitted`).
ETAG = len(Course.__struct_fields__)


def to_tagged_course(row: asyncpg.Record) -> Course:
    return Course(*row[:ETAG])


def _code_taken(error: asyncpg.UniqueViolationError, code: str | UnsetType) -> Exception:
    if error.constraint_name == "courses_code_key" and isinstance(code, str):
        return CodeTaken(code)
    return error


class CourseController(Controller):
    path = "/courses"
    tags = ["courses"]
    before_request = staticmethod(require_current_schema)

    @post(
        dto=StrictBody[NewCourse],
        return_dto=None,
        status_code=201,
        summary="Create a course",
        responses=documented(409, body=True, keyed=True),
        response_headers=ETAG_HEADER,
    )
    async def create_course(
        self,
        db: NamedDependency[Database],
        data: JSONBody[NewCourse],
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[Course]:
        try:
            row = await db.fetchrow(CREATE, data.code, data.name, data.level, data.capacity)
        except asyncpg.UniqueViolationError as error:
            raise _code_taken(error, data.code) from None
        assert row is not None
        return tagged(to_tagged_course(row), row[ETAG], 201, Location=f"/courses/{row[0]}")

    @get(summary="List courses by id", responses=documented(400))
    async def list_courses(
        self,
        pages: NamedDependency[Pages],
        limit: Limit = 50,
        cursor: Cursor = None,
        code: Annotated[
            str | None,
            Parameter(
                max_length=32, pattern=NO_CONTROL_CHARS, description="Exact course code, any case"
            ),
        ] = None,
    ) -> CoursePage:
        listing = "courses" if code is None else f"courses?code={code.strip().lower()}"
        if code is None:
            rows = await pages.fetch(LIST, listing, cursor, limit)
        else:
            rows = await pages.fetch(LIST_BY_CODE, listing, cursor, limit, code.strip())
        return pages.page(CoursePage, rows, limit, to_course, listing)

    @get(
        "/{course_id:str}",
        summary="Get a course",
        responses={**documented(400, 404), **NOT_MODIFIED},
        response_headers=ETAG_HEADER,
    )
    async def get_course(
        self,
        db: NamedDependency[Database],
        course_id: CourseId,
        if_none_match: IfNoneMatch = None,
    ) -> Response[Course]:
        row = await db.fetchrow(GET, course_id)
        if row is None:
            raise CourseNotFound(course_id)
        return tagged_unless_known(to_tagged_course(row), row[ETAG], if_none_match)

    @patch(
        "/{course_id:str}",
        dto=StrictBody[CoursePatch],
        return_dto=None,
        summary="Change a course; capacity null removes the limit",
        responses=documented(404, 409, 412, body=True, keyed=True),
        response_headers=ETAG_HEADER,
    )
    async def patch_course(
        self,
        db: NamedDependency[Database],
        course_id: CourseId,
        data: JSONBody[CoursePatch],
        if_match: IfMatch = None,
        if_none_match: IfNoneMatch = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response[Course]:
        set_capacity = not isinstance(data.capacity, UnsetType)
        capacity = None if isinstance(data.capacity, UnsetType) else data.capacity
        try:
            row = await db.fetchrow(
                PATCH,
                course_id,
                given_or_none(data.code),
                given_or_none(data.name),
                given_or_none(data.level),
                set_capacity,
                capacity,
                if_match_tags(if_match),
                if_none_match_tags(if_none_match),
            )
        except asyncpg.UniqueViolationError as error:
            raise _code_taken(error, data.code) from None
        except asyncpg.CheckViolationError as error:
            if error.constraint_name == "courses_enrolled_within_capacity" and capacity is not None:
                raise CapacityBelowEnrolled(course_id, capacity) from None
            raise
        if row is None:
            raise CourseNotFound(course_id)
        if not row[ETAG + 1]:
            raise PreconditionFailed("Course", course_id)
        return tagged(to_tagged_course(row), row[ETAG])

    @delete(
        "/{course_id:str}",
        summary="Delete a course and its enrollments",
        responses=documented(400, 404, 412, keyed=True),
    )
    async def delete_course(
        self,
        db: NamedDependency[Database],
        course_id: CourseId,
        if_match: IfMatch = None,
        if_none_match: IfNoneMatch = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> None:
        await delete_if_matching(
            db, DELETE, "Course", course_id, if_match, if_none_match, CourseNotFound(course_id)
        )
