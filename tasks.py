#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+: each one first makes `.venv` from the pinned
lock file (once, and again whenever the lock changes), then runs inside it.

    python3 tasks.py serve     # the API on http://localhost:8000, on an embedded PostgreSQL
    python3 tasks.py test      # the whole test suite, with coverage
    python3 tasks.py lint      # ruff check, ruff format --check, mypy --strict
    python3 tasks.py bench     # the benchmark (see bench/README.md); --smoke for a quick run
    python3 tasks.py env       # only make the environment
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements" / "dev.lock"
STAMP = VENV / ".lock-sha256"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

TEST_COMMAND = [
    "-m",
    "pytest",
    "--cov=enrollment_service",
    "--cov-report=term",
    "--cov-fail-under=90",
]


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before any venv exists
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _lock_digest() and PYTHON.exists():
        return
    print(
        f"tasks.py: preparing {VENV.relative_to(ROOT)} from {LOCK.relative_to(ROOT)} ...",
        flush=True,
    )
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--require-hashes", "-r", str(LOCK)], check=True)
    subprocess.run([*pip, "install", "--no-deps", "-e", str(ROOT)], check=True)
    STAMP.write_text(_lock_digest())


def run(*args: str) -> int:
    return subprocess.run([str(PYTHON), *args], cwd=ROOT, check=False).returncode


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    ensure_env()
    if task == "env":
        return 0
    if task == "serve":
        os.execv(str(BIN / "enrollment-service"), ["enrollment-service", "dev", *rest])  # noqa: S606
    if task == "test":
        return run(*TEST_COMMAND, *rest)
    if task == "lint":
        return (
            run("-m", "ruff", "check", ".")
            or run("-m", "ruff", "format", "--check", ".")
            or run("-m", "mypy")
        )
    if task == "bench":
        return run("-m", "bench", *rest)
    print(f"unknown task {task!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
