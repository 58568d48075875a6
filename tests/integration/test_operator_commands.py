"""How the commands a README procedure runs (`python -m shared.migrations`, `shared.grpc_server`,
`tasks.parked`, `devstack`) end when they cannot go on: a setting they cannot take, said in a
line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
# tests/import_pause/sitecustomize.py: holds the command as it is about to import a module.
IMPORT_PAUSE = REPO_ROOT / "tests" / "import_pause"


@pytest.mark.parametrize("setting, value, said", [
    ("ORDERS_DATABASE_URL", "postgresql://shop:not-to-be-shown@127.0.0.1:port/hseshop_orders",
     "ORDERS_DATABASE_URL='postgresql://shop:***@127.0.0.1:port/hseshop_orders': expected a"
     " PostgreSQL URL, postgresql://user:password@host:port/database"),
    ("ORDERS_GRPC_BIND", "50051", "ORDERS_GRPC_BIND='50051': expected host:port"),
])
def test_a_grpc_server_given_a_setting_it_cannot_take_says_it_in_a_line_and_exits_1(
        settings, setting, value, said):
    """As the operator's other commands say it (shared.config.settings_or_exit), its password
    hidden; before, a ValueError's traceback showed the URL's password."""
    server = start_child([sys.executable, "-m", "shared.grpc_server", "orders"], cwd=REPO_ROOT,
                         env={**os.environ, setting: value}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = _ended(server)
    assert server.returncode == 1, err
    assert out == ""
    (line,) = err.splitlines()
    assert line.endswith(f" ERROR shared.grpc_server [request_id=-] orders gRPC: nothing served:"
                         f" {said}"), line


def _ended(command: subprocess.Popen) -> tuple[str, str]:
    try:
        return command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait(10)
