"""A service signing or trusting with a secret published with the code (a default, or the
placeholder of deploy/token-signing.env or deploy/internal-auth.env) says so in one WARNING as it
starts, and starts all the same; a process that signs and verifies nothing with it (a worker, the
operator's commands) says nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway_app
import orders_app
import payments_app
from devstack.infra import free_port
from shared.config import PUBLISHED_SECRETS, SECRETS, load_settings
from tests.compose_tools import read_env_file
from tests.polling import wait_for
from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where docker-compose.yml's containers get each secret (tests/unit/test_compose_config.py).
SECRETS_ENV = {"INTERNAL_AUTH_SECRET": REPO_ROOT / "deploy" / "internal-auth.env",
               "AUTH_TOKEN_SECRET": REPO_ROOT / "deploy" / "token-signing.env"}
OWN_SECRETS = {"INTERNAL_AUTH_SECRET": "d4c1f0e9" * 8, "AUTH_TOKEN_SECRET": "7a3b9e21" * 8}
# A process's environment with the secrets at their defaults, published with the code (whatever
# the test run set them to).
WITH_THE_DEFAULTS = {**os.environ, **{name: PUBLISHED_SECRETS[name][0] for name in SECRETS}}
WARNING_OF_THEM = "published with the code"


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and WARNING_OF_THEM in record.getMessage()]


@pytest.mark.parametrize("environ", [
    {},  # the code's defaults
    {name: read_env_file(SECRETS_ENV[name])[name] for name in SECRETS},  # the placeholders
], ids=["defaults", "deploy placeholders"])
@pytest.mark.parametrize("package, named", [
    (orders_app, ["INTERNAL_AUTH_SECRET"]), (payments_app, ["INTERNAL_AUTH_SECRET"]),
    (gateway_app, ["INTERNAL_AUTH_SECRET", "AUTH_TOKEN_SECRET"])])
def test_a_service_started_with_a_published_secret_warns_once_naming_it(caplog, environ,
                                                                       package, named):
    caplog.set_level(logging.INFO)
    app = package.create_app(load_settings(environ))

    assert app is not None
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"{package.SERVICE}: {' and '.join(named)} ")
    assert "README: Deploying" in warning


@pytest.mark.parametrize("package", [orders_app, payments_app, gateway_app])
def test_a_service_with_secrets_of_its_own_says_nothing_of_them(caplog, package):
    caplog.set_level(logging.INFO)
    package.create_app(load_settings(OWN_SECRETS))
    assert _warnings(caplog) == []


def test_the_gateway_names_only_the_secret_still_published(caplog):
    caplog.set_level(logging.INFO)
    gateway_app.create_app(load_settings({"AUTH_TOKEN_SECRET": OWN_SECRETS["AUTH_TOKEN_SECRET"]}))
    (warning,) = _warnings(caplog)
    assert warning.startswith("gateway: INTERNAL_AUTH_SECRET is the placeholder ")


@pytest.mark.parametrize("package", [orders_app, payments_app, gateway_app])
def test_an_app_built_for_workers_and_tools_says_nothing_of_the_secrets(caplog, package):
    """Built for its app context only (tasks.services), an app serves no request: it signs and
    verifies nothing."""
    caplog.set_level(logging.INFO)
    package.create_app(load_settings({}), warns_of_published_secrets=False)
    assert _warnings(caplog) == []


def test_a_grpc_server_started_with_a_published_secret_warns_once_in_its_log(tmp_path):
    """A real process that verifies identities with INTERNAL_AUTH_SECRET (it starts without a
    database)."""
    bind = f"127.0.0.1:{free_port()}"
    log = tmp_path / "orders-grpc.log"
    with open(log, "wb") as output:
        server = start_child([sys.executable, "-m", "shared.grpc_server", "orders"],
                             cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                             env={**WITH_THE_DEFAULTS, "ORDERS_GRPC_BIND": bind})
    try:
        wait_for(lambda: f"listening on {bind}" in log.read_text(), timeout=30,
                 what="the gRPC server to listen")
    finally:
        server.terminate()
        server.wait(10)
    (warning,) = [line for line in log.read_text().splitlines() if WARNING_OF_THEM in line]
    assert " WARNING " in warning
    assert "orders: INTERNAL_AUTH_SECRET is the placeholder " in warning


def test_the_workers_apps_built_with_the_published_secrets_say_nothing_of_them():
    """Each worker (`make run` starts three) and the operator's commands build their service's
    app through tasks.services: in a process of their own, with the defaults, not a word of
    them (the app's logging is set up all the same: it would be printed)."""
    built = subprocess.run(
        [sys.executable, "-c", "from tasks.services import service_app\n"
                               "for service in ('orders', 'payments', 'gateway'):\n"
                               "    service_app(service)\n"
                               "service_app('orders').logger.warning('built')"],
        env=WITH_THE_DEFAULTS, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    assert "built" in built.stderr  # (what they would have warned is logged where this is)
    assert WARNING_OF_THEM not in built.stderr, built.stderr


def test_the_operators_command_run_with_the_published_secrets_says_nothing_of_them():
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/hseshop_payments"
    ran = subprocess.run([sys.executable, "-m", "tasks.parked", "list", "payments"],
                         env={**WITH_THE_DEFAULTS, "PAYMENTS_DATABASE_URL": unreachable},
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1, ran.stderr
    (said,) = ran.stderr.splitlines()  # what it tried, and no warning beside it
    assert said.startswith("payments inbox: nothing listed: "), said
