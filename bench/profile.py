"""`python -m bench.profile ENDPOINT`: where one server process spends its CPU on one endpoint.

Seeds the 10k scale (or --scale) on an embedded PostgreSQL, serves it with `enrollment-service
serve` (one worker, production logging), and drives the endpoint with wrk twice: once to measure
the server's CPU time per request, once while py-spy samples it; prints both. py-spy is not a
dependency: `.venv/bin/pip install py-spy` first.

.venv/bin/python -m bench.profile roster          # or health, student_courses, enroll, ...
.venv/bin/python -m bench.profile enroll_keyed --cpu-only   # CPU per request only, no py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import database, drivers
from bench.plan import (
    BATCH,
    BATCH_ITEMS,
    CHANGES,
    PROFILED,
    SCALES,
    Ids,
    is_enrollment,
    newcomers_needed,
)
from bench.server import Service, Variant

_NOISE = re.compile(r"\(/[^)]*?(site-packages|lib/python3\.\d+|work/[^/]+)/")


def _frame(raw: str) -> str:
    """`fetch (/…/site-packages/asyncpg/connection.py:123)` -> `fetch (asyncpg/connection.py)`"""
    return re.sub(r":\d+\)$", ")", _NOISE.sub("(", raw))


def top_frames(collapsed: Path, count: int) -> tuple[int, list[tuple[float, str]]]:
    """Frames by the share of samples they appear in (inclusive), from py-spy's raw output."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        total += int(samples)
        for frame in {_frame(raw) for raw in stack.split(";")}:
            inclusive[frame] += int(samples)
    ranked = [(100 * n / max(total, 1), frame) for frame, n in inclusive.most_common(count)]
    return total, ranked


#: Changes in the feed before a `changes` run: its pages are read from the start.
HISTORY = 20_000


def _summary(key: str, concurrency: int, result: drivers.Result, cpu: float, db_cpu: float) -> str:
    per_request = 1e6 * cpu / max(result.requests, 1)
    per_item = f" ({per_request / BATCH_ITEMS:,.1f} us per item)" if key == BATCH.key else ""
    return (
        f"{key} at c={concurrency}: {result.rps:,.0f} req/s, errors {result.errors}, "
        f"server CPU {per_request:,.0f} us per request{per_item}, "
        f"PostgreSQL {1e6 * db_cpu / max(result.requests, 1):,.0f} us"
    )


def main(argv: list[str] | None = None) -> int:
    keys = [endpoint.key for endpoint in PROFILED]
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("endpoint", choices=keys)
    parser.add_argument("--seconds", type=int, default=10, help="sampled seconds")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--scale", choices=list(SCALES), default="10k", help="data to seed")
    parser.add_argument("--top", type=int, default=45, help="frames to print")
    parser.add_argument(
        "--cpu-only", action="store_true", help="measure CPU per request; no py-spy profile"
    )
    parser.add_argument("--raw", type=Path, help="also keep py-spy's raw stacks in this file")
    parser.add_argument(
        "--server",
        choices=("serve", "uvicorn", "granian"),
        default="serve",
        help="serve: the production command; uvicorn or granian: bench.asgi:app under it, for "
        "comparing servers by CPU per request (granian: `.venv/bin/pip install granian`)",
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not args.cpu_only and not Path(py_spy).exists():
        print("bench.profile: py-spy is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    endpoint = next(e for e in PROFILED if e.key == args.endpoint)
    scale = SCALES[args.scale]
    with (
        database.postgres(None) as pg,
        tempfile.TemporaryDirectory(prefix="bench-profile-") as work,
    ):
        database.migrate(pg.url)
        asyncio.run(database.seed(pg.url, scale))
        if endpoint is CHANGES:
            asyncio.run(database.add_history(pg.url, HISTORY))
        seeded = Ids(scale.students, scale.courses)

        def run_ids(seconds: int) -> Ids:
            """Ids for one run; a POST run gets its own block of fresh students."""
            if not is_enrollment(endpoint):
                return seeded
            needed = newcomers_needed(seconds + 2, scale.courses)
            return asyncio.run(database.add_newcomers(pg.url, seeded, needed))

        with (Path(work) / "server.log").open("wb") as log:
            service = Service(pg.url, Variant(server=args.server, workers=1), log)
            try:
                service.wait_ready()
                c, seconds = args.concurrency, args.seconds

                def drive(seconds: int) -> drivers.Result:
                    return drivers.wrk(
                        service.url, endpoint, run_ids(seconds), scale.name, c, seconds
                    )

                drive(2)  # warm-up
                # CPU per request from a run of its own: py-spy pauses the process to sample it.
                # The whole process tree: granian serves from a child process.
                before = drivers.cpu_seconds(service.tree())
                db_before = drivers.cpu_seconds(drivers.postgres_pids())
                result = drive(seconds)
                cpu = drivers.cpu_seconds(service.tree()) - before
                db_cpu = drivers.cpu_seconds(drivers.postgres_pids()) - db_before
                if args.cpu_only:
                    print(_summary(endpoint.key, args.concurrency, result, cpu, db_cpu))
                    return 0
                collapsed = Path(work) / "profile.txt"
                record = [py_spy, "record", "--pid", str(service.process.pid), "--rate", "200"]
                record += ["--subprocesses"] if args.server != "serve" else []
                spy = subprocess.Popen(
                    [
                        *record,
                        *("--duration", str(seconds), "--format", "raw"),
                        *("--output", str(collapsed)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                drive(seconds)
                spy.wait(timeout=seconds + 30)
            finally:
                service.stop()
        print(_summary(endpoint.key, args.concurrency, result, cpu, db_cpu))
        if args.raw:
            shutil.copyfile(collapsed, args.raw)
        total, ranked = top_frames(collapsed, args.top)
        print(f"{total} samples; share of samples each frame appears in:")
        for share, frame in ranked:
            print(f"{share:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
