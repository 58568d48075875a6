"""devstack.ports.free_port: ports from outside the system's ephemeral range, free as given, and
never given twice in a process."""

from __future__ import annotations

import socket
import types
from contextlib import ExitStack

import pytest

from devstack import ports
from devstack.ports import LOWEST_PORT_GIVEN, free_port


@pytest.fixture
def none_given_yet(monkeypatch):
    monkeypatch.setattr(ports, "_ports_given", set())  # (this session's picks aside)


def _system_reads(tmp_path, monkeypatch, ephemeral_range: str, reserved: str = "") -> None:
    """Have free_port read `ephemeral_range` and `reserved` as the system's files say them."""
    for name, text in (("EPHEMERAL_RANGE_FILE", ephemeral_range),
                       ("RESERVED_PORTS_FILE", reserved)):
        (tmp_path / name).write_text(f"{text}\n")
        monkeypatch.setattr(ports, name, tmp_path / name)


def _random_picks_the_first(monkeypatch) -> None:
    """Have free_port's random pick be the first port it may give, every time."""
    monkeypatch.setattr(ports, "random", types.SimpleNamespace(randrange=lambda stop: 0))


def test_no_port_given_is_one_the_system_gives_a_socket_bound_to_port_0():
    """What failed in CI: an orders gRPC process's port, found free (port 0 bound, the port the
    system gave read back, the socket closed), then given by the system to one of the test's
    proxies, listening on port 0, before the process listened on it. The system gives such
    sockets (and connections' own ends) ports of its ephemeral range, which free_port's were."""
    low, high = ports.ephemeral_range()  # (the machine's own)
    if low <= ports.LOWEST_PORT_GIVEN:  # (a machine whose ephemeral ports leave none below)
        with pytest.warns(RuntimeWarning, match="ephemeral ports"):
            free_port()
        return
    given = [free_port() for _ in range(20)]
    with ExitStack() as proxies:
        system_gave = [proxies.enter_context(socket.create_server(("127.0.0.1", 0)))
                       .getsockname()[1] for _ in range(20)]
    assert all(low <= port <= high for port in system_gave), system_gave  # (the range is its)
    assert [port for port in given if low <= port <= high] == []


def test_ports_given_lie_below_the_ephemeral_range_read_and_are_none_reserved(
        tmp_path, monkeypatch, none_given_yet):
    """Every one of them, once each, then none: a process given that many has a bug."""
    last = LOWEST_PORT_GIVEN + 11
    _system_reads(tmp_path, monkeypatch, f"{last + 1}\t60999",
                  f"{LOWEST_PORT_GIVEN + 3},{LOWEST_PORT_GIVEN + 5}-{LOWEST_PORT_GIVEN + 8},40000")
    monkeypatch.setattr(ports, "_binds_now", lambda port: True)
    expected = {LOWEST_PORT_GIVEN + offset for offset in (0, 1, 2, 4, 9, 10, 11)}

    given = [free_port() for _ in expected]

    assert sorted(given) == sorted(expected)
    with pytest.raises(RuntimeError, match=f"no port from {LOWEST_PORT_GIVEN} to {last} is free"):
        free_port()


def test_free_port_never_gives_a_port_twice_though_its_random_pick_may(
        tmp_path, monkeypatch, none_given_yet):
    _system_reads(tmp_path, monkeypatch, "32768 60999")
    monkeypatch.setattr(ports, "_binds_now", lambda port: True)
    _random_picks_the_first(monkeypatch)

    given = [free_port() for _ in range(3)]

    assert given == [LOWEST_PORT_GIVEN, LOWEST_PORT_GIVEN + 1, LOWEST_PORT_GIVEN + 2]


def test_a_port_taken_now_is_passed_over(tmp_path, monkeypatch, none_given_yet):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        taken = listener.getsockname()[1]
        # (Read as if the ports from it on were the only ones below the ephemeral range.)
        _system_reads(tmp_path, monkeypatch, f"{taken + 10} 65535",
                      f"{LOWEST_PORT_GIVEN}-{taken - 1}")
        _random_picks_the_first(monkeypatch)  # (the taken one)

        given = free_port()

    assert taken < given < taken + 10


def test_where_the_system_does_not_say_its_ranges_linuxs_default_is_taken(
        tmp_path, monkeypatch, none_given_yet):
    """As on a system without /proc, whose ephemeral ports are most often 49152 and above."""
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", tmp_path / "none")
    monkeypatch.setattr(ports, "RESERVED_PORTS_FILE", tmp_path / "none")

    assert ports.ephemeral_range() == (32768, 60999) and ports.reserved_ports() == set()
    assert LOWEST_PORT_GIVEN <= free_port() < 32768


def test_the_reserved_ports_are_read_as_the_system_writes_them(tmp_path, monkeypatch):
    _system_reads(tmp_path, monkeypatch, "32768 60999", "8080,9148-9150,50000")
    assert ports.reserved_ports() == {8080, 9148, 9149, 9150, 50000}
    _system_reads(tmp_path, monkeypatch, "32768 60999", "")
    assert ports.reserved_ports() == set()


def test_with_no_port_below_the_ephemeral_range_the_systems_picks_are_given_never_twice(
        tmp_path, monkeypatch, none_given_yet):
    """The system's picks, as free_port gave before, on a system whose ephemeral ports start low
    (1024 here): a warning says they may be given another socket before the server listens."""
    _system_reads(tmp_path, monkeypatch, "1024 65535")
    picks = iter([41001, 41001, 41002, 41001, 41003])

    class Socket:  # bind() to port 0 as the system answers it: the same port again at times
        def __init__(self, *args):
            self.port = next(picks)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def bind(self, address):
            pass

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(ports, "socket", types.SimpleNamespace(
        socket=Socket, AF_INET=socket.AF_INET, SOCK_STREAM=socket.SOCK_STREAM))
    with pytest.warns(RuntimeWarning, match="ephemeral ports .* start at 1024"):
        given = [free_port() for _ in range(3)]

    assert given == [41001, 41002, 41003]
