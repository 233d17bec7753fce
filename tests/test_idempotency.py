"""Idempotency-Key on POST, PATCH and DELETE, over HTTP against the real app and PostgreSQL:
stored with the change it records, replayed with `Idempotent-Replayed: true`, refused for
another request, scoped per caller, once under concurrency, forgotten after its TTL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service.app import create_app
from enrollment_service.enrollments import Enrollment
from enrollment_service.settings import load_settings
from tests.conftest import assert_problem, create_course, create_student, error_fields

NEW_STUDENT = {"name": "Ada Lovelace", "email": "ada@example.org"}


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


async def _count(pool: asyncpg.Pool, table: str) -> int:
    count: int = await pool.fetchval(f"select count(*) from {table}")  # noqa: S608 - fixed names
    return count


@pytest.fixture(autouse=True)
async def _no_keys(pool: asyncpg.Pool) -> None:
    await pool.execute("truncate idempotency_keys")


async def test_a_retried_post_is_answered_again_not_applied_again(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    first = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-1"))
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    again = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-1"))
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["content-type"] == first.headers["content-type"]
    assert await _count(pool, "students") == 1
    assert await _count(pool, "idempotency_keys") == 1


async def test_the_same_json_in_another_order_or_spacing_is_the_same_request(
    client: httpx.AsyncClient,
) -> None:
    first = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-2"))
    reordered = b'{ "email" : "ada@example.org",\n  "name": "Ada Lovelace" }'
    again = await client.post(
        "/students",
        content=reordered,
        headers=keyed("k-2", **{"Content-Type": "application/json"}),
    )
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()


async def test_the_same_key_for_another_request_answers_422_and_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await client.post("/students", json=NEW_STUDENT, headers=keyed("k-3"))
    other_body = {"name": "Grace Hopper", "email": "grace@example.org"}
    reused = await client.post("/students", json=other_body, headers=keyed("k-3"))
    assert_problem(reused, 422, "idempotency-key-reused")
    course = await create_course(client)
    other_path = await client.post(
        "/courses", json={"code": "K3", "name": "x", "level": "y"}, headers=keyed("k-3")
    )
    assert_problem(other_path, 422, "idempotency-key-reused")
    student = (await client.get("/students")).json()["items"][0]
    other_method = await client.delete(f"/students/{student['id']}", headers=keyed("k-3"))
    assert_problem(other_method, 422, "idempotency-key-reused")
    assert await _count(pool, "students") == 1
    assert [c["id"] for c in (await client.get("/courses")).json()["items"]] == [course["id"]]


async def test_a_reused_key_with_an_invalid_body_is_400_not_422(
    client: httpx.AsyncClient,
) -> None:
    await client.post("/students", json=NEW_STUDENT, headers=keyed("k-4"))
    invalid = await client.post("/students", json={"name": ""}, headers=keyed("k-4"))
    assert error_fields(invalid) == {"name", "email"}


async def test_a_400_is_not_stored_so_the_corrected_request_runs(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    invalid = await client.post("/students", json={"name": "Ada"}, headers=keyed("k-5"))
    assert invalid.status_code == 400
    assert await _count(pool, "idempotency_keys") == 0
    valid = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-5"))
    assert valid.status_code == 201
    assert "idempotent-replayed" not in valid.headers


async def test_a_domain_refusal_is_stored_and_replayed_whatever_happened_since(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client, capacity=0)
    path = f"/students/{student['id']}/courses"
    full = await client.post(path, json={"course_id": course["id"]}, headers=keyed("k-6"))
    assert_problem(full, 409, "course-full")
    await client.patch(f"/courses/{course['id']}", json={"capacity": 5})
    again = await client.post(path, json={"course_id": course["id"]}, headers=keyed("k-6"))
    assert_problem(again, 409, "course-full")
    assert again.headers["idempotent-replayed"] == "true"
    assert await _count(pool, "student_courses") == 0
    # A 404 told by a constraint (the statement failed) is stored too.
    missing = await client.post(path, json={"course_id": 2**62}, headers=keyed("k-6b"))
    assert_problem(missing, 404, "course-not-found")
    replay = await client.post(path, json={"course_id": 2**62}, headers=keyed("k-6b"))
    assert_problem(replay, 404, "course-not-found")
    assert replay.headers["idempotent-replayed"] == "true"


async def test_a_retried_delete_answers_204_again_not_404(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    path = f"/students/{student['id']}"
    assert (await client.delete(path, headers=keyed("k-7"))).status_code == 204
    again = await client.delete(path, headers=keyed("k-7"))
    assert again.status_code == 204
    assert again.headers["idempotent-replayed"] == "true"
    assert "content-length" not in again.headers
    assert "content-type" not in again.headers
    assert_problem(await client.delete(path), 404, "student-not-found")


async def test_a_replay_answers_the_original_after_the_resource_changed(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client, name="Ada")
    path = f"/students/{student['id']}"
    patched = await client.patch(path, json={"name": "Ada L."}, headers=keyed("k-8"))
    assert patched.json()["name"] == "Ada L."
    await client.patch(path, json={"name": "Countess"})
    replay = await client.patch(path, json={"name": "Ada L."}, headers=keyed("k-8"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == patched.json()
    assert (await client.get(path)).json()["name"] == "Countess", "the replay changed nothing"


async def test_the_key_is_ignored_on_get_and_put(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    assert (await client.get("/students", headers=keyed("not a key"))).status_code == 200
    assert (await client.get("/students", headers=keyed("k-9"))).status_code == 200
    assert await _count(pool, "idempotency_keys") == 0


async def test_a_malformed_key_is_a_400_naming_idempotency_key(
    client: httpx.AsyncClient,
) -> None:
    for bad in (b"", b"a b", "\u00e9".encode(), b"x" * 256, b'"unterminated', b'"bad\\escape"'):
        headers = [(b"Idempotency-Key", bad)]
        response = await client.post("/students", json=NEW_STUDENT, headers=headers)
        assert error_fields(response) == {"Idempotency-Key"}, (bad, response.text)
    # Listed with the other bad fields, all at once.
    both = await client.post("/students", json={"name": ""}, headers=keyed("a b"))
    assert error_fields(both) == {"Idempotency-Key", "name", "email"}
    student = await create_student(client)
    no_body = await client.delete(f"/students/{student['id']}", headers=keyed("a b"))
    assert error_fields(no_body) == {"Idempotency-Key"}
    twice = await client.post(
        "/students",
        json=NEW_STUDENT,
        headers=[("Idempotency-Key", "k-10"), ("Idempotency-Key", "k-11")],
    )
    assert error_fields(twice) == {"Idempotency-Key"}
    # A quoted structured-field string names the key inside the quotes.
    quoted = await client.post("/students", json=NEW_STUDENT, headers=keyed('"k-12"'))
    bare = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-12"))
    assert bare.headers["idempotent-replayed"] == "true"
    assert bare.json() == quoted.json()


async def test_concurrent_requests_with_one_key_change_the_data_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    answers = await asyncio.gather(
        *(client.post("/students", json=NEW_STUDENT, headers=keyed("k-13")) for _ in range(12))
    )
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum("idempotent-replayed" in a.headers for a in answers) == 11
    assert await _count(pool, "students") == 1

    course = await create_course(client, capacity=3)
    student_id = answers[0].json()["id"]
    enrolls = await asyncio.gather(
        *(
            client.post(
                f"/students/{student_id}/courses",
                json={"course_id": course["id"]},
                headers=keyed("k-14"),
            )
            for _ in range(12)
        )
    )
    assert [a.status_code for a in enrolls] == [201] * 12, [a.text for a in enrolls]
    assert (await client.get(f"/courses/{course['id']}")).json()["enrolled_count"] == 1


async def test_a_keyed_enroll_answers_and_replays_the_bytes_a_get_gives(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # The keyed enroll stores its 201 in the enroll's own statement, its body written by SQL.
    student = await create_student(client)
    course = await create_course(client)
    path = f"/students/{student['id']}/courses"
    first = await client.post(path, json={"course_id": course["id"]}, headers=keyed("k-17"))
    assert first.status_code == 201, first.text
    assert first.headers["content-type"] == "application/json"
    got = await client.get(first.headers["location"])
    assert first.content == got.content, "the same encoding as every other response"
    replay = await client.post(path, json={"course_id": course["id"]}, headers=keyed("k-17"))
    assert replay.headers["idempotent-replayed"] == "true"
    assert (replay.status_code, replay.content) == (201, first.content)
    assert replay.headers["location"] == first.headers["location"]
    assert await _count(pool, "idempotency_keys") == 1


async def test_enrollment_json_writes_what_the_encoder_writes(pool: asyncpg.Pool) -> None:
    base = datetime(2026, 12, 2, 7, 4, 5, tzinfo=UTC)
    elsewhere = timezone(timedelta(hours=-5, minutes=-30))
    for moment in (
        base,
        base.replace(microsecond=1000),
        base.replace(microsecond=123456),
        base.replace(microsecond=10),
        base.replace(microsecond=999999).astimezone(elsewhere),
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=elsewhere),
    ):
        expected = msgspec.json.encode(Enrollment(2**62, 7, moment.astimezone(UTC)))
        written = await pool.fetchval("select enrollment_json($1, $2, $3)", 2**62, 7, moment)
        assert written == expected, moment


async def test_a_key_held_for_another_enrollment_undoes_the_new_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    first, second = await create_course(client), await create_course(client)
    path = f"/students/{student['id']}/courses"
    assert (await client.post(path, json={"course_id": first["id"]},
                              headers=keyed("k-18"))).status_code == 201  # fmt: skip
    reused = await client.post(path, json={"course_id": second["id"]}, headers=keyed("k-18"))
    assert_problem(reused, 422, "idempotency-key-reused")
    assert (await client.get(f"/courses/{second['id']}")).json()["enrolled_count"] == 0
    assert await _count(pool, "student_courses") == 1


async def test_concurrent_enrolls_of_two_courses_under_one_key_enroll_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    courses = [await create_course(client), await create_course(client)]
    answers = await asyncio.gather(
        *(
            client.post(
                f"/students/{student['id']}/courses",
                json={"course_id": courses[n % 2]["id"]},
                headers=keyed("k-19"),
            )
            for n in range(12)
        )
    )
    assert await _count(pool, "student_courses") == 1
    winner = await pool.fetchval("select course_id from student_courses")
    for n, answer in enumerate(answers):
        if courses[n % 2]["id"] == winner:
            assert answer.status_code == 201, answer.text
        else:
            assert_problem(answer, 422, "idempotency-key-reused")
    created = [a for a in answers if a.status_code == 201]
    assert sum("idempotent-replayed" not in a.headers for a in created) == 1


@pytest.fixture
async def two_callers(database_url: str) -> AsyncIterator[list[httpx.AsyncClient]]:
    settings = load_settings(environ={"API_TOKENS": "lms:secret-a,billing:secret-b"})
    service = create_app(settings, database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        clients = [
            httpx.AsyncClient(
                transport=transport,
                base_url="http://e",
                headers={"Authorization": f"Bearer secret-{who}"},
            )
            for who in "ab"
        ]
        yield clients
        for one in clients:
            await one.aclose()


async def test_keys_are_scoped_to_the_caller(
    two_callers: list[httpx.AsyncClient], clean_tables: None
) -> None:
    lms, billing = two_callers
    mine = await lms.post("/courses", json={"code": "A1", "name": "a", "level": "b"},
                          headers=keyed("shared"))  # fmt: skip
    theirs = await billing.post("/courses", json={"code": "B1", "name": "a", "level": "b"},
                                headers=keyed("shared"))  # fmt: skip
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "idempotent-replayed" not in theirs.headers


async def test_an_expired_key_is_new_again_and_pruned(database_url: str, pool: asyncpg.Pool,
                                                      clean_tables: None) -> None:  # fmt: skip
    service = create_app(load_settings(environ={"IDEMPOTENCY_KEY_TTL": "1"}), database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            first = await client.post("/students", json=NEW_STUDENT, headers=keyed("k-15"))
            assert first.status_code == 201
            courses = [await create_course(client), await create_course(client)]
            path = f"/students/{first.json()['id']}/courses"
            enrolled = await client.post(
                path, json={"course_id": courses[0]["id"]}, headers=keyed("k-15e")
            )
            assert enrolled.status_code == 201
            await asyncio.sleep(1.2)
            other: dict[str, Any] = {"name": "Grace", "email": "grace@example.org"}
            fresh = await client.post("/students", json=other, headers=keyed("k-15"))
            assert fresh.status_code == 201, fresh.text
            assert "idempotent-replayed" not in fresh.headers
            # The keyed enroll's own statement meets the expired key and takes the general path.
            again = await client.post(
                path, json={"course_id": courses[1]["id"]}, headers=keyed("k-15e")
            )
            assert again.status_code == 201, again.text
            assert "idempotent-replayed" not in again.headers
            assert await _count(pool, "student_courses") == 2
            # The service prunes expired keys itself, at least every TTL seconds here.
            for _ in range(40):
                if await _count(pool, "idempotency_keys") == 0:
                    break
                await asyncio.sleep(0.1)
            assert await _count(pool, "idempotency_keys") == 0


async def test_a_route_404_or_405_is_never_stored(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    assert_problem(await client.post("/nope", json={}, headers=keyed("k-16")), 404, "not-found")
    not_allowed = await client.post(f"/students/{student['id']}", json={}, headers=keyed("k-16"))
    assert_problem(not_allowed, 405, "method-not-allowed")
    assert await _count(pool, "idempotency_keys") == 0
    # The key is still free for a real request.
    created = await client.post("/courses", json={"code": "K16", "name": "a", "level": "b"},
                                headers=keyed("k-16"))  # fmt: skip
    assert created.status_code == 201
    assert "idempotent-replayed" not in created.headers
