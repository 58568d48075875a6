"""The benchmark's stack (bench.shop.bench_stack) signs with secrets of its own, not with those
published with the code, so that its APIs and gRPC servers warn of none; on a PostgreSQL of its
own, its data is in a folder of its own, forgotten with it."""

from __future__ import annotations

from pathlib import Path

from bench.shop import bench_stack, forget_stack_data
from devstack.infra import free_port
from devstack.stack import Stack
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
    stack = _on_its_own_postgres(tmp_path)
    stack.own_postgres_url = f"postgresql://postgres@127.0.0.1:{free_port()}"  # (stopped)
    stack._env = {f"{service.upper()}_DATABASE_URL": f"{stack.own_postgres_url}/{service}"
                  for service in SERVICES}
    forget_stack_data(stack)
    assert list(tmp_path.iterdir()) == [tmp_path / "postgres"]  # (another's: make bench's)


def test_a_bench_stack_stopped_as_its_postgres_first_started_deletes_what_it_began(tmp_path):
    """A Ctrl-C as its server was made or started: no URL known, no environment, and the folder
    (and initdb's, beside it) deleted all the same."""
    stack = _on_its_own_postgres(tmp_path)
    (tmp_path / f".{stack.own_postgres_dir.name}.initdb" / "base").mkdir(parents=True)
    forget_stack_data(stack)
    assert list(tmp_path.iterdir()) == [tmp_path / "postgres"]


def test_each_stack_on_a_postgres_of_its_own_keeps_its_data_in_a_folder_of_its_own():
    """Never run_dir/postgres, where make bench's embedded server (ensure_postgres's) keeps its
    data, and which a server running there is taken up from: the soak would crash the bench's,
    or the bench run on the soak's."""
    first, second = bench_stack(own_postgres=True), bench_stack(own_postgres=True)
    assert first.run_dir == second.run_dir
    assert first.own_postgres_dir.parent == first.run_dir
    assert first.own_postgres_dir.name.startswith("postgres-")
    assert first.own_postgres_dir != second.own_postgres_dir
    assert bench_stack().own_postgres_dir is None


def _on_its_own_postgres(run_dir: Path) -> Stack:
    """A bench stack on a PostgreSQL of its own, in `run_dir`, its data directory there made (a
    `base` folder in it), beside another's (run_dir/postgres); not started."""
    stack = bench_stack(own_redis=True, own_postgres=True)
    assert (stack.own_redis, stack.own_postgres) == (True, True)
    stack.run_dir = run_dir
    stack.own_postgres_dir = run_dir / stack.own_postgres_dir.name
    (stack.own_postgres_dir / "base").mkdir(parents=True)
    (run_dir / "postgres" / "base").mkdir(parents=True)
    return stack
