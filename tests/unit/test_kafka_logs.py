"""What shared.kafka_logs makes of a client's lines saying a broker cannot be connected to, its
probe of the broker (why_unanswered) replaced and its clock the test's."""

from __future__ import annotations

import logging
import threading

import pytest

from shared import kafka_logs
from shared.kafka_logs import ClientLog
from tests.polling import wait_for

BROKER = "127.0.0.1:9"
TIMED_OUT = (f"[thrd:{BROKER}/1]: {BROKER}/1: 1 request(s) timed out: disconnect (after 60000ms"
             " in state UP)")
REFUSED = (f"[thrd:{BROKER}/bootstrap]: {BROKER}/bootstrap: Connect to ipv4#{BROKER} failed:"
           " Connection refused (after 0ms in state CONNECT)")


@pytest.fixture
def now(monkeypatch):
    """The test's clock, [seconds] for it to set; the process's brokers away the test's own, their
    probes ended with it (no client having tried them since)."""
    monkeypatch.setattr(kafka_logs, "_brokers_away", {})
    now = [0.0]
    yield now
    now[0] = float("inf")
    wait_for(lambda: not _probing(), timeout=5, what="the test's probes to end")


def _said(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == kafka_logs.log.name]


def _probing() -> bool:
    return any(thread.name == f"kafka-probe {BROKER}" for thread in threading.enumerate())


def test_a_clients_lines_of_a_broker_that_answers_are_said_at_their_level_once_a_minute(
        monkeypatch, now, caplog):
    """A broker that accepts connections but has stalled: its clients' requests time out, and the
    probe finds it answering. Their lines are said as librdkafka said them, at its level, the
    first and then once a minute with a count, not dropped; and the broker, having answered, is
    not probed again for each line (an inbox consumer's twenty a second)."""
    asked = []
    monkeypatch.setattr(kafka_logs, "why_unanswered",
                        lambda address, timeout: asked.append(address))  # (None: it answers)
    caplog.set_level(logging.DEBUG, logger="shared.kafka")
    client = ClientLog(BROKER, clock=lambda: now[0])
    line = f"REQTMOUT [rdkafka#consumer-1] {TIMED_OUT.split(']: ', 1)[1]}"

    def tried_at(seconds: float) -> None:
        now[0] = seconds
        client.log(logging.ERROR, "%s [%s] %s", "REQTMOUT", "rdkafka#consumer-1", TIMED_OUT)
        wait_for(lambda: not _probing(), timeout=5, what="the probe to end")

    for seconds in [n / 10 for n in range(20)]:  # twenty lines, one probe (it answered at 0 s)
        tried_at(seconds)
    for seconds in (20.0, 40.0, 61.0):  # each a probe
        tried_at(seconds)
    assert _said(caplog) == [
        (logging.ERROR, f"{line} (broker {BROKER} answers a probe; such lines said once a minute)"),
        (logging.ERROR, f"{line} (broker {BROKER} answering: 23 such lines in 61 s)"),
    ]
    assert asked == [BROKER] * 4


def test_a_probe_of_a_broker_away_that_no_client_tries_any_more_ends_quietly(
        monkeypatch, now, caplog):
    """A broker away that the process's clients stop trying (removed, or its relay producer
    closed): its probe goes on while a client's line came in the last UNWATCHED_AFTER_SECONDS, then
    ends, saying at INFO that the broker is no longer watched, never that it is back; a client's
    line later begins a new outage, said as one."""
    asked = []
    monkeypatch.setattr(
        kafka_logs, "why_unanswered",
        lambda address, timeout: asked.append(address) or "ConnectionRefusedError: refused")
    monkeypatch.setattr(kafka_logs, "PROBE_EVERY_SECONDS", 0.01)
    caplog.set_level(logging.DEBUG, logger="shared.kafka")
    client = ClientLog(BROKER, clock=lambda: now[0])

    def tried() -> None:
        client.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", REFUSED)

    def round_at(seconds: float) -> None:
        """The clock at `seconds`, and a whole round of the probe there (or the probe ended)."""
        now[0], asks = seconds, len(asked)
        wait_for(lambda: len(asked) >= asks + 2 or not _probing(), timeout=5,
                 what=f"a probe's round at {seconds} s")

    tried()
    for seconds in range(0, 101, 20):
        round_at(seconds)
    tried()  # at 100 s: the probe goes on 120 s more
    for seconds in range(120, 220, 20):
        round_at(seconds)
    assert _probing()
    round_at(220)
    wait_for(lambda: not _probing(), timeout=5, what="the probe to end")
    now[0] = 230.0
    tried()
    wait_for(lambda: len(_said(caplog)) == 6, timeout=5, what="the new outage said")
    said = _said(caplog)
    begun = (logging.WARNING,
             f"Kafka clients cannot connect to broker {BROKER}: {REFUSED.split(']: ', 1)[1]}")
    assert said[0] == begun and said[-1] == begun, said
    for (level, line), seconds in zip(said[1:4], (60, 120, 180), strict=True):  # reminders
        assert level == logging.WARNING and line.startswith(
            f"Kafka clients still cannot connect to broker {BROKER} after {seconds} s"), line
    assert said[4] == (logging.INFO, f"Kafka broker {BROKER} no longer watched: no client has"
                       " tried it for 120 s (it still does not answer: ConnectionRefusedError:"
                       " refused)")
    assert len(said) == 6, said


def test_a_line_served_just_after_its_outage_ended_is_said_only_at_debug(monkeypatch, now, caplog):
    """A client's line of a try from before the broker came back, served after the probe found it
    back, is of the outage just over: not said as a client's trouble."""
    answers = ["ConnectionRefusedError: refused", None]
    monkeypatch.setattr(kafka_logs, "why_unanswered", lambda address, timeout: answers.pop(0))
    monkeypatch.setattr(kafka_logs, "PROBE_EVERY_SECONDS", 0.01)
    caplog.set_level(logging.DEBUG, logger="shared.kafka")
    client = ClientLog(BROKER, clock=lambda: now[0])
    client.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", REFUSED)
    wait_for(lambda: not _probing(), timeout=5, what="the probe to find the broker back")
    client.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", REFUSED)
    assert [(level, line.split(":")[0]) for level, line in _said(caplog)] == [
        (logging.WARNING, "Kafka clients cannot connect to broker 127.0.0.1"),
        (logging.INFO, "Kafka clients reach broker 127.0.0.1"),
        (logging.DEBUG, "FAIL [rdkafka#producer-1] 127.0.0.1")]
