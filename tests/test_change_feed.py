"""The change feed (GET /changes, GET /changes/head) over HTTP against the real app and
PostgreSQL: what each write records, in commit order, exactly once; cascades; filters; cursors
and retention; long-polling; and the two ordering traps, shown with transactions held open on
connections of the test's own."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from enrollment_service.app import Service, create_app
from enrollment_service.settings import load_settings
from tests.conftest import assert_problem, create_course, create_student, enroll, error_fields

Change = dict[str, Any]


@pytest.fixture(autouse=True)
async def _empty_feed(pool: asyncpg.Pool) -> None:
    # Deletes, not truncate: the app's poller may be reading these tables.
    await pool.execute(
        "delete from changes; delete from change_commits;"
        " update change_feed_state set pruned_through = 0"
    )


async def read_feed(
    client: httpx.AsyncClient, after: str | None = None, limit: int = 1000, **filters: Any
) -> tuple[list[Change], str]:
    """Every change after `after` that the feed gives now, page by page; and the last cursor."""
    items: list[Change] = []
    while True:
        params = {"limit": limit, **filters, **({"after": after} if after else {})}
        response = await client.get("/changes", params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        items += page["items"]
        if not page["items"]:
            return items, page["next_cursor"]
        after = page["next_cursor"]


def kinds(items: list[Change]) -> list[tuple[str, int | None, int | None]]:
    return [(c["type"], c["student_id"], c["course_id"]) for c in items]


def rid() -> dict[str, str]:
    return {"X-Request-ID": uuid.uuid4().hex}


async def test_each_write_records_its_changes_with_the_request_id(
    client: httpx.AsyncClient,
) -> None:
    created = await client.post(
        "/students", json={"name": "Ada", "email": "ada@example.org"}, headers=rid()
    )
    student = created.json()
    course = await create_course(client, capacity=5)
    s, c = student["id"], course["id"]
    await client.patch(f"/students/{s}", json={"name": "Ada L."})
    await client.patch(f"/courses/{c}", json={"capacity": 6})
    assert (await enroll(client, s, c)).status_code == 201
    assert (await client.delete(f"/students/{s}/courses/{c}")).status_code == 204
    assert (await client.put(f"/students/{s}/courses/{c}")).status_code == 201
    items, _ = await read_feed(client)
    assert kinds(items) == [
        ("student.created", s, None),
        ("course.created", None, c),
        ("student.updated", s, None),
        ("course.updated", None, c),
        ("enrollment.created", s, c),
        ("enrollment.deleted", s, c),
        ("enrollment.created", s, c),
    ]
    assert items[0]["request_id"] == created.request.headers["X-Request-ID"]
    assert items[0]["data"] == student, "the Student after the change, as the API shows it"
    assert items[2]["data"]["name"] == "Ada L."
    assert items[3]["data"] == {**course, "capacity": 6}
    enrollment = (await client.get(f"/students/{s}/courses/{c}")).json()
    assert items[6]["data"] == enrollment
    assert items[5]["data"] is None
    positions = [item["position"] for item in items]
    assert positions == sorted(set(positions))
    assert all(item["occurred_at"].endswith("Z") for item in items)


async def test_a_request_that_changes_nothing_records_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    student = await create_student(client)
    full = await create_course(client, capacity=0)
    course = await create_course(client)
    s = student["id"]
    _, head = await read_feed(client)
    await client.patch(f"/students/{s}", json={})
    await client.patch(f"/students/{s}", json={"name": student["name"]})
    await client.patch(f"/courses/{course['id']}", json={"capacity": None})
    assert_problem(await enroll(client, s, full["id"]), 409, "course-full")
    assert_problem(await enroll(client, s, 2**62), 404, "course-not-found")
    keyed = {"Idempotency-Key": "feed-1"}
    path = f"/students/{s}/courses"
    assert (await client.post(path, json={"course_id": course["id"]}, headers=keyed)).status_code
    again = await client.post(path, json={"course_id": course["id"]}, headers=keyed)
    assert again.headers["idempotent-replayed"] == "true"
    assert (await client.put(f"{path}/{course['id']}")).status_code == 200
    rejected = await client.post(
        "/enrollments/batch",
        json={"atomic": True, "items": [{"student_id": s, "course_id": full["id"]}]},
    )
    assert_problem(rejected, 409, "batch-rejected")
    other = await client.post(path, json={"course_id": full["id"]}, headers=keyed)
    assert_problem(other, 422, "idempotency-key-reused")
    items, _ = await read_feed(client, after=head)
    assert kinds(items) == [("enrollment.created", s, course["id"])]
    assert await pool.fetchval("select count(*) from changes") == 4


async def test_a_batch_records_its_items_in_order_and_its_failures_not_at_all(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    one, two = await create_course(client), await create_course(client, capacity=0)
    s = student["id"]
    _, head = await read_feed(client)
    items = [
        {"student_id": s, "course_id": one["id"]},
        {"student_id": s, "course_id": two["id"]},  # course-full
        {"student_id": s, "course_id": one["id"], "action": "drop"},
        {"student_id": s, "course_id": one["id"]},
    ]
    response = await client.post("/enrollments/batch", json={"items": items}, headers=rid())
    assert response.status_code == 200, response.text
    changes, _ = await read_feed(client, after=head)
    assert kinds(changes) == [
        ("enrollment.created", s, one["id"]),
        ("enrollment.deleted", s, one["id"]),
        ("enrollment.created", s, one["id"]),
    ]
    assert {c["request_id"] for c in changes} == {response.request.headers["X-Request-ID"]}


@pytest.mark.parametrize("parent", ["student", "course"])
async def test_a_cascade_records_each_removed_enrollment_then_the_deletion(
    client: httpx.AsyncClient, parent: str
) -> None:
    students = [await create_student(client) for _ in range(3 if parent == "course" else 1)]
    courses = [await create_course(client) for _ in range(3 if parent == "student" else 1)]
    pairs = [(s["id"], c["id"]) for s in students for c in courses]
    for s, c in pairs:
        assert (await enroll(client, s, c)).status_code == 201
    _, head = await read_feed(client)
    doomed = (students if parent == "student" else courses)[0]["id"]
    deleted = await client.delete(f"/{parent}s/{doomed}", headers=rid())
    assert deleted.status_code == 204
    changes, _ = await read_feed(client, after=head)
    assert kinds(changes) == [
        *(("enrollment.deleted", s, c) for s, c in sorted(pairs, key=lambda p: p[::-1])),
        (f"{parent}.deleted", *((doomed, None) if parent == "student" else (None, doomed))),
    ]
    assert {c["request_id"] for c in changes} == {deleted.request.headers["X-Request-ID"]}


async def test_a_cursor_walk_in_small_pages_gives_the_whole_feed_once(
    client: httpx.AsyncClient,
) -> None:
    for _ in range(7):
        await create_student(client)
    everything, last = await read_feed(client)
    walked, last_walked = await read_feed(client, limit=2)
    assert walked == everything
    assert last_walked == last
    assert (await client.get("/changes/head")).json() == {"next_cursor": last}
    # Nothing new: the cursor sent comes back.
    page = (await client.get("/changes", params={"after": last})).json()
    assert page == {"items": [], "next_cursor": last}


async def test_the_filters_select_a_student_s_or_a_course_s_history(
    client: httpx.AsyncClient,
) -> None:
    ada, bob = await create_student(client), await create_student(client)
    cs, ma = await create_course(client), await create_course(client)
    for s, c in ((ada, cs), (ada, ma), (bob, cs)):
        await enroll(client, s["id"], c["id"])
    await client.patch(f"/courses/{cs['id']}", json={"name": "Renamed"})
    about_ada, _ = await read_feed(client, student_id=ada["id"], limit=1)
    assert kinds(about_ada) == [
        ("student.created", ada["id"], None),
        ("enrollment.created", ada["id"], cs["id"]),
        ("enrollment.created", ada["id"], ma["id"]),
    ]
    about_cs, _ = await read_feed(client, course_id=cs["id"])
    assert kinds(about_cs) == [
        ("course.created", None, cs["id"]),
        ("enrollment.created", ada["id"], cs["id"]),
        ("enrollment.created", bob["id"], cs["id"]),
        ("course.updated", None, cs["id"]),
    ]
    both, _ = await read_feed(client, student_id=bob["id"], course_id=cs["id"])
    assert kinds(both) == [("enrollment.created", bob["id"], cs["id"])]
    nobody = (await client.get("/changes", params={"student_id": 2**62})).json()
    assert nobody["items"] == []


async def test_bad_parameters_are_400_naming_each(client: httpx.AsyncClient) -> None:
    _, cursor = await read_feed(client)
    for params, field in (
        ({"after": "not-a-cursor"}, "after"),
        ({"after": cursor[:-1] + ("A" if cursor[-1] != "A" else "B")}, "after"),
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"wait": 31}, "wait"),
        ({"wait": -1}, "wait"),
        ({"wait": "soon"}, "wait"),
        ({"student_id": 0}, "student_id"),
        ({"course_id": "x"}, "course_id"),
    ):
        response = await client.get("/changes", params=params)
        assert error_fields(response) == {field}, (params, response.text)


async def test_a_change_committed_while_a_reader_waits_is_answered_within_a_second(
    client: httpx.AsyncClient,
) -> None:
    student = await create_student(client)
    _, head = await read_feed(client)

    async def write_later() -> float:
        await asyncio.sleep(0.5)
        await client.patch(f"/students/{student['id']}", json={"name": "Later"})
        return time.monotonic()

    waited, committed_at = await asyncio.gather(
        client.get("/changes", params={"after": head, "wait": 10}), write_later()
    )
    answered_after = time.monotonic() - committed_at
    assert kinds(waited.json()["items"]) == [("student.updated", student["id"], None)]
    assert answered_after < 1.0, answered_after

    # A filtered reader keeps waiting through changes about others, then times out empty.
    started = time.monotonic()
    other = await create_course(client)
    quiet, _ = await asyncio.gather(
        client.get(
            "/changes",
            params={"after": waited.json()["next_cursor"], "wait": 0.8, "student_id": 2**62},
        ),
        client.patch(f"/courses/{other['id']}", json={"name": "Noise"}),
    )
    assert quiet.json() == {"items": [], "next_cursor": waited.json()["next_cursor"]}
    assert time.monotonic() - started >= 0.8


async def _transactions_committed(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "select xact_commit from pg_stat_database where datname = current_database()"
    )
    return count


async def test_waiting_readers_cost_no_database_work_each(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    _, head = await read_feed(client)
    readers = [
        asyncio.create_task(client.get("/changes", params={"after": head, "wait": 6}))
        for _ in range(60)
    ]
    await asyncio.sleep(1.5)  # every reader has read once and now waits
    before = await _transactions_committed(pool)
    await asyncio.sleep(3)
    await asyncio.sleep(1.1)  # the server's statistics reach the view within a second
    spent = await _transactions_committed(pool) - before
    # One process polls the head five times a second: about 20 statements in 4 s, whatever the
    # number of readers. A query per reader per tick would be 60 times that.
    assert spent < 60, spent
    await create_student(client)
    answers = await asyncio.gather(*readers)
    assert all(len(a.json()["items"]) == 1 for a in answers)


async def test_a_change_committed_late_is_not_skipped(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Trap 1: a transaction that takes its number first but commits last. A reader that had
    passed it would never see it; the feed holds later changes back until it commits."""
    student, course = await create_student(client), await create_course(client)
    _, head = await read_feed(client)
    slow = await asyncpg.connect(database_url)
    try:
        transaction = slow.transaction()
        await transaction.start()
        await slow.execute(
            "insert into student_courses (student_id, course_id) values ($1, $2)",
            student["id"],
            course["id"],
        )
        fast = await create_student(client)  # commits while `slow` is open
        held, _ = await read_feed(client, after=head)
        assert held == [], "nothing after a transaction still running"
        await transaction.commit()
    finally:
        await slow.close()
    items, _ = await read_feed(client, after=head)
    assert kinds(items) == [
        ("student.created", fast["id"], None),
        ("enrollment.created", student["id"], course["id"]),
    ]


async def test_an_enroll_that_waited_for_a_drop_comes_after_it(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Trap 2: the enroll's transaction began (and took its id) first, then waited for a
    concurrent drop of the same pair. Ordered by transaction id, the enroll would come before
    the drop, and a mirror replaying the feed would end without the enrollment."""
    student, course = await create_student(client), await create_course(client)
    s, c = student["id"], course["id"]
    assert (await enroll(client, s, c)).status_code == 201
    _, head = await read_feed(client)
    enroller, dropper = await asyncpg.connect(database_url), await asyncpg.connect(database_url)
    try:
        await enroller.execute("begin")
        await enroller.execute("update students set name = 'First' where id = $1", s)
        enroller_xid = await enroller.fetchval("select pg_current_xact_id()::text::bigint")
        await dropper.execute("begin")
        await dropper.execute(
            "delete from student_courses where student_id = $1 and course_id = $2", s, c
        )
        dropper_xid = await dropper.fetchval("select pg_current_xact_id()::text::bigint")
        assert enroller_xid < dropper_xid
        enrolling = asyncio.create_task(
            enroller.execute("insert into student_courses values ($1, $2)", s, c)
        )
        await asyncio.sleep(0.3)
        assert not enrolling.done(), "the enroll waits for the drop"
        await dropper.execute("commit")
        await enrolling
        await enroller.execute("commit")
    finally:
        await enroller.close()
        await dropper.close()
    items, _ = await read_feed(client, after=head)
    assert kinds(items) == [
        ("enrollment.deleted", s, c),
        ("student.updated", s, None),
        ("enrollment.created", s, c),
    ]


async def test_retention_prunes_and_an_older_cursor_answers_410(
    database_url: str, clean_tables: None
) -> None:
    service = create_app(load_settings(environ={"CHANGES_RETENTION": "1"}), database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            await create_student(client)
            first, start = await read_feed(client)
            assert len(first) == 1
            await asyncio.sleep(1.1)
            late = await create_student(client)  # younger than the retention: kept
            for _ in range(40):
                expired = await client.get("/changes", params={"after": _cursor_before(first)})
                if expired.status_code == 410:
                    break
                await asyncio.sleep(0.1)
            assert_problem(expired, 410, "cursor-expired")
            # The cursor after the pruned change still works, and so does starting afresh.
            kept, _ = await read_feed(client, after=start)
            assert kinds(kept) == [("student.created", late["id"], None)]
            fresh, _ = await read_feed(client)
            assert fresh == kept


def _cursor_before(items: list[Change]) -> str:
    from enrollment_service.changes import encode_cursor

    return encode_cursor(items[0]["position"] - 1)


async def test_shutdown_answers_waiting_readers_at_once(
    database_url: str, clean_tables: None
) -> None:
    service: Service = create_app(load_settings(environ={}), database_url)
    async with LifespanManager(service):
        transport = httpx.ASGITransport(app=service)
        async with httpx.AsyncClient(transport=transport, base_url="http://e") as client:
            _, head = await read_feed(client)
            waiting = asyncio.create_task(
                client.get("/changes", params={"after": head, "wait": 20})
            )
            await asyncio.sleep(0.5)
            started = time.monotonic()
            service.begin_shutdown(grace_seconds=5)
            answer = await waiting
            assert answer.json() == {"items": [], "next_cursor": head}
            assert time.monotonic() - started < 1
