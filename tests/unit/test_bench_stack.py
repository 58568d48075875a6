"""The benchmark's stack (bench.shop.bench_stack) signs with secrets of its own, not with those
published with the code, so that its APIs and gRPC servers warn of none; on a PostgreSQL of its
own, its data is forgotten with the server's folder."""

from __future__ import annotations

from bench.shop import bench_stack, forget_stack_data
from devstack.infra import free_port
from shared.config import SECRETS, SERVICES, load_settings, published_secrets


def test_each_bench_stack_signs_with_fresh_secrets_of_its_own():
    first, second = bench_stack(), bench_stack()

    # (Its secrets alone: its database URLs are templates, "{postgres}/...", filled as it starts.)
    secrets = {name: first.env_overrides[name] for name in SECRETS}
    assert published_secrets(load_settings(secrets)) == []
    for name in SECRETS:
        assert len(first.env_overrides[name]) >= 43  # (256 bits, as make run's)
        assert first.env_overrides[name] != second.env_overrides[name]


def test_a_bench_stack_on_a_postgres_of_its_own_forgets_its_data_by_deleting_the_servers_folder(
        tmp_path):
    """Its databases are on its own server, stopped with it: none can be dropped (a connection
    to it refused), so the server's data directory goes, databases and all."""
    stack = bench_stack(own_redis=True, own_postgres=True)
    assert (stack.own_redis, stack.own_postgres) == (True, True)
    stack.run_dir = tmp_path
    (tmp_path / "postgres" / "base").mkdir(parents=True)
    stack.own_postgres_url = f"postgresql://postgres@127.0.0.1:{free_port()}"  # (stopped)
    stack._env = {f"{service.upper()}_DATABASE_URL": f"{stack.own_postgres_url}/{service}"
                  for service in SERVICES}
    forget_stack_data(stack)
    assert not (tmp_path / "postgres").exists()
