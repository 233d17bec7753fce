"""Safe defaults of the real `enrollment-service serve`: it says at start-up when it runs without
authentication or with the built-in cursor key, and it names callers, never their secrets."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ServeFactory


def _warnings(records: list[dict[str, object]]) -> list[str]:
    return [str(r["msg"]) for r in records if r["level"] == "warning"]


@pytest.mark.timeout(60)
async def test_serve_warns_once_each_without_tokens_and_with_the_built_in_cursor_secret(
    database_url: str, serve: ServeFactory
) -> None:
    service = await serve(database_url)
    service.stop()
    warnings = _warnings(service.records())
    assert len([w for w in warnings if w.startswith("API_TOKENS is not set")]) == 1, warnings
    assert len([w for w in warnings if w.startswith("CURSOR_SECRET is the built-in")]) == 1


@pytest.mark.timeout(60)
async def test_serve_configured_safely_warns_about_neither(
    database_url: str, serve: ServeFactory
) -> None:
    service = await serve(database_url, API_TOKENS="ops:s3cret", CURSOR_SECRET="another-key")
    service.stop()
    warnings = _warnings(service.records())
    assert not [w for w in warnings if w.startswith(("API_TOKENS", "CURSOR_SECRET"))], warnings


@pytest.mark.timeout(60)
async def test_the_access_log_names_the_caller_and_never_the_secret(
    database_url: str, serve: ServeFactory, clean_tables: None
) -> None:
    secret, bare = "lms-secret-7f3a", "bare-secret-91c2"
    service = await serve(database_url, API_TOKENS=f"lms-sync:{secret}, {bare}")
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        for token, request_id in ((secret, "by-name"), (bare, "by-bare"), ("wrong", "nobody")):
            await client.get(
                "/students",
                headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
            )
    service.stop()
    access = service.access_log()
    assert access["by-name"]["caller"] == "lms-sync"
    assert access["by-name"]["status"] == 200
    assert str(access["by-bare"]["caller"]).startswith("token-")
    assert access["nobody"]["status"] == 401
    assert "caller" not in access["nobody"]
    log = service.log_text()
    assert secret not in log
    assert bare not in log
