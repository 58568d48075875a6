"""`make run`'s own settings, read from the environment: the ports it serves on, and the prefix of
the names it uses on the machine's PostgreSQL and Redis (README: The two commands). Each unset, or
empty, is its default: the ports and names the shop has always had."""

from __future__ import annotations

import re
from collections.abc import Mapping

# The variable setting each of make run's ports (devstack.stack.DEFAULT_PORTS' names).
PORT_SETTINGS = {"gateway": "GATEWAY_PORT", "orders": "ORDERS_PORT", "payments": "PAYMENTS_PORT",
                 "orders-grpc": "ORDERS_GRPC_PORT", "payments-grpc": "PAYMENTS_GRPC_PORT",
                 "broker": "BROKER_PORT", "flower": "FLOWER_PORT"}
# The prefix of the run's databases (<prefix>_orders, <prefix>_payments, <prefix>_gateway) and of
# its Redis keys (REDIS_KEY_PREFIX): a second checkout on the same machine gives its own.
NAMES_PREFIX_SETTING = "HSESHOP_PREFIX"
DEFAULT_NAMES_PREFIX = "hseshop"
# A name PostgreSQL takes unquoted, with room for "_payments" in its 63 bytes.
NAMES_PREFIX_FORM = re.compile(r"[a-z][a-z0-9_]{0,53}")


def chosen_ports(defaults: Mapping[str, int], environ: Mapping[str, str]) -> dict[str, int]:
    """`defaults` (name: port), each one its variable (PORT_SETTINGS) sets taken instead. A
    RuntimeError naming the variable for a value that is no port, or for two ports the same."""
    ports = dict(defaults)
    for name, variable in PORT_SETTINGS.items():
        raw = environ.get(variable, "").strip()
        if not raw:
            continue
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise RuntimeError(f"{variable}={raw!r}: expected a port number from 1 to 65535")
        ports[name] = int(raw)
    by_port: dict[int, list[str]] = {}
    for name, port in ports.items():
        by_port.setdefault(port, []).append(_named(name, environ))
    for port, names in by_port.items():
        if len(names) > 1:
            raise RuntimeError(f"port {port} is given to more than one server:"
                               f" {' and '.join(names)}; set each its own")
    return ports


def _named(name: str, environ: Mapping[str, str]) -> str:
    variable = PORT_SETTINGS.get(name)
    if variable is not None and environ.get(variable, "").strip():
        return variable
    return f"{name} (by default{f'; {variable}' if variable else ''})"


def names_prefix(environ: Mapping[str, str]) -> str:
    """The prefix NAMES_PREFIX_SETTING sets (DEFAULT_NAMES_PREFIX unset or empty); a RuntimeError
    saying what it takes for one it cannot be."""
    raw = environ.get(NAMES_PREFIX_SETTING, "").strip()
    if not raw:
        return DEFAULT_NAMES_PREFIX
    if not NAMES_PREFIX_FORM.fullmatch(raw):
        raise RuntimeError(f"{NAMES_PREFIX_SETTING}={raw!r}: expected a lowercase letter, then up"
                           " to 53 lowercase letters, digits or underscores (it begins the names of"
                           " the run's databases)")
    return raw
