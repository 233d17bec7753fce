"""Hooks for the schemathesis run (tests/test_schemathesis.py, via SCHEMATHESIS_HOOKS).

A generated `wait` would hold each GET /changes for up to 30 s when nothing changes: it is cut
to a fifth of a second, which still exercises the waiting path."""

from __future__ import annotations

from typing import Any

import schemathesis

MAX_WAIT = 0.2


@schemathesis.hook
def map_query(context: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    wait = (query or {}).get("wait")
    if query is not None and isinstance(wait, int | float) and not isinstance(wait, bool):
        query["wait"] = min(wait, MAX_WAIT)
    return query
