"""The contract's guarantees under concurrency, with real concurrent requests through the app."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
import httpx

from tests.conftest import assert_problem, create_course, create_student, enroll


async def test_fifty_identical_enrollments_give_one_201_and_49_already_enrolled(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    responses = await asyncio.gather(
        *(enroll(client, student["id"], course["id"]) for _ in range(50))
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 1, 409: 49}
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409, "already-enrolled")
    assert await pool.fetchval("select count(*) from student_courses") == 1
    assert await pool.fetchval("select enrolled_count from courses") == 1


async def test_forty_students_racing_for_ten_seats_get_exactly_ten(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=10)
    students = [await create_student(client) for _ in range(40)]
    responses = await asyncio.gather(*(enroll(client, s["id"], course["id"]) for s in students))
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 409: 30}
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409, "course-full")
    row = await pool.fetchrow("select capacity, enrolled_count from courses")
    assert row is not None
    assert tuple(row) == (10, 10)
    assert await pool.fetchval("select count(*) from student_courses") == 10


async def test_a_course_deleted_while_enrollments_are_in_flight_leaves_no_orphan(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for _ in range(3):
        course = await create_course(client)
        students = [await create_student(client) for _ in range(30)]
        enrollments = [enroll(client, s["id"], course["id"]) for s in students]
        deletion = client.delete(f"/courses/{course['id']}")
        *responses, deleted = await asyncio.gather(*enrollments[:15], deletion, *enrollments[15:])
        results = [*responses, deleted]
        assert all(r.status_code < 500 for r in results), [r.text for r in results]
        assert any(r.status_code == 204 for r in results)
        for response in results:
            if response.status_code == 404:
                assert_problem(response, 404, "course-not-found")
        orphans = await pool.fetchval(
            "select count(*) from student_courses sc where not exists "
            "(select from courses c where c.id = sc.course_id) or not exists "
            "(select from students s where s.id = sc.student_id)"
        )
        assert orphans == 0
        assert (
            await pool.fetchval(
                "select count(*) from student_courses where course_id = $1", course["id"]
            )
            == 0
        )


async def test_a_student_deleted_while_they_enroll_leaves_no_orphan_and_true_counts(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    courses = [await create_course(client) for _ in range(20)]
    requests = [enroll(client, student["id"], c["id"]) for c in courses]
    requests.insert(10, client.delete(f"/students/{student['id']}"))
    results = await asyncio.gather(*requests)
    assert all(r.status_code < 500 for r in results), [r.text for r in results]
    assert await pool.fetchval("select count(*) from student_courses") == 0
    mismatched = await pool.fetchval(
        "select count(*) from courses c where enrolled_count <> "
        "(select count(*) from student_courses sc where sc.course_id = c.id)"
    )
    assert mismatched == 0


async def test_concurrent_enrolls_and_unenrolls_keep_enrolled_count_true(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=15)
    students = [await create_student(client) for _ in range(30)]
    first = await asyncio.gather(*(enroll(client, s["id"], course["id"]) for s in students))
    enrolled = [s for s, r in zip(students, first, strict=True) if r.status_code == 201]
    others = [s for s, r in zip(students, first, strict=True) if r.status_code != 201]
    mixed = [client.delete(f"/students/{s['id']}/courses/{course['id']}") for s in enrolled[:8]]
    mixed += [enroll(client, s["id"], course["id"]) for s in others]
    results = await asyncio.gather(*mixed)
    assert all(r.status_code in (201, 204, 409) for r in results)
    row = await pool.fetchrow(
        "select enrolled_count, (select count(*) from student_courses) as true_count from courses"
    )
    assert row is not None
    assert row["enrolled_count"] == row["true_count"] <= 15
