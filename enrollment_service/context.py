"""What the running request is, for every layer that needs to know: the logs, the idempotency
keys' scope, and the change feed's record of which request made a change."""

from __future__ import annotations

import contextvars

#: The request's X-Request-ID ("-" outside a request).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: Who is calling: the name of the bearer token the request carried ("-" without tokens).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="-")
