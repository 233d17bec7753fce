"""Conditional requests (RFC 9110 §13): ETags on single students and courses, and the
If-Match / If-None-Match headers read into the tags a statement compares under the row's lock.

An ETag is `"<md5 hex>"`, computed by PostgreSQL (`student_etag`, `course_etag`, migration 0004)
in the statement that reads or writes the row. The headers are parsed here into lists of bare
tags for that statement: `["*"]` for a wildcard, `[]` for a header that can match nothing, None
for no header. Only tags this service could have made (32 lowercase hex digits) are kept: any
other tag, well formed or not, can never match.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from litestar.datastructures import ResponseHeader
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter
from litestar.response import Response

from enrollment_service.db import Database, Query
from enrollment_service.problems import PreconditionFailed

WILDCARD = "*"

IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match",
        required=False,
        description="Act only if the resource's current ETag is one of these (strong "
        'comparison), e.g. `"3f2a…"` or `"a…", "b…"`, or `*` for any; otherwise 412',
    ),
]
IfNoneMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-None-Match",
        required=False,
        description="ETags the caller already has (weak comparison: `W/` is ignored), or `*`",
    ),
]

#: What the OpenAPI document says about the ETag header of a success response.
ETAG_HEADER = [
    ResponseHeader(
        name="ETag",
        documentation_only=True,
        description="Strong entity tag of this representation: changes exactly when it does",
    )
]
#: The 304 a GET answers when If-None-Match names the current ETag.
NOT_MODIFIED = {
    304: ResponseSpec(
        data_container=None,
        description="Not modified: If-None-Match names the current ETag (sent again in ETag); "
        "no body",
        generate_examples=False,
    )
}

# One list element: an entity tag, or anything else up to the next comma (which matches nothing).
_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([^"]*)"|[^,]*?)[ \t]*(?:,|\Z)')
_OURS = re.compile(r"[0-9a-f]{32}")


def _tags(header: str, weak_matches: bool) -> list[str]:
    if header.strip(" \t") == WILDCARD:
        return [WILDCARD]
    tags: list[str] = []
    position, end = 0, len(header)
    while position < end:
        element = _ELEMENT.match(header, position)
        assert element is not None  # the second alternative matches anything
        weak, opaque = element.group(1, 2)
        if opaque is not None and (weak_matches or not weak) and _OURS.fullmatch(opaque):
            tags.append(opaque)
        position = element.end()
    return tags


def if_match_tags(header: str | None) -> list[str] | None:
    """If-Match compares strongly: a weak tag never matches, nor does a malformed one."""
    return None if header is None else _tags(header, weak_matches=False)


def if_none_match_tags(header: str | None) -> list[str] | None:
    """If-None-Match compares weakly: `W/"x"` names the same tag as `"x"`."""
    return None if header is None else _tags(header, weak_matches=True)


def tagged(content: Any, etag: str, status_code: int = 200, **headers: str) -> Response[Any]:
    """A response carrying one resource and its ETag."""
    return Response(content, status_code=status_code, headers={"ETag": f'"{etag}"', **headers})


def tagged_unless_known(content: Any, etag: str, if_none_match: str | None) -> Response[Any]:
    """A GET's answer: 304 with no body when If-None-Match names the current ETag (or is `*`),
    else the resource and its ETag."""
    if if_none_match is not None:
        known = if_none_match_tags(if_none_match)
        if known and (known[0] == WILDCARD or etag in known):
            return Response(None, status_code=304, headers={"ETag": f'"{etag}"'})
    return tagged(content, etag)


async def delete_if_matching(
    db: Database,
    query: Query,
    resource: str,
    resource_id: int,
    if_match: str | None,
    if_none_match: str | None,
    missing: Exception,
) -> None:
    """DELETE of one student or course under its preconditions: `query` checks the ETag and
    deletes under the row's lock, answering no row for a missing resource, else `permitted`."""
    row = await db.fetchrow(
        query, resource_id, if_match_tags(if_match), if_none_match_tags(if_none_match)
    )
    if row is None:
        raise missing
    if not row[0]:
        raise PreconditionFailed(resource, resource_id)
