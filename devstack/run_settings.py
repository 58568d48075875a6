"""`make run`'s own settings, read from the environment: the ports it serves on (README: The two
commands). Each unset, or empty, is its default: the ports the shop has always had."""

from __future__ import annotations

from collections.abc import Mapping

# The variable setting each of make run's ports (devstack.stack.DEFAULT_PORTS' names).
PORT_SETTINGS = {"gateway": "GATEWAY_PORT", "orders": "ORDERS_PORT", "payments": "PAYMENTS_PORT",
                 "orders-grpc": "ORDERS_GRPC_PORT", "payments-grpc": "PAYMENTS_GRPC_PORT",
                 "broker": "BROKER_PORT", "flower": "FLOWER_PORT"}


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

