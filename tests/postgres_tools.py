"""PostgreSQL for tests: ending a connection from the server's side, as a restart would."""

from __future__ import annotations

import psycopg2

from shared.db import driver_dsn


def terminate_backend(database_url: str, pid: int) -> None:
    """Have the database end the connection served by backend `pid`, and no other."""
    with psycopg2.connect(driver_dsn(database_url)) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert cursor.fetchone()[0], f"no backend {pid} to end"
    admin.close()
