"""Whether something listens on a TCP port: asked by devstack.infra and by
devstack.postmaster_lock, which infra imports, so it lives apart from both."""

from __future__ import annotations

import socket


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
