"""`python -m bench`: seed, serve, load, and report (see bench/README.md).

python3 tasks.py bench                         # the full run: 10k, 1M and 10M enrollments
python3 tasks.py bench --smoke                 # a few seconds at a tiny scale (CI)
python3 tasks.py bench --out docs/performance  # write docs/performance.json and .png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import database, drivers, report
from bench.drivers import Result
from bench.plan import DATA_ENDPOINTS, ENDPOINTS, SCALES, SMOKE_SCALE, Endpoint, Ids, Scale
from bench.plan import newcomers_needed as _newcomers_needed
from bench.server import Service, Variant


def _variants(spec: str) -> list[Variant]:
    """`serve`, `serve:1:20`, `uvicorn:2:10`, `granian:1` ... (server:workers:pool size)."""
    variants = []
    for item in spec.split(","):
        server, _, rest = item.strip().partition(":")
        workers, _, pool = rest.partition(":")
        size = int(pool) if pool else None
        variants.append(
            Variant(
                server=server,
                workers=int(workers or 1),
                pool_min=min(2, size) if size else None,
                pool_max=size,
            )
        )
    return variants


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds at a tiny scale")
    parser.add_argument(
        "--scales", default="10k,1M,10M", help=f"comma-separated, of {', '.join(SCALES)}"
    )
    parser.add_argument("--concurrency", default="16,64", help="connections, comma-separated")
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds per point")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured seconds per endpoint")
    parser.add_argument(
        "--variants",
        default="serve:2:20",
        help="server variants, server:workers:pool, comma-separated; the first is the one "
        "compared with the ceilings (serve = `enrollment-service serve` with WORKERS=workers; "
        "default serve:2:20, the configuration chosen for the 2-core machine this runs on)",
    )
    parser.add_argument(
        "--no-ceilings", action="store_true", help="skip the database-alone runs (comparisons)"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL"),
        help="a PostgreSQL to use instead of an embedded one (its tables are EMPTIED); "
        "default $BENCH_DATABASE_URL",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/bench"),
        help="write OUT.json and OUT.png (default bench/results/bench)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.scales, args.concurrency, args.seconds, args.warmup = "smoke", "4", 1, 0
    return args


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _describe(result: Result) -> str:
    return (
        f"{result.tool:<8} {result.endpoint:<16} c={result.concurrency:<3} "
        f"{result.rps:>9,.0f}/s  p50 {result.p50_ms:7.2f}  p99 {result.p99_ms:7.2f}  "
        f"p99.9 {result.p999_ms:7.2f} ms  errors {result.errors}"
        + (
            f"  cpu/req server {result.server_cpu_us:.0f} us, db {result.db_cpu_us:.0f} us"
            if result.server_cpu_us is not None
            else ""
        )
        + (f" {result.error_kinds}" if result.error_kinds else "")
    )


class Bench:
    def __init__(self, args: argparse.Namespace, pg: database.Postgres) -> None:
        self.args = args
        self.pg = pg
        self.results: list[Result] = []
        self.rss: dict[str, list[float]] = {}
        self.concurrencies = [int(c) for c in args.concurrency.split(",")]

    def _record(self, result: Result, variant: str = "") -> None:
        result.variant = variant
        self.results.append(result)
        _log(_describe(result))

    def _enroll_run(self, ids: Ids, seconds: int, run: Any) -> Result:
        """A POST run on its own block of fresh students, removed afterwards; any pair reused
        (fewer enrollments created than successes reported) counts as errors."""
        fresh = asyncio.run(
            database.add_newcomers(self.pg.url, ids, _newcomers_needed(seconds + 2, ids.courses))
        )
        result: Result = run(fresh)
        created = asyncio.run(database.remove_newcomers(self.pg.url, fresh))
        missing = result.requests - result.errors - created
        if missing > 0:
            result.errors += missing
            result.error_kinds["not_created"] = missing
        return result

    def _point(
        self, tool: str, endpoint: Endpoint, ids: Ids, scale: Scale, c: int, **kw: Any
    ) -> Result:
        seconds = self.args.seconds

        def run(run_ids: Ids) -> Result:
            if tool == "service":
                return drivers.wrk(kw["url"], endpoint, run_ids, scale.name, c, seconds)
            # The database alone gets as many client processes (threads) as the server has
            # workers, so that neither side is held to fewer cores than the other.
            workers = kw["workers"]
            if tool == "asyncpg":
                return drivers.asyncpg_loop(
                    self.pg.url, endpoint, run_ids, scale.name, c, seconds, workers
                )
            assert self.pg.bin_dir is not None
            return drivers.pgbench(
                self.pg.url, self.pg.bin_dir, endpoint, run_ids, scale.name, c, seconds, workers
            )

        def measured(run_ids: Ids) -> Result:
            server = kw["service"].tree() if tool == "service" else []
            postgres = drivers.postgres_pids()
            server_before = drivers.cpu_seconds(server)
            db_before = drivers.cpu_seconds(postgres)
            result = run(run_ids)
            # Backends started for the run (asyncpg, pgbench) count too; they are still alive.
            postgres_after = drivers.postgres_pids() if tool == "service" else postgres
            requests = max(result.requests, 1)
            db_cpu = drivers.cpu_seconds(postgres_after) - db_before
            result.db_cpu_us = round(db_cpu / requests * 1e6, 1) if tool == "service" else None
            if tool == "service":
                server_cpu = drivers.cpu_seconds(server) - server_before
                result.server_cpu_us = round(server_cpu / requests * 1e6, 1)
            return result

        if endpoint.key == "enroll":
            return self._enroll_run(ids, seconds, measured)
        return measured(ids)

    def scale(self, scale: Scale, variants: list[Variant], log_dir: Path) -> dict[str, Any]:
        _log(
            f"seeding {scale.name}: {scale.students:,} students, {scale.courses:,} courses, "
            f"{scale.enrollments:,} enrollments"
        )
        seed_seconds = asyncio.run(database.seed(self.pg.url, scale))
        _log(f"seeded {scale.name} in {seed_seconds:.1f}s")
        ids = Ids(scale.students, scale.courses)
        for index, variant in enumerate(variants):
            ceilings = index == 0 and not self.args.no_ceilings
            self._serve(scale, variant, ids, ceilings, log_dir)
        wrong = asyncio.run(database.check_counts(self.pg.url))
        if wrong:
            raise RuntimeError(f"{wrong} courses have an enrolled_count that is not true")
        return {
            "name": scale.name,
            "enrollments": scale.enrollments,
            "students": scale.students,
            "courses": scale.courses,
            "seed_seconds": round(seed_seconds, 1),
        }

    def _serve(
        self, scale: Scale, variant: Variant, ids: Ids, ceilings: bool, log_dir: Path
    ) -> None:
        log_path = log_dir / f"server-{scale.name}-{variant.label.replace(' ', '_')}.log"
        with log_path.open("wb") as log:
            service = Service(self.pg.url, variant, log)
            _log(f"serving ({variant.label}) on {service.url}")
            try:
                service.wait_ready()
                for endpoint in ENDPOINTS:
                    if self.args.warmup:
                        self._warm(endpoint, ids, scale, service.url)
                    for c in self.concurrencies:
                        result = self._point(
                            "service", endpoint, ids, scale, c, url=service.url, service=service
                        )
                        self._record(result, variant.label)
                        if ceilings and endpoint in DATA_ENDPOINTS:
                            for tool in ("asyncpg", "pgbench"):
                                self._record(
                                    self._point(
                                        tool, endpoint, ids, scale, c, workers=variant.workers
                                    )
                                )
                self.rss[f"{scale.name}/{variant.label}"] = service.peak_rss_mb()
                _log(f"peak RSS per worker: {self.rss[f'{scale.name}/{variant.label}']} MB")
            finally:
                status = service.stop()
        if status != 0:
            raise RuntimeError(f"the service exited with status {status}; see {log_path}")

    def _warm(self, endpoint: Endpoint, ids: Ids, scale: Scale, url: str) -> None:
        seconds = self.args.warmup

        def run(run_ids: Ids) -> Result:
            return drivers.wrk(url, endpoint, run_ids, scale.name, max(self.concurrencies), seconds)

        if endpoint.key == "enroll":
            self._enroll_run(ids, seconds, run)
        else:
            run(ids)


def _meta(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python3 tasks.py bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": _cpu_model(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "system": platform.platform(),
            "python": platform.python_version(),
        },
        "seconds_per_point": args.seconds,
        "warmup_seconds": args.warmup,
        "concurrency": args.concurrency,
        "postgres": "embedded" if not args.database_url else "--database-url",
        "postgres_settings": database.PG_SETTINGS if not args.database_url else {},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if shutil.which("wrk") is None:
        print(
            "bench: wrk is not installed (Debian/Ubuntu: apt-get install -y wrk)", file=sys.stderr
        )
        return 2
    scales = [SMOKE_SCALE] if args.smoke else [SCALES[name] for name in args.scales.split(",")]
    variants = _variants(args.variants)
    started = time.monotonic()
    meta = _meta(args, argv)
    scale_info = []
    with (
        tempfile.TemporaryDirectory(prefix="enrollment-bench-logs-") as logs,
        database.postgres(args.database_url) as pg,
    ):
        if pg.bin_dir is None or not (pg.bin_dir / "pgbench").exists():
            print("bench: pgbench not found (install postgresql-client)", file=sys.stderr)
            return 2
        database.migrate(pg.url)
        bench = Bench(args, pg)
        try:
            for scale in scales:
                scale_info.append(bench.scale(scale, variants, Path(logs)))
        except Exception:
            for log in sorted(Path(logs).glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-20:]
                print(f"--- last lines of {log.name}:", *tail, sep="\n", file=sys.stderr)
            raise
    main_variant = variants[0].label
    meta["total_seconds"] = round(time.monotonic() - started)
    met = report.targets(bench.results, main_variant, [s.name for s in scales], bench.rss)
    extra = {
        "scales": scale_info,
        "variants": [v.label for v in variants],
        "peak_rss_mb_per_worker": bench.rss,
        "ratios": report.ratios(bench.results, main_variant),
        "targets": met,
    }
    json_path = args.out.with_suffix(".json")
    report.write_json(json_path, meta, bench.results, extra)
    report.chart(
        args.out.with_suffix(".png"),
        bench.results,
        main_variant,
        f"enrollment-service ({main_variant}), {meta['date'][:10]}, "
        f"{meta['machine']['cpus']} cores shared by wrk, PostgreSQL and the server",
    )
    print(report.markdown(bench.results, main_variant, bench.rss))
    if len(variants) > 1:
        print()
        print(report.variants_markdown(bench.results, bench.rss))
    if not args.no_ceilings:
        print()
        print(report.ceilings_markdown(bench.results))
    print()
    print(json.dumps(met, indent=2))
    _log(f"done in {meta['total_seconds']}s: {json_path} and {args.out.with_suffix('.png')}")
    errors = met["zero_errors"]["errors"]
    empty = [r for r in bench.results if r.requests == 0]
    if errors or empty:
        _log(f"FAILED: {errors} errors, {len(empty)} runs without a single answer")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
