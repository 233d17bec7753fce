"""Conditional requests on students and courses: strong ETags, 304 on If-None-Match, 412 on a
failed If-Match, checked atomically with the write, through the real app."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from enrollment_service import migrations
from tests.conftest import (
    DatabaseFactory,
    assert_problem,
    create_student,
    enroll,
    error_fields,
)

STRONG_ETAG = re.compile(r'"[0-9a-f]{32}"')
OTHER_ETAG = '"0123456789abcdef0123456789abcdef"'
ETAGS = "0004.etags"


def etag_of(response: httpx.Response) -> str:
    etag = response.headers["etag"]
    assert STRONG_ETAG.fullmatch(etag), etag
    return etag


async def _student(client: httpx.AsyncClient, **fields: Any) -> tuple[dict[str, Any], str]:
    payload = {"name": "Ada Lovelace", "email": "ada@example.org", **fields}
    response = await client.post("/students", json=payload)
    assert response.status_code == 201, response.text
    return response.json(), etag_of(response)


async def _course(client: httpx.AsyncClient, **fields: Any) -> tuple[dict[str, Any], str]:
    payload = {"code": "CS101", "name": "Intro", "level": "beginner", "capacity": 30, **fields}
    response = await client.post("/courses", json=payload)
    assert response.status_code == 201, response.text
    return response.json(), etag_of(response)


async def _row(pool: asyncpg.Pool, table: str, id_: int) -> tuple[Any, ...] | None:
    """The row as stored, with xmin: the transaction that last wrote it."""
    query = {
        "students": "select xmin::text as xmin, * from students where id = $1",
        "courses": "select xmin::text as xmin, * from courses where id = $1",
    }[table]
    row = await pool.fetchrow(query, id_)
    return None if row is None else tuple(row)


# --- ETags on every response carrying one resource. ----------------------------------------


async def test_a_students_post_get_and_patch_carry_the_same_strong_etag_for_the_same_state(
    client: httpx.AsyncClient,
) -> None:
    student, created = await _student(client)
    path = f"/students/{student['id']}"

    got = await client.get(path)
    patched_nothing = await client.patch(path, json={})
    patched_same = await client.patch(path, json={"name": "Ada Lovelace"})

    assert [etag_of(r) for r in (got, patched_nothing, patched_same)] == [created] * 3
    assert got.json() == patched_nothing.json() == patched_same.json() == student


async def test_a_courses_post_get_and_patch_carry_the_same_strong_etag_for_the_same_state(
    client: httpx.AsyncClient,
) -> None:
    course, created = await _course(client)
    path = f"/courses/{course['id']}"

    got = await client.get(path)
    patched_nothing = await client.patch(path, json={})
    patched_same = await client.patch(
        path, json={"code": "CS101", "name": "Intro", "level": "beginner", "capacity": 30}
    )

    assert [etag_of(r) for r in (got, patched_nothing, patched_same)] == [created] * 3
    assert got.json() == patched_nothing.json() == patched_same.json() == course


async def test_a_students_etag_changes_with_each_field_and_comes_back_with_the_same_content(
    client: httpx.AsyncClient,
) -> None:
    student, original = await _student(client)
    path = f"/students/{student['id']}"
    seen = {original}
    for change in ({"name": "Ada King"}, {"email": "ada@king.org"}, {"email": "ADA@king.org"}):
        response = await client.patch(path, json=change)
        assert response.status_code == 200
        assert etag_of(response) not in seen, change
        assert etag_of(await client.get(path)) == etag_of(response)
        seen.add(etag_of(response))

    back = await client.patch(path, json={"name": "Ada Lovelace", "email": "ada@example.org"})
    assert etag_of(back) == original


async def test_a_courses_etag_changes_with_each_field_and_comes_back_with_the_same_content(
    client: httpx.AsyncClient,
) -> None:
    course, original = await _course(client)
    path = f"/courses/{course['id']}"
    seen = {original}
    changes: list[dict[str, Any]] = [
        {"code": "CS102"},
        {"code": "cs102"},
        {"name": "Intro to CS"},
        {"level": "advanced"},
        {"capacity": 31},
        {"capacity": None},
        {"capacity": 0},
    ]
    for change in changes:
        response = await client.patch(path, json=change)
        assert response.status_code == 200
        assert etag_of(response) not in seen, change
        assert etag_of(await client.get(path)) == etag_of(response)
        seen.add(etag_of(response))

    back = await client.patch(
        path, json={"code": "CS101", "name": "Intro", "level": "beginner", "capacity": 30}
    )
    assert etag_of(back) == original


async def test_a_courses_etag_follows_its_enrolled_count_through_enroll_and_drop(
    client: httpx.AsyncClient,
) -> None:
    course, original = await _course(client)
    student = await create_student(client)
    path = f"/courses/{course['id']}"

    assert (await enroll(client, student["id"], course["id"])).status_code == 201
    enrolled = await client.get(path)
    assert enrolled.json()["enrolled_count"] == 1
    assert etag_of(enrolled) != original

    dropped = await client.delete(f"/students/{student['id']}/courses/{course['id']}")
    assert dropped.status_code == 204
    after = await client.get(path)
    assert after.json()["enrolled_count"] == 0
    assert etag_of(after) == original


async def test_two_resources_with_different_ids_have_different_etags(
    client: httpx.AsyncClient,
) -> None:
    _, first = await _student(client, email="one@example.org")
    _, second = await _student(client, email="two@example.org")
    assert first != second


async def test_lists_carry_no_etag(client: httpx.AsyncClient) -> None:
    await _student(client)
    await _course(client)
    for path in ("/students", "/courses"):
        response = await client.get(path)
        assert response.status_code == 200
        assert "etag" not in response.headers


# --- A PATCH that changes nothing writes nothing. ------------------------------------------


@pytest.mark.parametrize(
    "body",
    [{}, {"name": "Ada Lovelace"}, {"name": "  Ada Lovelace ", "email": "ada@example.org"}],
)
async def test_a_student_patch_that_changes_nothing_does_not_write_the_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body: dict[str, Any]
) -> None:
    student, etag = await _student(client)
    before = await _row(pool, "students", student["id"])

    response = await client.patch(f"/students/{student['id']}", json=body)

    assert response.status_code == 200
    assert response.json() == student
    assert etag_of(response) == etag
    assert await _row(pool, "students", student["id"]) == before  # xmin included


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"capacity": 30},
        {"code": "CS101", "name": "Intro", "level": "beginner", "capacity": 30},
    ],
)
async def test_a_course_patch_that_changes_nothing_does_not_write_the_row(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body: dict[str, Any]
) -> None:
    course, etag = await _course(client)
    before = await _row(pool, "courses", course["id"])

    response = await client.patch(f"/courses/{course['id']}", json=body)

    assert response.status_code == 200
    assert response.json() == course
    assert etag_of(response) == etag
    assert await _row(pool, "courses", course["id"]) == before


async def test_a_course_without_a_limit_patched_to_no_limit_is_not_written(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course, etag = await _course(client, capacity=None)
    before = await _row(pool, "courses", course["id"])

    response = await client.patch(f"/courses/{course['id']}", json={"capacity": None})

    assert etag_of(response) == etag
    assert await _row(pool, "courses", course["id"]) == before


# --- GET with If-None-Match. ---------------------------------------------------------------


def _weak(etag: str) -> str:
    return f"W/{etag}"


@pytest.mark.parametrize(
    "header",
    [
        lambda etag: etag,
        lambda etag: f'{OTHER_ETAG}, {etag}, "x"',
        lambda etag: f"{OTHER_ETAG},{etag}",
        lambda etag: "*",
        lambda etag: _weak(etag),
    ],
    ids=["single", "list", "list-without-spaces", "wildcard", "weak"],
)
@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_get_answers_304_without_a_body_when_if_none_match_names_the_current_etag(
    client: httpx.AsyncClient, resource: str, header: Any
) -> None:
    created = await (_student(client) if resource == "students" else _course(client))
    path = f"/{resource}/{created[0]['id']}"

    response = await client.get(path, headers={"If-None-Match": header(created[1])})

    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == created[1]


@pytest.mark.parametrize(
    "header",
    [OTHER_ETAG, f"{OTHER_ETAG}, W/{OTHER_ETAG}", "", "garbage", '"unterminated', '"*"'],
)
@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_get_answers_200_when_if_none_match_names_another_etag(
    client: httpx.AsyncClient, resource: str, header: str
) -> None:
    body, etag = await (_student(client) if resource == "students" else _course(client))

    response = await client.get(f"/{resource}/{body['id']}", headers={"If-None-Match": header})

    assert response.status_code == 200
    assert response.json() == body
    assert etag_of(response) == etag


async def test_a_stale_etag_gets_the_new_representation(client: httpx.AsyncClient) -> None:
    course, etag = await _course(client)
    student = await create_student(client)
    await enroll(client, student["id"], course["id"])

    response = await client.get(f"/courses/{course['id']}", headers={"If-None-Match": etag})

    assert response.status_code == 200
    assert response.json()["enrolled_count"] == 1
    assert etag_of(response) != etag


async def test_get_of_a_missing_resource_with_if_none_match_star_is_still_404(
    client: httpx.AsyncClient,
) -> None:
    assert_problem(
        await client.get("/students/999999", headers={"If-None-Match": "*"}),
        404,
        "student-not-found",
    )
    assert_problem(
        await client.get("/courses/999999", headers={"If-None-Match": "*"}),
        404,
        "course-not-found",
    )


# --- PATCH and DELETE with If-Match / If-None-Match. ---------------------------------------

CHANGES = {"students": {"name": "Grace Hopper"}, "courses": {"name": "Compilers"}}


async def _created(client: httpx.AsyncClient, resource: str) -> tuple[dict[str, Any], str]:
    return await (_student(client) if resource == "students" else _course(client))


FAILING = {
    "if-match-other": lambda etag: {"If-Match": OTHER_ETAG},
    "if-match-others": lambda etag: {"If-Match": f"{OTHER_ETAG}, W/{OTHER_ETAG}"},
    "if-match-weak-current": lambda etag: {"If-Match": f"W/{etag}"},
    "if-match-unquoted-current": lambda etag: {"If-Match": etag.strip('"')},
    "if-match-current-then-junk": lambda etag: {"If-Match": f"{etag} junk"},
    "if-match-empty": lambda etag: {"If-Match": ""},
    "if-match-quoted-star": lambda etag: {"If-Match": '"*"'},
    "if-match-star-in-a-list": lambda etag: {"If-Match": f"{OTHER_ETAG}, *"},
    "if-none-match-current": lambda etag: {"If-None-Match": etag},
    "if-none-match-weak-current": lambda etag: {"If-None-Match": f"W/{etag}"},
    "if-none-match-star": lambda etag: {"If-None-Match": "*"},
    "if-none-match-list-with-current": lambda etag: {"If-None-Match": f"{OTHER_ETAG}, {etag}"},
    "both-current": lambda etag: {"If-Match": etag, "If-None-Match": etag},
}


@pytest.mark.parametrize("header", FAILING.values(), ids=FAILING.keys())
@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_a_failed_precondition_answers_412_and_changes_nothing(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    resource: str,
    method: str,
    header: Callable[[str], dict[str, str]],
) -> None:
    body, etag = await _created(client, resource)
    before = await _row(pool, resource, body["id"])

    response = await client.request(
        method,
        f"/{resource}/{body['id']}",
        headers=header(etag),
        json=CHANGES[resource] if method == "PATCH" else None,
    )

    problem = assert_problem(response, 412, "precondition-failed")
    assert str(body["id"]) in problem["detail"]
    assert await _row(pool, resource, body["id"]) == before  # not written, not deleted


@pytest.mark.parametrize(
    "header",
    [
        {"If-Match": "current"},
        {"If-Match": "*"},
        {"If-Match": f"{OTHER_ETAG}, current"},
        {"If-Match": "  current  ,"},
        {"If-None-Match": OTHER_ETAG},
        {"If-None-Match": "garbage"},
        {"If-Match": "current", "If-None-Match": OTHER_ETAG},
    ],
    ids=lambda header: repr(header),
)
@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_a_patch_whose_preconditions_hold_succeeds_with_the_new_etag(
    client: httpx.AsyncClient, resource: str, header: dict[str, str]
) -> None:
    body, etag = await _created(client, resource)
    headers = {name: value.replace("current", etag) for name, value in header.items()}

    response = await client.patch(
        f"/{resource}/{body['id']}", headers=headers, json=CHANGES[resource]
    )

    assert response.status_code == 200, response.text
    assert response.json()["name"] == CHANGES[resource]["name"]
    assert etag_of(response) != etag
    assert etag_of(await client.get(f"/{resource}/{body['id']}")) == etag_of(response)


@pytest.mark.parametrize(
    "header",
    [{"If-Match": "current"}, {"If-Match": "*"}, {"If-None-Match": OTHER_ETAG}],
    ids=lambda header: repr(header),
)
@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_a_delete_whose_preconditions_hold_deletes(
    client: httpx.AsyncClient, pool: asyncpg.Pool, resource: str, header: dict[str, str]
) -> None:
    body, etag = await _created(client, resource)
    headers = {name: value.replace("current", etag) for name, value in header.items()}

    response = await client.delete(f"/{resource}/{body['id']}", headers=headers)

    assert response.status_code == 204, response.text
    assert await _row(pool, resource, body["id"]) is None


async def test_a_noop_patch_with_a_matching_if_match_succeeds_and_keeps_the_etag(
    client: httpx.AsyncClient,
) -> None:
    student, etag = await _student(client)
    response = await client.patch(f"/students/{student['id']}", headers={"If-Match": etag}, json={})
    assert response.status_code == 200
    assert etag_of(response) == etag


async def test_if_match_on_a_course_fails_once_an_enrollment_changed_its_count(
    client: httpx.AsyncClient,
) -> None:
    course, etag = await _course(client)
    student = await create_student(client)
    await enroll(client, student["id"], course["id"])

    response = await client.patch(
        f"/courses/{course['id']}", headers={"If-Match": etag}, json={"capacity": 10}
    )

    assert_problem(response, 412, "precondition-failed")
    assert (await client.get(f"/courses/{course['id']}")).json()["capacity"] == 30


# --- Precedence: 400, then 404, then 412, then 409. ----------------------------------------


@pytest.mark.parametrize("method", ["PATCH", "DELETE"])
async def test_a_missing_resource_is_404_even_when_the_precondition_fails(
    client: httpx.AsyncClient, method: str
) -> None:
    for resource, slug in (("students", "student-not-found"), ("courses", "course-not-found")):
        response = await client.request(
            method,
            f"/{resource}/999999",
            headers={"If-Match": OTHER_ETAG},
            json=CHANGES[resource] if method == "PATCH" else None,
        )
        assert_problem(response, 404, slug)


async def test_a_bad_body_is_400_even_when_the_precondition_fails(
    client: httpx.AsyncClient,
) -> None:
    student, _ = await _student(client)
    response = await client.patch(
        f"/students/{student['id']}", headers={"If-Match": OTHER_ETAG}, json={"name": ""}
    )
    assert error_fields(response) == {"name"}


async def test_a_failed_precondition_is_412_before_email_taken(
    client: httpx.AsyncClient,
) -> None:
    await _student(client, email="taken@example.org")
    student, etag = await _student(client, email="mine@example.org")
    path = f"/students/{student['id']}"
    taken = {"email": "TAKEN@example.org"}

    assert_problem(
        await client.patch(path, headers={"If-Match": OTHER_ETAG}, json=taken),
        412,
        "precondition-failed",
    )
    assert_problem(
        await client.patch(path, headers={"If-None-Match": etag}, json=taken),
        412,
        "precondition-failed",
    )
    assert_problem(
        await client.patch(path, headers={"If-Match": etag}, json=taken), 409, "email-taken"
    )


async def test_a_failed_precondition_is_412_before_code_taken_and_capacity_below_enrolled(
    client: httpx.AsyncClient,
) -> None:
    await _course(client, code="TAKEN")
    course, etag = await _course(client, code="MINE", capacity=5)
    for student_number in range(2):
        student = await create_student(client, email=f"s{student_number}@example.org")
        await enroll(client, student["id"], course["id"])
    etag = etag_of(await client.get(f"/courses/{course['id']}"))
    path = f"/courses/{course['id']}"

    refusals = [({"code": "taken"}, "code-taken"), ({"capacity": 1}, "capacity-below-enrolled")]
    for change, slug in refusals:
        assert_problem(
            await client.patch(path, headers={"If-Match": OTHER_ETAG}, json=change),
            412,
            "precondition-failed",
        )
        assert_problem(await client.patch(path, headers={"If-Match": etag}, json=change), 409, slug)


# --- Atomic with the write. ----------------------------------------------------------------


async def _wait_for_lock_waiters(pool: asyncpg.Pool, count: int) -> None:
    for _ in range(500):
        waiting = await pool.fetchval(
            "select count(*) from pg_stat_activity"
            " where application_name = 'enrollment-service' and wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} requests never queued on the row lock")


@pytest.mark.parametrize("resource", ["students", "courses"])
async def test_two_concurrent_patches_with_the_same_if_match_give_one_200_and_one_412(
    client: httpx.AsyncClient, pool: asyncpg.Pool, resource: str
) -> None:
    body, etag = await _created(client, resource)
    path = f"/{resource}/{body['id']}"
    names = ["First writer", "Second writer"]

    # Both requests are made to read the same state: they queue on the row's lock, held here,
    # and run once it is released. A read-then-write in two steps would let both succeed.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"select from {resource} where id = $1 for update", body["id"])
        requests = [
            asyncio.ensure_future(client.patch(path, headers={"If-Match": etag}, json={"name": n}))
            for n in names
        ]
        await _wait_for_lock_waiters(pool, 2)
    responses = await asyncio.gather(*requests)

    assert Counter(r.status_code for r in responses) == {200: 1, 412: 1}
    winner = next(r for r in responses if r.status_code == 200)
    loser = next(r for r in responses if r.status_code == 412)
    assert_problem(loser, 412, "precondition-failed")
    current = await client.get(path)
    assert current.json()["name"] == winner.json()["name"]
    assert etag_of(current) == etag_of(winner)


async def test_a_patch_and_a_delete_racing_on_one_etag_do_not_both_succeed(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student, etag = await _student(client)
    path = f"/students/{student['id']}"
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("select from students where id = $1 for update", student["id"])
        requests = [
            asyncio.ensure_future(
                client.patch(path, headers={"If-Match": etag}, json={"name": "X"})
            ),
            asyncio.ensure_future(client.delete(path, headers={"If-Match": etag})),
        ]
        await _wait_for_lock_waiters(pool, 2)
    patched, deleted = await asyncio.gather(*requests)

    if patched.status_code == 200:
        assert_problem(deleted, 412, "precondition-failed")
        assert (await client.get(path)).json()["name"] == "X"
    else:
        assert deleted.status_code == 204
        assert_problem(patched, 404, "student-not-found")


# --- The OpenAPI document says all of it. --------------------------------------------------


async def test_the_openapi_document_describes_etags_and_the_conditional_headers(
    client: httpx.AsyncClient,
) -> None:
    paths = (await client.get("/schema/openapi.json")).json()["paths"]
    for resource in ("/students/{student_id}", "/courses/{course_id}"):
        operations = paths[resource]
        parameters = {
            method: {
                p["name"] for p in operations[method].get("parameters", []) if p["in"] == "header"
            }
            for method in ("get", "patch", "delete")
        }
        assert parameters == {
            "get": {"If-None-Match"},
            "patch": {"If-Match", "If-None-Match", "Idempotency-Key"},
            "delete": {"If-Match", "If-None-Match", "Idempotency-Key"},
        }
        assert "ETag" in operations["get"]["responses"]["200"]["headers"]
        assert "ETag" in operations["patch"]["responses"]["200"]["headers"]
        assert "content" not in operations["get"]["responses"]["304"]
        assert "412" in operations["patch"]["responses"]
        assert "412" in operations["delete"]["responses"]
    for resource in ("/students", "/courses"):
        assert "ETag" in paths[resource]["post"]["responses"]["201"]["headers"]


# --- Migration 0004. ------------------------------------------------------------------------


async def test_the_etag_migration_rolls_back_and_applies_again_without_harm(
    database_factory: DatabaseFactory,
) -> None:
    url = await database_factory.create("etags")
    await asyncio.to_thread(migrations.apply, url)
    functions = "select count(*) from pg_proc where proname in ('student_etag', 'course_etag')"
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval(functions) == 2
        # Immutable and made of immutable parts: PostgreSQL inlines them into each statement.
        assert await conn.fetchval(
            "select bool_and(provolatile = 'i') from pg_proc"
            " where proname in ('student_etag', 'course_etag')"
        )
        etag = await conn.fetchval("select course_etag(1, 'C', 'n', 'l', null, 0)")
        assert etag != await conn.fetchval("select course_etag(1, 'C', 'n', 'l', 0, 0)")
        await conn.execute((migrations.MIGRATIONS_DIR / f"{ETAGS}.sql").read_text())

        await asyncio.to_thread(migrations.rollback, url, ETAGS)
        assert await conn.fetchval(functions) == 0

        assert ETAGS in await asyncio.to_thread(migrations.apply, url)
        assert await conn.fetchval("select course_etag(1, 'C', 'n', 'l', null, 0)") == etag
    finally:
        await conn.close()
