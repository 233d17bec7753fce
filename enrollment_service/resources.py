"""Where the `sql/` and `migrations/` folders are: beside the package in a checkout, inside it
in an installed wheel (pyproject.toml copies them to `enrollment_service/_resources/`)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ folder beside or inside {_PACKAGE}")
