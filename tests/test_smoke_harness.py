"""The harness itself: a real database, migrated, behind the real app."""

from __future__ import annotations

import asyncpg
import httpx

from enrollment_service.db import Query, all_query_names


async def test_ready_answers_200_against_the_migrated_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "migrations": "ok"},
    }


async def test_every_named_query_prepares_against_the_schema(pool: asyncpg.Pool) -> None:
    names = all_query_names()
    assert "enrollments/enroll" in names
    async with pool.acquire() as conn:
        for name in names:
            await conn.prepare(Query.load(name).text)


def _shaped_queries() -> list[Query]:
    from enrollment_service import courses, enrollments, students

    found = [
        value
        for module in (students, courses, enrollments)
        for value in vars(module).values()
        if isinstance(value, Query) and value.shape is not None
    ]
    return sorted(found, key=lambda query: query.name)


def test_the_list_and_detail_statements_all_declare_a_shape() -> None:
    names = {query.name for query in _shaped_queries()}
    assert {"students/get", "courses/list", "students/list"} <= names
    # The two enrollment lists write their pages' JSON themselves: tests/test_json_pages.py.
    assert len(names) == 10


async def test_every_shaped_statement_returns_its_structs_fields_in_order(
    pool: asyncpg.Pool,
) -> None:
    # Rows become Structs positionally (`Student(*row)`): a column out of order would put, say,
    # the email into the name without any error, so the order is checked here, by name.
    async with pool.acquire() as conn:
        for query in _shaped_queries():
            assert query.shape is not None
            statement = await conn.prepare(query.text)
            columns = [attribute.name for attribute in statement.get_attributes()]
            fields = list(query.shape.__struct_fields__)
            assert columns[: len(fields)] == fields, query.name
            # After the fields, only what a single-resource statement adds: the ETag, and for a
            # conditional write whether its preconditions held.
            assert columns[len(fields) :] in ([], ["etag"], ["etag", "permitted"]), query.name
