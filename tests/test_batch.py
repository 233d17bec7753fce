"""POST /enrollments/batch: enrolls and drops applied in one transaction, in item order, each as
PUT or DELETE of the pair would have answered at that point."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest

from enrollment_service import migrations
from tests.conftest import (
    DatabaseFactory,
    assert_problem,
    create_course,
    create_student,
    enroll,
    error_fields,
)

BATCH_MIGRATION = "0005.enrollment-batch"


def item(student_id: int, course_id: int, action: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"student_id": student_id, "course_id": course_id}
    if action is not None:
        entry["action"] = action
    return entry


async def batch(
    client: httpx.AsyncClient, items: list[dict[str, Any]], atomic: bool | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"items": items}
    if atomic is not None:
        body["atomic"] = atomic
    return await client.post("/enrollments/batch", json=body)


def statuses(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [result["status"] for result in response.json()["results"]]


async def _rows(pool: asyncpg.Pool) -> list[tuple[object, ...]]:
    rows = await pool.fetch(
        "select student_id, course_id, enrolled_at::text from student_courses order by 1, 2"
    )
    return [tuple(row) for row in rows]


async def _counts_are_true(pool: asyncpg.Pool) -> bool:
    mismatched = await pool.fetchval(
        "select count(*) from courses c where c.enrolled_count <>"
        " (select count(*) from student_courses sc where sc.course_id = c.id)"
        " or c.enrolled_count > coalesce(c.capacity, c.enrolled_count)"
    )
    return bool(mismatched == 0)


async def test_items_apply_in_order_each_as_put_or_delete_would(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    ada, grace = await create_student(client), await create_student(client)
    cs, ma = await create_course(client, capacity=5), await create_course(client)
    already = await enroll(client, grace["id"], ma["id"])
    response = await batch(
        client,
        [
            item(ada["id"], cs["id"]),  # 201
            item(ada["id"], cs["id"], "enroll"),  # 200: enrolled by the item before
            item(ada["id"], ma["id"]),  # 201
            item(ada["id"], ma["id"], "drop"),  # 204
            item(grace["id"], ma["id"]),  # 200: enrolled before the batch
            item(grace["id"], ma["id"], "drop"),  # 204
            item(grace["id"], ma["id"], "enroll"),  # 201 again, a new enrollment
        ],
    )
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert statuses(response) == [201, 200, 201, 204, 200, 204, 201]
    assert body["summary"] == {"created": 3, "unchanged": 2, "dropped": 2, "failed": 0}
    results = body["results"]
    assert results[0]["enrollment"]["student_id"] == ada["id"]
    assert results[0]["enrollment"]["course_id"] == cs["id"]
    assert results[1]["enrollment"] == results[0]["enrollment"]
    assert results[4]["enrollment"] == already.json()
    assert results[3] == results[5] == {"status": 204}
    assert results[6]["enrollment"]["enrolled_at"] != already.json()["enrolled_at"]
    for result in results:
        if "enrollment" in result:
            assert set(result) == {"status", "enrollment"}
            assert set(result["enrollment"]) == {"student_id", "course_id", "enrolled_at"}
    assert await _rows(pool) == sorted(
        [
            (ada["id"], cs["id"], await _enrolled_at_text(pool, ada["id"], cs["id"])),
            (grace["id"], ma["id"], await _enrolled_at_text(pool, grace["id"], ma["id"])),
        ]
    )
    got = await client.get(f"/students/{ada['id']}/courses/{cs['id']}")
    assert got.json() == results[0]["enrollment"]
    got = await client.get(f"/students/{grace['id']}/courses/{ma['id']}")
    assert got.json() == results[6]["enrollment"]
    assert await _counts_are_true(pool)


async def _enrolled_at_text(pool: asyncpg.Pool, student_id: int, course_id: int) -> str:
    value = await pool.fetchval(
        "select enrolled_at::text from student_courses where student_id = $1 and course_id = $2",
        student_id,
        course_id,
    )
    assert isinstance(value, str)
    return value


async def test_failed_items_carry_the_problem_the_single_endpoint_gives_and_change_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    full = await create_course(client, capacity=0)
    gone_student, gone_course = student["id"] + 1000, course["id"] + 1000
    items = [
        item(gone_student, course["id"]),  # enroll, no student
        item(student["id"], gone_course),  # enroll, no course
        item(gone_student, gone_course),  # enroll, neither: the student first
        item(student["id"], full["id"]),  # course-full
        item(student["id"], course["id"], "drop"),  # not enrolled
        item(student["id"], gone_course, "drop"),  # the course does not exist: not enrolled
        item(gone_student, course["id"], "drop"),  # no student
    ]
    response = await batch(client, items)
    assert statuses(response) == [404, 404, 404, 409, 404, 404, 404]
    body = response.json()
    assert body["summary"] == {"created": 0, "unchanged": 0, "dropped": 0, "failed": 7}
    singles = []
    for entry in items:
        path = f"/students/{entry['student_id']}/courses/{entry['course_id']}"
        if entry.get("action") == "drop":
            singles.append(await client.delete(path))
        else:
            singles.append(await client.put(path))
    slugs = [
        "student-not-found",
        "course-not-found",
        "student-not-found",
        "course-full",
        "enrollment-not-found",
        "enrollment-not-found",
        "student-not-found",
    ]
    for result, single, slug in zip(body["results"], singles, slugs, strict=True):
        assert set(result) == {"status", "problem"}
        assert_problem(single, result["status"], slug)
        assert result["problem"] == single.json()
    assert await _rows(pool) == []
    assert await _counts_are_true(pool)


async def test_with_k_free_seats_exactly_the_first_k_new_enrollments_get_201(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=3)
    seated = await create_student(client)
    assert (await enroll(client, seated["id"], course["id"])).status_code == 201
    students = [await create_student(client) for _ in range(5)]
    response = await batch(
        client,
        [
            item(students[0]["id"], course["id"]),  # 201: 2 seats were free
            item(seated["id"], course["id"]),  # 200: holds a seat already
            item(students[1]["id"], course["id"]),  # 201: the last seat
            item(students[2]["id"], course["id"]),  # 409
            item(seated["id"], course["id"], "drop"),  # 204: frees a seat
            item(students[3]["id"], course["id"]),  # 201: takes it
            item(students[4]["id"], course["id"]),  # 409
            item(students[0]["id"], course["id"]),  # 200: enrolled earlier in the batch
        ],
    )
    assert statuses(response) == [201, 200, 201, 409, 204, 201, 409, 200]
    for index in (3, 6):
        problem = response.json()["results"][index]["problem"]
        assert problem["type"].endswith("/course-full")
        assert problem["status"] == 409
        assert str(course["id"]) in problem["detail"]
    enrolled = await pool.fetch("select student_id from student_courses order by 1")
    assert [row[0] for row in enrolled] == sorted(
        [students[0]["id"], students[1]["id"], students[3]["id"]]
    )
    row = await pool.fetchrow("select enrolled_count, capacity from courses")
    assert row is not None
    assert tuple(row) == (3, 3)


async def test_an_atomic_batch_with_failures_is_rejected_listing_every_one_and_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=2)
    students = [await create_student(client) for _ in range(4)]
    assert (await enroll(client, students[3]["id"], course["id"])).status_code == 201
    rows_before = await _rows(pool)
    items = [
        item(students[0]["id"], course["id"]),  # would be 201: the last seat
        item(students[0]["id"] + 1000, course["id"]),  # student-not-found
        item(students[3]["id"], course["id"], "drop"),  # would be 204
        item(students[1]["id"], course["id"]),  # would be 201: the seat just freed
        item(students[2]["id"], course["id"]),  # course-full
        item(students[2]["id"], course["id"], "drop"),  # enrollment-not-found
    ]
    response = await batch(client, items, atomic=True)
    body = assert_problem(response, 409, "batch-rejected")
    assert [failure["index"] for failure in body["failures"]] == [1, 4, 5]
    assert set(body["failures"][0]) == {"index", "problem"}
    problems = [failure["problem"] for failure in body["failures"]]
    assert [problem["type"].rsplit("/", 1)[-1] for problem in problems] == [
        "student-not-found",
        "course-full",
        "enrollment-not-found",
    ]
    assert [problem["status"] for problem in problems] == [404, 409, 404]
    assert all(problem["title"] and problem["detail"] for problem in problems)
    assert re.search(r"\b1\b.*\b4\b.*\b5\b", body["detail"])
    assert await _rows(pool) == rows_before
    assert await pool.fetchval("select enrolled_count from courses") == 1

    # The same batch, not atomic: the failures change nothing, the rest is applied.
    applied = await batch(client, items)
    assert statuses(applied) == [201, 404, 204, 201, 409, 404]
    assert applied.json()["summary"] == {"created": 2, "unchanged": 0, "dropped": 1, "failed": 3}
    enrolled = await pool.fetch("select student_id from student_courses order by 1")
    assert [row[0] for row in enrolled] == sorted([students[0]["id"], students[1]["id"]])
    assert await _counts_are_true(pool)


async def test_an_atomic_batch_without_failures_answers_200_and_applies_every_item(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    course = await create_course(client, capacity=2)
    students = [await create_student(client) for _ in range(2)]
    response = await batch(client, [item(s["id"], course["id"]) for s in students] * 2, atomic=True)
    assert statuses(response) == [201, 201, 200, 200]
    assert response.json()["summary"] == {"created": 2, "unchanged": 2, "dropped": 0, "failed": 0}
    assert await pool.fetchval("select count(*) from student_courses") == 2
    assert await pool.fetchval("select enrolled_count from courses") == 2


async def test_atomic_and_action_have_their_defaults(client: httpx.AsyncClient) -> None:
    student = await create_student(client)
    course = await create_course(client)
    # Not atomic by default: the failure does not stop the other item.
    response = await client.post(
        "/enrollments/batch",
        json={"items": [{"student_id": student["id"], "course_id": course["id"]},
                        {"student_id": student["id"] + 1000, "course_id": course["id"]}]},
    )  # fmt: skip
    assert statuses(response) == [201, 404]


async def test_invalid_items_answer_400_naming_every_bad_field(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    course = await create_course(client)
    response = await client.post(
        "/enrollments/batch",
        json={
            "items": [
                item(student["id"], course["id"]),
                {"student_id": "1", "course_id": 0},
                {"student_id": 1, "course_id": 2**63, "action": "join", "note": "x"},
                {"course_id": 1.0},
                7,
                item(student["id"], course["id"], "drop"),
            ],
            "atomic": "yes",
            "extra": 1,
        },
    )
    assert error_fields(response) == {
        "items[1].student_id",
        "items[1].course_id",
        "items[2].course_id",
        "items[2].action",
        "items[2].note",
        "items[3].student_id",
        "items[3].course_id",
        "items[4]",
        "atomic",
        "extra",
    }
    assert "items[1].student_id" in response.json()["detail"]
    assert await pool.fetchval("select count(*) from student_courses") == 0


@pytest.mark.parametrize("count", [0, 1001])
async def test_a_batch_needs_1_to_1000_items(client: httpx.AsyncClient, count: int) -> None:
    response = await batch(client, [item(1, 1)] * count)
    assert error_fields(response) == {"items"}


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"{}", {"items"}),
        (b'{"items": {}}', {"items"}),
        (b'{"items": null}', {"items"}),
        (b"[]", {"body"}),
        (b'{"items": [', {"body"}),
        (b"", {"body"}),
    ],
)
async def test_a_malformed_batch_answers_400(
    client: httpx.AsyncClient, body: bytes, fields: set[str]
) -> None:
    response = await client.post(
        "/enrollments/batch", content=body, headers={"Content-Type": "application/json"}
    )
    assert error_fields(response) == fields


async def test_a_batch_that_is_not_json_answers_415(client: httpx.AsyncClient) -> None:
    for headers in [{"Content-Type": "text/plain"}, {}]:
        response = await client.post("/enrollments/batch", content=b"{}", headers=headers)
        assert_problem(response, 415, "unsupported-media-type")


async def test_a_full_batch_of_1000_new_enrollments_is_applied(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    students = await pool.fetch(
        "insert into students (name, email) select 'S', 's' || g || '@example.org'"
        " from generate_series(1, 100) g returning id"
    )
    courses = [await create_course(client, capacity=100) for _ in range(10)]
    items = [item(s["id"], c["id"]) for s in students for c in courses]
    response = await batch(client, items)
    assert Counter(statuses(response)) == {201: 1000}
    assert await pool.fetchval("select count(*) from student_courses") == 1000
    assert await _counts_are_true(pool)


async def test_concurrent_readers_see_all_of_a_batch_or_none_of_it(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    students = await pool.fetch(
        "insert into students (name, email) select 'S', 's' || g || '@example.org'"
        " from generate_series(1, 100) g returning id"
    )
    courses = [await create_course(client) for _ in range(10)]
    items = [item(s["id"], c["id"]) for s in students for c in courses]
    seen: set[int] = set()
    done = asyncio.Event()

    async def read_until_done() -> None:
        while not done.is_set():
            seen.add(await pool.fetchval("select count(*) from student_courses"))
            seen.add(await pool.fetchval("select coalesce(sum(enrolled_count), 0) from courses"))
            await asyncio.sleep(0)

    reader = asyncio.create_task(read_until_done())
    try:
        response = await batch(client, items)
    finally:
        done.set()
        await reader
    assert Counter(statuses(response)) == {201: 1000}
    seen.add(await pool.fetchval("select count(*) from student_courses"))
    assert seen <= {0, 1000}
    assert 1000 in seen


async def test_concurrent_batches_and_single_enrollments_never_overfill_a_course(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    for _ in range(3):
        await pool.execute("truncate student_courses, students, courses")
        course = await create_course(client, capacity=12)
        other = await create_course(client)
        students = await pool.fetch(
            "insert into students (name, email) select 'S', 's' || g || '@example.org'"
            " from generate_series(1, 60) g returning id"
        )
        ids = [row["id"] for row in students]
        # Four batches of ten students each (plus an uncapped course), twenty single POSTs.
        batches = [
            batch(
                client,
                [item(s, other["id"]) for s in ids[10 * b : 10 * b + 10]]
                + [item(s, course["id"]) for s in ids[10 * b : 10 * b + 10]],
            )
            for b in range(4)
        ]
        singles = [enroll(client, s, course["id"]) for s in ids[40:]]
        requests: list[Any] = [*batches, *singles]
        requests = requests[::2] + requests[1::2]  # interleaved
        responses = await asyncio.gather(*requests)
        assert all(r.status_code < 500 for r in responses), [r.text for r in responses]

        winners: set[int] = set()
        for response in responses:
            if response.request.url.path == "/enrollments/batch":
                for result in response.json()["results"]:
                    if (
                        result["status"] == 201
                        and result["enrollment"]["course_id"] == course["id"]
                    ):
                        winners.add(result["enrollment"]["student_id"])
                    elif result["status"] == 409:
                        assert result["problem"]["type"].endswith("/course-full")
            elif response.status_code == 201:
                winners.add(response.json()["student_id"])
            else:
                assert_problem(response, 409, "course-full")
        enrolled = await pool.fetch(
            "select student_id from student_courses where course_id = $1", course["id"]
        )
        assert {row[0] for row in enrolled} == winners
        assert len(winners) == 12
        assert (
            await pool.fetchval("select enrolled_count from courses where id = $1", course["id"])
            == 12
        )
        assert (
            await pool.fetchval(
                "select count(*) from student_courses where course_id = $1", other["id"]
            )
            == 40
        )
        assert await _counts_are_true(pool)


async def _deadlock_retries(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    found = re.findall(
        r'^enrollment_db_retries_total\{[^}]*error="DeadlockDetectedError"[^}]*\} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert found, "the metrics count deadlock retries"
    return sum(float(value) for value in found)


async def test_batches_touching_the_same_courses_in_opposite_orders_never_deadlock(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    courses = [await create_course(client) for _ in range(20)]
    students = [await create_student(client) for _ in range(8)]
    retries_before = await _deadlock_retries(client)
    for round_ in range(3):
        action = "drop" if round_ == 1 else "enroll"
        requests = []
        for n, student in enumerate(students):
            ordered = courses if n % 2 == 0 else courses[::-1]
            requests.append(batch(client, [item(student["id"], c["id"], action) for c in ordered]))
        responses = await asyncio.gather(*requests)
        for response in responses:
            expected = 204 if action == "drop" else 201
            assert statuses(response) == [expected] * len(courses)
    assert await _deadlock_retries(client) == retries_before
    assert await pool.fetchval("select count(*) from student_courses") == 8 * 20
    assert await _counts_are_true(pool)


async def test_a_student_deleted_while_batches_enroll_them_leaves_true_counts(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    courses = [await create_course(client) for _ in range(10)]
    students = [await create_student(client) for _ in range(6)]
    requests = [
        batch(client, [item(s["id"], c["id"]) for c in courses for s in students[n::2]])
        for n in range(2)
    ]
    requests.insert(1, client.delete(f"/students/{students[0]['id']}"))
    responses = await asyncio.gather(*requests)
    assert all(r.status_code < 500 for r in responses), [r.text for r in responses]
    assert responses[1].status_code == 204
    assert (
        await pool.fetchval(
            "select count(*) from student_courses where student_id = $1", students[0]["id"]
        )
        == 0
    )
    assert await _counts_are_true(pool)


async def test_the_batch_migration_rolls_back_and_applies_again(
    database_factory: DatabaseFactory,
) -> None:
    url = await database_factory.create("batch_migration")
    await asyncio.to_thread(migrations.apply, url)
    conn = await asyncpg.connect(url)
    try:
        exists = "select count(*) from pg_proc where proname = 'enrollment_batch' and pronargs = 4"
        assert await conn.fetchval(exists) == 1
        await asyncio.to_thread(migrations.rollback, url, BATCH_MIGRATION)
        assert await conn.fetchval(exists) == 0
        assert await asyncio.to_thread(migrations.apply, url) == [BATCH_MIGRATION]
        # Harmless when run again, as yoyo may after a crash before marking it applied.
        await conn.execute((migrations.MIGRATIONS_DIR / f"{BATCH_MIGRATION}.sql").read_text())
        assert await conn.fetchval(exists) == 1
        student = await conn.fetchval(
            "insert into students (name, email) values ('A', 'a@example.org') returning id"
        )
        course = await conn.fetchval(
            "insert into courses (code, name, level) values ('C', 'C', 'x') returning id"
        )
        rows = await conn.fetch(
            "select * from enrollment_batch($1, $2, $3, false)",
            [student, student],
            [course, course],
            [False, True],
        )
        assert [(row["item"], row["outcome"]) for row in rows] == [(0, "created"), (1, "dropped")]
    finally:
        await conn.close()
