"""The container files, checked without a Docker engine: the compose file parses and wires the
services as docs/operations.md says, every setting has a default, the Dockerfile builds from the
lock and runs non-root as PID 1, its health checks work against a real server, and the README's
compose instructions name only what the files define."""

from __future__ import annotations

import asyncio
import configparser
import json
import re
import shlex
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from enrollment_service.settings import load_settings
from tests.ops_support import ROOT, SERVICE_VARIABLES, ServiceProcess, service_command

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"


# --- Reading the files ---------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?])?(?P<arg>[^}]*)\})")


def interpolate(value: str, env: dict[str, str], missing: set[str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `$$`, against `env`."""

    def replace(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if op in (":-", "-") and not env.get(name):
            return arg
        if name not in env and missing is not None:
            missing.add(name)
        return env.get(name, "")

    return _VARIABLE.sub(replace, value)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _resolve(node: Any) -> Any:
    """The compose document as `docker compose up` sees it with an empty environment."""
    if isinstance(node, str):
        return interpolate(node, {})
    if isinstance(node, dict):
        return {key: _resolve(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item) for item in node]
    return node


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


@pytest.fixture(scope="module")
def compose(raw_compose: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = _resolve(raw_compose)
    return resolved


@dataclass
class Instruction:
    keyword: str
    arguments: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]


def dockerfile_stages(text: str) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name] = default
        elif keyword == "FROM":
            image, _, name = re.sub(r"\s+as\s+", " AS ", arguments, flags=re.I).partition(" AS ")
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), ""), image)
            stages.append(Stage(base=base.strip(), name=name.strip() or None))
        else:
            stages[-1].instructions.append(Instruction(keyword, arguments))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages(DOCKERFILE.read_text(encoding="utf-8"))


def _exec_form(arguments: str) -> list[str]:
    assert arguments.startswith("["), f"not exec form: {arguments}"
    command: list[str] = json.loads(arguments)
    return command


def _healthcheck_command(stage: Stage) -> list[str]:
    (healthcheck,) = stage.all("HEALTHCHECK")
    _options, _, command = healthcheck.partition("CMD ")
    return _exec_form(command.strip())


def _duration_seconds(value: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, f"not a duration: {value}"
    return sum(float(number) * units[unit] for number, unit in parts)


def _url_host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


# --- docker-compose.yml --------------------------------------------------------------------


def test_compose_starts_from_a_fresh_clone_with_no_environment(raw_compose: dict[str, Any]) -> None:
    """Every variable the file reads has a default, so no .env file is needed."""
    missing: set[str] = set()
    for text in _strings(raw_compose):
        interpolate(text, {}, missing)
    assert not missing, f"variables without a default: {sorted(missing)}"


def test_compose_gates_the_api_on_a_healthy_postgres_and_a_finished_migration(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert {"postgres", "migrate", "api"} <= set(services)

    postgres = services["postgres"]
    image, _, tag = postgres["image"].partition(":")
    major = int(tag.split(".")[0].split("-")[0])
    assert image == "postgres"
    assert major >= 17, "a current PostgreSQL major version"
    (volume,) = postgres["volumes"]
    name, _, target = volume.partition(":")
    assert name in compose["volumes"], "a named volume"
    # 18+ images keep PGDATA under /var/lib/postgresql/<major>/docker; older under .../data.
    assert target == ("/var/lib/postgresql" if major >= 18 else "/var/lib/postgresql/data")
    check = postgres["healthcheck"]["test"]
    assert "pg_isready" in check
    # TCP, not the socket: the image's first-initialisation server listens on the socket only.
    assert check[check.index("-h") + 1] == "127.0.0.1"

    migrate = services["migrate"]
    assert migrate["command"] == ["enrollment-service", "migrate"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert migrate.get("restart", "no") == "no"
    assert _url_host(migrate["environment"]["MIGRATIONS_DATABASE_URL"]) == "postgres:5432"

    api = services["api"]
    assert "profiles" not in api
    assert api["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert "/health/ready" in " ".join(api["healthcheck"]["test"])
    assert api["ports"] == ["127.0.0.1:8000:8000"], "the API on this host's loopback only"
    assert _url_host(api["environment"]["DATABASE_URL"]) == "postgres:5432"
    # The app services run the image this repository's Dockerfile builds.
    for service in ("migrate", "api"):
        assert services[service]["build"]["context"] == "."


def test_compose_passes_every_setting_with_the_service_defaults(compose: dict[str, Any]) -> None:
    environment = {k: str(v) for k, v in compose["services"]["api"]["environment"].items()}
    # DATA_DIR is only for `dev`; the MIGRATE* ones belong to the migrate service.
    expected = SERVICE_VARIABLES - {
        "DATA_DIR",
        "MIGRATIONS_DATABASE_URL",
        "MIGRATE_CONNECT_TIMEOUT",
    }
    assert set(environment) == expected
    as_composed = load_settings(environ=environment)
    # The one deliberate difference: behind a load balancer, a lame-duck delay before draining.
    assert as_composed.shutdown_delay > 0
    built_in = load_settings(
        environ={
            "DATABASE_URL": environment["DATABASE_URL"],
            "SHUTDOWN_DELAY": environment["SHUTDOWN_DELAY"],
        }
    )
    assert as_composed == built_in


def test_compose_waits_longer_than_the_drain_before_killing_the_api(
    compose: dict[str, Any],
) -> None:
    for name in ("api", "api-pgbouncer"):
        service = compose["services"][name]
        delay = float(service["environment"]["SHUTDOWN_DELAY"])
        grace = float(service["environment"]["SHUTDOWN_GRACE_PERIOD"])
        # The lame-duck delay, then the drain: the grace period plus the server's last-resort
        # second (__main__.serve), plus time for the pool to close.
        assert _duration_seconds(service["stop_grace_period"]) >= delay + grace + 1 + 3


def test_compose_offers_pgbouncer_as_an_opt_in_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    bouncer, pooled = services["pgbouncer"], services["api-pgbouncer"]
    assert bouncer["profiles"] == ["pgbouncer"]
    assert pooled["profiles"] == ["pgbouncer"]
    assert bouncer["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert bouncer["stop_signal"] == "SIGINT"
    context = ROOT / bouncer["build"]["context"]
    assert (context / "Dockerfile").is_file()

    config = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    config.read(context / "pgbouncer.ini", encoding="utf-8")
    assert config["pgbouncer"]["pool_mode"] == "transaction"
    port = config["pgbouncer"]["listen_port"]
    assert config["databases"]["*"].split() == ["host=postgres", "port=5432"]

    environment = pooled["environment"]
    assert _url_host(environment["DATABASE_URL"]) == f"pgbouncer:{port}"
    assert environment["DB_STATEMENT_CACHE_SIZE"] == "0"
    assert pooled["depends_on"] == {
        "pgbouncer": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert pooled["ports"] == ["127.0.0.1:8001:8000"]
    # Migrations never go through PgBouncer.
    assert _url_host(services["migrate"]["environment"]["MIGRATIONS_DATABASE_URL"]) != (
        f"pgbouncer:{port}"
    )


# --- Dockerfile and .dockerignore ----------------------------------------------------------


def _python_version_of_the_lock() -> str:
    header = (ROOT / "requirements" / "prod.lock").read_text(encoding="utf-8")
    match = re.search(r"--python-version (\d+\.\d+)", header)
    assert match, "the lock names the Python it was compiled for"
    return match.group(1)


def test_dockerfile_builds_from_the_lock_onto_a_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2, "multi-stage"
    build, runtime = stages[0], stages[-1]
    assert re.fullmatch(
        rf"python:{re.escape(_python_version_of_the_lock())}-slim(-\w+)?", runtime.base
    )
    installs = " ".join(build.all("RUN"))
    assert "--require-hashes" in installs
    assert "requirements/prod.lock" in installs
    assert "pip check" in installs
    # The build backend too comes hash-pinned, never fetched by build isolation.
    assert "requirements/build.lock" in installs
    assert "--no-build-isolation" in installs
    # Only the built virtualenv reaches the runtime stage.
    assert all(copy.startswith(f"--from={build.name}") for copy in runtime.all("COPY"))


def test_dockerfile_runs_the_server_as_pid_1_and_not_as_root(stages: list[Stage]) -> None:
    runtime = stages[-1]
    user = runtime.all("USER")[-1].split(":")[0]
    assert user not in ("root", "0")
    assert not runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert _exec_form(cmd) == ["enrollment-service", "serve"]
    assert runtime.all("STOPSIGNAL") in ([], ["SIGTERM"])


def test_the_commands_the_container_files_run_exist(compose: dict[str, Any]) -> None:
    usage = subprocess.run(
        [*service_command(), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for command in ("serve", "migrate"):
        assert command in usage
    assert compose["services"]["migrate"]["command"][1] in usage


def test_the_healthcheck_needs_nothing_but_python(stages: list[Stage]) -> None:
    command = _healthcheck_command(stages[-1])
    assert command[0] == "python"
    assert "/health/live" in command[-1]
    assert not {"curl", "wget"} & set(" ".join(command).split())


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path, or any folder above
    it, decides; `!` re-includes."""
    ignored = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_image_copies_and_nothing_private(stages: list[Stage]) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: list[str] = []
    for stage in stages:
        for copy in stage.all("COPY"):
            if copy.startswith("--from"):
                continue
            *sources, _target = [w for w in copy.split() if not w.startswith("--")]
            copied.extend(sources)
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if not _ignored(str(f.relative_to(ROOT)), patterns)]
        assert kept, f"{source} is copied but .dockerignore drops it"
        if path.is_file():
            assert kept == [path], source
    for private in (".git/config", ".venv/bin/python", ".data/postgres/PG_VERSION", ".env"):
        assert _ignored(private, patterns), private
    assert _ignored("enrollment_service/__pycache__/app.cpython-311.pyc", patterns)
    assert not _ignored("enrollment_service/app.py", patterns)


def test_the_build_lock_pins_the_build_backend_pyproject_names() -> None:
    """tasks.py and the Dockerfile install the project without build isolation, from this lock."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"][
        "requires"
    ]
    lock = (ROOT / "requirements" / "build.lock").read_text(encoding="utf-8")
    for requirement in requires:
        assert re.search(rf"^{re.escape(requirement)} \\$", lock, re.M), requirement
    assert "--hash=sha256:" in lock


def test_the_lock_holds_every_runtime_dependency() -> None:
    """The image installs the lock with --no-deps, then the package with --no-deps."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lock = (ROOT / "requirements" / "prod.lock").read_text(encoding="utf-8")
    locked = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    for requirement in project["dependencies"]:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        assert name.replace("_", "-") in {n.replace("_", "-") for n in locked}, requirement


async def test_the_health_checks_work_against_a_real_server(
    stages: list[Stage], compose: dict[str, Any], database_url: str, tmp_path: Path
) -> None:
    """The image's HEALTHCHECK (liveness) and compose's API health check (readiness), run as
    the container would run them: exit 0 while the server answers, non-zero once it is gone."""
    image_check = _healthcheck_command(stages[-1])
    compose_check = compose["services"]["api"]["healthcheck"]["test"]
    assert compose_check[0] == "CMD"
    checks = [image_check, compose_check[1:]]

    def run(command: list[str], port: int) -> int:
        python = [sys.executable] if command[0] == "python" else [command[0]]
        result = subprocess.run(
            [*python, *command[1:]],
            env={"PORT": str(port), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            timeout=15,
            check=False,
        )
        return result.returncode

    service = ServiceProcess(database_url, tmp_path).start()
    try:
        await asyncio.to_thread(service.wait_until_ready)
        assert [run(check, service.port) for check in checks] == [0, 0]
    finally:
        service.stop()
    assert all(run(check, service.port) != 0 for check in checks)


# --- The README's instructions --------------------------------------------------------------


def _compose_commands(markdown: str) -> list[list[str]]:
    blocks = re.findall(r"```[a-z]*\n(.*?)```", markdown, re.S)
    commands: list[list[str]] = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("docker compose"):
                commands.append(shlex.split(line)[2:])
    return commands


def _check_compose_command(words: list[str], compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    words = list(words)
    while words and words[0].startswith("-"):
        option = words.pop(0)
        if option == "--profile":
            assert words.pop(0) in profiles, option
        elif option in ("-f", "--file", "-p", "--project-name", "--env-file"):
            words.pop(0)
    assert words, "a compose subcommand"
    subcommand, *rest = words
    known = {"up", "down", "logs", "ps", "exec", "run", "stop", "restart", "build", "config"}
    assert subcommand in known, subcommand
    arguments = [w for w in rest if not w.startswith("-")]
    if subcommand in ("exec", "run"):
        arguments = arguments[:1]
    for name in arguments:
        assert name in services, f"docker compose {subcommand}: no service {name!r}"


@pytest.mark.parametrize("document", [README, OPERATIONS], ids=["README", "operations"])
def test_the_documented_compose_commands_name_what_the_files_define(
    document: Path, compose: dict[str, Any]
) -> None:
    text = document.read_text(encoding="utf-8")
    commands = _compose_commands(text)
    assert any(c and c[0] == "up" for c in commands), f"{document.name} shows docker compose up"
    for command in commands:
        _check_compose_command(command, compose)
    # "address:host port:container port"
    published = {
        int(p.split(":")[-2]) for s in compose["services"].values() for p in s.get("ports", [])
    }
    api_port = int(compose["services"]["api"]["ports"][0].split(":")[-2])
    assert f"localhost:{api_port}" in text
    for port in re.findall(r"localhost:(\d+)", text):
        if int(port) in (8000, 8001):
            assert int(port) in published, port


# --- docs/operations.md's plan for Citus, against the schema and the SQL ------------------


def _citus_section() -> str:
    text = OPERATIONS.read_text(encoding="utf-8")
    start = text.index("### The Citus plan")
    return text[start:]


async def test_student_courses_keeps_the_rules_of_a_table_distributed_by_student_id(
    pool: asyncpg.Pool,
) -> None:
    """Citus enforces uniqueness only when it includes the distribution column, and foreign
    keys only to co-located tables (joined on the distribution column) or reference tables."""
    unique = await pool.fetch(
        "select i.indexrelid::regclass::text as name, array_agg(a.attname::text) as columns"
        "  from pg_index i"
        "  join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)"
        " where i.indrelid = 'student_courses'::regclass and i.indisunique"
        " group by i.indexrelid"
    )
    assert {row["name"] for row in unique} == {"student_courses_pkey"}
    assert all("student_id" in row["columns"] for row in unique)

    foreign = await pool.fetch(
        "select a.attname::text as column_name, c.confrelid::regclass::text as target,"
        "       fa.attname::text as target_column"
        "  from pg_constraint c"
        "  join pg_attribute a on a.attrelid = c.conrelid and a.attnum = c.conkey[1]"
        "  join pg_attribute fa on fa.attrelid = c.confrelid and fa.attnum = c.confkey[1]"
        " where c.conrelid = 'student_courses'::regclass and c.contype = 'f'"
    )
    assert {(r["column_name"], r["target"], r["target_column"]) for r in foreign} == {
        ("student_id", "students", "id"),  # co-located with students distributed by id
        ("course_id", "courses", "id"),  # to the reference table
    }


async def test_what_the_citus_plan_must_change_is_what_the_schema_has(pool: asyncpg.Pool) -> None:
    """The plan names every trigger on student_courses (triggers are what it replaces) and
    every unique index on students that does not include its distribution column `id`."""
    plan = _citus_section()
    triggers = await pool.fetch(
        "select tgname::text from pg_trigger"
        " where tgrelid = 'student_courses'::regclass and not tgisinternal"
    )
    for row in triggers:
        assert f"`{row['tgname']}`" in plan, row["tgname"]
    student_uniques = await pool.fetch(
        "select i.indexrelid::regclass::text as name from pg_index i"
        " where i.indrelid = 'students'::regclass and i.indisunique and not i.indisprimary"
    )
    for row in student_uniques:
        assert f"`{row['name']}`" in plan, row["name"]


def test_every_statement_on_student_courses_is_placed_in_the_citus_plan() -> None:
    """Each SQL file that touches student_courses has a row in the plan's table, and those the
    plan runs on one shard pin the student to a parameter, so Citus can route them."""
    plan = _citus_section()
    rows = dict(re.findall(r"^\| `([a-z_]+/[a-z_]+)\.sql` \| ([^|]+)\|", plan, re.M))
    sql_dir = ROOT / "sql"
    touching = {
        str(path.relative_to(sql_dir).with_suffix(""))
        for path in sql_dir.rglob("*.sql")
        if "student_courses" in path.read_text(encoding="utf-8")
    }
    assert touching == set(rows), "every statement on student_courses, and only those"
    pinned = re.compile(
        r"(\bstudent_id|\bs\.id)\s*=\s*\$1\b|\(student_id, course_id\)\s*(values \(|select )\$1"
    )
    for name, placement in rows.items():
        text = (sql_dir / f"{name}.sql").read_text(encoding="utf-8")
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        if placement.strip().startswith("one shard"):
            assert pinned.search(body), f"{name} is said to run on one shard"
        else:
            assert not pinned.search(body), f"{name} could run on one shard"
