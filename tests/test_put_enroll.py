"""PUT /students/{id}/courses/{course_id}: the idempotent enroll, and its create-only form."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service.app import create_app
from enrollment_service.settings import load_settings
from tests.conftest import assert_problem, create_course, create_student, enroll, error_fields


async def put(
    client: httpx.AsyncClient, student_id: object, course_id: object, **kwargs: Any
) -> httpx.Response:
    return await client.put(f"/students/{student_id}/courses/{course_id}", **kwargs)


async def _state(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    """Every enrollment row, and every course's count, as they are now."""
    rows = await pool.fetch(
        "select student_id, course_id, enrolled_at::text from student_courses order by 1, 2"
    )
    counts = await pool.fetch("select id, enrolled_count from courses order by id")
    return [tuple(row) for row in [*rows, *counts]]


async def test_put_enrolls_with_201_and_location_and_takes_one_seat(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=3)
    response = await put(client, student["id"], course["id"])
    assert response.status_code == 201, response.text
    enrollment = response.json()
    assert set(enrollment) == {"student_id", "course_id", "enrolled_at"}
    assert (enrollment["student_id"], enrollment["course_id"]) == (student["id"], course["id"])
    assert enrollment["enrolled_at"].endswith("Z")
    assert response.headers["location"] == f"/students/{student['id']}/courses/{course['id']}"
    assert response.headers["content-type"].startswith("application/json")
    got = await client.get(f"/students/{student['id']}/courses/{course['id']}")
    assert got.json() == enrollment
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 1


async def test_put_again_answers_200_with_the_original_enrollment_and_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=3)
    first = await put(client, student["id"], course["id"])
    before = await _state(pool)
    again = await put(client, student["id"], course["id"])
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert "location" not in again.headers
    assert await _state(pool) == before
    # An enrollment made by POST is the same enrollment.
    other = await create_course(client)
    posted = await enroll(client, student["id"], other["id"])
    put_after_post = await put(client, student["id"], other["id"])
    assert put_after_post.status_code == 200
    assert put_after_post.json() == posted.json()


@pytest.mark.parametrize(
    "request_body",
    [
        {"content": b"{}", "headers": {"Content-Type": "application/json"}},
        {"content": b" { } ", "headers": {"Content-Type": "application/json; charset=utf-8"}},
        {"content": b"{}", "headers": {"Content-Type": "application/merge-patch+json"}},
        # No body at all: whatever the Content-Type says, there is nothing to judge.
        {"content": b"", "headers": {"Content-Type": "text/plain"}},
        {},
    ],
)
async def test_put_takes_no_body_or_an_empty_json_object(
    client: httpx.AsyncClient, request_body: dict[str, Any]
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    response = await put(client, student["id"], course["id"], **request_body)
    assert response.status_code == 201, response.text


async def test_put_with_any_other_json_body_answers_400_and_enrolls_no_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    unknown = await put(client, student["id"], course["id"], json={"course_id": course["id"]})
    assert error_fields(unknown) == {"course_id"}
    for body in [b"[]", b"null", b"1", b'""', b"{", b"{}{}"]:
        response = await put(
            client,
            student["id"],
            course["id"],
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert error_fields(response) == {"body"}, body
    assert await pool.fetchval("select count(*) from student_courses") == 0


async def test_put_with_a_body_that_is_not_json_answers_415_before_400(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    for headers in [{"Content-Type": "text/plain"}, {"Content-Type": "application/xml"}, {}]:
        response = await put(client, student["id"], course["id"], content=b"{}", headers=headers)
        assert_problem(response, 415, "unsupported-media-type")
    # Bad ids too: 415 still comes first.
    response = await put(client, 0, "abc", content=b"x", headers={"Content-Type": "text/plain"})
    assert_problem(response, 415, "unsupported-media-type")
    assert await pool.fetchval("select count(*) from student_courses") == 0


async def test_put_with_bad_ids_answers_400_naming_each_with_the_bad_body(
    client: httpx.AsyncClient,
) -> None:
    assert error_fields(await put(client, 0, 1)) == {"student_id"}
    assert error_fields(await put(client, 1, "abc")) == {"course_id"}
    assert error_fields(await put(client, 2**63, "1.0")) == {"student_id", "course_id"}
    assert error_fields(await put(client, -1, 1, json={"x": 1})) == {"student_id", "x"}


async def test_put_for_a_missing_student_or_course_answers_404_student_first(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    missing_student = await put(client, student["id"] + 1000, course["id"])
    assert (
        str(student["id"] + 1000)
        in assert_problem(missing_student, 404, "student-not-found")["detail"]
    )
    missing_course = await put(client, student["id"], course["id"] + 1000)
    assert (
        str(course["id"] + 1000)
        in assert_problem(missing_course, 404, "course-not-found")["detail"]
    )
    both = await put(client, student["id"] + 1000, course["id"] + 1000)
    assert_problem(both, 404, "student-not-found")
    full = await create_course(client, capacity=0)
    assert_problem(await put(client, student["id"] + 1000, full["id"]), 404, "student-not-found")
    assert await pool.fetchval("select count(*) from student_courses") == 0


async def test_put_into_a_full_course_answers_409_only_when_not_already_enrolled(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=1)
    first, second = await create_student(client), await create_student(client)
    assert (await put(client, first["id"], course["id"])).status_code == 201
    full = await put(client, second["id"], course["id"])
    assert str(course["id"]) in assert_problem(full, 409, "course-full")["detail"]
    # The student holding the one seat is answered 200, not course-full.
    assert (await put(client, first["id"], course["id"])).status_code == 200
    closed = await create_course(client, capacity=0)
    assert_problem(await put(client, first["id"], closed["id"]), 409, "course-full")
    row = await pool.fetchrow(
        "select enrolled_count, capacity from courses where id = $1", course["id"]
    )
    assert row is not None
    assert tuple(row) == (1, 1)


async def test_if_none_match_star_makes_put_create_only(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=5)
    created = await put(client, student["id"], course["id"], headers={"If-None-Match": "*"})
    assert created.status_code == 201
    before = await _state(pool)
    again = await put(client, student["id"], course["id"], headers={"If-None-Match": "*"})
    body = assert_problem(again, 412, "precondition-failed")
    assert str(student["id"]) in body["detail"]
    assert str(course["id"]) in body["detail"]
    assert await _state(pool) == before
    # Any other If-None-Match names no tag an enrollment has: it is an ordinary PUT.
    tagged = await put(client, student["id"], course["id"], headers={"If-None-Match": '"abc"'})
    assert tagged.status_code == 200
    assert tagged.json() == created.json()


async def test_put_precedence_is_404_then_412_then_409(client: httpx.AsyncClient) -> None:
    create_only = {"If-None-Match": "*"}
    student = await create_student(client)
    course = await create_course(client, capacity=1)
    assert (await put(client, student["id"], course["id"])).status_code == 201
    # Already enrolled in a course now full: the precondition fails before the seat count.
    assert_problem(
        await put(client, student["id"], course["id"], headers=create_only),
        412,
        "precondition-failed",
    )
    # A missing student comes before everything else the database decides.
    assert_problem(
        await put(client, student["id"] + 1000, course["id"], headers=create_only),
        404,
        "student-not-found",
    )
    # Not enrolled and no seat: course-full, with or without the header.
    other = await create_student(client)
    assert_problem(
        await put(client, other["id"], course["id"], headers=create_only), 409, "course-full"
    )


async def test_put_on_a_route_method_mismatch_answers_405_before_415(
    client: httpx.AsyncClient,
) -> None:
    response = await client.patch(
        "/students/1/courses/2", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_problem(response, 405, "method-not-allowed")
    assert "PUT" in response.headers["allow"]
    nowhere = await client.put(
        "/students/1/courses", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_problem(nowhere, 405, "method-not-allowed")
    no_route = await client.put(
        "/students/1/courses/2/x", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_problem(no_route, 404, "not-found")


@pytest.fixture
async def guarded_client(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    service = create_app(load_settings(environ={"API_TOKENS": "alpha"}), database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://enrollment") as client:
            yield client


async def test_put_without_a_token_answers_401_before_anything_else(
    guarded_client: httpx.AsyncClient, clean_tables: None
) -> None:
    response = await put(
        guarded_client, 0, "x", content=b"x", headers={"Content-Type": "text/plain"}
    )
    assert_problem(response, 401, "unauthorized")


async def test_fifty_concurrent_puts_of_one_pair_give_one_201_and_49_200(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=1)
    responses = await asyncio.gather(*(put(client, student["id"], course["id"]) for _ in range(50)))
    assert Counter(r.status_code for r in responses) == {201: 1, 200: 49}
    assert len({r.json()["enrolled_at"] for r in responses}) == 1
    assert await pool.fetchval("select count(*) from student_courses") == 1
    assert await pool.fetchval("select enrolled_count from courses") == 1


async def test_concurrent_create_only_puts_of_one_pair_give_one_201_and_the_rest_412(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    create_only = {"If-None-Match": "*"}
    responses = await asyncio.gather(
        *(put(client, student["id"], course["id"], headers=create_only) for _ in range(20))
    )
    assert Counter(r.status_code for r in responses) == {201: 1, 412: 19}
    assert await pool.fetchval("select count(*) from student_courses") == 1
    assert await pool.fetchval("select enrolled_count from courses") == 1
