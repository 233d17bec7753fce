"""The service as an importable ASGI app (`bench.asgi:app`), for the server comparison only: uvicorn
with several workers, or granian, import it in each worker. Production runs
`enrollment-service serve`, which builds the same app with the same settings and logging."""

from __future__ import annotations

from enrollment_service.app import create_app
from enrollment_service.observability import configure_logging
from enrollment_service.settings import load_settings

_settings = load_settings()
configure_logging(_settings.log_level, _settings.log_format)
app = create_app(_settings)
