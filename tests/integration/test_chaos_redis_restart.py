"""The chaos soak's Redis restart (bench/chaos/disruptions.py): the stack's own Redis is killed and
started again on its port after a pause drawn from the disruptor's generator, empty, and answering
before the next disruption. What its restart does as PostgreSQL's does (never another Redis taken
for it, a stack's leaving nothing running, ...) is test_chaos_own_server_restart.py's."""

from __future__ import annotations

import random

import redis

from bench.chaos.disruptions import Disruptor
from bench.chaos.plan import REDIS_RESTART, ChaosPlan
from devstack.infra import free_port, start_embedded_redis
from devstack.processes import ProcessGroup


def test_redis_restarted_comes_back_on_its_port_empty_after_a_pause_of_the_seeds_drawing(
        tmp_path):
    plan = ChaosPlan(seed=7, redis_down_seconds=(0.1, 0.3))
    group = ProcessGroup(handle_signals=False)
    url, server = start_embedded_redis(tmp_path, free_port())
    group.add(server)
    said = []
    try:
        client = redis.Redis.from_url(url)
        client.set("queued-task", "1")
        first_pid = server.pid
        disruptor = Disruptor(plan, {"redis": server}, group.start_again, lambda rng: 0,
                              said.append, own_urls={"redis": url})
        assert disruptor._disrupt(REDIS_RESTART)
        assert server.pid != first_pid and server.alive()
        assert client.get("queued-task") is None  # (its client reconnects to the same port)
        client.close()
    finally:
        group.stop_all()
    assert said == ["SIGKILL redis", f"redis started again on {url}, empty, answering"]
    drawn = random.Random(f"disruptions-{plan.seed}")
    drawn.uniform(*plan.redis_down_seconds)  # the pause: the one draw it takes
    assert disruptor.rng.getstate() == drawn.getstate()

