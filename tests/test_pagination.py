"""Keyset pagination on every list endpoint: walks, limits, and cursors that cannot be forged."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.conftest import create_course, create_student, enroll, error_fields

Walker = Callable[[httpx.AsyncClient, int], Awaitable[tuple[list[dict[str, Any]], int]]]


async def walk(
    client: httpx.AsyncClient,
    path: str,
    limit: int,
    between_pages: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Every item of every page, and how many pages it took."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        assert page["items"], "a page with a next_cursor is never empty"
        if between_pages is not None:
            await between_pages()


async def test_walking_students_returns_each_exactly_once_in_id_order(
    client: httpx.AsyncClient,
) -> None:
    students = [await create_student(client) for _ in range(23)]
    items, pages = await walk(client, "/students", limit=5)
    assert items == students
    assert pages == 5
    exact, pages = await walk(client, "/students", limit=23)
    assert (len(exact), pages) == (23, 1)


async def test_the_walk_survives_inserts_and_deletes_made_meanwhile(
    client: httpx.AsyncClient,
) -> None:
    rng = random.Random(7)
    students = [await create_student(client) for _ in range(40)]
    deleted: set[int] = set()
    inserted: set[int] = set()

    async def churn() -> None:
        for _ in range(2):
            victim = rng.choice(students)["id"]
            if victim not in deleted:
                assert (await client.delete(f"/students/{victim}")).status_code == 204
                deleted.add(victim)
            inserted.add((await create_student(client))["id"])

    items, _ = await walk(client, "/students", limit=6, between_pages=churn)
    ids = [item["id"] for item in items]
    assert ids == sorted(ids)
    assert len(ids) == len(set(ids))
    survivors = {s["id"] for s in students} - deleted
    assert survivors <= set(ids)
    assert set(ids) <= survivors | deleted | inserted


async def test_walking_courses_and_both_sides_of_the_relationship(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    courses = [await create_course(client) for _ in range(12)]
    for course in courses:
        assert (await enroll(client, student["id"], course["id"])).status_code == 201
    course_items, _ = await walk(client, "/courses", limit=5)
    assert [c["id"] for c in course_items] == [c["id"] for c in courses]
    enrolled, pages = await walk(client, f"/students/{student['id']}/courses", limit=5)
    assert [c["id"] for c in enrolled] == [c["id"] for c in courses]
    assert pages == 3

    roster_students = [student] + [await create_student(client) for _ in range(8)]
    for other in roster_students[1:]:
        assert (await enroll(client, other["id"], courses[0]["id"])).status_code == 201
    roster, pages = await walk(client, f"/courses/{courses[0]['id']}/students", limit=4)
    assert [s["id"] for s in roster] == [s["id"] for s in roster_students]
    assert pages == 3


async def test_the_default_limit_is_50_and_500_is_allowed(client: httpx.AsyncClient) -> None:
    for _ in range(51):
        await create_student(client)
    default = (await client.get("/students")).json()
    assert len(default["items"]) == 50
    assert default["next_cursor"] is not None
    everything = (await client.get("/students", params={"limit": 500})).json()
    assert len(everything["items"]) == 51
    assert everything["next_cursor"] is None


@pytest.mark.parametrize("limit", ["0", "-1", "501", "abc", "1.5", "", "99999999999999999999"])
@pytest.mark.parametrize(
    "path", ["/students", "/courses", "/students/1/courses", "/courses/1/students"]
)
async def test_a_bad_limit_answers_400(client: httpx.AsyncClient, path: str, limit: str) -> None:
    assert error_fields(await client.get(path, params={"limit": limit})) == {"limit"}


async def test_a_tampered_or_invented_cursor_answers_400(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await create_student(client)
    cursor = (await client.get("/students", params={"limit": 1})).json()["next_cursor"]
    flipped = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    for bad in [flipped, "abc", "!!!", "", cursor + "x", "A" * 200, cursor[:-1]]:
        response = await client.get("/students", params={"cursor": bad})
        assert error_fields(response) == {"cursor"}, bad
    assert (await client.get("/students", params={"cursor": cursor})).status_code == 200
    # A genuine cursor from another listing is refused too.
    other = await client.get("/courses", params={"cursor": cursor})
    assert error_fields(other) == {"cursor"}


async def test_bad_limit_and_cursor_are_reported_together(client: httpx.AsyncClient) -> None:
    for cursor in ["x" * 300, "bogus", "not a cursor"]:
        response = await client.get("/students", params={"limit": "0", "cursor": cursor})
        assert error_fields(response) == {"limit", "cursor"}
    response = await client.get("/students/abc/courses", params={"limit": "0", "cursor": "?"})
    assert error_fields(response) == {"student_id", "limit", "cursor"}
