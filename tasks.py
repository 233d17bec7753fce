#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.11+: each one first makes `.venv` from the pinned
lock files (once, and again whenever a lock changes), then runs inside it.

    python3 tasks.py serve     # the API on http://127.0.0.1:8000, on an embedded PostgreSQL
    python3 tasks.py test      # the whole test suite, with coverage (any pytest arguments after)
    python3 tasks.py lint      # ruff check, ruff format --check, mypy --strict
    python3 tasks.py bench     # the benchmark (see bench/README.md); --smoke for a quick run
    python3 tasks.py env       # only make the environment
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
#: Everything the project and its tests import, hash-pinned and complete (installed --no-deps).
LOCK = ROOT / "requirements" / "dev.lock"
#: The build backend (hatchling) and what it needs, hash-pinned too: the project is installed
#: without build isolation, which would fetch an unpinned hatchling.
BUILD_LOCK = ROOT / "requirements" / "build.lock"
STAMP = VENV / ".lock-sha256"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"

TEST_COMMAND = ["-m", "pytest", "--cov=enrollment_service", "--cov-report=term"]
#: The coverage gate holds for the whole suite; a chosen subset of tests is not held to it.
COVERAGE_GATE = "--cov-fail-under=90"

#: Programs the suite and the benchmark drive for real, and the Debian package of each.
SYSTEM_PROGRAMS = {"test": {"pgbouncer": "pgbouncer"}, "bench": {"wrk": "wrk"}}


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for path in (LOCK, BUILD_LOCK, ROOT / "pyproject.toml"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_env() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this file runs before any venv exists
        sys.exit(f"Python 3.11 or newer is needed; this is {sys.version.split()[0]}")
    if STAMP.exists() and STAMP.read_text() == _lock_digest() and PYTHON.exists():
        return
    print(f"tasks.py: preparing {VENV.relative_to(ROOT)} from requirements/*.lock ...", flush=True)
    if not PYTHON.exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    # Whatever pip the interpreter bundled (23.2 and older too): --no-deps, because the locks
    # are complete, and an old pip would refuse a dependency's extra (coverage[toml]) that it
    # cannot match against the pinned version.
    pip = [str(PYTHON), "-m", "pip", "--disable-pip-version-check", "-q"]
    for lock in (LOCK, BUILD_LOCK):
        subprocess.run([*pip, "install", "--require-hashes", "--no-deps", "-r", lock], check=True)
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True
    )
    STAMP.write_text(_lock_digest())


def ensure_programs(task: str) -> None:
    """Install the system programs a task drives where they are missing: as root on Debian with
    apt-get (CI, containers); elsewhere the task's own check names what to install."""
    missing = [
        package
        for program, package in SYSTEM_PROGRAMS.get(task, {}).items()
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists()
    ]
    if not missing or os.name == "nt" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    print(f"tasks.py: installing {' '.join(missing)} (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def run(*args: str) -> int:
    return subprocess.run([str(PYTHON), *args], cwd=ROOT, check=False).returncode


def main(argv: list[str]) -> int:
    task, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if task in ("help", "-h", "--help"):
        print(__doc__)
        return 0
    ensure_env()
    ensure_programs(task)
    if task == "env":
        return 0
    if task == "serve":
        os.execv(str(BIN / "enrollment-service"), ["enrollment-service", "dev", *rest])  # noqa: S606
    if task == "test":
        return run(*TEST_COMMAND, *(rest or [COVERAGE_GATE]))
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
