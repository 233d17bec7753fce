"""The benchmark's PostgreSQL: an embedded throwaway server (or the one --database-url names),
migrated, then seeded with bulk COPY at each scale."""

from __future__ import annotations

import io
import random
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bench.plan import COURSES_PER_STUDENT, Ids, Scale
from enrollment_service import migrations

#: Server settings for the embedded PostgreSQL: memory sized for the 10M scale (it fits in
#: shared_buffers, as a production database of that size would), and WAL room so that seeding
#: does not checkpoint every few seconds. Durability stays on: a POST commits and flushes.
PG_SETTINGS = {
    "shared_buffers": "2GB",
    "effective_cache_size": "8GB",
    "maintenance_work_mem": "512MB",
    "work_mem": "16MB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "max_connections": "300",
}

#: Students COPYed per chunk (each chunk also carries their enrollments); one chunk, one tick of
#: the progress bar.
CHUNK_STUDENTS = 20_000

LEVELS = ("beginner", "intermediate", "advanced")


@dataclass(frozen=True, slots=True)
class Postgres:
    url: str
    bin_dir: Path | None


@contextmanager
def postgres(database_url: str | None) -> Iterator[Postgres]:
    """An embedded PostgreSQL in a temporary folder (removed afterwards), or the given server."""
    if database_url:
        pgbench = shutil.which("pgbench")
        yield Postgres(database_url, Path(pgbench).parent if pgbench else None)
        return
    from enrollment_service.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="enrollment-bench-pg-")) / "data"
    server = EmbeddedPostgres(data_dir)
    server.start(**PG_SETTINGS)
    try:
        yield Postgres(server.url, server.bin_dir)
    finally:
        server.destroy()
        shutil.rmtree(data_dir.parent, ignore_errors=True)


def migrate(url: str) -> None:
    migrations.apply(url)


class Progress:
    """A one-line progress bar on stderr (a plain line per update when stderr is not a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self._last_line = -1.0

    def advance(self, amount: int) -> None:
        self.done += amount
        fraction = min(self.done / self.total, 1.0)
        now = time.monotonic()
        if not self.tty and fraction < 1.0 and now - self._last_line < 5:
            return
        self._last_line = now
        bar = "#" * int(fraction * 30)
        rate = self.done / max(now - self.started, 1e-9)
        line = (
            f"  {self.label:<28} [{bar:<30}] {fraction:6.1%}"
            f"  {self.done:>11,}/{self.total:,}  {rate:,.0f}/s"
        )
        end = "\r" if self.tty and fraction < 1.0 else "\n"
        print(line, end=end, file=sys.stderr, flush=True)


def _student_lines(first: int, last: int) -> bytes:
    return "".join(
        f"{i}\tStudent {i}\tstudent{i}@example.org\n" for i in range(first, last + 1)
    ).encode()


def _course_lines(count: int) -> bytes:
    return "".join(
        f"{i}\tC{i:06d}\tCourse {i}\t{LEVELS[i % 3]}\t\\N\n" for i in range(1, count + 1)
    ).encode()


async def _student_chunks(count: int, progress: Progress) -> AsyncIterator[bytes]:
    for first in range(1, count + 1, CHUNK_STUDENTS):
        last = min(first + CHUNK_STUDENTS - 1, count)
        yield _student_lines(first, last)
        progress.advance(last - first + 1)


async def _enrollment_chunks(
    scale: Scale, rng: random.Random, progress: Progress
) -> AsyncIterator[bytes]:
    courses = range(1, scale.courses + 1)
    for first in range(1, scale.students + 1, CHUNK_STUDENTS):
        last = min(first + CHUNK_STUDENTS - 1, scale.students)
        lines: list[str] = []
        for student in range(first, last + 1):
            lines.extend(
                f"{student}\t{course}\n"
                for course in sorted(rng.sample(courses, COURSES_PER_STUDENT))
            )
        yield "".join(lines).encode()
        progress.advance(len(lines))


async def _disable_triggers(conn: asyncpg.Connection) -> str:
    """Skip the seat-count triggers (and, where allowed, the FK checks) for this session only:
    the generated data is consistent by construction, and the counts are set once afterwards."""
    try:
        await conn.execute("set session_replication_role = replica")
    except asyncpg.InsufficientPrivilegeError:
        await conn.execute("alter table student_courses disable trigger user")
        return "alter table student_courses enable trigger user"
    return "set session_replication_role = default"


async def seed(url: str, scale: Scale, seed_value: int = 5) -> float:
    """Empty the tables and fill them at `scale`; returns the seconds it took."""
    started = time.monotonic()
    rng = random.Random(seed_value)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("truncate student_courses, students, courses restart identity")
        restore = await _disable_triggers(conn)
        try:
            await conn.copy_to_table(
                "courses",
                source=io.BytesIO(_course_lines(scale.courses)),
                columns=["id", "code", "name", "level", "capacity"],
            )
            await conn.copy_to_table(
                "students",
                source=_student_chunks(
                    scale.students, Progress(f"{scale.name}: students", scale.students)
                ),
                columns=["id", "name", "email"],
            )
            await conn.copy_to_table(
                "student_courses",
                source=_enrollment_chunks(
                    scale, rng, Progress(f"{scale.name}: enrollments", scale.enrollments)
                ),
                columns=["student_id", "course_id"],
            )
        finally:
            await conn.execute(restore)
        await conn.execute(
            """
            update courses c
               set enrolled_count = n.enrolled
              from (select course_id, count(*)::int as enrolled
                      from student_courses
                     group by course_id) n
             where c.id = n.course_id
            """
        )
        await _sync_sequences(conn)
        # As a long-running production database would be: statistics current, visibility map
        # set by (auto)vacuum, and no checkpoint owed from the load.
        await conn.execute("vacuum (analyze) courses, students, student_courses")
        await conn.execute("checkpoint")
    finally:
        await conn.close()
    return time.monotonic() - started


async def _sync_sequences(conn: asyncpg.Connection) -> None:
    for table in ("students", "courses"):
        await conn.execute(
            f"select setval(pg_get_serial_sequence('{table}', 'id'),"
            f" coalesce((select max(id) from {table}), 0) + 1, false)"
        )


async def add_newcomers(url: str, ids: Ids, count: int) -> Ids:
    """COPY `count` students without enrollments for one POST run; returns the ids to use."""
    conn = await asyncpg.connect(url)
    try:
        base = int(await conn.fetchval("select coalesce(max(id), 0) + 1 from students"))
        await conn.copy_to_table(
            "students",
            source=io.BytesIO(_student_lines(base, base + count - 1)),
            columns=["id", "name", "email"],
        )
        await _sync_sequences(conn)
    finally:
        await conn.close()
    return Ids(ids.students, ids.courses, newcomer_base=base, newcomers=count)


async def add_history(url: str, changes: int) -> None:
    """`changes` entries in the change feed: students renamed, a hundred per transaction."""
    conn = await asyncpg.connect(url)
    try:
        students: int = await conn.fetchval("select count(*) from students")
        for first in range(0, changes, 100):
            await conn.execute(
                "update students set name = name || '.' where id > $1 and id <= $2",
                first % students,
                first % students + min(100, changes - first),
            )
        await conn.execute("vacuum analyze changes, change_commits")
    finally:
        await conn.close()


async def remove_newcomers(url: str, ids: Ids) -> int:
    """Delete one POST run's students (their enrollments go with them, and the seat counts
    follow through the triggers); returns how many enrollments the run created."""
    conn = await asyncpg.connect(url)
    try:
        created = int(
            await conn.fetchval(
                "select count(*) from student_courses where student_id >= $1", ids.newcomer_base
            )
        )
        await conn.execute("delete from students where id >= $1", ids.newcomer_base)
        await conn.execute("vacuum (analyze) courses, students, student_courses")
    finally:
        await conn.close()
    return created


async def check_counts(url: str) -> int:
    """The number of courses whose enrolled_count disagrees with its enrollments (must be 0)."""
    conn = await asyncpg.connect(url)
    try:
        wrong = await conn.fetchval(
            """
            select count(*)
              from courses c
              left join (select course_id, count(*) as n from student_courses group by course_id) s
                on s.course_id = c.id
             where c.enrolled_count <> coalesce(s.n, 0)
            """
        )
    finally:
        await conn.close()
    return int(wrong)
