"""The change feed's costs (issue 12), against `enrollment-service serve` (production settings,
2 workers, pool 20) on an embedded PostgreSQL:

1. POST /students/{id}/courses with the feed recording and without (its trigger disabled), at
   16 and 64 connections, interleaved: throughput, and CPU per request of the service and of
   PostgreSQL.
2. A consumer catching up: the whole feed (--history changes made first, plus those of part 1)
   read with limit=1000, one request after another.
3. Idle long-polling readers: N connections waiting in GET /changes?wait=30, and what they cost
   the service and PostgreSQL over a quiet window, against the same window with no readers.

    .venv/bin/python -m bench.feed --seconds 8 --readers 1000
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass

import asyncpg

from bench import database, drivers
from bench.batch import count_enrollments, seed_uncapped, wrk_enrollments
from bench.server import Service, Variant

FEED_TRIGGER = "student_courses_record_change"


@dataclass(frozen=True, slots=True)
class Window:
    """What a stretch of time cost: CPU seconds of the service and PostgreSQL, transactions."""

    seconds: float
    service_cpu: float
    db_cpu: float
    transactions: int

    def line(self, label: str) -> str:
        return (
            f"{label:<28} {self.seconds:4.1f} s: service CPU {self.service_cpu:6.3f} s,"
            f" PostgreSQL CPU {self.db_cpu:6.3f} s, {self.transactions:>4} transactions"
            f" ({self.transactions / self.seconds:5.1f}/s)"
        )


async def _sql(url: str, statement: str, *args: object) -> object:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


def _transactions(url: str) -> int:
    count = asyncio.run(
        _sql(url, "select xact_commit from pg_stat_database where datname = current_database()")
    )
    assert isinstance(count, int)
    return count


#: An idle backend reports its transactions to pg_stat_database within this many seconds
#: (PostgreSQL's PGSTAT_IDLE_INTERVAL is 10 s): a window's count waits this long at each end.
STATS_LAG = 11


def _measure(url: str, service: Service, seconds: float) -> Window:
    """The cost of the next `seconds`, whatever is happening meanwhile."""
    postgres = drivers.postgres_pids()
    time.sleep(STATS_LAG)  # what ran before has been counted
    transactions = _transactions(url)
    service_cpu, db_cpu = drivers.cpu_seconds(service.tree()), drivers.cpu_seconds(postgres)
    time.sleep(seconds)
    service_cpu = drivers.cpu_seconds(service.tree()) - service_cpu
    db_cpu = drivers.cpu_seconds(postgres) - db_cpu
    time.sleep(STATS_LAG)  # what ran in the window has been counted (and only a little more)
    counted = _transactions(url) - transactions
    return Window(seconds, service_cpu, db_cpu, round(counted * seconds / (seconds + STATS_LAG)))


def enroll_with_and_without(url: str, service: Service, seconds: int, warmup: int,
                            rounds: int) -> None:  # fmt: skip
    first = 0
    for concurrency in (16, 64):
        rates: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(rounds):
            for feed in (True, False):
                switch = "enable" if feed else "disable"
                asyncio.run(
                    _sql(url, f"alter table student_courses {switch} trigger {FEED_TRIGGER}")
                )
                for run_seconds, measured in ((warmup, False), (seconds, True)):
                    before = asyncio.run(count_enrollments(url))
                    postgres = drivers.postgres_pids()
                    service_cpu = drivers.cpu_seconds(service.tree())
                    db_cpu = drivers.cpu_seconds(postgres)
                    result = wrk_enrollments(
                        service.url, "post", first, 1, concurrency, run_seconds
                    )
                    service_cpu = drivers.cpu_seconds(service.tree()) - service_cpu
                    db_cpu = drivers.cpu_seconds(postgres) - db_cpu
                    created = asyncio.run(count_enrollments(url)) - before
                    first += result["requests"] + concurrency * 2
                    if not measured:
                        continue
                    rate = created / (result["duration_us"] / 1e6)
                    rates[feed].append(rate)
                    requests = max(result["requests"], 1)
                    print(
                        f"POST enroll, feed {'on ' if feed else 'off'} c={concurrency:<3}"
                        f" {rate:7,.0f}/s  errors {result['errors']}"
                        f"  p99 {result['p99_us'] / 1000:6.1f} ms"
                        f"  service CPU {1e6 * service_cpu / requests:4.0f} us/request"
                        f"  PostgreSQL CPU {1e6 * db_cpu / requests:4.0f} us/request",
                        flush=True,
                    )
        ratio = sum(rates[True]) / max(sum(rates[False]), 1)
        print(f"c={concurrency}: with the feed / without: {ratio:.2f}", flush=True)
    asyncio.run(_sql(url, f"alter table student_courses enable trigger {FEED_TRIGGER}"))


def catch_up(service: Service) -> None:
    host, port = service.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    postgres = drivers.postgres_pids()
    service_cpu, db_cpu = drivers.cpu_seconds(service.tree()), drivers.cpu_seconds(postgres)
    started = time.perf_counter()
    changes = pages = 0
    cursor = None
    while True:
        path = "/changes?limit=1000" + (f"&after={cursor}" if cursor else "")
        connection.request("GET", path)
        response = connection.getresponse()
        page = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"GET {path}: {response.status} {page}")
        if not page["items"]:
            break
        changes += len(page["items"])
        pages += 1
        cursor = page["next_cursor"]
    elapsed = time.perf_counter() - started
    service_cpu = drivers.cpu_seconds(service.tree()) - service_cpu
    db_cpu = drivers.cpu_seconds(postgres) - db_cpu
    connection.close()
    print(
        f"catch-up, limit=1000: {changes:,} changes in {pages} pages, {elapsed:.2f} s:"
        f" {changes / elapsed:,.0f} changes/s; per page: service CPU"
        f" {1000 * service_cpu / pages:.1f} ms, PostgreSQL CPU {1000 * db_cpu / pages:.1f} ms",
        flush=True,
    )


async def _more_history(url: str, count: int) -> None:
    """`count` more changes: transactions of 1000 new enrollments each."""
    conn = await asyncpg.connect(url)
    try:
        students = await conn.fetchval("select count(*) from students")
        offset = await conn.fetchval("select count(*) from student_courses")
        for start in range(offset, offset + count, 1000):
            await conn.execute(
                "insert into student_courses (student_id, course_id)"
                " select 1 + (g / 20000) % $3, 1 + g % 20000 from generate_series($1::bigint, $2) g"
                " on conflict do nothing",
                start + 5_000_000,
                start + 5_000_000 + 999,
                students,
            )
    finally:
        await conn.close()


async def _hold_readers(port: int, count: int, ready: asyncio.Event, done: asyncio.Event) -> int:
    """`count` connections, each with one long-poll waiting; returns how many were answered."""
    head = json.loads(await _get(port, "/changes/head"))["next_cursor"]
    request = (f"GET /changes?after={head}&wait=30 HTTP/1.1\r\nHost: bench\r\n\r\n").encode()
    streams = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        streams.append((reader, writer))
    await asyncio.sleep(5)  # every request has reached its worker, read once, and waits
    ready.set()
    await done.wait()
    answered = 0
    for reader, writer in streams:
        writer.close()
        answered += 0 if reader.at_eof() else 1
    return answered


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return raw.split(b"\r\n\r\n", 1)[1]


def idle_readers(url: str, service: Service, count: int, seconds: float) -> None:
    quiet = _measure(url, service, seconds)
    print(quiet.line("no readers"), flush=True)

    async def run() -> Window:
        ready, done = asyncio.Event(), asyncio.Event()
        holding = asyncio.create_task(_hold_readers(service.port, count, ready, done))
        await ready.wait()
        window = await asyncio.to_thread(_measure, url, service, seconds)
        done.set()
        await holding
        return window

    waiting = asyncio.run(run())
    print(waiting.line(f"{count} waiting readers"), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feed", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="feed on/off pairs per concurrency")
    parser.add_argument("--history", type=int, default=200_000, help="changes made before")
    parser.add_argument("--readers", type=int, default=1000)
    parser.add_argument("--parts", default="enroll,catch-up,readers")
    parser.add_argument("--database-url", help="a server whose tables this empties")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.readers + 1024)), hard))

    parts = args.parts.split(",")
    with database.postgres(args.database_url) as postgres, tempfile.TemporaryFile() as log:
        database.migrate(postgres.url)
        asyncio.run(seed_uncapped(postgres.url))
        service = Service(postgres.url, Variant("serve", workers=2, pool_max=20), log)
        try:
            service.wait_ready()
            # A feed with history, its statistics current, as a running deployment's is: the
            # first minutes of an empty feed (plans made for tiny tables) are not the case.
            asyncio.run(_more_history(postgres.url, args.history))
            asyncio.run(_sql(postgres.url, "vacuum analyze changes, change_commits"))
            if "enroll" in parts:
                enroll_with_and_without(postgres.url, service, args.seconds, args.warmup,
                                        args.rounds)  # fmt: skip
            if "catch-up" in parts:
                catch_up(service)
            if "readers" in parts:
                idle_readers(postgres.url, service, args.readers, args.seconds)
        finally:
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
