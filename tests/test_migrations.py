"""The migrations against a real PostgreSQL: data survives them, rollbacks undo only their own
work, and concurrent `enrollment-service migrate` runs apply each migration exactly once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from enrollment_service import migrations
from tests.conftest import DatabaseFactory

FIRST, SECOND = "0001.students-and-courses", "0002.student-courses"


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


async def test_migration_ids_are_in_dependency_order() -> None:
    assert migrations.migration_ids() == [FIRST, SECOND]


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

    assert await _apply(empty_database) == [SECOND]

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

    assert await _apply(empty_database) == [SECOND]
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
    assert applied == [(FIRST, 1), (SECOND, 1)]
    assert await _rows(empty_database, "select count(*) from yoyo_lock") == [(0,)]


async def test_migrate_twice_in_a_row_is_a_no_op(empty_database: str) -> None:
    for _ in range(2):
        process = _migrate_process(empty_database)
        output, _ = await asyncio.to_thread(process.communicate, timeout=120)
        assert process.returncode == 0, output
    rows = await _rows(empty_database, "select count(*) from _yoyo_log where operation = 'apply'")
    assert rows == [(2,)]


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
