"""The relay speed's two sides (bench/relay_speed.py) fail on a delivery the broker refused, never
count it as sent: the raw producer's, with the real client against librdkafka's own mock cluster
(tests/librdkafka_mock.py), and the relay's, on a crafted read of its outbox."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
from confluent_kafka import KafkaError

from bench import relay_speed
from shared.config import load_settings
from tests.librdkafka_mock import PRODUCE, MockCluster

TOPIC = "relay-speed"
MESSAGES = [(f"user-{n % 5}", f'{{"n": {n}}}', {"message_id": str(n)}) for n in range(50)]


@pytest.fixture
def cluster():
    with MockCluster() as cluster:
        cluster.create_topic(TOPIC)
        yield cluster


def test_the_raw_producer_sends_every_message_to_a_broker_that_takes_them(cluster):
    settings = load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap})
    assert relay_speed._send_raw(settings, TOPIC, MESSAGES) > 0


def test_the_raw_producers_first_message_refused_fails_the_measurement(cluster):
    settings = load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap})
    cluster.answer_next_requests_with(PRODUCE, KafkaError.INVALID_RECORD)
    with pytest.raises(RuntimeError, match="first message went unacknowledged: INVALID_RECORD"):
        relay_speed._send_raw(settings, TOPIC, MESSAGES)


def test_the_raw_producers_messages_refused_fail_the_measurement(cluster):
    """The first message (sent before the clock starts) taken, the measured ones refused: each
    reported failed, none counted as sent."""
    settings = load_settings({"KAFKA_BOOTSTRAP_SERVERS": cluster.bootstrap})
    cluster.answer_next_requests_with(PRODUCE, KafkaError.NO_ERROR,
                                      *[KafkaError.INVALID_RECORD] * len(MESSAGES))
    with pytest.raises(RuntimeError, match=rf"of the raw producer's {len(MESSAGES)} messages "
                                           r"failed: INVALID_RECORD"):
        relay_speed._send_raw(settings, TOPIC, MESSAGES)


class _Outbox:
    """The orders outbox as _wait_until_sent reads it: the newest row still there, and a row of
    the topic the broker refused."""

    @contextmanager
    def cursor(self, _stack, _service):
        yield self

    def execute(self, sql: str, params=None) -> None:
        self.sql = sql

    def fetchone(self):
        return True, "MSG_SIZE_TOO_LARGE: Broker: Message size too large"


def test_a_row_the_broker_refused_the_relay_fails_its_turn_at_once(monkeypatch):
    """Not counted as sent once tried again, nor waited for until the timeout once parked."""
    monkeypatch.setattr(relay_speed, "service_cursor", _Outbox().cursor)
    with pytest.raises(RuntimeError, match="refused rows the relay sent to relay-speed: "
                                           "MSG_SIZE_TOO_LARGE"):
        relay_speed._wait_until_sent(object(), TOPIC, 100, timeout=5)
