"""The script that makes each service's role and database (deploy/postgres-init/
01-service-databases.sh, compose's postgres-roles) run for real, through psql, against the test
server, with names of the test's own: each service's role owns its database and may not connect
to another's, migrates it as the compose `*-migrate` job does, and the script runs again over what
it made, or over databases an earlier release made as the superuser. Roles belong to the whole
server: each test drops those it made, with their databases. The test server lets every role in
without a password; what needs one asked for runs on a server of this module's own that asks, as
the compose file's does (`password_server`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import URL, make_url

from devstack.infra import free_port, logs_dir, postgres_binaries, start_embedded_postgres
from shared.config import SERVICES
from shared.migrations import alembic_config, ensure_database
from tests.environment import RUN_ID, database_name

INIT_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "postgres-init" / \
    "01-service-databases.sh"


@dataclass(frozen=True)
class ServiceDatabase:
    """A service's role, its password and its database, as deploy/service-roles.env names them."""

    service: str
    role: str
    password: str
    database: str

    def settings(self) -> dict[str, str]:
        """The init script's variables for this service."""
        prefix = self.service.upper()
        return {f"{prefix}_DB_NAME": self.database, f"{prefix}_DB_USER": self.role,
                f"{prefix}_DB_PASSWORD": self.password}


class ServiceDatabases(dict[str, ServiceDatabase]):
    def __init__(self, server: URL, made: dict[str, ServiceDatabase]):
        super().__init__(made)
        self.server = server  # the superuser's, no database
        self.administrators: list[str] = []  # roles the test made to run the script as

    def make_administrator(self, *attributes: str) -> str:
        """A login role of the test's own with `attributes` (CREATEROLE, ...), dropped after the
        test with the services' roles."""
        name = self["orders"].role.removesuffix("_orders") + f"_admin{len(self.administrators)}"
        _as_superuser(self.server, f'CREATE ROLE "{name}" LOGIN {" ".join(attributes)}')
        self.administrators.append(name)
        return name

    def as_role(self, role_of: str, database_of: str) -> URL:
        """The URL that connects as `role_of`'s role, with its password, to `database_of`'s
        database."""
        role = self[role_of]
        return self.server.set(username=role.role, password=role.password,
                               database=self[database_of].database)

    def as_superuser(self, service: str) -> URL:
        return self.server.set(database=self[service].database)

    def run_init_script(self, as_user: str | None = None, password: str | None = None,
                        check: bool = True,
                        psql_dir: Path | None = None) -> subprocess.CompletedProcess:
        """The script as compose's postgres-roles runs it (executed, as POSTGRES_USER: the
        server's superuser unless `as_user`, its password POSTGRES_PASSWORD if given, no
        PGPASSWORD), with the embedded server's psql (or the one in `psql_dir`); fails the test
        if it fails, when `check`."""
        env = {name: value for name, value in os.environ.items()
               if name not in ("PGPASSWORD", "POSTGRES_PASSWORD")}
        env.update({"POSTGRES_USER": as_user or self.server.username,
                    "PGHOST": self.server.host, "PGPORT": str(self.server.port or 5432),
                    "PATH": f"{psql_dir or postgres_binaries(None)}{os.pathsep}{env['PATH']}"})
        if password is not None:
            env["POSTGRES_PASSWORD"] = password
        for made in self.values():
            env.update(made.settings())
        result = subprocess.run([str(INIT_SCRIPT)], env=env, capture_output=True, text=True,
                                timeout=60)
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def service_databases(infrastructure) -> Iterator[ServiceDatabases]:
    with _service_databases_on(make_url(infrastructure.postgres_base)) as made:
        yield made


@dataclass(frozen=True)
class PasswordServer:
    url: URL  # its superuser's, `postgres`, let in without a password; no database
    log: Path  # what the server logs, every statement


@pytest.fixture(scope="module")
def password_server(module_server_dir, note_started) -> Iterator[PasswordServer]:
    """A PostgreSQL of the module's own (the embedded wheel's) that asks every role but its
    superuser for its password (scram-sha-256, as the postgres image's does) and logs every
    statement it receives. Its data is outside pytest's temporary root, which another run may
    close to the server's user (conftest._a_folder_another_user_can_enter)."""
    run_dir = module_server_dir
    port = free_port()
    url_base, process = start_embedded_postgres(run_dir, port, on_start=note_started)
    try:
        (run_dir / "postgres" / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")
        _as_superuser(make_url(url_base), "ALTER SYSTEM SET log_statement = 'all'")
    finally:
        process.stop()
    # Started again on its data, with both read as it starts.
    url_base, process = start_embedded_postgres(run_dir, port, on_start=note_started)
    try:
        yield PasswordServer(make_url(url_base), logs_dir(run_dir) / "postgres.log")
    finally:
        process.stop()


@pytest.fixture
def service_databases_asking_passwords(password_server) -> Iterator[ServiceDatabases]:
    with _service_databases_on(password_server.url) as made:
        yield made


@contextmanager
def _service_databases_on(server: URL) -> Iterator[ServiceDatabases]:
    """Each service's role, password and database on `server`, named for this test alone, none
    made yet; every one the test made is dropped after it, the databases first (a role owning one
    cannot be dropped), the administrators it made last."""
    tag = uuid.uuid4().hex[:6]
    made = ServiceDatabases(server, {
        service: ServiceDatabase(service, role=f"hseshop_test_{RUN_ID}_{tag}_{service}",
                                 # (a quote and a space: the script passes it to SQL as it is)
                                 password=f"{service}-{tag} it's",
                                 database=database_name(f"roles_{tag}", service))
        for service in SERVICES})
    try:
        yield made
    finally:
        _as_superuser(made.server,
                      *(f'DROP DATABASE IF EXISTS "{each.database}" WITH (FORCE)'
                        for each in made.values()),
                      *(f'DROP ROLE IF EXISTS "{each.role}"' for each in made.values()),
                      *(f'DROP ROLE IF EXISTS "{name}"' for name in made.administrators))


def _as_superuser(server: URL, *statements: str) -> None:
    """Run `statements` on the server's `postgres` database, as its superuser, in autocommit."""
    engine = sa.create_engine(server.set(drivername="postgresql+psycopg2", database="postgres"),
                              isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def _connect(url: URL):
    return psycopg2.connect(host=url.host, port=url.port, user=url.username, password=url.password,
                            dbname=url.database)


def _one(url: URL, statement: str, *params):
    connection = _connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchone()
    finally:
        connection.close()


def _password_is(server: URL, role: str, password: str) -> bool:
    """Whether the role's stored SCRAM-SHA-256 verifier is that of `password` (the test server
    lets every role in without a password, so a connection would not tell)."""
    (verifier,) = _one(server.set(database="postgres"),
                       "SELECT rolpassword FROM pg_authid WHERE rolname = %s", role)
    # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (RFC 5803)
    method, iterations_and_salt, keys = verifier.split("$")
    iterations, salt = iterations_and_salt.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt),
                                 int(iterations))
    server_key = base64.b64encode(hmac.digest(salted, b"Server Key", "sha256")).decode()
    return method == "SCRAM-SHA-256" and keys.split(":")[1] == server_key


def _owners_in(url: URL) -> set[str]:
    """Who owns the tables, sequences and functions of the database's public schema."""
    connection = _connect(url)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_get_userbyid(relowner) FROM pg_class"
                           " WHERE relnamespace = 'public'::regnamespace"
                           " UNION SELECT pg_get_userbyid(proowner) FROM pg_proc"
                           " WHERE pronamespace = 'public'::regnamespace")
            return {owner for (owner,) in cursor.fetchall()}
    finally:
        connection.close()


def _migrate_as(url: URL, service: str) -> subprocess.CompletedProcess:
    """`python -m shared.migrations upgrade <service>`, as the service's `*-migrate` container
    runs it, its database URL `url`."""
    env = {**os.environ,
           f"{service.upper()}_DATABASE_URL": url.render_as_string(hide_password=False)}
    return subprocess.run([sys.executable, "-m", "shared.migrations", "upgrade", service],
                          env=env, capture_output=True, text=True, timeout=120)


def test_each_services_role_owns_its_database_and_may_not_connect_to_anothers(
        service_databases):
    service_databases.run_init_script()
    # Again, over what it made, with new passwords: each replaces the old.
    for service, made in list(service_databases.items()):
        service_databases[service] = dataclasses.replace(made, password=made.password + " new")
    service_databases.run_init_script()

    server = service_databases.server
    for service, made in service_databases.items():
        own = service_databases.as_role(service, service)
        assert _one(own, "SELECT current_user, current_database()") == (made.role, made.database)
        connection = _connect(own)
        with connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE made_by_its_role (id int PRIMARY KEY)")
            cursor.execute("INSERT INTO made_by_its_role VALUES (1)")
        connection.close()
        assert _one(server.set(database=made.database),
                    "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                    made.database) == (made.role,)
        assert _one(server.set(database="postgres"),
                    "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                    " WHERE rolname = %s", made.role) == (True, False, False, False)
        assert _password_is(server, made.role, made.password)
        for other in SERVICES:
            if other == service:
                continue
            with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
                _connect(service_databases.as_role(service, other)).close()


def _roles_powers(server: URL, role: str) -> tuple[bool, ...]:
    return _one(server.set(database="postgres"),
                "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication,"
                " rolbypassrls FROM pg_roles WHERE rolname = %s", role)


def _made_by_an_earlier_release(service_databases: ServiceDatabases, as_user: URL) -> None:
    """Each service's database as a release before the service roles left it: made and migrated
    (to 0005) by the one role the shop then connected as, `as_user`, which owns it all."""
    for service, made in service_databases.items():
        url = as_user.set(drivername="postgresql+psycopg2", database=made.database)
        ensure_database(url.render_as_string(hide_password=False))
        command.upgrade(alembic_config(service, url.render_as_string(hide_password=False)),
                        "0005")


def test_an_administrator_that_is_no_superuser_runs_it_as_on_a_managed_server(
        service_databases):
    """A managed PostgreSQL gives no superuser, but an administrator that may create roles and
    databases: the script runs as it, over databases an earlier release made as it too, and
    again; each role is made with no power but to log in, and the administrator takes none away
    (it may not: "must be superuser to alter superuser roles")."""
    administrator = service_databases.make_administrator("CREATEROLE", "CREATEDB")
    _made_by_an_earlier_release(service_databases,
                                service_databases.server.set(username=administrator))
    service_databases.run_init_script(as_user=administrator)
    for service, made in list(service_databases.items()):
        service_databases[service] = dataclasses.replace(made, password=made.password + " new")
    service_databases.run_init_script(as_user=administrator)

    server = service_databases.server
    for service, made in service_databases.items():
        assert _roles_powers(server, made.role) == (True, False, False, False, False, False)
        assert _password_is(server, made.role, made.password)
        assert _owners_in(service_databases.as_superuser(service)) == {made.role}
        migrated = _migrate_as(service_databases.as_role(service, service), service)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr


def test_a_services_role_that_is_a_superuser_is_refused_and_nothing_is_changed(
        service_databases):
    """Named after a superuser (another administrator's role, say): the script would have taken
    its powers away, or given them to a service; it changes nothing, and says why."""
    payments = service_databases["payments"].role
    _as_superuser(service_databases.server, f'CREATE ROLE "{payments}" SUPERUSER')
    result = service_databases.run_init_script(check=False)

    assert result.returncode == 1
    assert result.stderr.strip() == (f"role {payments} is a superuser: a service's role must"
                                     " not be; nothing was changed")
    assert _roles_powers(service_databases.server, payments)[1] is True
    assert _one(service_databases.server.set(database="postgres"),
                "SELECT count(*) FROM pg_roles WHERE rolname = %s",
                service_databases["orders"].role) == (0,)


def test_no_password_is_on_a_command_line(service_databases, tmp_path):
    """Any user of the machine may read a process's command line (ps, /proc/<pid>/cmdline): each
    psql the script runs is given the passwords in its environment instead."""
    calls = tmp_path / "psql-calls"
    (tmp_path / "psql").write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> "{calls}"\n'
        f'exec "{postgres_binaries(None) / "psql"}" "$@"\n')
    (tmp_path / "psql").chmod(0o755)
    service_databases.run_init_script(psql_dir=tmp_path)

    command_lines = calls.read_text()
    assert "--dbname" in command_lines  # (the script ran its psql through the one above)
    for made in service_databases.values():
        assert made.password not in command_lines


def test_no_password_is_in_the_servers_log(service_databases_asking_passwords, password_server):
    """The server logs every statement it receives; the script, run as its superuser, keeps
    those of its own sessions out, so the passwords in them are not written there."""
    service_databases_asking_passwords.run_init_script()

    logged = password_server.log.read_text(errors="replace")
    assert "statement: " in logged  # (it logs statements: the test's own, at least)
    for made in service_databases_asking_passwords.values():
        for written in (made.password, made.password.replace("'", "''")):
            assert written not in logged


def test_it_signs_in_with_postgres_password_as_compose_runs_it(
        service_databases_asking_passwords):
    """postgres-roles gets the superuser's password as the postgres container does,
    POSTGRES_PASSWORD (deploy/postgres.env), and no PGPASSWORD."""
    databases = service_databases_asking_passwords
    superuser = databases.make_administrator("SUPERUSER", "PASSWORD 'its own, ok'")
    databases.run_init_script(as_user=superuser, password="its own, ok")
    for service, made in databases.items():
        assert _one(databases.as_role(service, service), "SELECT current_user") == (made.role,)


def test_a_migration_whose_password_is_refused_names_the_script_that_sets_it(
        service_databases_asking_passwords):
    """A URL whose password is not the role's (changed in deploy/service-roles.env and not in the
    service's URL, say): `*-migrate` says where the role's is set, in its one line."""
    databases = service_databases_asking_passwords
    databases.run_init_script()
    wrong = databases.as_role("orders", "orders").set(password="not its password")
    migrated = _migrate_as(wrong, "orders")

    assert migrated.returncode == 1
    (line,) = migrated.stderr.splitlines()
    assert f'password authentication failed for user "{databases["orders"].role}"' in line
    assert line.endswith(
        ": the role's password is the one deploy/postgres-init/01-service-databases.sh sets from"
        " ORDERS_DB_PASSWORD (deploy/service-roles.env, or deploy/postgres.env where the release"
        " before kept it, which then wins; the compose service postgres-roles runs it at every"
        " `docker compose up`), and ORDERS_DATABASE_URL must hold the same")
    migrated = _migrate_as(databases.as_role("orders", "orders"), "orders")  # (with its own)
    assert migrated.returncode == 0, migrated.stderr


def test_each_services_migrations_run_as_its_own_role(service_databases):
    service_databases.run_init_script()
    for service, made in service_databases.items():
        migrated = _migrate_as(service_databases.as_role(service, service), service)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert _owners_in(service_databases.as_superuser(service)) == {made.role}


def test_a_database_an_earlier_release_made_as_the_superuser_is_handed_to_the_services_role(
        service_databases):
    """A volume from before the service roles: every database and all in it the superuser's.
    Run on it, the script hands each over with its tables, and the role migrates it on."""
    _made_by_an_earlier_release(service_databases, service_databases.server)
    service_databases.run_init_script()
    for service, made in service_databases.items():
        assert _owners_in(service_databases.as_superuser(service)) == {made.role}
        migrated = _migrate_as(service_databases.as_role(service, service), service)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert _owners_in(service_databases.as_superuser(service)) == {made.role}


def test_the_hand_over_gives_way_to_a_shop_still_running_and_says_to_stop_it(
        service_databases):
    """An earlier release still running on its databases holds its tables' locks: the hand-over
    waits at most 5 s for one, not for ever (queued for it, it held up every statement after it
    on the table), hands nothing over, and says in a line to stop the shop first."""
    _made_by_an_earlier_release(service_databases, service_databases.server)
    orders = service_databases.as_superuser("orders")
    still_running = _connect(orders)
    try:
        with still_running.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM orders")  # (its lock held till the end)
        started = time.monotonic()
        result = service_databases.run_init_script(check=False)
        assert 5 <= time.monotonic() - started < 30
    finally:
        still_running.close()

    assert result.returncode == 3
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"ERROR:  database {service_databases['orders'].database}: nothing"
                           f" handed over to role {service_databases['orders'].role}: a session"
                           " using it held a lock too long (canceling statement due to lock"
                           " timeout)")
    assert line.endswith("stop the HseShop processes that use it first (docker compose stop),"
                         " then run this again")
    assert _owners_in(orders) == {orders.username}
    service_databases.run_init_script()  # (once it is stopped)
    assert _owners_in(orders) == {service_databases["orders"].role}


def test_a_services_migration_whose_database_is_missing_says_in_a_line_to_make_it(
        service_databases):
    """The services' roles may not create databases (the init script makes them): a `*-migrate`
    whose database is gone says so, and what to do, in a line, not in a traceback."""
    service_databases.run_init_script()
    _as_superuser(service_databases.server,
                  f'DROP DATABASE "{service_databases["orders"].database}" WITH (FORCE)')
    migrated = _migrate_as(service_databases.as_role("orders", "orders"), "orders")
    assert migrated.returncode == 1
    (line,) = migrated.stderr.splitlines()
    assert line == (
        f"ERROR shared.migrations: orders: nothing migrated: there is no database"
        f" {service_databases['orders'].database} and {service_databases['orders'].role} may not"
        " create one (InsufficientPrivilege: permission denied to create database): make it"
        f" first, owned by {service_databases['orders'].role}"
        " (deploy/postgres-init/01-service-databases.sh makes each service's)")
