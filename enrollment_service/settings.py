"""Every setting the service reads, parsed once from the environment into one frozen object."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

T = TypeVar("T")

LogFormat = Literal["json", "text"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting has a value the service cannot start with; the message names the variable."""


class ApiToken(msgspec.Struct, frozen=True):
    """One accepted bearer token. `name` says who the caller is (logs, idempotency scope);
    the secret itself is never logged."""

    name: str
    secret: str


#: The name of a caller in `API_TOKENS=name:secret`.
_TOKEN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: The built-in cursor key: fine for `dev`, a warning at start-up anywhere else.
DEFAULT_CURSOR_SECRET = "enrollment-service-cursors"  # noqa: S105 - set CURSOR_SECRET in production


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: str | None = None
    """Where the API's queries go (possibly through PgBouncer)."""
    migrations_database_url: str | None = None
    """A direct connection for migrations; defaults to `database_url`."""
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 1
    """Server processes, each with its own pool of up to `pool_max_size` connections."""
    api_tokens: tuple[ApiToken, ...] = ()
    pool_min_size: int = 2
    pool_max_size: int = 10
    pool_acquire_timeout: float = 2.0
    connect_timeout: float = 5.0
    command_timeout: float = 10.0
    statement_cache_size: int = 1024
    health_timeout: float = 1.0
    shutdown_delay: float = 0.0
    """Seconds between SIGTERM and the drain: readiness answers 503 at once, but new connections
    and requests are still served, so a load balancer has time to notice before the port closes."""
    shutdown_grace_period: float = 20.0
    migrate_connect_timeout: float = 60.0
    """Seconds `migrate` keeps retrying its first connection to a database that is not up yet."""
    retry_after_seconds: int = 2
    idempotency_key_ttl: int = 86_400
    changes_retention: int = 604_800
    """Seconds a stored Idempotency-Key outcome is kept; after that the key is new again."""
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    cursor_secret: str = DEFAULT_CURSOR_SECRET
    data_dir: Path = Path(".data/postgres")

    @property
    def migrations_url(self) -> str | None:
        return self.migrations_database_url or self.database_url


def _parse_number(kind: Callable[[str], T], low: T, high: T, unit: str) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        try:
            value = kind(raw)
            in_range = low <= value <= high  # type: ignore[operator]
        except ValueError:
            in_range = False
        if not in_range:
            raise ValueError(f"must be {unit} from {low} to {high}, not {raw!r}")
        return value

    return parse


def _parse_int(low: int, high: int) -> Callable[[str], int]:
    return _parse_number(int, low, high, "a whole number")


def _parse_float(low: float, high: float) -> Callable[[str], float]:
    return _parse_number(float, low, high, "a number of seconds")


def _parse_tokens(raw: str) -> tuple[ApiToken, ...]:
    """Comma-separated `name:secret` entries, or bare secrets (named `token-` and the first 8
    hex digits of the secret's SHA-256, so logs can tell callers apart without the secret)."""
    tokens: list[ApiToken] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, colon, secret = entry.partition(":")
        if colon and _TOKEN_NAME.fullmatch(name):
            if not secret.strip():
                raise ValueError(f"the token named {name!r} has an empty secret")
            tokens.append(ApiToken(name, secret.strip()))
        else:
            digest = hashlib.sha256(entry.encode()).hexdigest()[:8]
            tokens.append(ApiToken(f"token-{digest}", entry))
    names = [token.name for token in tokens]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"each token needs its own name; repeated: {', '.join(duplicates)}")
    return tuple(tokens)


def _parse_log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return level


def _parse_log_format(raw: str) -> LogFormat:
    if raw == "json":
        return "json"
    if raw == "text":
        return "text"
    raise ValueError("must be 'json' or 'text'")


def _parse_url(raw: str) -> str:
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql://")
    return raw


def _parse_nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw


_PARSERS: dict[str, tuple[str, Callable[[str], object]]] = {
    "DATABASE_URL": ("database_url", _parse_url),
    "MIGRATIONS_DATABASE_URL": ("migrations_database_url", _parse_url),
    "HOST": ("host", _parse_nonempty),
    "PORT": ("port", _parse_int(0, 65535)),
    "WORKERS": ("workers", _parse_int(1, 64)),
    "API_TOKENS": ("api_tokens", _parse_tokens),
    "DB_POOL_MIN_SIZE": ("pool_min_size", _parse_int(0, 1000)),
    "DB_POOL_MAX_SIZE": ("pool_max_size", _parse_int(1, 1000)),
    "DB_POOL_ACQUIRE_TIMEOUT": ("pool_acquire_timeout", _parse_float(0.01, 300)),
    "DB_CONNECT_TIMEOUT": ("connect_timeout", _parse_float(0.1, 300)),
    "DB_COMMAND_TIMEOUT": ("command_timeout", _parse_float(0.1, 3600)),
    "DB_STATEMENT_CACHE_SIZE": ("statement_cache_size", _parse_int(0, 100_000)),
    "HEALTH_TIMEOUT": ("health_timeout", _parse_float(0.05, 60)),
    "SHUTDOWN_DELAY": ("shutdown_delay", _parse_float(0, 3600)),
    "SHUTDOWN_GRACE_PERIOD": ("shutdown_grace_period", _parse_float(0, 3600)),
    "MIGRATE_CONNECT_TIMEOUT": ("migrate_connect_timeout", _parse_float(0, 3600)),
    "RETRY_AFTER_SECONDS": ("retry_after_seconds", _parse_int(1, 30)),
    "IDEMPOTENCY_KEY_TTL": ("idempotency_key_ttl", _parse_int(1, 365 * 86_400)),
    "CHANGES_RETENTION": ("changes_retention", _parse_int(1, 10 * 365 * 86_400)),
    "LOG_LEVEL": ("log_level", _parse_log_level),
    "LOG_FORMAT": ("log_format", _parse_log_format),
    "CURSOR_SECRET": ("cursor_secret", _parse_nonempty),
    "DATA_DIR": ("data_dir", Path),
}


def load_settings(
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, object] | None = None,
    **overrides: object,
) -> Settings:
    """Read the environment once; a bad value raises SettingsError naming its variable.
    `defaults` replace the built-in defaults (the environment still wins); `overrides` win."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = dict(defaults or {})
    for variable, (field, parse) in _PARSERS.items():
        raw = env.get(variable)
        if raw is None or raw == "":
            continue
        try:
            values[field] = parse(raw)
        except ValueError as error:
            raise SettingsError(f"{variable}: {error}") from None
    values.update(overrides)
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.pool_min_size > settings.pool_max_size:
        raise SettingsError("DB_POOL_MIN_SIZE: must not exceed DB_POOL_MAX_SIZE")
    return settings
