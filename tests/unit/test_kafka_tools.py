"""Counting this process's librdkafka threads, and waiting for their count (tests/kafka_tools.py),
with threads named as librdkafka names its own (rdk:...) that end when a test lets them."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.kafka_tools import _thread_name, librdkafka_threads, wait_for_librdkafka_threads
from tests.polling import wait_for


@contextmanager
def _threads_named_like_librdkafkas(count: int) -> Iterator[threading.Event]:
    """`count` threads named rdk:..., running until the event yielded is set (at the latest as
    the block ends), then joined."""
    released = threading.Event()
    named = threading.Barrier(count + 1)

    def run() -> None:
        Path("/proc/thread-self/comm").write_text("rdk:unit-test")
        named.wait(5)
        released.wait(30)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    named.wait(5)
    try:
        yield released
    finally:
        released.set()
        for thread in threads:
            thread.join(5)


def _steady_librdkafka_threads() -> int:
    """The count of this process's librdkafka threads once two reads 0.1 s apart agree: clients
    of earlier tests let go (gc) can leave threads listed for a moment, which would move it."""
    gc.collect()
    counts = [librdkafka_threads()]

    def steady() -> bool:
        counts.append(librdkafka_threads())
        return counts[-1] == counts[-2]

    wait_for(steady, timeout=5, interval=0.1, what="this process's librdkafka threads to settle")
    return counts[-1]


def test_the_wait_for_the_threads_count_waits_for_threads_that_end_after_a_delay():
    """A client's threads can outlive their client's destruction by a moment: the wait, begun
    while they run, returns once they have ended, where a count compared once failed."""
    before = _steady_librdkafka_threads()
    with _threads_named_like_librdkafkas(2) as released:
        assert librdkafka_threads() == before + 2
        threading.Timer(0.5, released.set).start()
        wait_for_librdkafka_threads(before)
        assert released.is_set()


def test_the_wait_for_the_threads_count_fails_once_its_time_is_up():
    before = _steady_librdkafka_threads()
    with _threads_named_like_librdkafkas(1):
        with pytest.raises(AssertionError, match=f"librdkafka threads to be {before}"):
            wait_for_librdkafka_threads(before, timeout=0.3)


def test_a_thread_that_ended_since_its_task_was_listed_is_not_counted():
    """Its /proc/self/task entry, listed as it ran, is gone by the time its name is read."""
    native_ids = []
    thread = threading.Thread(target=lambda: native_ids.append(threading.get_native_id()))
    thread.start()
    thread.join()
    comm = Path(f"/proc/self/task/{native_ids[0]}/comm")
    wait_for(lambda: not comm.exists(), timeout=5,  # (its task goes a moment after the join)
             what="the ended thread's task to go")
    assert _thread_name(comm) == ""
