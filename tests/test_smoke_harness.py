"""The harness itself: a real database, migrated, behind the real app."""

from __future__ import annotations

import asyncpg
import httpx

from enrollment_service.db import all_query_names


async def test_ready_answers_200_against_the_migrated_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": "ok", "migrations": "ok"},
    }


async def test_every_named_query_prepares_against_the_schema(pool: asyncpg.Pool) -> None:
    from enrollment_service.db import Query

    names = all_query_names()
    assert "enrollments/enroll" in names
    async with pool.acquire() as conn:
        for name in names:
            await conn.prepare(Query.load(name).text)
