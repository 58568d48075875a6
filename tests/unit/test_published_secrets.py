"""A service signing or trusting with a secret published with the code (a default, or
deploy/compose.env's placeholder) says so in one WARNING as it starts, and starts all the same."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import gateway_app
import orders_app
import payments_app
from shared.config import SECRETS, load_settings
from tests.compose_tools import read_env_file

COMPOSE_ENV = Path(__file__).resolve().parents[2] / "deploy" / "compose.env"
OWN_SECRETS = {"INTERNAL_AUTH_SECRET": "d4c1f0e9" * 8, "AUTH_TOKEN_SECRET": "7a3b9e21" * 8}


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.levelno == logging.WARNING and "published with the code" in
            record.getMessage()]


@pytest.mark.parametrize("environ", [
    {},  # the code's defaults
    {name: read_env_file(COMPOSE_ENV)[name] for name in SECRETS},  # compose.env's placeholders
], ids=["defaults", "compose.env"])
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
