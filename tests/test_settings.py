"""Settings come from the environment once; a bad value stops start-up naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enrollment_service.settings import ApiToken, SettingsError, load_settings


def test_defaults_need_no_environment() -> None:
    settings = load_settings(environ={})
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.api_tokens == ()
    assert settings.database_url is None
    assert settings.log_format == "json"


def test_every_variable_is_read_and_typed() -> None:
    settings = load_settings(
        environ={
            "DATABASE_URL": "postgresql://u@db/app",
            "MIGRATIONS_DATABASE_URL": "postgresql://u@direct/app",
            "HOST": "127.0.0.1",
            "PORT": "9000",
            "WORKERS": "4",
            "API_TOKENS": " one, sync-job:two ,,",
            "DB_POOL_MIN_SIZE": "1",
            "DB_POOL_MAX_SIZE": "30",
            "DB_POOL_ACQUIRE_TIMEOUT": "0.5",
            "DB_STATEMENT_CACHE_SIZE": "0",
            "LOG_LEVEL": "debug",
            "LOG_FORMAT": "text",
            "SHUTDOWN_GRACE_PERIOD": "7.5",
            "SHUTDOWN_DELAY": "10",
            "MIGRATE_CONNECT_TIMEOUT": "3",
            "DATA_DIR": "/srv/enrollment/pg",
        }
    )
    assert settings.port == 9000
    assert settings.workers == 4
    assert settings.api_tokens == (
        ApiToken("token-7692c3ad", "one"),  # bare: named by its SHA-256, never by the secret
        ApiToken("sync-job", "two"),
    )
    assert (settings.shutdown_delay, settings.migrate_connect_timeout) == (10, 3)
    assert settings.pool_max_size == 30
    assert settings.pool_acquire_timeout == 0.5
    assert settings.statement_cache_size == 0
    assert settings.log_level == "DEBUG"
    assert settings.migrations_url == "postgresql://u@direct/app"
    assert settings.data_dir == Path("/srv/enrollment/pg")
    assert load_settings(environ={"DATABASE_URL": "postgresql://a@b/c"}).migrations_url == (
        "postgresql://a@b/c"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("DB_POOL_MAX_SIZE", "0"),
        ("DB_POOL_ACQUIRE_TIMEOUT", "-1"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("DATABASE_URL", "mysql://x"),
        ("RETRY_AFTER_SECONDS", "31"),
        ("HOST", "  "),
        ("SHUTDOWN_DELAY", "-1"),
        ("MIGRATE_CONNECT_TIMEOUT", "soon"),
        ("API_TOKENS", "sync:a, sync:b"),
        ("API_TOKENS", "sync:"),
    ],
)
def test_a_bad_value_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        load_settings(environ={variable: value})


def test_a_pool_minimum_above_its_maximum_is_refused() -> None:
    with pytest.raises(SettingsError, match="DB_POOL_MIN_SIZE"):
        load_settings(environ={"DB_POOL_MIN_SIZE": "9", "DB_POOL_MAX_SIZE": "3"})


def test_the_command_stops_with_one_line_naming_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enrollment_service", "serve"],
        env={"PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "enrollment-service: PORT: must be a whole number from 0 to 65535, not 'not-a-port'"
    ]


def test_serve_without_a_database_url_says_so() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enrollment_service", "serve"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
