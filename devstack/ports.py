"""Loopback TCP ports: which one to give a server started later (free_port), and whether
something listens on one (port_open). Asked by devstack.infra and by devstack.postmaster_lock,
which infra imports, so it lives apart from both."""

from __future__ import annotations

import random
import socket
import threading
import warnings
from pathlib import Path

LOCALHOST = "127.0.0.1"

# The ports the system gives a socket bound to port 0 (a test's proxy listening on a port of the
# system's choice) and the own end of a connection made, "32768\t60999"; and the ports it keeps
# out of that range for programs that bind them by number, "8080,9148-9150" (most often none).
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED_PORTS_FILE = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
# (IPv6 sockets are given ports of the same range.) Linux's default is taken where the range
# cannot be read (no /proc: another system, a sandbox): free_port's ports, all below it, are
# outside the IANA range too (49152-65535), which the BSDs, macOS and Windows give from.
DEFAULT_EPHEMERAL_RANGE = (32768, 60999)
# free_port gives from here up to the ephemeral range's low end (22766 ports by default): above
# the ports of the services that may run on a shop's machine (MariaDB 3306, RabbitMQ 4369 and
# 5672, Mosquitto 1883, NATS 4222, 6222 and 8222, PostgreSQL 5432, Redis 6379, devstack's own
# 5555, 8000-8002 and 9092), but for these two of RabbitMQ's (its management's, its nodes'),
# passed over even while nothing listens there: such a server started later would find its
# port taken. Picked at random from so many, ports seldom collide with another run's picks.
LOWEST_PORT_GIVEN = 10000
SERVICE_PORTS_PASSED_OVER = frozenset({15672, 25672})

_ports_given: set[int] = set()
_ports_given_lock = threading.Lock()


def free_port() -> int:
    """A loopback port free now, for a server started later, and never one this process was
    given before: ports picked together and bound later (a stack's six) must differ.

    The port is not held until the server binds it, so it is one the system gives no socket:
    below its ephemeral range and none of its reserved ports. A port of that range, free as it
    was found, could be given meanwhile to a test's proxy listening on port 0 or to a connection
    as its own end, and the server then could not listen (a CI run's orders gRPC process, its
    port found free by binding port 0, as this did, taken by a proxy of its test's)."""
    with _ports_given_lock:
        low, _ = ephemeral_range()
        if low <= LOWEST_PORT_GIVEN:  # (a machine set so still runs a stack, as it did)
            warnings.warn(
                f"the system's ephemeral ports ({EPHEMERAL_RANGE_FILE}) start at {low}, not"
                f" above {LOWEST_PORT_GIVEN}: free ports are its picks, which it may give"
                f" another socket before the server they are for listens", RuntimeWarning,
                stacklevel=2)
            return _one_of_the_systems_picks()
        passed_over = _ports_given | reserved_ports() | SERVICE_PORTS_PASSED_OVER
        ports = [port for port in range(LOWEST_PORT_GIVEN, low) if port not in passed_over]
        start = random.randrange(len(ports)) if ports else 0
        for port in ports[start:] + ports[:start]:
            if _binds_now(port):
                _ports_given.add(port)
                return port
    raise RuntimeError(f"no port from {LOWEST_PORT_GIVEN} to {low - 1} is free on {LOCALHOST}"
                       f" that this process was not given before")


def ephemeral_range() -> tuple[int, int]:
    """The ports the system gives sockets bound to port 0 and connections' own ends, first and
    last; Linux's default where they cannot be read."""
    try:
        low, high = (int(part) for part in EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL_RANGE
    return low, high


def reserved_ports() -> set[int]:
    """The ports the system keeps out of its ephemeral range for programs that bind them by
    number; none where they cannot be read."""
    try:
        entries = RESERVED_PORTS_FILE.read_text().replace(",", " ").split()
        ports: set[int] = set()
        for entry in entries:
            first, _, last = entry.partition("-")
            ports.update(range(int(first), int(last or first) + 1))
    except (OSError, ValueError):
        return set()
    return ports


def _binds_now(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _one_of_the_systems_picks() -> int:
    """A port the system picks (port 0 bound), given to this process for the first time."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOCALHOST, 0))
            port = sock.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
