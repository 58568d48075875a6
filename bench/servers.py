"""The servers a run used besides the shop's own processes, named with their versions in every
report: the figures depend on them, and the Kafka broker here is the test broker (Tansu, which
keeps everything in memory and answers fetches otherwise than Apache Kafka, which production
runs), whatever machine the run was made on."""

from __future__ import annotations

import os
import subprocess

import redis

from bench.shop import service_cursor
from devstack.stack import Stack

# Where Tansu keeps what it is sent, unless its environment says otherwise.
TANSU_DEFAULT_STORAGE = "memory://tansu/"


def server_versions(stack: Stack) -> dict[str, str]:
    return {
        "kafka_broker": _broker_version(stack),
        "postgresql": _postgres_version(stack),
        "redis": _redis_version(stack),
    }


def _broker_version(stack: Stack) -> str:
    """The started broker's own answer to --version, and its storage (e.g. "tansu 0.6.0, storage
    memory://tansu/")."""
    broker = next(process for process in stack.processes if process.name == "broker")
    answer = subprocess.run([broker.argv[0], "--version"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    environment = broker.env if broker.env is not None else os.environ
    return f"{answer}, storage {environment.get('STORAGE_ENGINE', TANSU_DEFAULT_STORAGE)}"


def _postgres_version(stack: Stack) -> str:
    with service_cursor(stack, "orders") as cursor:
        cursor.execute("SHOW server_version")
        return cursor.fetchone()[0]


def _redis_version(stack: Stack) -> str:
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        return client.info("server")["redis_version"]
    finally:
        client.close()
