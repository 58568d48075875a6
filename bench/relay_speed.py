"""Relay speed: pre-inserted outbox rows sent to Kafka by the running relay, rows per second,
against a raw confluent-kafka producer sending the very same messages from Python.

The two take turns (relay, raw, raw, relay, ...), as the intake's sides do, so that the machine's
drift over the measurement, and the topic growing with every turn, fall on both alike. The rows go
to a topic of their own, which no consumer reads (so the rest of the pipeline stays idle) and which
is deleted once measured.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient

from bench.shop import RELAY_SPEED_TOPIC, service_cursor
from devstack.stack import Stack
from shared.config import load_settings
from shared.kafka import ensure_topics, producer_config
from shared.outbox.publishing import FLUSH_TIMEOUT_S
from shared.outbox.relaying import RELAY_SELECT, relay_headers

INSERT_ROWS = """
INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, envelope, created_at)
SELECT message_id, %(topic)s, user_id, 'PaymentRequested', order_id::text,
       json_build_object('message_id', message_id, 'type', 'PaymentRequested', 'version', 1,
                         'occurred_at', %(occurred_at)s, 'correlation_id', order_id::text,
                         'payload', json_build_object('order_id', order_id::text,
                                                      'user_id', user_id, 'amount', '1.00')),
       %(occurred_at)s
FROM (SELECT gen_random_uuid() AS message_id, gen_random_uuid() AS order_id,
             'relay-speed-' || (n %% 50) AS user_id
      FROM generate_series(1, %(rows)s) AS n) AS generated
"""


def relay_speed_topic(settings) -> str:
    """The measurement's own topic, in the stack's namespace."""
    return f"{settings.kafka_consumer_group_prefix}.{RELAY_SPEED_TOPIC}"


def measure_relay_speed(stack: Stack, rows: int, rounds: int, timeout: float = 600) -> dict:
    settings = load_settings(stack.env)
    topic = relay_speed_topic(settings)
    ensure_topics(settings, [topic])
    # Unmeasured, a whole turn of the relay first: after a warm-up of 1% or 10% of the rows, the
    # relay's first turn was the slowest of its measurement in all six probes, by a fifth or more
    # in four. The measured turns then find the topic warm and the relay's leader up.
    warm_last_row_id, _, _ = _insert_rows(stack, topic, rows)
    _wait_until_sent(stack, topic, warm_last_row_id, timeout)
    relay_turns: list[float] = []
    raw_turns: list[float] = []
    messages: list[tuple[str, str, dict[str, str]]] = []
    for round_number in range(rounds):
        # The relay goes first in the first round: its rows are the messages the raw producer sends.
        for side in ("relay", "raw") if round_number % 2 == 0 else ("raw", "relay"):
            if side == "relay":
                messages = []  # the last turn's freed before this one's clock starts
                last_row_id, messages, committed = _insert_rows(stack, topic, rows)
                relay_turns.append(_wait_until_sent(stack, topic, last_row_id, timeout) - committed)
            else:
                raw_turns.append(_send_raw(settings, topic, messages))
    _delete_topic(settings, topic)
    relay_rate = rows * len(relay_turns) / sum(relay_turns)
    raw_rate = rows * len(raw_turns) / sum(raw_turns)
    return {
        "rows": rows,
        "relay_seconds": round(sum(relay_turns) / len(relay_turns), 2),
        "relay_rows_per_s": round(relay_rate),
        "turns_relay_rows_per_s": [round(rows / seconds) for seconds in relay_turns],
        "raw_producer_seconds": round(sum(raw_turns) / len(raw_turns), 2),
        "raw_producer_rows_per_s": round(raw_rate),
        "turns_raw_producer_rows_per_s": [round(rows / seconds) for seconds in raw_turns],
        "ratio": round(relay_rate / raw_rate, 3),
    }


def _delete_topic(settings, topic: str, timeout: float = 30) -> None:
    """Give the test broker its memory back: it keeps every message it has taken (five turns of
    the rows here, some 230 MB) for the rest of the run otherwise."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    for future in admin.delete_topics([topic], operation_timeout=timeout).values():
        future.result(timeout)


def _wait_until_sent(stack: Stack, topic: str, last_row_id: int, timeout: float) -> float:
    """The moment no row of `topic` is left (the relay deletes each row the broker acknowledged;
    the commit of the rows woke it, as in production). A row the broker refused (the relay counts
    an attempt on it, to try it again later, or parks it) fails the measurement at once, as a
    failed delivery fails the raw producer's (_send_raw): the turn would count the relay's wait
    to try again, or wait out `timeout` for a row parked.

    The relay sends rows oldest first, so until the newest row is gone only that one row is looked
    up (by primary key), and the refused rows' index, empty but for them: counting the table every
    few milliseconds would load the very database the relay is working on.
    """
    deadline = time.monotonic() + timeout
    with service_cursor(stack, "orders") as cursor:
        while time.monotonic() < deadline:
            cursor.execute(_NEWEST_LEFT_AND_A_REFUSAL, {"id": last_row_id, "topic": topic})
            newest_left, refusal = cursor.fetchone()
            if refusal is not None:
                raise RuntimeError(f"the broker refused rows the relay sent to {topic}: {refusal}")
            if not newest_left:
                done = time.monotonic()
                cursor.execute("SELECT count(*) FROM outbox_messages WHERE topic = %s", (topic,))
                if cursor.fetchone()[0] == 0:
                    return done
            time.sleep(0.005)
    raise TimeoutError(f"the relay did not send the {topic} rows within {timeout}s")


# Whether the newest row is still there, and the error of one row of the topic the broker refused
# (the relay counted an attempt on it: shared.outbox.relaying), if any.
_NEWEST_LEFT_AND_A_REFUSAL = """
SELECT EXISTS (SELECT FROM outbox_messages WHERE id = %(id)s),
       (SELECT last_error FROM outbox_messages WHERE attempts > 0 AND topic = %(topic)s LIMIT 1)"""


def _insert_rows(stack: Stack, topic: str,
                 rows: int) -> tuple[int, list[tuple[str, str, dict]], float]:
    """Insert the rows in one transaction; return the id of the newest, (key, value, headers) of
    each, exactly as the relay reads them, read before the commit (the relay deletes them once
    sent), and the moment of the commit, which wakes the relay: its clock starts there. All of it
    is made before the commit, so none of the runner's own work falls on the relay's turn."""
    with service_cursor(stack, "orders") as cursor:
        cursor.execute(INSERT_ROWS, {"topic": topic, "rows": rows,
                                     "occurred_at": datetime.now(timezone.utc).isoformat()})
        cursor.execute(RELAY_SELECT + " WHERE topic = %(topic)s ORDER BY id", {"topic": topic})
        inserted = cursor.fetchall()
        last_row_id = inserted[-1][0]
        messages = [(key, envelope, relay_headers(message_id, event_type, request_id))
                    for _, _, key, message_id, event_type, request_id, envelope in inserted]
        del inserted
    committed = time.monotonic()
    return last_row_id, messages, committed


def _send_raw(settings, topic: str, messages: list[tuple[str, str, dict[str, str]]]) -> float:
    """Seconds a bare producer, configured as the relay's (failed deliveries reported only), takes
    to have them all acknowledged; connected, its producer id taken and the topic's partitions
    known before the clock starts, as the relay's long-lived producer is. A delivery that failed
    (the first message's too) fails the measurement, as a refused row fails the relay's turn
    (_wait_until_sent): the report only of failures would otherwise count it as sent."""
    failed: list[KafkaError] = []
    producer = Producer({**producer_config(settings), "delivery.report.only.error": True,
                         "on_delivery": lambda error, _message: failed.append(error)})
    key, value, headers = messages[0]
    producer.produce(topic, key=key, value=value, headers=headers)  # (no consumer reads it)
    if producer.flush(FLUSH_TIMEOUT_S) or failed:
        raise RuntimeError(f"the raw producer's first message went unacknowledged:"
                           f" {_kinds(failed) or 'no answer'}")
    started = time.monotonic()
    for key, value, headers in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(FLUSH_TIMEOUT_S + 60):
        raise RuntimeError("the raw producer left messages unacknowledged")
    if failed:
        raise RuntimeError(f"{len(failed)} of the raw producer's {len(messages)} messages failed:"
                           f" {_kinds(failed)}")
    return time.monotonic() - started


def _kinds(errors: list[KafkaError]) -> str:
    return ", ".join(sorted({error.name() for error in errors}))
