"""The alive file (tasks/alive.py) on the run's Redis. A real Celery worker's: renewed while the
worker's event loop runs, left to age while the loop is stuck, gone once the worker stops. Real
celery beat's, with the shop's config: renewed at each tick of its scheduler, though nothing in
its schedule falls due, left to age while its sends fail (Redis out of reach) and renewed once they
work again, and gone once beat stops; docker-compose.yml's healthcheck reads it as beat writes
it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis import Redis

from devstack.infra import free_port
from shared.config import SERVICES
from shared.task_queues import control_queue
from shared.celery_settings import ALIVE_FILE_RENEW_EVERY_SECONDS
from tasks.alive import ALIVE_WITHIN_SECONDS
from tests.compose_tools import alive_file_check
from tests.environment import REDIS_DB, REDIS_KEYS_OF_THE_RUN
from tests.network_tools import SilencingProxy
from tests.polling import wait_for
from tests.process_tools import start_child

REPO_ROOT = Path(__file__).resolve().parents[2]
RENEW_EVERY = 0.2
STALL_AFTER, STALL_FOR = 2.0, 3.0

# A worker of its own app, with the shop's step and option, whose event loop a timer of its own
# holds up for STALL_FOR seconds, STALL_AFTER seconds after the consumer starts.
_WORKER = f"""
import sys, time
from celery import Celery, bootsteps
from tasks import alive

alive.ALIVE_FILE_RENEW_EVERY_SECONDS = {RENEW_EVERY}
app = Celery("alive-test", broker=sys.argv[3])
app.conf.task_default_queue = sys.argv[2]
app.conf.broker_transport_options = {{"global_keyprefix": sys.argv[4]}}  # (the run's keys)
app.user_options["worker"].add(alive.worker_alive_file_option())
app.steps["consumer"].add(alive.AliveFileStep)


class StallTheLoop(bootsteps.StartStopStep):
    requires = {{"tasks.alive:AliveFileStep"}}

    def start(self, c):
        c.timer.call_after({STALL_AFTER}, lambda: time.sleep({STALL_FOR}))


app.steps["consumer"].add(StallTheLoop)
app.worker_main(["worker", "-P", "threads", "-c", "1", "--without-gossip", "--without-mingle",
                 "--without-heartbeat", "-l", "WARNING", "--alive-file", sys.argv[1]])
"""


@contextmanager
def _worker_running(path: Path, broker: str) -> Iterator[subprocess.Popen]:
    # Celery takes CELERY_BROKER_URL, which the layer's `settings` set, over the app's broker: a
    # worker meant never to reach its broker reached the run's once another test had used them.
    env = {name: value for name, value in os.environ.items() if name != "CELERY_BROKER_URL"}
    process = start_child(
        [sys.executable, "-c", _WORKER, str(path), f"alive-test-{uuid.uuid4().hex}", broker,
         f"{REDIS_KEYS_OF_THE_RUN}alive-test:"],
        cwd=REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@pytest.fixture
def worker(tmp_path, infrastructure):
    path = tmp_path / "worker-alive"
    with _worker_running(path, f"{infrastructure.redis_base}/{REDIS_DB['integration']}") as process:
        yield process, path


def test_a_file_left_by_a_worker_killed_outright_is_gone_as_the_next_one_starts(tmp_path):
    """Killed outright (SIGKILL, the OOM killer), a worker leaves its file; restarted in the same
    container, the next one, starting (here, never reaching its broker), must not read healthy
    on it."""
    path = tmp_path / "worker-alive"
    path.touch()
    with _worker_running(path, f"redis://127.0.0.1:{free_port()}/0"):
        wait_for(lambda: not path.exists(), timeout=20, what="the old alive file to go")


def _renewals(path: Path, seconds: float) -> list[float]:
    """The file's modification times seen over `seconds`, each change once."""
    seen: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        mtime = path.stat().st_mtime if path.exists() else None
        if mtime is not None and (not seen or mtime != seen[-1]):
            seen.append(mtime)
        time.sleep(0.02)  # (a look every 0.02 s over the whole span: what is watched, no wait)
    return seen


def test_the_event_loop_renews_the_file_stops_while_stuck_and_removes_it_at_shutdown(worker):
    process, path = worker
    wait_for(path.exists, timeout=20, what="the worker to write its alive file")
    started = time.monotonic()
    seen = _renewals(path, STALL_AFTER + STALL_FOR + 1.5)
    gaps = [later - earlier for earlier, later in zip(seen, seen[1:])]
    # Renewed every RENEW_EVERY s, except while the loop was held up: a timer thread of its own
    # would have gone on renewing it.
    assert len(seen) >= 8, seen
    assert max(gaps) >= STALL_FOR - 0.5, gaps
    assert sorted(gaps)[len(gaps) // 2] < 4 * RENEW_EVERY, gaps
    assert time.monotonic() - started < STALL_AFTER + STALL_FOR + 10
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.stdout.read()
    assert not path.exists()


def _compose_healthcheck_passes(path: Path) -> bool:
    check = alive_file_check()
    argv = [arg.replace(check.path, str(path)) for arg in check.argv]
    return subprocess.run(argv, timeout=30).returncode == 0


@contextmanager
def _beat_running(path: Path, tmp_path: Path,
                  **env: str) -> Iterator[tuple[subprocess.Popen, Callable[[], str]]]:
    """`celery -A tasks beat --alive-file path` as compose runs it, with the shop's config and
    these settings over the layer's; yields it and a reader of its log. Killed if still running
    after."""
    log_path = tmp_path / "beat.log"
    with open(log_path, "w") as log_file:
        beat = start_child(
            [sys.executable, "-m", "celery", "-A", "tasks", "beat", "-l", "WARNING",
             "-s", str(tmp_path / "schedule"), "--alive-file", str(path)],
            cwd=REPO_ROOT, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT)
    try:
        yield beat, log_path.read_text
    finally:
        if beat.poll() is None:
            beat.kill()
            beat.wait(10)


def _renewed_by(beat: subprocess.Popen, path: Path, log: Callable[[], str]) -> bool:
    """Whether beat, still running, has written its file (an empty one)."""
    assert beat.poll() is None, log()
    return path.exists() and path.stat().st_size == 0


def _age(path: Path) -> float:
    return time.time() - path.stat().st_mtime


def test_beat_renews_its_file_at_each_tick_with_nothing_due_and_removes_it_as_it_stops(
        settings, tmp_path):
    """Beat as compose runs it, with the shop's config, every entry of its schedule a minute or
    more apart: nothing falls due while the test watches, and its scheduler still ticks (at least
    every beat_max_loop_interval), renewing the file each time."""
    path = tmp_path / "alive"
    # A file left by a beat killed outright, just now: the next one removes it as it starts (the
    # one it writes is empty).
    path.write_text("left by a beat killed outright")
    with _beat_running(path, tmp_path, OUTBOX_RELAY_INTERVAL_SECONDS="60",
                       INBOX_SWEEP_INTERVAL_SECONDS="60") as (beat, log):
        wait_for(lambda: _renewed_by(beat, path, log), timeout=30,
                 what="beat to write its alive file")
        seen = _renewals(path, 2 * ALIVE_FILE_RENEW_EVERY_SECONDS + 1.5)
        gaps = [later - earlier for earlier, later in zip(seen, seen[1:])]
        assert len(seen) >= 3, (seen, log())
        assert max(gaps) < ALIVE_FILE_RENEW_EVERY_SECONDS + 1, gaps
        assert _compose_healthcheck_passes(path)
        beat.send_signal(signal.SIGTERM)
        assert beat.wait(20) == 0, log()
        assert not path.exists()


def test_beat_leaves_its_file_to_age_while_its_sends_fail_and_renews_it_once_they_work(
        settings, tmp_path):
    """Celery's scheduler logs a send that failed and ticks on: beat reaching Redis through a
    proxy that is then cut must still go unhealthy (its file older than the healthcheck's bound),
    and healthy again once Redis is back. (Its relay and sweeper sent every second or few, to
    queues under a prefix of its own.)"""
    broker = urlsplit(settings.celery_broker_url)
    proxy = SilencingProxy(f"{broker.hostname}:{broker.port or 6379}")
    prefix = f"{REDIS_KEYS_OF_THE_RUN}alive-beat-{uuid.uuid4().hex[:8]}"
    redis = Redis.from_url(settings.celery_broker_url)
    # (each queue's list under celeryconfig's global_keyprefix)
    queue_keys = [f"{prefix}:celery:{control_queue(service)}" for service in SERVICES]
    path = tmp_path / "alive"
    try:
        with _beat_running(path, tmp_path, REDIS_KEY_PREFIX=prefix,
                           CELERY_BROKER_URL=broker._replace(netloc=proxy.address).geturl(),
                           ) as (beat, log):
            # Cut once beat's sends work: before, a beat still connecting is held up, not failing.
            wait_for(lambda: _renewed_by(beat, path, log) and all(map(redis.llen, queue_keys)),
                     timeout=30, what="beat to send a task to each control queue")
            proxy.cut()
            wait_for(lambda: _renewed_by(beat, path, log) and _age(path) > ALIVE_WITHIN_SECONDS,
                     timeout=ALIVE_WITHIN_SECONDS + 15, interval=0.5,
                     what="the file to age past the healthcheck's bound, Redis out of reach")
            assert not _compose_healthcheck_passes(path)
            proxy.restore()
            wait_for(lambda: (_renewed_by(beat, path, log)
                              and _age(path) < ALIVE_FILE_RENEW_EVERY_SECONDS),
                     timeout=30, interval=0.2, what="beat to renew its file, Redis back")
            assert _compose_healthcheck_passes(path)
    finally:
        proxy.close()
        redis.close()
