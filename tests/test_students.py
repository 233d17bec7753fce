"""/students: every row of the contract's table, success and each error, through the real app."""

from __future__ import annotations

from datetime import datetime

import asyncpg
import httpx
import pytest

from tests.conftest import assert_problem, create_course, create_student, enroll, error_fields

MAX_ID = 2**63 - 1


async def test_creating_a_student_answers_201_with_location_and_stores_the_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    response = await client.post(
        "/students", json={"name": "Ada Lovelace", "email": "Ada@Example.org"}
    )
    assert response.status_code == 201
    student = response.json()
    assert set(student) == {"id", "name", "email", "created_at"}
    assert student["name"] == "Ada Lovelace"
    assert student["email"] == "Ada@Example.org"
    assert response.headers["location"] == f"/students/{student['id']}"
    created_at = datetime.fromisoformat(student["created_at"])
    offset = created_at.utcoffset()
    assert offset is not None
    assert offset.total_seconds() == 0
    assert student["created_at"].endswith("Z")
    row = await pool.fetchrow("select name, email from students where id = $1", student["id"])
    assert row is not None
    assert tuple(row) == ("Ada Lovelace", "Ada@Example.org")


async def test_names_and_emails_are_trimmed_before_they_are_checked_and_stored(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/students", json={"name": "  Ada  ", "email": " a@b.c "})
    assert response.status_code == 201
    assert response.json()["name"] == "Ada"
    assert response.json()["email"] == "a@b.c"
    blank = await client.post("/students", json={"name": "   ", "email": "x@y.z"})
    assert error_fields(blank) == {"name"}


async def test_an_email_taken_in_any_case_answers_409_email_taken(
    client: httpx.AsyncClient,
) -> None:
    await create_student(client, email="grace@example.org")
    response = await client.post("/students", json={"name": "G", "email": "GRACE@example.ORG"})
    body = assert_problem(response, 409, "email-taken")
    assert "email" in body["detail"]


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        ({"email": "a@b.c"}, {"name"}),
        ({"name": "Ada"}, {"email"}),
        ({}, {"name", "email"}),
        ({"name": "", "email": "a@b.c"}, {"name"}),
        ({"name": "x" * 201, "email": "a@b.c"}, {"name"}),
        ({"name": "Ada", "email": "ab"}, {"email"}),
        ({"name": "Ada", "email": "no-at-sign"}, {"email"}),
        ({"name": "Ada", "email": "two@@ats.org"}, {"email"}),
        ({"name": "Ada", "email": "a b@c.d"}, {"email"}),
        ({"name": "Ada", "email": "a@" + "b" * 253}, {"email"}),
        ({"name": "Ada\u0000", "email": "a@b.c"}, {"name"}),
        ({"name": "Ada\u0007x", "email": "a@b.c"}, {"name"}),
        ({"name": "Ada", "email": "a\u0000@b.c"}, {"email"}),
        ({"name": "Bad\u0085Name", "email": "c1\u0090@example.org"}, {"name", "email"}),
        ({"name": "Ada\u007f", "email": "a@b.c"}, {"name"}),
        ({"name": 5, "email": "a@b.c"}, {"name"}),
        ({"name": None, "email": "a@b.c"}, {"name"}),
        ({"name": ["Ada"], "email": True}, {"name", "email"}),
        ({"name": "Ada", "email": "a@b.c", "age": 3}, {"age"}),
        ({"name": "", "email": "", "nickname": "x"}, {"name", "email", "nickname"}),
    ],
)
async def test_a_bad_student_body_answers_400_naming_every_bad_field(
    client: httpx.AsyncClient, pool: asyncpg.Pool, payload: dict[str, object], fields: set[str]
) -> None:
    response = await client.post("/students", json=payload)
    assert error_fields(response) == fields
    for error in response.json()["errors"]:
        assert error["message"]
    assert await pool.fetchval("select count(*) from students") == 0


async def test_name_and_email_at_their_maximum_lengths_are_accepted(
    client: httpx.AsyncClient,
) -> None:
    email = "a" * 120 + "@" + "b" * 133
    assert len(email) == 254
    response = await client.post("/students", json={"name": "n" * 200, "email": email})
    assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'"text"', b"", b"null", b'{"name": "a", "name": 1', b'{"name": "Ad\xffa"}'],
)
async def test_a_body_that_is_not_a_json_object_answers_400(
    client: httpx.AsyncClient, body: bytes
) -> None:
    response = await client.post(
        "/students", content=body, headers={"content-type": "application/json"}
    )
    assert error_fields(response) == {"body"}


async def test_getting_a_student_answers_200_and_a_missing_one_404(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    response = await client.get(f"/students/{student['id']}")
    assert response.status_code == 200
    assert response.json() == student
    missing = await client.get(f"/students/{student['id'] + 1000}")
    body = assert_problem(missing, 404, "student-not-found")
    assert str(student["id"] + 1000) in body["detail"]


@pytest.mark.parametrize(
    "bad_id",
    ["0", "-1", "abc", "1.5", "1.0", "1e0", "10e-1", "+1", "0x1", str(MAX_ID + 1), "9" * 30],
)
async def test_a_bad_id_in_the_path_answers_400_or_404_never_500(
    client: httpx.AsyncClient, bad_id: str
) -> None:
    response = await client.get(f"/students/{bad_id}")
    assert response.status_code in (400, 404), response.text
    if response.status_code == 400:
        assert error_fields(response) == {"student_id"}
    for method in ("PATCH", "DELETE"):
        response = await client.request(method, f"/students/{bad_id}", json={})
        assert response.status_code in (400, 404)


async def test_the_largest_id_answers_404_not_500(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"/students/{MAX_ID}"), 404, "student-not-found")


async def test_patching_changes_only_the_given_fields(client: httpx.AsyncClient) -> None:
    student = await create_student(client, name="Ada", email="ada@example.org")
    response = await client.patch(f"/students/{student['id']}", json={"name": " Countess "})
    assert response.status_code == 200
    assert response.json() == {**student, "name": "Countess"}
    response = await client.patch(f"/students/{student['id']}", json={"email": "ADA@example.org"})
    assert response.status_code == 200
    assert response.json()["email"] == "ADA@example.org"
    assert (await client.get(f"/students/{student['id']}")).json()["email"] == "ADA@example.org"


async def test_patching_with_an_empty_object_answers_200_unchanged(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    response = await client.patch(f"/students/{student['id']}", json={})
    assert response.status_code == 200
    assert response.json() == student


async def test_patching_errors(client: httpx.AsyncClient) -> None:
    first = await create_student(client, email="first@example.org")
    second = await create_student(client, email="second@example.org")
    taken = await client.patch(f"/students/{second['id']}", json={"email": "FIRST@example.org"})
    assert_problem(taken, 409, "email-taken")
    missing = await client.patch(f"/students/{second['id'] + 99}", json={"name": "X"})
    assert_problem(missing, 404, "student-not-found")
    null_name = await client.patch(f"/students/{first['id']}", json={"name": None})
    assert error_fields(null_name) == {"name"}
    unknown = await client.patch(f"/students/{first['id']}", json={"id": 5, "name": ""})
    assert error_fields(unknown) == {"id", "name"}
    both = await client.patch("/students/0", json={"name": ""})
    assert error_fields(both) == {"student_id", "name"}


async def test_deleting_a_student_answers_204_and_takes_their_enrollments(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    assert (await enroll(client, student["id"], course["id"])).status_code == 201
    response = await client.delete(f"/students/{student['id']}")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get(f"/students/{student['id']}"), 404, "student-not-found")
    assert await pool.fetchval("select count(*) from student_courses") == 0
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 0
    again = await client.delete(f"/students/{student['id']}")
    assert_problem(again, 404, "student-not-found")


async def test_listing_filters_by_email_case_insensitively(client: httpx.AsyncClient) -> None:
    await create_student(client, email="one@example.org")
    two = await create_student(client, email="Two@Example.org")
    response = await client.get("/students", params={"email": "two@EXAMPLE.org"})
    assert response.status_code == 200
    assert response.json() == {"items": [two], "next_cursor": None}
    none = await client.get("/students", params={"email": "nobody@example.org"})
    assert none.json() == {"items": [], "next_cursor": None}
    assert error_fields(await client.get("/students", params={"email": "a\u0000b"})) == {"email"}
