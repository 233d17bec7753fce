"""The student_courses relationship: enrolling, reading it from either side, unenrolling."""

from __future__ import annotations

import asyncpg
import httpx

from tests.conftest import assert_problem, create_course, create_student, enroll, error_fields


async def test_enrolling_answers_201_with_location_and_counts_the_seat(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=2)
    response = await enroll(client, student["id"], course["id"])
    assert response.status_code == 201
    enrollment = response.json()
    assert set(enrollment) == {"student_id", "course_id", "enrolled_at"}
    assert (enrollment["student_id"], enrollment["course_id"]) == (student["id"], course["id"])
    assert enrollment["enrolled_at"].endswith("Z")
    assert response.headers["location"] == f"/students/{student['id']}/courses/{course['id']}"
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 1
    rows = await pool.fetch("select student_id, course_id from student_courses")
    assert [tuple(r) for r in rows] == [(student["id"], course["id"])]


async def test_enrolling_twice_answers_409_already_enrolled(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    course = await create_course(client)
    first = await enroll(client, student["id"], course["id"])
    second = await enroll(client, student["id"], course["id"])
    body = assert_problem(second, 409, "already-enrolled")
    assert str(student["id"]) in body["detail"]
    assert str(course["id"]) in body["detail"]
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 1
    got = await client.get(f"/students/{student['id']}/courses/{course['id']}")
    assert got.json()["enrolled_at"] == first.json()["enrolled_at"]


async def test_enrolling_in_a_full_course_answers_409_course_full(
    client: httpx.AsyncClient,
) -> None:
    course = await create_course(client, capacity=1)
    first, second = await create_student(client), await create_student(client)
    assert (await enroll(client, first["id"], course["id"])).status_code == 201
    body = assert_problem(await enroll(client, second["id"], course["id"]), 409, "course-full")
    assert str(course["id"]) in body["detail"]
    closed = await create_course(client, capacity=0)
    assert_problem(await enroll(client, first["id"], closed["id"]), 409, "course-full")


async def test_a_student_already_in_a_full_course_is_told_already_enrolled(
    client: httpx.AsyncClient,
) -> None:
    course = await create_course(client, capacity=1)
    student = await create_student(client)
    assert (await enroll(client, student["id"], course["id"])).status_code == 201
    assert_problem(await enroll(client, student["id"], course["id"]), 409, "already-enrolled")


async def test_enrolling_a_missing_student_or_course_answers_404(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    missing_course = await enroll(client, student["id"], course["id"] + 1000)
    assert (
        str(course["id"] + 1000)
        in assert_problem(missing_course, 404, "course-not-found")["detail"]
    )
    missing_student = await enroll(client, student["id"] + 1000, course["id"])
    assert_problem(missing_student, 404, "student-not-found")
    # Both missing: the student (named in the path) is reported first.
    both = await enroll(client, student["id"] + 1000, course["id"] + 1000)
    assert_problem(both, 404, "student-not-found")
    full = await create_course(client, capacity=0)
    assert_problem(await enroll(client, student["id"] + 1000, full["id"]), 404, "student-not-found")


async def test_bad_enrollment_bodies_answer_400(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    for payload, fields in [
        ({}, {"course_id"}),
        ({"course_id": "3"}, {"course_id"}),
        ({"course_id": 0}, {"course_id"}),
        ({"course_id": 2**63}, {"course_id"}),
        ({"course_id": 1.0}, {"course_id"}),
        ({"course_id": None}, {"course_id"}),
        ({"course_id": 1, "student_id": 2}, {"student_id"}),
    ]:
        response = await client.post(f"/students/{student['id']}/courses", json=payload)
        assert error_fields(response) == fields, payload


async def test_a_bad_path_id_and_a_bad_body_are_reported_together(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/students/abc/courses", json={"course_id": "x"})
    assert error_fields(response) == {"student_id", "course_id"}


async def test_getting_one_enrollment(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    course = await create_course(client)
    other = await create_course(client)
    created = (await enroll(client, student["id"], course["id"])).json()
    response = await client.get(f"/students/{student['id']}/courses/{course['id']}")
    assert response.status_code == 200
    assert response.json() == created
    assert_problem(
        await client.get(f"/students/{student['id']}/courses/{other['id']}"),
        404,
        "enrollment-not-found",
    )
    # A course that does not exist, for a student who does: enrollment-not-found.
    assert_problem(
        await client.get(f"/students/{student['id']}/courses/{other['id'] + 999}"),
        404,
        "enrollment-not-found",
    )
    assert_problem(
        await client.get(f"/students/{student['id'] + 999}/courses/{course['id']}"),
        404,
        "student-not-found",
    )
    assert error_fields(await client.get(f"/students/{student['id']}/courses/0")) == {"course_id"}


async def test_unenrolling_answers_204_frees_the_seat_and_then_404(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=1)
    await enroll(client, student["id"], course["id"])
    response = await client.delete(f"/students/{student['id']}/courses/{course['id']}")
    assert response.status_code == 204
    assert await pool.fetchval("select count(*) from student_courses") == 0
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 0
    assert_problem(
        await client.delete(f"/students/{student['id']}/courses/{course['id']}"),
        404,
        "enrollment-not-found",
    )
    assert_problem(
        await client.delete(f"/students/{student['id'] + 5}/courses/{course['id']}"),
        404,
        "student-not-found",
    )
    assert_problem(
        await client.delete(f"/students/{student['id']}/courses/{course['id'] + 5}"),
        404,
        "enrollment-not-found",
    )
    # The freed seat can be taken again.
    assert (await enroll(client, student["id"], course["id"])).status_code == 201


async def test_listing_a_students_courses_adds_enrolled_at_in_course_id_order(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    courses = [await create_course(client) for _ in range(3)]
    for course in reversed(courses):
        await enroll(client, student["id"], course["id"])
    response = await client.get(f"/students/{student['id']}/courses")
    assert response.status_code == 200
    items = response.json()["items"]
    assert [item["id"] for item in items] == [course["id"] for course in courses]
    assert response.json()["next_cursor"] is None
    for item, course in zip(items, courses, strict=True):
        assert {k: v for k, v in item.items() if k not in ("enrolled_at", "enrolled_count")} == {
            k: v for k, v in course.items() if k != "enrolled_count"
        }
        assert item["enrolled_count"] == 1
        assert item["enrolled_at"].endswith("Z")


async def test_a_student_with_no_courses_gets_an_empty_page_and_a_missing_one_404(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    response = await client.get(f"/students/{student['id']}/courses")
    assert response.json() == {"items": [], "next_cursor": None}
    assert_problem(
        await client.get(f"/students/{student['id'] + 1}/courses"), 404, "student-not-found"
    )


async def test_a_courses_roster_lists_students_with_enrolled_at_in_id_order(
    client: httpx.AsyncClient,
) -> None:
    course = await create_course(client)
    students = [await create_student(client) for _ in range(3)]
    for student in reversed(students):
        await enroll(client, student["id"], course["id"])
    response = await client.get(f"/courses/{course['id']}/students")
    assert response.status_code == 200
    items = response.json()["items"]
    assert [item["id"] for item in items] == [s["id"] for s in students]
    for item, student in zip(items, students, strict=True):
        assert {k: v for k, v in item.items() if k != "enrolled_at"} == student
    empty = await create_course(client)
    assert (await client.get(f"/courses/{empty['id']}/students")).json() == {
        "items": [],
        "next_cursor": None,
    }
    assert_problem(
        await client.get(f"/courses/{empty['id'] + 77}/students"), 404, "course-not-found"
    )


async def test_enrolled_count_follows_enrolls_unenrolls_and_cascades(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=10)
    students = [await create_student(client) for _ in range(4)]
    for student in students:
        await enroll(client, student["id"], course["id"])

    async def count() -> int:
        value: int = (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"]
        true_count = await pool.fetchval(
            "select count(*) from student_courses where course_id = $1", course["id"]
        )
        assert value == true_count
        return value

    assert await count() == 4
    await client.delete(f"/students/{students[0]['id']}/courses/{course['id']}")
    assert await count() == 3
    await client.delete(f"/students/{students[1]['id']}")
    assert await count() == 2
    await enroll(client, students[0]["id"], course["id"])
    assert await count() == 3
