"""The two enrollment lists, whose pages' JSON PostgreSQL writes (sql/enrollments/list_for_student
and roster): held byte for byte to what the service's encoder writes for the page Structs built
from the same rows, field by field, and to the Structs' schema by strict decoding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import msgspec

from enrollment_service.enrollments import (
    EnrolledCourse,
    EnrolledCoursePage,
    EnrolledStudent,
    RosterPage,
)
from tests.conftest import create_course, create_student, enroll

# Names the encoder must escape, or may write as they are: quotes, backslashes, non-ASCII,
# astral characters, U+2028 (JSON allows it raw), and HTML's specials (neither escapes them).
AWKWARD_NAMES = ['Quote " and \\ back', "Zoë Ødegård 😀", "line\u2028sep <b>&amp;</b>", "plain"]


_SET_CREATED_AT = {
    "students": "update students set created_at = $2 where id = $1",
    "courses": "update courses set created_at = $2 where id = $1",
}


async def _set_created_at(pool: asyncpg.Pool, table: str, row_id: int, moment: datetime) -> None:
    await pool.execute(_SET_CREATED_AT[table], row_id, moment)


async def _set_enrolled_at(
    pool: asyncpg.Pool, student_id: int, course_id: int, moment: datetime
) -> None:
    await pool.execute(
        "update student_courses set enrolled_at = $3 where student_id = $1 and course_id = $2",
        student_id,
        course_id,
        moment,
    )


# Microseconds none, some, leading zeros, the most; and one given in another zone.
MOMENTS = [
    datetime(2026, 12, 2, 7, 4, 5, tzinfo=UTC),
    datetime(2026, 12, 2, 7, 4, 5, 10, tzinfo=UTC),
    datetime(2026, 12, 2, 7, 4, 5, 120000, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
]


async def test_json_timestamp_writes_what_the_encoder_writes(pool: asyncpg.Pool) -> None:
    elsewhere = timezone(timedelta(hours=9, minutes=30))
    async with pool.acquire() as conn:
        for zone in ("UTC", "America/St_Johns", "Asia/Kathmandu"):
            await conn.execute(f"set time zone '{zone}'")  # the function must not depend on it
            for moment in [*MOMENTS, MOMENTS[2].astimezone(elsewhere), datetime.now(UTC)]:
                written = await conn.fetchval("select json_timestamp($1)", moment)
                assert written.encode() == msgspec.json.encode(moment.astimezone(UTC)), moment
        await conn.execute("reset time zone")


async def _student_courses_page(pool: asyncpg.Pool, student_id: int) -> EnrolledCoursePage:
    """The page the encoder would write, built from the tables by a plain select."""
    rows = await pool.fetch(
        """select c.id, c.code, c.name, c.level, c.capacity, c.enrolled_count, c.created_at,
                  sc.enrolled_at
             from student_courses sc join courses c on c.id = sc.course_id
            where sc.student_id = $1 order by c.id""",
        student_id,
    )
    return EnrolledCoursePage([EnrolledCourse(*row) for row in rows], next_cursor=None)


async def _roster_page(pool: asyncpg.Pool, course_id: int) -> RosterPage:
    rows = await pool.fetch(
        """select s.id, s.name, s.email, s.created_at, sc.enrolled_at
             from student_courses sc join students s on s.id = sc.student_id
            where sc.course_id = $1 order by s.id""",
        course_id,
    )
    return RosterPage([EnrolledStudent(*row) for row in rows], next_cursor=None)


async def test_a_students_courses_page_is_what_the_encoder_writes(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    for n, name in enumerate(AWKWARD_NAMES):
        capacity = None if n % 2 else 5 + n  # capacity null and not
        course = await create_course(client, capacity=capacity, name=name, level="advanced")
        assert (await enroll(client, student["id"], course["id"])).status_code == 201
        await _set_created_at(pool, "courses", course["id"], MOMENTS[n % len(MOMENTS)])
        await _set_enrolled_at(pool, student["id"], course["id"], MOMENTS[(n + 1) % len(MOMENTS)])
    response = await client.get(f"/students/{student['id']}/courses")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    expected = await _student_courses_page(pool, student["id"])
    assert len(expected.items) == len(AWKWARD_NAMES)
    assert response.content == msgspec.json.encode(expected)
    assert msgspec.json.decode(response.content, type=EnrolledCoursePage, strict=True) == expected


async def test_a_roster_page_is_what_the_encoder_writes(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client)
    for n, name in enumerate(AWKWARD_NAMES):
        student = await create_student(client, name=name, email=f'é{n}+"q"@example.org')
        assert (await enroll(client, student["id"], course["id"])).status_code == 201
        await _set_created_at(pool, "students", student["id"], MOMENTS[n % len(MOMENTS)])
        await _set_enrolled_at(pool, student["id"], course["id"], MOMENTS[(n + 2) % len(MOMENTS)])
    response = await client.get(f"/courses/{course['id']}/students")
    assert response.status_code == 200
    expected = await _roster_page(pool, course["id"])
    assert len(expected.items) == len(AWKWARD_NAMES)
    assert response.content == msgspec.json.encode(expected)
    assert msgspec.json.decode(response.content, type=RosterPage, strict=True) == expected


async def _walk(client: httpx.AsyncClient, path: str, limit: int) -> list[dict[str, Any]]:
    """Every page of a listing, `limit` at a time, as decoded bodies."""
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1]["next_cursor"]
        if cursor is None:
            return pages


async def test_pages_split_where_the_limit_says_and_the_last_one_says_so(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    courses = [await create_course(client) for _ in range(5)]
    for course in courses:
        assert (await enroll(client, student["id"], course["id"])).status_code == 201
    ids = [course["id"] for course in courses]
    path = f"/students/{student['id']}/courses"
    for limit, sizes in ((2, [2, 2, 1]), (5, [5]), (4, [4, 1]), (1, [1] * 5)):
        pages = await _walk(client, path, limit)
        assert [len(page["items"]) for page in pages] == sizes, limit
        assert [item["id"] for page in pages for item in page["items"]] == ids
        assert all(isinstance(page["next_cursor"], str) for page in pages[:-1])
    # A course's roster, the other statement, splits the same way.
    roster = await _walk(client, f"/courses/{courses[0]['id']}/students", 1)
    assert [[item["id"] for item in page["items"]] for page in roster] == [[student["id"]]]


async def test_an_owner_with_nothing_enrolled_gets_an_empty_page_and_a_missing_one_404(
    client: httpx.AsyncClient,
) -> None:
    student, course = await create_student(client), await create_course(client)
    for path in (f"/students/{student['id']}/courses", f"/courses/{course['id']}/students"):
        response = await client.get(path)
        assert response.status_code == 200
        assert response.content == b'{"items":[],"next_cursor":null}'
    assert (await client.get(f"/students/{student['id'] + 1}/courses")).status_code == 404
    assert (await client.get(f"/courses/{course['id'] + 1}/students")).status_code == 404


async def test_the_openapi_document_still_names_the_page_structs(client: httpx.AsyncClient) -> None:
    # The bytes come from PostgreSQL; the documented shape must still be the Structs'.
    document = (await client.get("/schema/openapi.json")).json()
    for path, struct in (
        ("/students/{student_id}/courses", "EnrolledCoursePage"),
        ("/courses/{course_id}/students", "RosterPage"),
    ):
        content = document["paths"][path]["get"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{struct}"}
        fields = document["components"]["schemas"][struct]["properties"]
        assert set(fields) == {"items", "next_cursor"}
