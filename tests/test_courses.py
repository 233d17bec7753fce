"""/courses: every row of the contract's table, success and each error, through the real app."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.conftest import assert_problem, create_course, create_student, enroll, error_fields

VALID = {"code": "CS101", "name": "Intro to CS", "level": "beginner"}


async def test_creating_a_course_answers_201_with_location(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post("/courses", json={**VALID, "capacity": 30})
    assert response.status_code == 201
    course = response.json()
    assert set(course) == {
        "id", "code", "name", "level", "capacity", "enrolled_count", "created_at",
    }  # fmt: skip
    assert course["capacity"] == 30
    assert course["enrolled_count"] == 0
    assert response.headers["location"] == f"/courses/{course['id']}"
    assert await pool.fetchval("select code from courses where id = $1", course["id"]) == "CS101"


async def test_capacity_is_optional_and_null_means_no_limit(client: httpx.AsyncClient) -> None:
    response = await client.post("/courses", json=VALID)
    assert response.status_code == 201
    assert response.json()["capacity"] is None
    explicit = await client.post("/courses", json={**VALID, "code": "CS102", "capacity": None})
    assert explicit.json()["capacity"] is None


async def test_text_fields_are_trimmed(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/courses", json={"code": " CS1 ", "name": "  Intro ", "level": " easy  "}
    )
    assert response.status_code == 201
    course = response.json()
    assert (course["code"], course["name"], course["level"]) == ("CS1", "Intro", "easy")


async def test_a_code_taken_in_any_case_answers_409_code_taken(client: httpx.AsyncClient) -> None:
    await create_course(client, code="cs101")
    response = await client.post("/courses", json=VALID)
    body = assert_problem(response, 409, "code-taken")
    assert "CS101" in body["detail"]


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"code": ""}, {"code"}),
        ({"code": "x" * 33}, {"code"}),
        ({"code": "CS 101"}, {"code"}),
        ({"code": "CS/101"}, {"code"}),
        ({"code": "CS\u0000"}, {"code"}),
        ({"name": ""}, {"name"}),
        ({"name": "n" * 201}, {"name"}),
        ({"level": ""}, {"level"}),
        ({"level": "l" * 51}, {"level"}),
        ({"level": "a\nb"}, {"level"}),
        ({"level": "a\u009fb"}, {"level"}),
        ({"capacity": -1}, {"capacity"}),
        ({"capacity": 1_000_001}, {"capacity"}),
        ({"capacity": "5"}, {"capacity"}),
        ({"capacity": 2.5}, {"capacity"}),
        ({"capacity": True}, {"capacity"}),
        ({"code": 101, "level": None}, {"code", "level"}),
        ({"seats": 5}, {"seats"}),
    ],
)
async def test_a_bad_course_body_answers_400_naming_every_bad_field(
    client: httpx.AsyncClient, pool: asyncpg.Pool, changes: dict[str, object], fields: set[str]
) -> None:
    response = await client.post("/courses", json={**VALID, **changes})
    assert error_fields(response) == fields
    assert await pool.fetchval("select count(*) from courses") == 0


async def test_missing_required_fields_are_all_listed(client: httpx.AsyncClient) -> None:
    assert error_fields(await client.post("/courses", json={})) == {"code", "name", "level"}


@pytest.mark.parametrize("capacity", [0, 1_000_000])
async def test_capacity_bounds_are_inclusive(client: httpx.AsyncClient, capacity: int) -> None:
    response = await client.post("/courses", json={**VALID, "capacity": capacity})
    assert response.status_code == 201
    assert response.json()["capacity"] == capacity


async def test_getting_a_course_answers_200_and_a_missing_one_404(
    client: httpx.AsyncClient,
) -> None:
    course = await create_course(client)
    assert (await client.get(f"/courses/{course['id']}")).json() == course
    body = assert_problem(await client.get("/courses/999999"), 404, "course-not-found")
    assert "999999" in body["detail"]
    assert error_fields(await client.get("/courses/0")) == {"course_id"}


async def test_patching_a_course(client: httpx.AsyncClient) -> None:
    course = await create_course(client, code="OLD1", capacity=10)
    response = await client.patch(
        f"/courses/{course['id']}", json={"code": "NEW1", "name": "New", "level": "hard"}
    )
    assert response.status_code == 200
    assert response.json() == {**course, "code": "NEW1", "name": "New", "level": "hard"}
    unchanged = await client.patch(f"/courses/{course['id']}", json={})
    assert unchanged.status_code == 200
    assert unchanged.json() == response.json()


async def test_patching_capacity_to_null_removes_the_limit_and_leaving_it_out_keeps_it(
    client: httpx.AsyncClient,
) -> None:
    course = await create_course(client, capacity=5)
    kept = await client.patch(f"/courses/{course['id']}", json={"name": "Renamed"})
    assert kept.json()["capacity"] == 5
    removed = await client.patch(f"/courses/{course['id']}", json={"capacity": None})
    assert removed.status_code == 200
    assert removed.json()["capacity"] is None
    restored = await client.patch(f"/courses/{course['id']}", json={"capacity": 7})
    assert restored.json()["capacity"] == 7


async def test_capacity_below_the_enrolled_count_answers_409(client: httpx.AsyncClient) -> None:
    course = await create_course(client, capacity=3)
    for _ in range(2):
        student = await create_student(client)
        assert (await enroll(client, student["id"], course["id"])).status_code == 201
    below = await client.patch(f"/courses/{course['id']}", json={"capacity": 1})
    body = assert_problem(below, 409, "capacity-below-enrolled")
    assert str(course["id"]) in body["detail"]
    equal = await client.patch(f"/courses/{course['id']}", json={"capacity": 2})
    assert equal.status_code == 200
    assert equal.json()["enrolled_count"] == 2


async def test_patching_errors(client: httpx.AsyncClient) -> None:
    first = await create_course(client, code="AAA")
    second = await create_course(client, code="BBB")
    assert_problem(
        await client.patch(f"/courses/{second['id']}", json={"code": "aaa"}), 409, "code-taken"
    )
    assert_problem(
        await client.patch("/courses/987654", json={"name": "x"}), 404, "course-not-found"
    )
    assert error_fields(await client.patch(f"/courses/{first['id']}", json={"name": None})) == {
        "name"
    }
    assert error_fields(
        await client.patch(f"/courses/{first['id']}", json={"capacity": -5, "extra": 1})
    ) == {"capacity", "extra"}


async def test_deleting_a_course_answers_204_and_takes_its_enrollments(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client)
    student = await create_student(client)
    assert (await enroll(client, student["id"], course["id"])).status_code == 201
    assert (await client.delete(f"/courses/{course['id']}")).status_code == 204
    assert await pool.fetchval("select count(*) from student_courses") == 0
    assert_problem(await client.get(f"/courses/{course['id']}"), 404, "course-not-found")
    assert_problem(await client.delete(f"/courses/{course['id']}"), 404, "course-not-found")
    listing = await client.get(f"/students/{student['id']}/courses")
    assert listing.json() == {"items": [], "next_cursor": None}


async def test_listing_filters_by_code_case_insensitively(client: httpx.AsyncClient) -> None:
    await create_course(client, code="MA201")
    cs = await create_course(client, code="CS101")
    response = await client.get("/courses", params={"code": "cs101"})
    assert response.json() == {"items": [cs], "next_cursor": None}
    assert error_fields(await client.get("/courses", params={"code": "CS\u0000"})) == {"code"}
