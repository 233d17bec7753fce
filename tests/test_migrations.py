"""The migrations against a real PostgreSQL: data survives them, rollbacks undo only their own
work, and concurrent `enrollment-service migrate` runs apply each migration exactly once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import psycopg
import pytest

from enrollment_service import migrations
from tests.conftest import DatabaseFactory

FIRST, SECOND = "0001.students-and-courses", "0002.student-courses"
THIRD = "0003.validate-course-constraints"
#: Every migration after the first, in the order they apply (later issues add more).
AFTER_FIRST = migrations.migration_ids()[1:]
COURSE_CONSTRAINTS = ("courses_enrolled_within_capacity", "courses_enrolled_count_nonnegative")


@pytest.fixture
async def empty_database(database_factory: DatabaseFactory) -> str:
    return await database_factory.create("migrations")


async def _rows(url: str, query: str, *args: object) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


async def _tables(url: str) -> set[str]:
    rows = await _rows(
        url, "select table_name from information_schema.tables where table_schema = 'public'"
    )
    return {str(row[0]) for row in rows}


async def _constraints(url: str, table: str) -> dict[str, str]:
    rows = await _rows(
        url,
        "select conname, pg_get_constraintdef(oid) from pg_constraint"
        " where conrelid = $1::regclass",
        table,
    )
    return {str(name): str(definition) for name, definition in rows}


async def _apply(url: str, target: str | None = None) -> list[str]:
    return await asyncio.to_thread(migrations.apply, url, target=target)


async def _validated(url: str) -> dict[str, bool]:
    """courses' enrollment constraints, and whether PostgreSQL has checked every row."""
    rows = await _rows(
        url,
        "select conname, convalidated from pg_constraint"
        " where conrelid = 'courses'::regclass and conname = any($1::text[])",
        list(COURSE_CONSTRAINTS),
    )
    return {str(name): bool(valid) for name, valid in rows}


async def _counts(url: str) -> dict[str, tuple[int, int]]:
    """Each course's code -> (enrolled_count, the enrollments actually there)."""
    rows = await _rows(
        url,
        "select c.code, c.enrolled_count, count(sc.student_id) from courses c"
        " left join student_courses sc on sc.course_id = c.id group by c.id order by c.code",
    )
    return {str(code): (int(str(kept)), int(str(true))) for code, kept, true in rows}


async def _older_deployment(url: str, courses: dict[str, tuple[int | None, int]]) -> None:
    """0001 applied, and student_courses made by hand as an older deployment had it (no
    enrolled_count, no triggers), holding rows: `courses` maps each code to (capacity, how many
    of the students s0, s1, s2 are enrolled in it)."""
    assert await _apply(url, target=FIRST) == [FIRST]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """
            create table student_courses (
                student_id  bigint not null references students (id) on delete cascade,
                course_id   bigint not null references courses (id) on delete cascade,
                enrolled_at timestamptz not null default now(),
                primary key (student_id, course_id)
            )
            """
        )
        students = [
            await conn.fetchval(
                "insert into students (name, email) values ($1, $2) returning id",
                f"Student {n}",
                f"s{n}@example.org",
            )
            for n in range(3)
        ]
        for code, (capacity, enrolled) in courses.items():
            course = await conn.fetchval(
                "insert into courses (code, name, level, capacity) values ($1, $1, 'x', $2)"
                " returning id",
                code,
                capacity,
            )
            for student in students[:enrolled]:
                await conn.execute("insert into student_courses values ($1, $2)", student, course)
    finally:
        await conn.close()


async def test_migration_ids_are_in_dependency_order() -> None:
    ids = migrations.migration_ids()
    assert ids[:3] == [FIRST, SECOND, THIRD]
    assert ids == sorted(ids), "numbered in the order they apply"


async def test_second_migration_keeps_existing_rows_and_adds_the_join_table(
    empty_database: str,
) -> None:
    assert await _apply(empty_database, target=FIRST) == [FIRST]
    assert "student_courses" not in await _tables(empty_database)

    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "insert into students (name, email) values ('Ada', 'ada@example.org'), "
            "('Grace', 'grace@example.org')"
        )
        await conn.execute(
            "insert into courses (code, name, level, capacity) values "
            "('CS101', 'Intro', 'beginner', 30), ('MA201', 'Algebra', 'advanced', null)"
        )
        students_before = await conn.fetch("select * from students order by id")
        courses_before = await conn.fetch("select * from courses order by id")
    finally:
        await conn.close()

    assert await _apply(empty_database) == AFTER_FIRST

    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetch("select * from students order by id") == students_before
        courses_after = await conn.fetch("select * from courses order by id")
        for before, after in zip(courses_before, courses_after, strict=True):
            assert {k: after[k] for k in before.keys()} == dict(before)  # noqa: SIM118 - a Record iterates values
            assert after["enrolled_count"] == 0
    finally:
        await conn.close()

    constraints = await _constraints(empty_database, "student_courses")
    assert constraints["student_courses_pkey"] == "PRIMARY KEY (student_id, course_id)"
    assert "ON DELETE CASCADE" in constraints["student_courses_student_id_fkey"]
    assert "REFERENCES students(id)" in constraints["student_courses_student_id_fkey"]
    assert "ON DELETE CASCADE" in constraints["student_courses_course_id_fkey"]
    assert "REFERENCES courses(id)" in constraints["student_courses_course_id_fkey"]
    indexes = await _rows(
        empty_database,
        "select indexdef from pg_indexes where tablename = 'student_courses'",
    )
    assert any("(course_id, student_id)" in str(row[0]) for row in indexes)
    enrolled_at = await _rows(
        empty_database,
        "select is_nullable, column_default from information_schema.columns "
        "where table_name = 'student_courses' and column_name = 'enrolled_at'",
    )
    assert enrolled_at == [("NO", "now()")]
    assert await _validated(empty_database) == dict.fromkeys(COURSE_CONSTRAINTS, True)


async def test_rolling_back_the_second_migration_removes_only_student_courses(
    empty_database: str,
) -> None:
    await _apply(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        student = await conn.fetchval(
            "insert into students (name, email) values ('Ada', 'ada@example.org') returning id"
        )
        course = await conn.fetchval(
            "insert into courses (code, name, level) values ('CS1', 'Intro', 'x') returning id"
        )
        await conn.execute("insert into student_courses values ($1, $2)", student, course)
        students_before = await conn.fetch("select * from students")
    finally:
        await conn.close()

    await asyncio.to_thread(migrations.rollback, empty_database, SECOND)

    assert await _tables(empty_database) >= {"students", "courses"}
    assert "student_courses" not in await _tables(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetch("select * from students") == students_before
        assert await conn.fetchval("select count(*) from courses") == 1
    finally:
        await conn.close()
    assert set(await _constraints(empty_database, "courses")).isdisjoint(COURSE_CONSTRAINTS)

    # Rolling back 0002 rolled back 0003 and the later ones, which depend on it: all apply
    # again.
    assert await _apply(empty_database) == AFTER_FIRST
    assert "student_courses" in await _tables(empty_database)
    assert await _apply(empty_database) == []


def _migrate_process(url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"}
    return subprocess.Popen(
        [sys.executable, "-m", "enrollment_service", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_three_concurrent_migrate_commands_apply_each_migration_once(
    empty_database: str,
) -> None:
    processes = [_migrate_process(empty_database) for _ in range(3)]
    outputs = [await asyncio.to_thread(p.communicate, timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], outputs

    applied = await _rows(
        empty_database,
        "select migration_id, count(*) from _yoyo_log where operation = 'apply' "
        "group by migration_id order by migration_id",
    )
    assert applied == [(migration_id, 1) for migration_id in migrations.migration_ids()]
    assert await _rows(empty_database, "select count(*) from yoyo_lock") == [(0,)]


async def test_migrate_twice_in_a_row_is_a_no_op(empty_database: str) -> None:
    for _ in range(2):
        process = _migrate_process(empty_database)
        output, _ = await asyncio.to_thread(process.communicate, timeout=120)
        assert process.returncode == 0, output
    rows = await _rows(empty_database, "select count(*) from _yoyo_log where operation = 'apply'")
    assert rows == [(len(migrations.migration_ids()),)]


async def test_migrate_without_a_database_url_fails_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if "DATABASE_URL" not in k}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "enrollment_service", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr


async def test_an_unknown_migration_target_is_refused(empty_database: str) -> None:
    with pytest.raises(migrations.MigrationError, match="no migration named"):
        await _apply(empty_database, target="9999.nope")


async def test_enrollments_an_older_deployment_already_has_are_counted(
    empty_database: str,
) -> None:
    await _older_deployment(empty_database, {"CS101": (30, 3), "MA201": (None, 1), "EMPTY": (5, 0)})

    assert await _apply(empty_database) == AFTER_FIRST

    assert await _counts(empty_database) == {"CS101": (3, 3), "EMPTY": (0, 0), "MA201": (1, 1)}
    assert await _validated(empty_database) == dict.fromkeys(COURSE_CONSTRAINTS, True)
    # From now on the triggers keep the count.
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(
            "insert into student_courses select s.id, c.id from students s, courses c"
            " where s.email = 's0@example.org' and c.code = 'EMPTY'"
        )
    finally:
        await conn.close()
    assert (await _counts(empty_database))["EMPTY"] == (1, 1)


async def test_an_older_deployment_with_an_over_full_course_stops_at_the_validation(
    empty_database: str,
) -> None:
    await _older_deployment(empty_database, {"CS101": (2, 3)})

    with pytest.raises(psycopg.errors.CheckViolation) as raised:
        await _apply(empty_database)

    assert raised.value.diag.constraint_name == "courses_enrolled_within_capacity"
    # 0002 is applied (the count is true, and further enrollments are refused); 0003 waits
    # for someone to fix the course and run migrate again.
    assert await _counts(empty_database) == {"CS101": (3, 3)}
    applied = await _rows(empty_database, "select migration_id from _yoyo_migration order by 1")
    assert applied == [(FIRST,), (SECOND,)]
    assert await _validated(empty_database) == dict.fromkeys(COURSE_CONSTRAINTS, False)


async def test_running_the_second_migration_again_is_harmless(empty_database: str) -> None:
    await _older_deployment(empty_database, {"CS101": (30, 3), "MA201": (None, 1)})
    await _apply(empty_database)
    conn = await asyncpg.connect(empty_database)
    try:
        # A count gone wrong (as a crash between 0002's commit and yoyo marking it applied
        # cannot cause, but a hand edit could): the re-run must put it right.
        await conn.execute("update courses set enrolled_count = 0 where code = 'CS101'")
        enrollments_before = await conn.fetch("select * from student_courses order by 1, 2")

        await conn.execute((migrations.MIGRATIONS_DIR / f"{SECOND}.sql").read_text())

        assert await conn.fetch("select * from student_courses order by 1, 2") == (
            enrollments_before
        )
        await conn.execute(
            "insert into student_courses select s.id, c.id from students s, courses c"
            " where s.email = 's1@example.org' and c.code = 'MA201'"
        )
        triggers = await conn.fetchval(
            "select count(*) from pg_trigger where tgrelid = 'student_courses'::regclass"
            " and not tgisinternal and tgfoid::regproc::text like 'student_courses_count_%'"
        )
    finally:
        await conn.close()
    assert await _counts(empty_database) == {"CS101": (3, 3), "MA201": (2, 2)}
    assert triggers == 2
    # Validated constraints stay validated: 0003 will not run again to validate them.
    assert await _validated(empty_database) == dict.fromkeys(COURSE_CONSTRAINTS, True)
