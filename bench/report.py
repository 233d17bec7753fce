"""Turning results into what an operator reads: ratios to the two ceilings, the targets, a Markdown
table, the JSON file and the PNG chart."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.drivers import Result
from bench.plan import DATA_ENDPOINTS, ENDPOINTS

#: The issue's targets.
MIN_DB_RATIO = 0.5
MIN_SCALE_RATIO = 0.8
MAX_RSS_MB = 100.0


def _find(
    results: Iterable[Result], tool: str, endpoint: str, scale: str, concurrency: int, variant: str
) -> Result | None:
    for result in results:
        if (
            result.tool == tool
            and result.endpoint == endpoint
            and result.scale == scale
            and result.concurrency == concurrency
            and (tool != "service" or result.variant == variant)
        ):
            return result
    return None


def ratios(results: list[Result], variant: str) -> list[dict[str, Any]]:
    """service / database ceiling and service / HTTP ceiling, per data endpoint, scale and
    concurrency, for one server variant."""
    rows = []
    for result in results:
        if result.tool != "service" or result.variant != variant or result.endpoint == "health":
            continue
        key = (result.endpoint, result.scale, result.concurrency)
        row: dict[str, Any] = {
            "endpoint": result.endpoint,
            "scale": result.scale,
            "concurrency": result.concurrency,
        }
        for tool in ("asyncpg", "pgbench"):
            ceiling = _find(results, tool, *key, variant)
            row[f"vs_{tool}"] = round(result.rps / ceiling.rps, 3) if ceiling else None
        http = _find(results, "service", "health", result.scale, result.concurrency, variant)
        row["vs_http"] = round(result.rps / http.rps, 3) if http else None
        rows.append(row)
    return rows


def targets(
    results: list[Result],
    variant: str,
    scales: list[str],
    rss: dict[str, list[float]],
) -> dict[str, Any]:
    """Each target as measured: met or not, with the numbers that decide it."""
    ratio_rows = ratios(results, variant)
    db: dict[str, Any] = {}
    for tool in ("asyncpg", "pgbench"):
        values = [row[f"vs_{tool}"] for row in ratio_rows if row[f"vs_{tool}"] is not None]
        db[tool] = {
            "min": min(values) if values else None,
            "met": bool(values) and min(values) >= MIN_DB_RATIO,
        }
    flat: list[dict[str, Any]] = []
    if len(scales) > 1:
        small, large = scales[0], scales[-1]
        for result in results:
            if result.tool != "service" or result.variant != variant or result.scale != small:
                continue
            big = _find(results, "service", result.endpoint, large, result.concurrency, variant)
            if big is not None and result.endpoint != "health":
                flat.append(
                    {
                        "endpoint": result.endpoint,
                        "concurrency": result.concurrency,
                        "ratio": round(big.rps / result.rps, 3) if result.rps else None,
                    }
                )
    errors = sum(r.errors for r in results)
    worst_rss = max((mb for peaks in rss.values() for mb in peaks), default=0.0)
    return {
        "service_vs_database": {"threshold": MIN_DB_RATIO, **db},
        "large_vs_small_scale": {
            "threshold": MIN_SCALE_RATIO,
            "rows": flat,
            "met": bool(flat) and all((row["ratio"] or 0) >= MIN_SCALE_RATIO for row in flat),
        },
        "zero_errors": {"errors": errors, "met": errors == 0},
        "peak_rss_per_worker": {
            "mb": worst_rss,
            "limit": MAX_RSS_MB,
            "met": worst_rss < MAX_RSS_MB,
        },
    }


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def markdown(results: list[Result], variant: str, rss: dict[str, list[float]]) -> str:
    """The results table for one server variant, each service point beside its ceilings."""
    lines = [
        "| scale | endpoint | conc | service req/s | p50 ms | p99 ms | p99.9 ms | errors "
        "| asyncpg q/s | pgbench tps | svc/asyncpg | svc/pgbench | svc/HTTP |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    ratio_rows = {
        (r["endpoint"], r["scale"], r["concurrency"]): r for r in ratios(results, variant)
    }
    scales = list(dict.fromkeys(r.scale for r in results))
    for scale in scales:
        for endpoint in ENDPOINTS:
            for result in results:
                if (result.tool, result.variant, result.scale, result.endpoint) != (
                    "service",
                    variant,
                    scale,
                    endpoint.key,
                ):
                    continue
                key = (endpoint.key, scale, result.concurrency)
                asyncpg_r = _find(results, "asyncpg", *key, variant)
                pgbench_r = _find(results, "pgbench", *key, variant)
                ratio = ratio_rows.get(key, {})
                lines.append(
                    f"| {scale} | `{endpoint.method} {endpoint.path}` | {result.concurrency} "
                    f"| {_fmt(result.rps)} | {_fmt(result.p50_ms, 2)} | {_fmt(result.p99_ms, 2)} "
                    f"| {_fmt(result.p999_ms, 2)} | {result.errors} "
                    f"| {_fmt(asyncpg_r.rps if asyncpg_r else None)} "
                    f"| {_fmt(pgbench_r.rps if pgbench_r else None)} "
                    f"| {_fmt(ratio.get('vs_asyncpg'), 2)} | {_fmt(ratio.get('vs_pgbench'), 2)} "
                    f"| {_fmt(ratio.get('vs_http'), 2)} |"
                )
    lines.append("")
    lines.append("| scale | peak RSS per worker (MB) |")
    lines.append("|---|--:|")
    for scale in scales:
        peaks = rss.get(f"{scale}/{variant}", [])
        lines.append(f"| {scale} | {', '.join(_fmt(mb, 1) for mb in peaks) or '-'} |")
    return "\n".join(lines)


def ceilings_markdown(results: list[Result]) -> str:
    """The database-alone runs with their latencies."""
    lines = [
        "| scale | statement | conc | tool | q/s | p50 ms | p99 ms | p99.9 ms | errors |",
        "|---|---|--:|---|--:|--:|--:|--:|--:|",
    ]
    for result in results:
        if result.tool == "service":
            continue
        lines.append(
            f"| {result.scale} | {result.endpoint} | {result.concurrency} | {result.tool} "
            f"| {_fmt(result.rps)} | {_fmt(result.p50_ms, 2)} | {_fmt(result.p99_ms, 2)} "
            f"| {_fmt(result.p999_ms, 2)} | {result.errors} |"
        )
    return "\n".join(lines)


def variants_markdown(results: list[Result], rss: dict[str, list[float]]) -> str:
    """Server variants side by side (the comparison that chose the production configuration)."""
    variants = list(dict.fromkeys(r.variant for r in results if r.tool == "service"))
    points = list(
        dict.fromkeys((r.scale, r.endpoint, r.concurrency) for r in results if r.tool == "service")
    )
    header = "| scale | endpoint | conc | " + " | ".join(variants) + " |"
    lines = [header, "|---|---|--:|" + "--:|" * len(variants)]
    for scale, endpoint, concurrency in points:
        cells = []
        for variant in variants:
            r = _find(results, "service", endpoint, scale, concurrency, variant)
            cells.append(
                f"{_fmt(r.rps)} req/s, p99 {_fmt(r.p99_ms, 1)} ms"
                + (f", **{r.errors} errors**" if r.errors else "")
                if r
                else "-"
            )
        lines.append(f"| {scale} | {endpoint} | {concurrency} | " + " | ".join(cells) + " |")
    scales = list(dict.fromkeys(r.scale for r in results))
    for scale in scales:
        cells = [
            ", ".join(_fmt(mb, 1) for mb in rss.get(f"{scale}/{v}", [])) + " MB" for v in variants
        ]
        lines.append(f"| {scale} | peak RSS per worker | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(
    path: Path, meta: dict[str, Any], results: list[Result], extra: dict[str, Any]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"meta": meta, **extra, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def chart(path: Path, results: list[Result], variant: str, title: str) -> None:
    """Throughput and p99 by scale and endpoint, one column per concurrency; the service solid,
    its database-alone ceilings (pgbench dotted, asyncpg dashed) in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = list(dict.fromkeys(r.scale for r in results))
    concurrencies = sorted({r.concurrency for r in results})
    fig, axes = plt.subplots(
        2, len(concurrencies), figsize=(6 * len(concurrencies), 8), squeeze=False
    )
    colours = {"health": "grey", "student_courses": "C0", "roster": "C1", "enroll": "C2"}
    styles = {"service": "-", "asyncpg": "--", "pgbench": ":"}
    x = list(range(len(scales)))
    for column, concurrency in enumerate(concurrencies):
        for endpoint in ENDPOINTS:
            tools = (
                ("service", "asyncpg", "pgbench") if endpoint in DATA_ENDPOINTS else ("service",)
            )
            for tool in tools:
                points = [
                    _find(results, tool, endpoint.key, scale, concurrency, variant)
                    for scale in scales
                ]
                if not any(points):
                    continue
                label = endpoint.key if tool == "service" else f"{endpoint.key} ({tool} alone)"
                for row, metric in enumerate(("rps", "p99_ms")):
                    values = [getattr(p, metric) if p else float("nan") for p in points]
                    axes[row][column].plot(
                        x,
                        values,
                        styles[tool],
                        marker="o" if tool == "service" else None,
                        color=colours[endpoint.key],
                        label=label,
                        linewidth=2 if tool == "service" else 1,
                    )
        for row, ylabel in enumerate(("requests per second", "p99 latency (ms)")):
            axis = axes[row][column]
            axis.set_xticks(x, [f"{s} enrollments" for s in scales])
            axis.set_ylabel(ylabel)
            axis.set_yscale("log")
            axis.grid(True, which="both", alpha=0.3)
            axis.set_title(f"{ylabel}, concurrency {concurrency}")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
