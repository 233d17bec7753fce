"""The change feed under real concurrency: writers enroll, drop, batch, and delete students and
courses with large cascades, while a reader follows the feed in small pages. Then: positions
strictly increase, nothing is duplicated, each success a writer was told of has exactly its
entries, and folding the feed from the start rebuilds exactly the final data.

`FEED_READER=naive python3 tasks.py test tests/test_change_feed_concurrency.py` runs the same
writers against a deliberately naive reader (the changes table read directly, ordered by the
writing transaction's id, with no horizon), which this test must catch."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import uuid
from collections import Counter
from typing import Any

import asyncpg
import httpx
import pytest

from tests.conftest import create_course, create_student

Change = dict[str, Any]

WRITERS_ROUNDS = 40
PAGE = 7


@pytest.fixture(autouse=True)
async def _empty_feed(pool: asyncpg.Pool) -> None:
    await pool.execute(
        "delete from changes; delete from change_commits;"
        " update change_feed_state set pruned_through = 0"
    )


class Ledger:
    """What the writers were told: each success, by request id."""

    def __init__(self) -> None:
        self.expected: dict[str, Counter[tuple[str, int | None, int | None]]] = {}

    def expect(
        self, response: httpx.Response, *entries: tuple[str, int | None, int | None]
    ) -> None:
        self.expect_of(response.request.headers["X-Request-ID"], *entries)

    def expect_of(self, request_id: str, *entries: tuple[str, int | None, int | None]) -> None:
        self.expected.setdefault(request_id, Counter()).update(entries)


def _headers(**extra: str) -> dict[str, str]:
    return {"X-Request-ID": uuid.uuid4().hex, **extra}


async def _enroller(client: httpx.AsyncClient, ids: dict[str, list[int]], ledger: Ledger,
                    rng: random.Random) -> None:  # fmt: skip
    for _ in range(WRITERS_ROUNDS):
        s, c = rng.choice(ids["students"]), rng.choice(ids["courses"])
        response = await client.post(
            f"/students/{s}/courses", json={"course_id": c}, headers=_headers()
        )
        if response.status_code == 201:
            ledger.expect(response, ("enrollment.created", s, c))


async def _dropper(client: httpx.AsyncClient, ids: dict[str, list[int]], ledger: Ledger,
                   rng: random.Random) -> None:  # fmt: skip
    for _ in range(WRITERS_ROUNDS):
        s, c = rng.choice(ids["students"]), rng.choice(ids["courses"])
        # Keyed: a transaction of several statements, so commits straggle behind their start.
        headers = _headers(**{"Idempotency-Key": uuid.uuid4().hex})
        response = await client.delete(f"/students/{s}/courses/{c}", headers=headers)
        if response.status_code == 204:
            ledger.expect(response, ("enrollment.deleted", s, c))


async def _batcher(client: httpx.AsyncClient, ids: dict[str, list[int]], ledger: Ledger,
                   rng: random.Random) -> None:  # fmt: skip
    for _ in range(WRITERS_ROUNDS // 4):
        items: list[dict[str, Any]] = [
            {
                "student_id": rng.choice(ids["students"]),
                "course_id": rng.choice(ids["courses"]),
                "action": rng.choice(["enroll", "drop"]),
            }
            for _ in range(20)
        ]
        response = await client.post(
            "/enrollments/batch", json={"items": items}, headers=_headers()
        )
        assert response.status_code == 200, response.text
        for item, result in zip(items, response.json()["results"], strict=True):
            pair: tuple[int, int] = (item["student_id"], item["course_id"])
            if result["status"] == 201:
                ledger.expect(response, ("enrollment.created", *pair))
            elif result["status"] == 204:
                ledger.expect(response, ("enrollment.deleted", *pair))


async def _deleter(client: httpx.AsyncClient, ids: dict[str, list[int]], ledger: Ledger,
                   pool: asyncpg.Pool) -> None:  # fmt: skip
    """Deletes the student and the course with the most enrollments, again and again, adding a
    fresh one of each so the others always have somewhere to write."""
    for _ in range(WRITERS_ROUNDS // 8):
        for kind in ("student", "course"):
            column = f"{kind}_id"
            doomed = await pool.fetchval(
                f"select {column} from student_courses group by 1"  # noqa: S608 - fixed names
                " order by count(*) desc limit 1"
            )
            if doomed is None:
                continue
            response = await client.delete(f"/{kind}s/{doomed}", headers=_headers())
            if response.status_code != 204:
                continue
            ids[f"{kind}s"].remove(doomed)
            # Its cascade's entries are checked by the fold below: which enrollments it took
            # depends on the other writers.
            ledger.expect(
                response,
                (f"{kind}.deleted", *((doomed, None) if kind == "student" else (None, doomed))),
            )
            fresh = await (create_student if kind == "student" else create_course)(client)
            ids[f"{kind}s"].append(fresh["id"])


async def _slow_writer(database_url: str, ids: dict[str, list[int]], ledger: Ledger,
                       rng: random.Random) -> None:  # fmt: skip
    """A writer whose transactions take a while between their first write and their commit, as
    an import script's or a busy server's do: the ones a reader can overtake."""
    conn = await asyncpg.connect(database_url)
    try:
        for _ in range(WRITERS_ROUNDS // 2):
            s, c = rng.choice(ids["students"]), rng.choice(ids["courses"])
            request_id = f"slow-{uuid.uuid4().hex}"
            try:
                async with conn.transaction():
                    await conn.execute("select set_config('enrollment.request_id', $1, true)",
                                       request_id)  # fmt: skip
                    created = await conn.fetchval(
                        "insert into student_courses values ($1, $2)"
                        " on conflict do nothing returning true",
                        s,
                        c,
                    )
                    await asyncio.sleep(0.03)
            except asyncpg.ForeignKeyViolationError:
                continue  # its student or course was deleted meanwhile
            except asyncpg.DeadlockDetectedError:
                continue  # with a cascade locking the other way: rolled back, nothing recorded
            if created:
                ledger.expect_of(request_id, ("enrollment.created", s, c))
    finally:
        await conn.close()


async def _read_http(client: httpx.AsyncClient, after: str | None) -> tuple[list[Change], str]:
    params: dict[str, Any] = {"limit": PAGE}
    if after is not None:
        params["after"] = after
    response = await client.get("/changes", params=params)
    assert response.status_code == 200, response.text
    page = response.json()
    return page["items"], page["next_cursor"]


NAIVE_PAGE = """
select (txid::text::bigint << 20) | ordinal as position, type, student_id, course_id, request_id
  from changes
 where (txid::text::bigint << 20) | ordinal > $1
 order by 1
 limit $2
"""


async def _read_naive(pool: asyncpg.Pool, after: str | None) -> tuple[list[Change], str]:
    rows = await pool.fetch(NAIVE_PAGE, int(after or 0), PAGE)
    items = [dict(row) for row in rows]
    return items, str(items[-1]["position"]) if items else (after or "0")


async def test_concurrent_writers_and_a_following_reader_agree_on_every_change(
    client: httpx.AsyncClient, pool: asyncpg.Pool, database_url: str
) -> None:
    rng = random.Random(12)
    naive = os.environ.get("FEED_READER") == "naive"
    ids: dict[str, list[int]] = {
        "students": [(await create_student(client))["id"] for _ in range(30)],
        "courses": [(await create_course(client))["id"] for _ in range(6)],
    }
    # Big cascades from the start: every student in the first course, and the first student
    # in every course.
    seed = [{"student_id": s, "course_id": ids["courses"][0]} for s in ids["students"]]
    seed += [{"student_id": ids["students"][0], "course_id": c} for c in ids["courses"][1:]]
    assert (await client.post("/enrollments/batch", json={"items": seed})).status_code == 200

    ledger = Ledger()
    feed: list[Change] = []
    writing = True

    async def follow() -> None:
        cursor: str | None = None
        while True:
            still_writing = writing
            items, cursor = await (
                _read_naive(pool, cursor) if naive else _read_http(client, cursor)
            )
            feed.extend(items)
            if not items:
                if not still_writing:
                    return
                await asyncio.sleep(0.01)

    reader = asyncio.create_task(follow())
    await asyncio.gather(
        *(_enroller(client, ids, ledger, random.Random(rng.random())) for _ in range(3)),
        *(_dropper(client, ids, ledger, random.Random(rng.random())) for _ in range(2)),
        _batcher(client, ids, ledger, random.Random(rng.random())),
        _deleter(client, ids, ledger, pool),
        _slow_writer(database_url, ids, ledger, random.Random(rng.random())),
    )
    writing = False
    await reader

    positions = [change["position"] for change in feed]
    assert all(a < b for a, b in itertools.pairwise(positions)), "strictly increasing"

    by_request: dict[str | None, Counter[tuple[str, int | None, int | None]]] = {}
    for change in feed:
        entry = (change["type"], change["student_id"], change["course_id"])
        by_request.setdefault(change["request_id"], Counter())[entry] += 1
    for request_id, expected in ledger.expected.items():
        recorded = by_request.get(request_id, Counter())
        for entry, count in expected.items():
            assert recorded[entry] == count, (request_id, entry, recorded)

    # Folding the feed from the start gives exactly what the database holds now.
    students: set[int] = set()
    courses: set[int] = set()
    enrolled: set[tuple[int, int]] = set()
    for change in feed:
        kind, s, c = change["type"], change["student_id"], change["course_id"]
        if kind == "student.created":
            assert s not in students
            students.add(s)
        elif kind == "student.deleted":
            assert not any(pair[0] == s for pair in enrolled), "its enrollments went first"
            students.remove(s)
        elif kind == "course.created":
            courses.add(c)
        elif kind == "course.deleted":
            assert not any(pair[1] == c for pair in enrolled), "its enrollments went first"
            courses.remove(c)
        elif kind == "enrollment.created":
            assert (s, c) not in enrolled, ("created twice", s, c)
            enrolled.add((s, c))
        elif kind == "enrollment.deleted":
            assert (s, c) in enrolled, ("deleted while not enrolled", s, c)
            enrolled.remove((s, c))
    assert students == {r["id"] for r in await pool.fetch("select id from students")}
    assert courses == {r["id"] for r in await pool.fetch("select id from courses")}
    assert enrolled == {
        (r["student_id"], r["course_id"])
        for r in await pool.fetch("select student_id, course_id from student_courses")
    }
    assert len(ledger.expected) > 50, "the writers did write"
