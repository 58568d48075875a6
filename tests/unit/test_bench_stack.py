"""The benchmark's stack (bench.shop.bench_stack) signs with secrets of its own, not with those
published with the code, so that its APIs and gRPC servers warn of none."""

from __future__ import annotations

from bench.shop import bench_stack
from shared.config import SECRETS, load_settings, published_secrets


def test_each_bench_stack_signs_with_fresh_secrets_of_its_own():
    first, second = bench_stack(), bench_stack()

    # (Its secrets alone: its database URLs are templates, "{postgres}/...", filled as it starts.)
    secrets = {name: first.env_overrides[name] for name in SECRETS}
    assert published_secrets(load_settings(secrets)) == []
    for name in SECRETS:
        assert len(first.env_overrides[name]) >= 43  # (256 bits, as make run's)
        assert first.env_overrides[name] != second.env_overrides[name]
