"""The outbox against real PostgreSQL and the Kafka-protocol broker."""

from __future__ import annotations

import dataclasses
import gc
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import psycopg2
import pytest
from confluent_kafka.admin import AdminClient
from sqlalchemy import delete, event, func, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from devstack.infra import free_port, start_and_wait_for_broker, start_broker
from orders_app import published_events, service
from orders_app.models import Order
from shared.contracts import ORDER_STATUS_CHANGED, PAYMENT_REQUESTED, decode, new_event, wire_text
from shared.db import db, driver_cursor, driver_dsn, transaction
from shared.inbox.storing import ConsumedRecord, inbox_row
from shared.kafka import ensure_topics
from shared.task_queues import worker_queues
from shared.outbox.parked import NotOfTheTopic, redirect_parked_outbox_messages
from shared.outbox.publishing import OutboxPublisher
from shared.outbox.relaying import (CLAIM_ROWS, FIRST_RETRY_AFTER_SECONDS, REFUSED_LOOKED_AT,
                                    Refusal, relay_pending_outbox, vacuum_outbox)
from shared.outbox.writing import (OUTBOX_CHANNEL, OutboxMessage, add_outbox_message,
                                  outbox_rows_written_together)
from shared.relay_leader import UNLOCK_WAIT_SECONDS, RelayLeaderConnection, _cut_off_after
from shared.request_context import request_id_bound
from tasks.services import service_app
from tests.discard_warnings import order_left_new
from tests.kafka_tools import (librdkafka_threads, read_topic, read_topic_until,
                               wait_for_librdkafka_threads)
from tests.network_tools import SilencingProxy
from tests.parked_terminal import (discarded_all_confirmed_leaving_some_parked,
                                   discarded_named_confirmed_leaving_one_parked)
from tests.postgres_tools import (called_at_the_first_statement_naming,
                                  committed_on_a_connection_of_its_own, other_sessions,
                                  terminate_backend, wait_for_sessions_waiting_on_a_lock)
from tests.polling import wait_for
from tests.process_tools import start_child
from tests.thread_tools import OutcomeThread, all_joined


def _place(user_id: str, amount: str = "30.00") -> service.PlacedOrder:
    with transaction() as session:
        return service.place_order(session, user_id=user_id, amount=Decimal(amount),
                                   description="")


def _relay_all(publisher: OutboxPublisher, batch_size: int = 100):
    totals = []
    while True:
        result = _relay_once(publisher, batch_size)
        totals.append(result)
        if result.claimed == 0 or result.refused_by_the_broker:
            return totals


def _relay_once(publisher: OutboxPublisher, batch_size: int):
    """One batch relayed, in a transaction of its own."""
    with transaction() as session, driver_cursor(session) as cursor:
        return relay_pending_outbox(cursor, publisher.send_batch, batch_size)


def _outbox_rows_for(order_ids) -> list[OutboxMessage]:
    wanted = {str(i) for i in order_ids}
    rows = db.session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    return [r for r in rows if r.correlation_id in wanted]


def test_an_order_and_its_payment_request_commit_together(in_orders, user_id):
    order = _place(user_id)
    rows = _outbox_rows_for([order.id])
    assert len(rows) == 1
    row = rows[0]
    assert row.type == "PaymentRequested"
    assert row.key == user_id
    envelope = dict(row.envelope)
    assert datetime.fromisoformat(envelope.pop("occurred_at")) == row.created_at
    assert envelope == {
        "message_id": str(row.message_id), "type": "PaymentRequested", "version": 1,
        "correlation_id": str(order.id), "causation_id": None,  # (placed by no request)
        "payload": {"order_id": str(order.id), "user_id": user_id, "amount": "30.00"}}
    assert row.attempts == 0


def test_a_failure_after_the_outbox_write_leaves_neither_row(in_orders, user_id):
    with pytest.raises(RuntimeError):
        with transaction() as session:
            service.place_order(session, user_id=user_id, amount=Decimal("5"), description="")
            raise RuntimeError("crash before commit")
    assert db.session.scalar(select(func.count()).where(Order.user_id == user_id)) == 0
    assert db.session.scalar(
        select(func.count()).where(OutboxMessage.key == user_id)) == 0


def test_relay_publishes_the_envelope_with_key_and_headers_and_deletes_the_rows(
        in_orders, settings, user_id):
    orders = [_place(user_id, "1.00")]
    with request_id_bound("request-of-the-second"):
        orders.append(_place(user_id, "2.50"))
    orders.append(_place(user_id, "3.00"))
    sent = sum(r.sent for r in _relay_all(OutboxPublisher(settings, "orders")))

    assert _outbox_rows_for([o.id for o in orders]) == []
    assert sent >= 3
    messages = _messages_of(settings, [o.id for o in orders])
    assert all(m.key() == user_id.encode() for m in messages)
    bodies = [json.loads(m.value()) for m in messages]
    assert [b["payload"]["amount"] for b in bodies] == ["1.00", "2.50", "3.00"]  # per-key order
    for message, body, order in zip(messages, bodies, orders):
        assert body["type"] == "PaymentRequested" and body["version"] == 1
        assert body["correlation_id"] == str(order.id)
        headers = dict(message.headers())
        assert headers["message_id"].decode() == body["message_id"]
        assert headers["type"] == b"PaymentRequested"
    assert [dict(m.headers()).get("request_id") for m in messages] == [
        None, b"request-of-the-second", None]
    assert [body["causation_id"] for body in bodies] == [None, "request-of-the-second", None]


def test_a_row_written_before_the_causation_id_is_relayed_and_read_by_its_header(
        in_orders, settings, user_id):
    """An outbox row an older release wrote, its envelope without `causation_id`, goes out as it
    was written, its request id in the header alone: a reader takes it, its causation_id none, and
    the inbox stores its request id from the header."""
    with request_id_bound("request-of-before"):
        order = _place(user_id, "1.00")
    (row,) = _outbox_rows_for([order.id])
    row_id, message_id = row.id, row.message_id
    as_written_before = {name: value for name, value in row.envelope.items()
                         if name != "causation_id"}
    with transaction() as session:
        session.execute(text("UPDATE outbox_messages SET envelope = :envelope WHERE id = :id"),
                        {"envelope": wire_text(as_written_before), "id": row_id})
    _relay_all(OutboxPublisher(settings, "orders"))

    (message,) = _messages_of(settings, [order.id])
    assert json.loads(message.value()) == as_written_before
    assert dict(message.headers())["request_id"] == b"request-of-before"
    read = decode(message.value())
    assert (read.correlation_id, read.causation_id) == (str(order.id), None)
    stored = inbox_row(ConsumedRecord(message.topic(), message.partition(), message.offset(),
                                      message.key(), message.value(), dict(message.headers())))
    assert (stored["message_id"], stored["request_id"]) == (message_id, "request-of-before")


def _messages_of(settings, order_ids, read_past: bool = False) -> list:
    """The payment-requested messages of these orders, read from Kafka until all are there (with
    `read_past`, until the last one is: repeats of the others sent before it are read too)."""
    wanted = {str(order_id) for order_id in order_ids}

    def of_the_orders(messages):
        # (.get: other tests send the topic bare envelopes of their own, `{}`)
        return [m for m in messages if json.loads(m.value()).get("correlation_id") in wanted]

    def enough(read) -> bool:
        ids = {json.loads(m.value())["correlation_id"] for m in of_the_orders(read)}
        return str(order_ids[-1]) in ids if read_past else ids == wanted

    messages = read_topic_until(settings.kafka_bootstrap_servers, settings.topic_payment_requested,
                                enough)
    return of_the_orders(messages)


def test_a_message_no_broker_can_take_is_parked_and_holds_back_its_key_and_no_other(
        in_orders, settings, user_id):
    """A row too large for the broker is refused by the producer at once: it is parked and not
    tried again, the rows behind it with its key wait (they must not overtake it), however many
    there are, and every other key's rows go out."""
    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    stuck_user = f"{user_id}-stuck"
    too_large = _place(stuck_user, "1.00")
    behind_it = [_place(stuck_user, amount).id for amount in ("2.00", "3.00", "4.00")]
    other = _place(user_id, "5.00")
    _make_too_large(too_large.id)
    try:
        results = _relay_all(publisher, batch_size=2)  # the stuck key's rows alone fill a batch
        first = results[0]
        assert (first.claimed, first.failed, first.held, first.parked) == (2, 2, 2, 1)
        assert sum(result.refused_by_the_broker for result in results) == 0
        db.session.rollback()
        assert _outbox_rows_for([other.id]) == []
        assert _messages_of(settings, [other.id])
        parked, *waiting = _outbox_rows_for([too_large.id, *behind_it])
        assert parked.correlation_id == str(too_large.id) and parked.parked_at is not None
        assert "MSG_SIZE_TOO_LARGE" in parked.last_error and parked.attempts == 1
        assert [row.correlation_id for row in waiting] == [str(i) for i in behind_it]
        assert waiting[0].last_error.startswith("held back behind a refused message")
        assert [row.attempts for row in waiting] == [1, 0, 0]
        assert all(row.parked_at is None for row in waiting)

        assert sum(result.claimed for result in _relay_all(publisher)) == 0  # not tried again
        db.session.rollback()
        assert _outbox_rows_for([too_large.id])[0].attempts == 1
    finally:
        _delete_outbox_rows_of([too_large.id, *behind_it])


def test_an_operator_replays_or_discards_a_parked_outbox_row(in_orders, settings, user_id,
                                                             capsys):
    """python -m tasks.parked ... --outbox: a row replayed is tried again in its place (and
    parked again while the producer still will not take it); one discarded is never sent, and the
    rows behind it go out in their order."""
    from tasks import parked

    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)
    too_large = _place(user_id, "1.00")
    behind_it = [_place(user_id, amount).id for amount in ("2.00", "3.00")]
    _make_too_large(too_large.id)
    try:
        _relay_all(publisher)
        db.session.rollback()
        (message_id,) = [row.message_id for row in _outbox_rows_for([too_large.id])]
        assert parked.main(["list", "orders", "--outbox"]) == 0
        listed = capsys.readouterr().out
        assert f"{message_id}  PaymentRequested" in listed and "2 waiting behind" in listed

        assert parked.main(["replay", "orders", "--outbox", str(message_id)]) == 0
        db.session.rollback()
        assert _outbox_rows_for([too_large.id])[0].parked_at is None
        _relay_all(publisher)
        db.session.rollback()
        (row,) = _outbox_rows_for([too_large.id])
        assert row.parked_at is not None and row.attempts == 2  # parked again
        assert len(_outbox_rows_for(behind_it)) == 2

        capsys.readouterr()
        assert parked.main(["discard", "orders", "--outbox", str(message_id)]) == 0
        assert capsys.readouterr().err == (  # (its envelope padded over: no payload)
            f"WARNING orders outbox: {message_id} PaymentRequested discarded: its order (no order"
            " id in its payload) stays as it is (NEW), never paid for,"
            " unless another copy of this event was handled (its status tells);"
            " nothing else moves a NEW"
            " order on\n")
        assert parked.main(["discard", "orders", "--outbox", str(message_id)]) == 1  # gone
        _relay_all(publisher)
        db.session.rollback()
        assert _outbox_rows_for([too_large.id, *behind_it]) == []
        messages = _messages_of(settings, behind_it)
        assert [json.loads(m.value())["payload"]["amount"] for m in messages] == ["2.00", "3.00"]
    finally:
        _delete_outbox_rows_of([too_large.id, *behind_it])


def test_the_rows_listed_as_waiting_behind_a_parked_row_are_the_later_unparked_rows_of_its_key(
        in_orders):
    """`list --outbox` counts, for each parked row, the later rows of its topic and key that are
    not parked: not the rows before it, nor those of its key on another topic, of another key, or
    parked themselves (each of those counted for itself); a row of no key holds none back. (Counted
    in one walk of the rows after the oldest listed, no longer a walk of every later row for each
    parked one, shared.outbox.parked._waiting_behind.)"""
    from shared.outbox.parked import parked_outbox_messages

    topic, other_topic = (f"waiting-behind-{uuid.uuid4().hex[:8]}" for _ in range(2))
    key, other_key = (uuid.uuid4().hex for _ in range(2))
    rows = [  # (name, topic, key, parked), in the order written
        ("before", topic, key, False), ("parked", topic, key, True),
        ("behind", topic, key, False), ("other topic", other_topic, key, False),
        ("other key", topic, other_key, False), ("keyless parked", topic, None, True),
        ("behind too", topic, key, False), ("parked later", topic, key, True),
        ("behind the later", topic, key, False), ("keyless", topic, None, False)]
    ids = {}
    with transaction() as session:
        for name, row_topic, row_key, is_parked in rows:
            ids[name] = session.scalar(text(
                "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
                " parked_at) VALUES (:message_id, :topic, :key, 'PaymentRequested', '{}',"
                " :attempts, CASE WHEN :parked THEN now() END) RETURNING message_id"),
                {"message_id": uuid.uuid4(), "topic": row_topic, "key": row_key,
                 "attempts": int(is_parked), "parked": is_parked})
    try:
        with transaction() as session:
            listed = {row.message_id: row.waiting_behind
                      for row in parked_outbox_messages(session, 10_000)}
        assert {name: listed[ids[name]] for name in ("parked", "keyless parked", "parked later")
                } == {"parked": 3, "keyless parked": 0, "parked later": 1}
        assert not set(listed) & {ids[name] for name, *_, is_parked in rows if not is_parked}
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(
                OutboxMessage.message_id.in_(ids.values())))


def test_listing_parked_rows_walks_the_rows_behind_them_once_not_once_a_parked_row(in_orders):
    """The rows behind parked ones, counted for `list --outbox`, are read in one walk: counted a
    parked row at a time, each walked every later row (no index finds untried rows by topic and
    key), and 80 parked with three million rows behind ran past the statement timeout. Measured
    by the rows the listing's transaction read (pg_stat_xact_user_tables), not by a clock."""
    from shared.outbox.parked import parked_outbox_messages

    topic, parked_count, backlog = f"walked-once-{uuid.uuid4().hex[:8]}", 20, 5_000
    keys = [uuid.uuid4().hex for _ in range(parked_count)]
    insert = ("INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
              " parked_at) SELECT gen_random_uuid(), :topic, key, 'PaymentRequested', '{}',"
              " :attempts, CASE WHEN :attempts > 0 THEN now() END FROM unnest(CAST(:keys AS"
              " text[])) AS key")
    with transaction() as session:
        session.execute(text(insert), {"topic": topic, "keys": keys, "attempts": 1})
        session.execute(text(insert), {"topic": topic, "keys": keys, "attempts": 0})  # behind
        session.execute(text(insert), {"topic": topic, "attempts": 0,
                                       "keys": [uuid.uuid4().hex for _ in range(backlog)]})
    try:
        with transaction() as session:
            in_the_table = session.scalar(text("SELECT count(*) FROM outbox_messages"))
        with transaction() as session:
            read_before = _outbox_rows_read(session)
            listed = parked_outbox_messages(session, parked_count)
            read = _outbox_rows_read(session) - read_before
        assert [(row.topic, row.waiting_behind) for row in listed] == [(topic, 1)] * parked_count
        # The listing may read the table (a small one) for the parked rows, and the count walks it
        # once: twice the table. Counted a parked row at a time, they read it 21 times over.
        assert read <= 2 * in_the_table, (read, in_the_table)
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.topic == topic))


def _outbox_rows_read(session: Session) -> int:
    """The outbox rows this session has read: by its transaction, and by those before it whose
    counts it has not yet reported (within a transaction, only the reads grow it)."""
    return session.scalar(text(
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        " FROM pg_stat_xact_user_tables WHERE relname = 'outbox_messages'"))


def test_discarding_a_parked_payment_request_row_warns_that_its_order_stays_new(
        in_orders, capsys):
    """The row of a PaymentRequested discarded, its order is never paid for and stays NEW: the
    command says so in a WARNING line naming the order; a row of another event, without one."""
    from tasks import parked

    order_id, topic = uuid.uuid4(), f"discarded-{uuid.uuid4().hex[:8]}"
    ids = {}
    with transaction() as session:
        for event_type in (PAYMENT_REQUESTED, ORDER_STATUS_CHANGED):
            ids[event_type] = session.scalar(text(
                "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
                " parked_at) VALUES (gen_random_uuid(), :topic, :key, :type, CAST(:envelope AS"
                " json), 1, now()) RETURNING message_id"),
                {"topic": topic, "key": str(order_id), "type": event_type,
                 "envelope": json.dumps({"payload": {"order_id": str(order_id)}})})
    try:
        assert parked.main(["discard", "orders", "--outbox", *map(str, ids.values())]) == 0
        said = capsys.readouterr()
        assert said.out == "orders outbox: 2 message(s) discarded\n"
        assert said.err.splitlines() == [
            order_left_new("orders outbox", ids[PAYMENT_REQUESTED], order_id)]
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.topic == topic))


def test_a_payment_request_row_parked_as_every_parked_row_is_discarded_is_warned_of(
        in_orders, settings, capsys, monkeypatch):
    """`discard --outbox --all` warns of the rows the deleting statements themselves deleted: a
    PaymentRequested row written before the last parked one, and parked by another transaction (a
    relay) stamped parked before the command began but committed only as the first batch is being
    deleted, is deleted in a later batch and warned of. (Read by a statement of its own before the
    delete, the payment events to warn of missed such a row, though the delete, a later statement,
    took it. A row stamped parked after the command began is left parked.)"""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 1)
    order_id = uuid.uuid4()
    topic = f"parked-meanwhile-{uuid.uuid4().hex[:8]}"
    _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=True)
    written_before = _outbox_row(topic, PAYMENT_REQUESTED, order_id, parked=False)
    _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=True)  # (the last parked)
    try:
        # (Any other test's parked rows discarded too.)
        _parked_command_with_rows_parked_meanwhile(
            settings.database_url("orders"), ["discard", "orders", "--outbox", "--all"],
            "DELETE FROM outbox_messages", [written_before],
            parked_at="clock_timestamp() - interval '1 minute'")
        said = capsys.readouterr()
        assert said.out.startswith("orders outbox: ") and "message(s) discarded" in said.out
        assert order_left_new("orders outbox", written_before, order_id) in said.err.splitlines()
        assert _rows_left_of(topic) == 0
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.topic == topic))


def test_discarding_every_parked_row_goes_a_batch_a_transaction_each_payment_event_warned_of(
        in_orders, settings, capsys, monkeypatch):
    """`discard --outbox --all` deletes the parked rows CHANGED_PER_TRANSACTION a transaction, in
    the order they were written, each batch committed before the next is deleted (seen from
    another connection): it deleted them all in one statement, one transaction however many, the
    rows it returned (to warn of payment events) all held at once. Each payment event is still
    warned of, as the statement that deleted it returned it, and every row goes."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 2)
    topic = f"discarded-in-batches-{uuid.uuid4().hex[:8]}"
    event_types = [PAYMENT_REQUESTED, ORDER_STATUS_CHANGED, PAYMENT_REQUESTED, PAYMENT_REQUESTED,
                   ORDER_STATUS_CHANGED, PAYMENT_REQUESTED, ORDER_STATUS_CHANGED]
    orders = {_outbox_row(topic, event_type, order_id, parked=True): (event_type, order_id)
              for event_type, order_id in ((event_type, uuid.uuid4())
                                           for event_type in event_types)}
    ours_there = []  # (before each deleting statement)

    def count_ours(watching) -> None:
        watching.execute("SELECT count(*) FROM outbox_messages WHERE topic = %s", (topic,))
        ours_there.append(watching.fetchone()[0])

    # (Any other test's parked rows discarded too, before these: written earlier.)
    deleted = _parked_command_looked_at_between_batches(
        settings.database_url("orders"), ["discard", "orders", "--outbox", "--all"],
        "DELETE FROM outbox_messages", count_ours)
    try:
        said = capsys.readouterr()
        assert said.out == f"orders outbox: {sum(deleted)} message(s) discarded\n"
        assert max(deleted) <= 2, deleted
        # Ours went two at a time, each two gone for good (committed) before the next deleted.
        assert len(ours_there) >= 4 and ours_there[-1] <= 2, ours_there
        assert all(0 <= there - after_it <= 2
                   for there, after_it in zip(ours_there, ours_there[1:])), ours_there
        ours = set(map(str, orders))
        warned = [line for line in said.err.splitlines() if line.split()[3] in ours]
        assert warned == [order_left_new("orders outbox", message_id, order_id)
                          for message_id, (event_type, order_id) in orders.items()
                          if event_type == PAYMENT_REQUESTED]
        assert _rows_left_of(topic) == 0
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.topic == topic))


def _parked_command_with_rows_parked_meanwhile(database_url: str, argv: list[str], changing: str,
                                               message_ids: list[uuid.UUID],
                                               parked_at: str = "clock_timestamp()") -> None:
    """Runs tasks/parked.py's command `argv` (to exit 0), the rows `message_ids` parked (attempts
    1, as a relay parks one) by another transaction, committed just before the command's first
    statement holding `changing` (its first batch's), stamped parked at `parked_at` (SQL: the
    clock then unless given)."""
    from tasks import parked

    with called_at_the_first_statement_naming(
            changing, before=True,
            call=lambda: committed_on_a_connection_of_its_own(
                database_url,
                f"UPDATE outbox_messages SET attempts = 1, parked_at = {parked_at}"
                " WHERE message_id = ANY(CAST(%s AS uuid[]))",
                ([str(message_id) for message_id in message_ids],))) as parked_meanwhile:
        assert parked.main(argv) == 0
    assert parked_meanwhile, f"nothing parked: no statement holding {changing!r} was run"


def _parked_command_looked_at_between_batches(
        database_url: str, argv: list[str], changing: str,
        look: Callable[[psycopg2.extensions.cursor], None]) -> list[int]:
    """Runs tasks/parked.py's command `argv` (to exit 0); just before each of its statements
    holding `changing` (a batch's), calls `look` with a cursor on a connection of its own,
    autocommit: it sees what the batches before have committed. Returns how many rows each of
    those statements changed."""
    from tasks import parked

    changed: list[int] = []

    def before(connection, cursor, statement, parameters, context, executemany):
        if changing in statement:
            with watcher.cursor() as watching:
                look(watching)

    def after(connection, cursor, statement, parameters, context, executemany):
        if changing in statement:
            changed.append(cursor.rowcount)

    with closing(psycopg2.connect(driver_dsn(database_url))) as watcher:
        watcher.autocommit = True
        event.listen(Engine, "before_cursor_execute", before)
        event.listen(Engine, "after_cursor_execute", after)
        try:
            assert parked.main(argv) == 0
        finally:
            event.remove(Engine, "before_cursor_execute", before)
            event.remove(Engine, "after_cursor_execute", after)
    return changed


def _rows_left_of(topic: str) -> int:
    """How many outbox rows of `topic` there are, as committed (the session's snapshot dropped)."""
    db.session.rollback()
    return db.session.scalar(select(func.count()).select_from(OutboxMessage).where(
        OutboxMessage.topic == topic))


def _outbox_row(topic: str, event_type: str, order_id: uuid.UUID, parked: bool) -> uuid.UUID:
    """A row of `event_type` for the order, keyed by it, written in a transaction of its own,
    parked (as the relay parks one) or waiting to be sent; returns its message id."""
    with transaction() as session:
        return session.scalar(text(
            "INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
            " parked_at) VALUES (gen_random_uuid(), :topic, :key, :type, CAST(:envelope AS json),"
            " :attempts, CASE WHEN :parked THEN now() END) RETURNING message_id"),
            {"topic": topic, "key": str(order_id), "type": event_type, "attempts": int(parked),
             "parked": parked, "envelope": json.dumps({"payload": {"order_id": str(order_id)}})})


def test_a_parked_outbox_row_replayed_once_mended_goes_out_before_the_rows_behind_it(
        in_orders, settings, user_id):
    from tasks import parked

    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)
    first = _place(user_id, "1.00")
    behind_it = [_place(user_id, amount).id for amount in ("2.00", "3.00")]
    (row,) = _outbox_rows_for([first.id])
    as_written = json.dumps(row.envelope)
    _make_too_large(first.id)
    try:
        _relay_all(publisher)
        db.session.rollback()
        assert _outbox_rows_for([first.id])[0].parked_at is not None
        with transaction() as session, driver_cursor(session) as cursor:  # mended
            cursor.execute("UPDATE outbox_messages SET envelope = %s WHERE correlation_id = %s",
                           (as_written, str(first.id)))
        assert parked.main(["replay", "orders", "--outbox", str(row.message_id)]) == 0
        _relay_all(publisher)
        db.session.rollback()
        assert _outbox_rows_for([first.id, *behind_it]) == []
        messages = _messages_of(settings, [first.id, *behind_it])
        assert [json.loads(m.value())["payload"]["amount"] for m in messages] == [
            "1.00", "2.00", "3.00"]
    finally:
        _delete_outbox_rows_of([first.id, *behind_it])



@pytest.mark.parametrize("command", ["replay", "discard", "replay --to-topic"])
def test_a_dry_run_says_what_it_would_do_to_a_parked_row_and_nothing_is_sent(
        in_orders, settings, user_id, capsys, caplog, command):
    """--dry-run --outbox (named, or --all; --to-topic too) says each parked row a run would take
    and how many, as the run would say them, and rolls back: the rows are as they were (topic,
    park, attempts), the relay is not woken (a NOTIFY goes at a commit), and it has nothing to
    send (a replay, a discard, or a row sent on, would have let the row behind go out), and
    nothing is audited. Before, an operator could not see what a discard would delete."""
    from tasks import parked

    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    orders = [_place(user_id, "1.00").id, _place(user_id, "2.00").id]
    renamed, to = f"renamed-{uuid.uuid4().hex[:8]}", settings.topic_payment_requested
    with transaction() as session:
        if command == "replay --to-topic":  # (parked for a topic no setting names now)
            session.execute(text("UPDATE outbox_messages SET topic = :topic"
                                 " WHERE correlation_id = ANY(:ids)"),
                            {"topic": renamed, "ids": [str(order) for order in orders]})
        message_id = session.scalar(text(
            "UPDATE outbox_messages SET parked_at = now(), attempts = 1, last_error = 'refused'"
            " WHERE correlation_id = :id RETURNING message_id"), {"id": str(orders[0])})
    before = _outbox_rows_as_read(orders)
    db.session.rollback()
    argv = [command.split()[0], "orders", "--outbox", "--dry-run"] + (
        ["--to-topic", to] if command == "replay --to-topic" else [])
    done_to = "discarded" if command == "discard" else "handed back to be sent"
    counted = f"orders outbox: 1 message(s) would be {done_to}" + (
        f" to {to}, with the rows behind them in their order, after the rows of their keys sent"
        " to it under its name while they were parked" if command == "replay --to-topic" else "")
    try:
        with closing(psycopg2.connect(driver_dsn(settings.database_url("orders")))) as listener:
            listener.autocommit = True
            listener.cursor().execute(f"LISTEN {OUTBOX_CHANNEL}")
            assert parked.main(argv + [str(message_id)]) == 0
            said = capsys.readouterr()
            assert said.out == (f"{message_id}: would be {done_to}\n"
                                f"{counted} (dry run: nothing changed)\n")
            assert said.err == ("" if command != "discard" else order_left_new(
                "orders outbox", message_id, orders[0]).replace(
                    "discarded", "would be discarded") + "\n")
            assert parked.main(argv + ["--all"]) == 0  # (any other test's parked rows said too)
            said = capsys.readouterr().out.splitlines()
            assert f"{message_id}: would be {done_to}" in said
            assert said[-1].startswith("orders outbox: ") and said[-1].endswith(
                " (dry run: nothing changed)")
            listener.poll()
            assert listener.notifies == []
        assert _outbox_rows_as_read(orders) == before
        db.session.rollback()
        assert sum(result.sent for result in _relay_all(publisher)) == 0
        assert [r.getMessage() for r in caplog.records if r.name == "tasks.parked"] == []
    finally:
        _delete_outbox_rows_of(orders)

def test_replaying_every_parked_row_goes_a_batch_a_transaction_the_relay_sending_each_once(
        in_orders, settings, user_id, capsys, monkeypatch):
    """`replay --outbox --all` hands the parked rows back CHANGED_PER_TRANSACTION a transaction, in
    the order they were written, each batch committed (seen from another connection) before the
    next is handed back: it unparked them all in one statement, one transaction however many,
    every row locked and none of them sendable until the last was. A relay run between two batches
    sends the rows of those before; a row it parks again, still too large, keeps its place and is
    not handed back again; every row handed back, and the row waiting behind one, is published
    once, and the command counts each row it handed back once."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 2)
    publisher = OutboxPublisher(settings, "orders")
    url = settings.database_url("orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    users = [f"{user_id}-{number}" for number in range(5)]
    firsts = [_place(user, "1.00").id for user in users]
    behind = _place(users[0], "2.00").id  # (waits behind the first user's parked row)
    still_too_large = firsts[2]
    as_written = {row.correlation_id: json.dumps(row.envelope)
                  for row in _outbox_rows_for(firsts)}
    ours = [*firsts, behind]
    for order_id in firsts:
        _make_too_large(order_id)
    sentinels = []
    try:
        _relay_all(publisher)
        db.session.rollback()
        assert all(row.parked_at is not None for row in _outbox_rows_for(firsts))
        with transaction() as session, driver_cursor(session) as cursor:  # mended, but one
            for order_id in firsts:
                if order_id != still_too_large:
                    cursor.execute("UPDATE outbox_messages SET envelope = %s"
                                   " WHERE correlation_id = %s",
                                   (as_written[str(order_id)], str(order_id)))
        ours_parked, ours_left = [], []  # (before each unparking statement)

        def relay_then_count_ours(watching) -> None:
            # The batches committed so far, as the relay sees them: sent by it as they come.
            _relay_once_elsewhere(url, publisher)
            watching.execute("SELECT count(*), count(parked_at) FROM outbox_messages"
                             " WHERE correlation_id = ANY(%s)", ([str(o) for o in ours],))
            left, still_parked = watching.fetchone()
            ours_left.append(left)
            ours_parked.append(still_parked)

        # (Any other test's parked rows handed back too, before these: written earlier.)
        unparked = _parked_command_looked_at_between_batches(
            url, ["replay", "orders", "--outbox", "--all"],
            "UPDATE outbox_messages SET parked_at = NULL", relay_then_count_ours)
        assert capsys.readouterr().out == (
            f"orders outbox: {sum(unparked)} message(s) handed back to be sent\n")
        assert max(unparked) <= 2, unparked
        # Ours went two at a time (5 parked: 3 batches at least), each two handed back for good
        # (committed) before the next; and the relay, run before each batch, had sent some of
        # them (the first batch's at least) before the last batch was handed back.
        assert len(ours_parked) >= 3 and ours_parked[0] == 5, ours_parked
        assert all(0 <= there - after_it <= 2
                   for there, after_it in zip(ours_parked, ours_parked[1:])), ours_parked
        assert ours_left[-1] < ours_left[0], ours_left
        _relay_all(publisher)
        db.session.rollback()
        (left,) = _outbox_rows_for(ours)  # parked again, once: handed back once
        assert left.correlation_id == str(still_too_large) and left.parked_at is not None
        assert left.attempts == 2
        # Each key's messages read up to a message placed after all this, on its partition: a
        # row sent twice would be read twice before it. (But the parked row's key: held back.)
        sentinels = [_place(user, "9.00").id for user in users if user != users[2]]
        _relay_all(publisher)
        wanted = {str(order_id) for order_id in [*ours, *sentinels]}
        read = read_topic_until(
            settings.kafka_bootstrap_servers, settings.topic_payment_requested,
            lambda messages: {str(s) for s in sentinels} <= _correlation_ids(messages, wanted))
        published = Counter(json.loads(m.value())["correlation_id"] for m in read
                            if json.loads(m.value()).get("correlation_id") in wanted)
        assert published == Counter({str(order_id): 1 for order_id in [*ours, *sentinels]
                                     if order_id != still_too_large})
        first_users = [json.loads(m.value())["payload"]["amount"] for m in read
                       if json.loads(m.value()).get("correlation_id") in {str(firsts[0]),
                                                                          str(behind)}]
        assert first_users == ["1.00", "2.00"]  # (the row behind after the one it waited for)
    finally:
        _delete_outbox_rows_of([*ours, *sentinels])


@dataclasses.dataclass(frozen=True)
class _ParkedInTurn:
    """Rows of a topic of their own, in the order they were written: the first parked, one
    waiting to be sent, the last parked, another waiting; each its message id."""

    topic: str
    first: uuid.UUID
    written_before: uuid.UUID  # (before the last parked)
    last_parked: uuid.UUID
    written_after: uuid.UUID


@contextmanager
def _rows_parked_in_turn(name: str, event_type: str) -> Iterator[_ParkedInTurn]:
    """_ParkedInTurn's rows, of `event_type`, on a topic named after `name`; every row of the
    topic deleted after."""
    topic = f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        yield _ParkedInTurn(topic, *(_outbox_row(topic, event_type, uuid.uuid4(), parked=parked)
                                     for parked in (True, False, True, False)))
    finally:
        _delete_the_outbox_rows_of_topic(topic)


def _parked_by_id(topic: str) -> dict[uuid.UUID, bool]:
    """Whether each outbox row of `topic` is parked, by message id, as a new transaction of
    db.session reads them."""
    db.session.rollback()
    return dict(db.session.execute(
        select(OutboxMessage.message_id, OutboxMessage.parked_at.is_not(None))
        .where(OutboxMessage.topic == topic)).all())


def _delete_the_outbox_rows_of_topic(topic: str) -> None:
    with transaction() as session:
        session.execute(delete(OutboxMessage).where(OutboxMessage.topic == topic))


def test_replaying_every_parked_row_leaves_those_parked_meanwhile_for_the_next_run(
        in_orders, settings, capsys, monkeypatch):
    """`replay --outbox --all` hands back the rows parked as it begins, up to the last written of
    them: a row parked (by a relay) as the first batch is handed back is left parked, for the next
    run, whether written after that last one or before it (the command's bound, read as it begins,
    as discard's, holds the database's clock then). Before, the bound was the last parked row's id
    alone, and a row written before it and parked meanwhile was handed back in a later batch."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 1)
    with _rows_parked_in_turn("replayed-meanwhile", PAYMENT_REQUESTED) as rows:
        # (Any other test's parked rows handed back too.)
        _parked_command_with_rows_parked_meanwhile(
            settings.database_url("orders"), ["replay", "orders", "--outbox", "--all"],
            "UPDATE outbox_messages SET parked_at = NULL",
            [rows.written_before, rows.written_after])
        assert "message(s) handed back to be sent" in capsys.readouterr().out
        assert _parked_by_id(rows.topic) == {rows.first: False, rows.written_before: True,
                                             rows.last_parked: False, rows.written_after: True}


def test_a_discard_confirmed_on_a_terminal_leaves_the_rows_parked_while_it_asked(in_orders,
                                                                                settings):
    """`discard --outbox --all` on a terminal discards the rows it counted as it asked and no
    more: a row parked while the question waits is left parked, and said to be, whether written
    after the last parked row or before it. Before, the bound was the last parked row's id alone,
    and a row written before it and parked meanwhile was discarded, never counted nor confirmed."""
    from tasks import parked

    assert parked.main(["discard", "orders", "--outbox", "--all", "--yes"]) == 0  # (others')
    with _rows_parked_in_turn("parked-while-asked", ORDER_STATUS_CHANGED) as rows:
        discarded_all_confirmed_leaving_some_parked(
            settings, "orders", outbox=True, counted=2,
            while_it_asks=lambda: committed_on_a_connection_of_its_own(  # (as a relay parks)
                settings.database_url("orders"),
                "UPDATE outbox_messages SET attempts = 1, parked_at = now()"
                " WHERE message_id = ANY(CAST(%s AS uuid[]))",
                ([str(rows.written_before), str(rows.written_after)],)))
        still_there = _parked_by_id(rows.topic)
        assert still_there == {rows.written_before: True, rows.written_after: True}
        assert rows.first not in still_there and rows.last_parked not in still_there


def test_a_discard_confirmed_on_a_terminal_leaves_a_row_parked_before_it_counted_uncommitted(
        in_orders, settings):
    """`discard --outbox --all` on a terminal discards the very rows its count saw parked: a row
    written before the last parked one, stamped parked before the count by a transaction that
    committed only once the count was done, was not counted, and is left parked, and said to be.
    Before, the discard took every row written up to the last parked and stamped parked by the
    database's clock as it counted: that row too, never counted nor confirmed."""
    from tasks import parked

    assert parked.main(["discard", "orders", "--outbox", "--all", "--yes"]) == 0  # (others')
    topic = f"parked-uncommitted-{uuid.uuid4().hex[:8]}"
    written_before = _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=False)
    _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=True)  # (the last parked)
    parking = psycopg2.connect(driver_dsn(settings.database_url("orders")))
    try:
        with parking.cursor() as cursor:
            cursor.execute("UPDATE outbox_messages SET attempts = 1, parked_at = clock_timestamp()"
                           " WHERE message_id = %s", (str(written_before),))
        discarded_all_confirmed_leaving_some_parked(settings, "orders", outbox=True, counted=1,
                                                    while_it_asks=parking.commit)
        assert _parked_by_id(topic) == {written_before: True}
    finally:
        parking.rollback()
        parking.close()
        _delete_the_outbox_rows_of_topic(topic)


def test_a_named_row_parked_while_a_discard_asked_is_left_parked_and_said_to_be(in_orders,
                                                                                settings):
    """`discard --outbox ID ID` on a terminal discards the named rows it counted as it asked: one
    not parked then, and parked while the question waits, is left parked, unconfirmed, and said
    to be (it was said "not parked, unknown")."""
    topic = f"named-parked-while-asked-{uuid.uuid4().hex[:8]}"
    counted = _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=True)
    parked_meanwhile = _outbox_row(topic, ORDER_STATUS_CHANGED, uuid.uuid4(), parked=False)
    try:
        discarded_named_confirmed_leaving_one_parked(
            settings, "orders", outbox=True, counted=counted, parked_meanwhile=parked_meanwhile,
            while_it_asks=lambda: committed_on_a_connection_of_its_own(
                settings.database_url("orders"),
                "UPDATE outbox_messages SET attempts = 1, parked_at = now() WHERE message_id = %s",
                (str(parked_meanwhile),)))
        assert _parked_by_id(topic) == {parked_meanwhile: True}
    finally:
        _delete_the_outbox_rows_of_topic(topic)


def _correlation_ids(messages, wanted: set[str]) -> set[str]:
    """The correlation ids among `wanted` of the messages (other tests send bare envelopes)."""
    return {json.loads(m.value()).get("correlation_id") for m in messages} & wanted


def _renamed_away(settings) -> str:
    """A topic the shop no longer names: its setting renamed since rows were written to it."""
    return f"{settings.topic_payment_requested}-before-its-rename-{uuid.uuid4().hex[:8]}"


def _parked_rows_for_their_topic(settings, user_id: str):
    """Orders whose outbox rows name a topic the shop does not use, relayed: a first one of a
    user's, parked, two after it of the same key, waiting behind it, and a row of no key, parked
    too; yields (old topic, parked order, the orders behind it, the keyless one)."""
    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    old_topic = _renamed_away(settings)
    first = _place(user_id, "1.00").id
    behind = [_place(user_id, amount).id for amount in ("2.00", "3.00")]
    keyless = _place(f"{user_id}-keyless", "4.00").id
    _send_to(old_topic, [first, *behind])
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("UPDATE outbox_messages SET topic = %s, key = NULL WHERE correlation_id"
                       " = %s", (old_topic, str(keyless)))
    _relay_all(publisher)
    db.session.rollback()
    return old_topic, first, behind, keyless


def test_a_row_naming_a_topic_the_shop_does_not_use_is_parked_not_sent_and_holds_back_its_key(
        in_orders, settings, user_id):
    """A row written under a TOPIC_* setting since renamed is parked, never produced (sent, it
    went to a topic no consumer of the shop reads, the broker creating it; with topics not made
    on first use it timed out, every try holding up its batch, for ever), with its reason; the
    rows of its key wait behind it, and every other row goes at once."""
    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)
    old_topic = _renamed_away(settings)
    first = _place(user_id, "1.00").id
    behind = _place(user_id, "2.00").id
    other = _place(f"{user_id}-other", "5.00").id
    _send_to(old_topic, [first, behind])
    try:
        started = time.monotonic()
        results = _relay_all(publisher)
        assert time.monotonic() - started < 2  # (no message timeout waited for)
        assert sum(result.parked for result in results) == 1
        assert sum(result.refused_by_the_broker for result in results) == 0
        db.session.rollback()
        assert _outbox_rows_for([other]) == [] and _messages_of(settings, [other])
        parked, waiting = _outbox_rows_for([first, behind])
        assert parked.parked_at is not None and parked.topic == old_topic
        assert parked.last_error.startswith("not sent: its topic is unknown")
        assert f"(Its topic {old_topic!r};" in parked.last_error
        assert "replay orders --outbox --to-topic TOPIC ID" in parked.last_error
        assert waiting.parked_at is None and "held back behind" in waiting.last_error
        assert sum(result.claimed for result in _relay_all(publisher)) == 0  # not tried again
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
        assert old_topic not in admin.list_topics(timeout=5).topics  # nothing produced to it
    finally:
        _delete_outbox_rows_of([first, behind, other])


def test_an_operator_sends_rows_parked_for_their_topic_on_to_one_of_the_shops(
        in_orders, settings, user_id, capsys):
    """python -m tasks.parked replay orders --outbox --to-topic TOPIC: a row parked for a topic
    that is not the shop's goes to TOPIC, and the rows of its key waiting behind it with it, in
    their order (not each parked in turn); a row of no key, named, alike. A topic that is not
    the shop's, or --to-topic without --outbox, is refused in a line, nothing changed."""
    from tasks import parked

    old_topic, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    try:
        rows = {row.correlation_id: row for row in _outbox_rows_for([first, *behind, keyless])}
        (first_id, keyless_id) = (rows[str(first)].message_id, rows[str(keyless)].message_id)
        assert rows[str(keyless)].parked_at is not None
        assert parked.main(["list", "orders", "--outbox"]) == 0
        assert f"{first_id}  PaymentRequested  {old_topic}" in capsys.readouterr().out

        for wrong, said in ((["--outbox", "--to-topic", old_topic], "topics orders writes to"),
                            (["--to-topic", settings.topic_payment_requested], "give --outbox")):
            with pytest.raises(SystemExit) as exited:
                parked.main(["replay", "orders", *wrong, str(first_id)])
            assert exited.value.code == 2 and said in capsys.readouterr().err
        db.session.rollback()
        assert _outbox_rows_for([first])[0].parked_at is not None  # nothing changed

        to = settings.topic_payment_requested
        assert parked.main(["replay", "orders", "--outbox", "--to-topic", to, str(first_id),
                            str(keyless_id)]) == 0
        assert capsys.readouterr().out.strip() == (
            f"orders outbox: 2 message(s) handed back to be sent to {to}{SENT_ON_IN_ORDER}")
        assert sum(result.parked for result in _relay_all(OutboxPublisher(settings, "orders"))) == 0
        db.session.rollback()
        assert _outbox_rows_for([first, *behind, keyless]) == []
        messages = _messages_of(settings, [first, *behind, keyless])
        mine = [json.loads(m.value())["payload"]["amount"] for m in messages
                if m.key() == user_id.encode()]
        assert mine == ["1.00", "2.00", "3.00"]
    finally:
        _delete_outbox_rows_of([first, *behind, keyless])


# What `replay --to-topic` says of the order its rows arrive in (README: Outbox relay).
SENT_ON_IN_ORDER = (", with the rows behind them in their order, after the rows of their keys sent"
                    " to it under its name while they were parked")


def test_rows_are_sent_on_only_to_a_topic_their_service_writes_their_events_to(
        in_orders, settings, user_id, capsys):
    """--to-topic takes a topic the service writes to, and rows (the named ones, or under --all
    those of the old topic, and the rows behind them) of the events it writes there: orders' rows
    sent on to payments' results, which orders reads itself, or a PaymentRequested to orders'
    status changes, would hand consumers events they never take. Refused in a line, exit 2,
    nothing changed; then sent where they go."""
    from tasks import parked

    old_topic, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    try:
        rows = {row.correlation_id: row for row in _outbox_rows_for([first, *behind, keyless])}
        first_id = str(rows[str(first)].message_id)
        for asked, said in (
                ([settings.topic_payment_results, first_id],
                 f"{settings.topic_payment_results!r} is none of the topics orders writes to"),
                ([settings.topic_payment_results, "--all"], "none of the topics orders writes"),
                ([settings.topic_order_status_changed, first_id],
                 f"rows to be sent on to {settings.topic_order_status_changed} hold"
                 " PaymentRequested events, which do not go there"),
                ([settings.topic_order_status_changed, "--all"], "hold PaymentRequested events")):
            with pytest.raises(SystemExit) as exited:
                parked.main(["replay", "orders", "--outbox", "--to-topic", *asked])
            assert exited.value.code == 2 and said in capsys.readouterr().err, asked
        with pytest.raises(SystemExit) as exited:
            parked.main(["replay", "payments", "--outbox", "--to-topic",
                         settings.topic_payment_requested, first_id])
        assert exited.value.code == 2 and "none of the topics payments writes to" in (
            capsys.readouterr().err)
        db.session.rollback()
        assert [(row.topic, row.parked_at is not None)
                for row in _outbox_rows_for([first, *behind])] == [
            (old_topic, True), (old_topic, False), (old_topic, False)]  # nothing changed

        assert parked.main(["replay", "orders", "--outbox", "--to-topic",
                            settings.topic_payment_requested, first_id]) == 0
        _relay_all(OutboxPublisher(settings, "orders"))
        db.session.rollback()
        assert _outbox_rows_for([first, *behind]) == []
    finally:
        _delete_outbox_rows_of([first, *behind, keyless])


def test_a_newer_releases_row_parked_by_a_relay_of_the_release_before_is_replayed_as_it_is(
        in_orders, settings, user_id, capsys):
    """In a rolling upgrade a relay of the release before, which does not know a topic the new
    release writes to, parks its rows, telling the operator both ways out for this service (not
    a SERVICE to fill in). Once the relays know it, the topic is the shop's: `--to-topic` refuses
    the row saying so, and to replay it without; plain `replay --outbox` hands it back, and it
    goes to its topic, the rows behind it after it, in order."""
    from tasks import parked

    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)
    new_topic = settings.topic_payment_requested
    release_before = OutboxPublisher(settings, "orders", topics=[
        topic for topic in settings.relayed_topics() if topic != new_topic])
    orders = [_place(user_id, amount).id for amount in ("1.00", "2.00", "3.00")]
    try:
        assert sum(result.parked for result in _relay_all(release_before)) == 1
        db.session.rollback()
        first, *_ = _outbox_rows_for(orders)
        assert first.parked_at is not None and first.topic == new_topic
        assert "replay orders --outbox --to-topic TOPIC ID" in first.last_error
        assert "upgrade: python -m tasks.parked replay orders --outbox ID." in first.last_error

        assert parked.main(["replay", "orders", "--outbox", "--to-topic", new_topic,
                            str(first.message_id)]) == 1
        said = capsys.readouterr()
        assert said.err.strip() == (
            f"{first.message_id}: not replayed (parked for a topic that is now the shop's"
            f" ({new_topic}): replay it without --to-topic)")
        assert parked.main(["replay", "orders", "--outbox", "--to-topic", new_topic,
                            str(uuid.uuid4())]) == 1
        assert "no such outbox row" in capsys.readouterr().err

        assert parked.main(["replay", "orders", "--outbox", str(first.message_id)]) == 0
        assert sum(result.parked for result in _relay_all(publisher)) == 0
        db.session.rollback()
        assert _outbox_rows_for(orders) == []
        amounts = [json.loads(m.value())["payload"]["amount"]
                   for m in _messages_of(settings, orders) if m.key() == user_id.encode()]
        assert amounts == ["1.00", "2.00", "3.00"]
    finally:
        _delete_outbox_rows_of(orders)


def test_replay_all_to_a_topic_sends_on_the_rows_of_one_topic_not_the_shops_only(
        in_orders, settings, user_id, capsys):
    """--all --to-topic takes the rows parked for one topic that is not the shop's; with rows
    parked for two such topics it is refused, naming them (the rows of two renamed settings
    must not end on one topic), and a row parked for its size is never sent on so."""
    from tasks import parked

    old_topic, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    other_user = f"{user_id}-two"
    other_old_topic, *other_orders = _parked_rows_for_their_topic(settings, other_user)
    other_ids = [other_orders[0], *other_orders[1], other_orders[2]]
    too_large = _place(f"{user_id}-large").id
    _make_too_large(too_large)
    _relay_all(OutboxPublisher(settings, "orders"))
    to = settings.topic_payment_requested
    try:
        with pytest.raises(SystemExit) as exited:
            parked.main(["replay", "orders", "--outbox", "--all", "--to-topic", to])
        assert exited.value.code == 2
        assert old_topic in capsys.readouterr().err
        _delete_outbox_rows_of(other_ids)

        assert parked.main(["replay", "orders", "--outbox", "--all", "--to-topic", to]) == 0
        assert capsys.readouterr().out.strip() == (
            f"orders outbox: 2 message(s) handed back to be sent to {to}{SENT_ON_IN_ORDER}")
        _relay_all(OutboxPublisher(settings, "orders"))
        db.session.rollback()
        assert _outbox_rows_for([first, *behind, keyless]) == []
        (large,) = _outbox_rows_for([too_large])
        assert large.parked_at is not None and large.attempts == 1  # left alone
        assert other_old_topic != old_topic
    finally:
        _delete_outbox_rows_of([first, *behind, keyless, *other_ids, too_large])


@pytest.mark.parametrize("committed", ["parked, under --all", "behind a named row"])
def test_a_row_of_the_old_topic_committed_as_rows_are_sent_on_is_never_moved_unchecked(
        in_orders, settings, user_id, capsys, committed):
    """`replay --to-topic` checks the types of the rows it sends on and moves them as one: a row
    of the old topic and of a type that does not go to TOPIC, committed by another transaction
    right after the command's statement that checks and moves them began (parked by a relay,
    under --all; or written behind a named row by a process of the release before), is left
    where it is, not sent on unchecked (as a check and then a move, two statements, the move took
    it)."""
    from tasks import parked

    old_topic, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    rows = {row.correlation_id: row for row in _outbox_rows_for([first, *behind, keyless])}
    under_all = committed.startswith("parked")
    like = rows[str(keyless if under_all else behind[-1])].message_id  # parked, or waiting
    stray = str(uuid.uuid4())
    to = settings.topic_payment_requested
    try:
        with called_at_the_first_statement_naming(
                "WITH chosen AS", before=False,
                call=lambda: _commit_a_row_of_another_type_like(settings, like, stray)) as inserted:
            asked = ["--all"] if under_all else [str(rows[str(first)].message_id)]
            assert parked.main(["replay", "orders", "--outbox", "--to-topic", to, *asked]) == 0
        assert inserted, "no row committed: the statement looked for was not run"
        assert capsys.readouterr().out.strip() == (
            f"orders outbox: {2 if under_all else 1} message(s) handed back to be sent to"
            f" {to}{SENT_ON_IN_ORDER}")
        db.session.rollback()
        (left,) = _outbox_rows_for([stray])
        assert (left.type, left.topic, left.parked_at is not None) == (
            ORDER_STATUS_CHANGED, old_topic, under_all)
    finally:
        _delete_outbox_rows_of([first, *behind, keyless, stray])


def _commit_a_row_of_another_type_like(settings, like: uuid.UUID, correlation_id: str) -> None:
    """Commit, on a connection of its own, a row like the row `like` (its topic, key, park) but of
    ORDER_STATUS_CHANGED events, its correlation id `correlation_id`: as a row written with it
    (behind it, when `like` is a parked row's or one waiting behind one)."""
    assert committed_on_a_connection_of_its_own(
        settings.database_url("orders"),
        "INSERT INTO outbox_messages (message_id, topic, key, type, correlation_id, envelope,"
        " attempts, last_error, parked_at)"
        " SELECT %s, topic, key, %s, %s, envelope, attempts, last_error, parked_at"
        " FROM outbox_messages WHERE message_id = %s",
        (str(uuid.uuid4()), ORDER_STATUS_CHANGED, correlation_id, str(like))) == 1


def _outbox_rows_as_read(order_ids) -> list[tuple]:
    """(correlation id, topic, parked_at, attempts) of the orders' outbox rows, in the order they
    were written, as db.session's transaction reads them now (no ORM object it holds stands in)."""
    return [tuple(row) for row in db.session.execute(text(
        "SELECT correlation_id, topic, parked_at, attempts FROM outbox_messages"
        " WHERE correlation_id = ANY(:ids) ORDER BY id"),
        {"ids": [str(order_id) for order_id in order_ids]})]


@dataclasses.dataclass(frozen=True)
class StrayBehindParked:
    """Parked rows for their topic, and a row of another type committed behind the first."""

    rows: dict  # the outbox rows, by order id
    first: uuid.UUID  # the order whose row is parked first
    keyless: uuid.UUID  # the order whose parked row has no key
    orders: list  # every order, the stray row's last
    before: list  # the orders' rows as read before the test's command (_outbox_rows_as_read)


@contextmanager
def _a_stray_row_behind_parked_ones(settings, user_id: str) -> Iterator[StrayBehindParked]:
    """An OrderStatusChanged row committed behind the parked rows of _parked_rows_for_their_topic;
    every row deleted after."""
    _, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    rows = {row.correlation_id: row for row in _outbox_rows_for([first, *behind, keyless])}
    stray = str(uuid.uuid4())
    orders = [first, *behind, keyless, stray]
    try:
        _commit_a_row_of_another_type_like(settings, rows[str(behind[-1])].message_id, stray)
        db.session.rollback()
        yield StrayBehindParked(rows, first, keyless, orders, _outbox_rows_as_read(orders))
    finally:
        db.session.rollback()
        _delete_outbox_rows_of(orders)


@pytest.mark.parametrize("asked", ["a named row", "--all"])
def test_rows_are_not_sent_on_when_a_row_waiting_behind_one_is_of_a_type_that_does_not_go_there(
        in_orders, settings, user_id, capsys, asked):
    """The rows waiting behind a parked row (its topic and key, written after it) go with it, so
    their types are checked too: an OrderStatusChanged behind a parked PaymentRequested, sent on
    to payment-requested, has the command refused, exit 2, naming its type, every row left as it
    was, the parked one named or under --all."""
    from tasks import parked

    to = settings.topic_payment_requested
    with _a_stray_row_behind_parked_ones(settings, user_id) as setup:
        old_topic = setup.before[0][1]
        assert [(topic, parked_at is not None) for _, topic, parked_at, _ in setup.before] == [
            (old_topic, True), (old_topic, False), (old_topic, False), (old_topic, True),
            (old_topic, False)]  # the stray row waits behind the first, not parked
        named = [str(setup.rows[str(setup.first)].message_id)]
        with pytest.raises(SystemExit) as exited:
            parked.main(["replay", "orders", "--outbox", "--to-topic", to,
                         *(["--all"] if asked == "--all" else named)])
        assert exited.value.code == 2
        assert (f"rows to be sent on to {to} hold {ORDER_STATUS_CHANGED} events, which do not go"
                " there") in capsys.readouterr().err
        db.session.rollback()
        assert _outbox_rows_as_read(setup.orders) == setup.before


def test_a_redirect_refused_for_a_type_moves_no_row_even_within_its_own_transaction(
        in_orders, settings, user_id):
    """redirect_parked_outbox_messages raising NotOfTheTopic has moved no row, not even as its
    caller's transaction, still open, sees them: neither the parked rows nor the rows waiting
    behind them (the command rolls back on the refusal; the statement's two updates are each
    done only when no row is of a type that does not go to the topic)."""
    to = settings.topic_payment_requested
    with _a_stray_row_behind_parked_ones(settings, user_id) as setup:
        with pytest.raises(NotOfTheTopic) as refused:
            redirect_parked_outbox_messages(
                db.session, [setup.rows[str(order)].message_id
                             for order in (setup.first, setup.keyless)],
                to, settings.relayed_topics(), published_events(settings)[to])
        assert refused.value.event_types == [ORDER_STATUS_CHANGED]
        assert _outbox_rows_as_read(setup.orders) == setup.before  # in the same transaction


@contextmanager
def _parked_one_a_key_with_rows_behind(settings, parked_count: int,
                                       behind_each: int) -> Iterator[tuple[str, list[str]]]:
    """`parked_count` rows parked for a topic that is not the shop's, each of a key of its own,
    with `behind_each` rows of its key waiting behind it; yields their topic and keys, and
    deletes every row of those keys after."""
    topic, keys = _renamed_away(settings), [uuid.uuid4().hex for _ in range(parked_count)]
    insert = ("INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,"
              " parked_at) SELECT gen_random_uuid(), :topic, key, 'PaymentRequested', '{}',"
              " :attempts, CASE WHEN :attempts > 0 THEN now() END FROM unnest(CAST(:keys AS"
              " text[])) AS key")
    try:
        with transaction() as session:
            session.execute(text(insert), {"topic": topic, "keys": keys, "attempts": 1})
            for _ in range(behind_each):
                session.execute(text(insert), {"topic": topic, "keys": keys, "attempts": 0})
        with transaction() as session:
            # The statistics autovacuum would take: with them, the planner estimates the parked
            # rows chosen at one (without any, on a table new to it, it may guess otherwise).
            session.execute(text("ANALYZE outbox_messages"))
        yield topic, keys
    finally:
        with transaction() as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.key.in_(keys)))


def test_sending_parked_rows_on_walks_the_rows_behind_them_once_not_once_a_parked_row(
        in_orders, settings):
    """`replay --all --to-topic` finds the rows waiting behind the parked rows it sends on in one
    walk: matched to each parked row in a join the planner made a nested loop of (it estimates
    the parked rows at one), they were read once a parked row, both to check their types and to
    move them, and 1,000 parked with 999,000 behind ran past the statement timeout, nothing sent
    on. Measured by the rows its transaction read (pg_stat_xact_user_tables), not by a clock."""
    parked_count, behind_each = 40, 50
    to = settings.topic_payment_requested
    with _parked_one_a_key_with_rows_behind(settings, parked_count, behind_each) as (topic, keys):
        with transaction() as session:
            in_the_table = session.scalar(text("SELECT count(*) FROM outbox_messages"))
        with transaction() as session:
            read_before = _outbox_rows_read(session)
            sent_on = redirect_parked_outbox_messages(
                session, None, to, settings.relayed_topics(), published_events(settings)[to],
                from_topic=topic)
            read = _outbox_rows_read(session) - read_before
        assert len(sent_on) == parked_count
        with transaction() as session:
            assert session.execute(text(
                "SELECT topic, count(*), count(parked_at) FROM outbox_messages"
                " WHERE key = ANY(:keys) GROUP BY topic"), {"keys": keys}).all() == [
                (to, parked_count * (1 + behind_each), 0)]
        # The parked rows read, the rows behind them walked once, each then moved by its id:
        # about twice the table. Matched a parked row at a time, they were read 80 times over.
        assert read <= 5 * in_the_table, (read, in_the_table)


def test_sending_on_that_runs_too_long_says_to_name_fewer_rows(in_orders, settings, capsys):
    """Its rows, and every row behind them, go in one statement: one that runs past
    statement_timeout (here 1 ms, set for it alone) changes nothing, and the command says to name
    fewer rows at a time, exit 1."""
    from tasks import parked

    def with_a_short_timeout(connection, cursor, statement, parameters, context, executemany):
        if "WITH chosen AS" in statement:
            cursor.execute("SET LOCAL statement_timeout = '1ms'")

    to = settings.topic_payment_requested
    with _parked_one_a_key_with_rows_behind(settings, 40, 50) as (topic, keys):
        event.listen(Engine, "before_cursor_execute", with_a_short_timeout)
        try:
            assert parked.main(["replay", "orders", "--outbox", "--all", "--to-topic", to]) == 1
        finally:
            event.remove(Engine, "before_cursor_execute", with_a_short_timeout)
        assert capsys.readouterr().err == (
            "orders outbox: nothing handed back to be sent: a statement ran too long"
            " (QueryCanceled: canceling statement due to statement timeout); name fewer rows to"
            " send on at a time (list orders --outbox shows them, with how many rows wait behind"
            " each): each goes with the rows behind it, all in one statement\n")
        with transaction() as session:
            assert session.execute(text(
                "SELECT topic, count(parked_at) FROM outbox_messages WHERE key = ANY(:keys)"
                " GROUP BY topic"), {"keys": keys}).all() == [(topic, 40)]


def test_a_row_committed_behind_a_parked_row_while_the_command_waits_for_its_lock_stays_put(
        in_orders, settings, user_id, capsys):
    """`replay --to-topic` waiting for a parked row another transaction holds locked reads the
    table, once it has the lock, through the snapshot it began with: a row of a type that does
    not go to TOPIC committed behind the parked row meanwhile is neither checked nor moved, and
    stays on the old topic; the parked row and the rows behind it as it began go on."""
    from tasks import parked

    old_topic, first, behind, keyless = _parked_rows_for_their_topic(settings, user_id)
    rows = {row.correlation_id: row for row in _outbox_rows_for([first, *behind, keyless])}
    first_id = rows[str(first)].message_id
    stray = str(uuid.uuid4())
    to = settings.topic_payment_requested
    url = settings.database_url("orders")
    outcome: list = []

    def run_the_command() -> None:
        try:
            outcome.append(parked.main(["replay", "orders", "--outbox", "--to-topic", to,
                                        str(first_id)]))
        except SystemExit as exited:
            outcome.append(f"exit {exited.code}")

    holder = psycopg2.connect(driver_dsn(url))
    command = threading.Thread(target=run_the_command)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT FROM outbox_messages WHERE message_id = %s FOR UPDATE",
                           (str(first_id),))
        command.start()
        # (What follows, within the command's lock_timeout, SESSION_LIMITS' 2 s: past it, the
        # command gives up, exit 1.)
        wait_for_sessions_waiting_on_a_lock(url, timeout=10,
                                            what="the command to wait for the parked row")
        _commit_a_row_of_another_type_like(settings, rows[str(behind[-1])].message_id, stray)
        holder.rollback()
        command.join(30)
        assert not command.is_alive() and outcome == [0]
        assert capsys.readouterr().out.strip() == (
            f"orders outbox: 1 message(s) handed back to be sent to {to}{SENT_ON_IN_ORDER}")
        db.session.rollback()
        assert [(correlation_id, topic, parked_at is not None) for correlation_id, topic,
                parked_at, _ in _outbox_rows_as_read([first, *behind, keyless, stray])] == [
            (str(first), to, False), *[(str(order), to, False) for order in behind],
            (str(keyless), old_topic, True), (stray, old_topic, False)]
    finally:
        holder.close()  # (its transaction, if still open, rolled back)
        if command.is_alive():
            command.join(30)
        _delete_outbox_rows_of([first, *behind, keyless, stray])


# A topic name the broker refuses every message for ("Broker: Invalid topic"), at once: as it would
# a topic the relay may not write to. A relay sends only to the shop's topics (a row naming another
# is parked, not produced): _refusing_publisher's takes it for one of them.
REFUSED_TOPIC = "no topic can be named this!"


def _refusing_publisher(settings) -> OutboxPublisher:
    """A publisher that sends to REFUSED_TOPIC as to one of the shop's topics, for the broker to
    refuse."""
    return OutboxPublisher(settings, "orders", topics=[*settings.topics(), REFUSED_TOPIC])


def _send_to(topic: str, order_ids, key: str | None = None) -> None:
    """Have the orders' outbox rows go to `topic` (and with `key`, when given)."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("UPDATE outbox_messages SET topic = %s, key = coalesce(%s, key)"
                       " WHERE correlation_id = ANY(%s)",
                       (topic, key, [str(order_id) for order_id in order_ids]))


def _due_now(order_ids) -> None:
    """Have the orders' outbox rows waiting for their next try tried at the next read."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("UPDATE outbox_messages SET next_attempt_at = now()"
                       " WHERE correlation_id = ANY(%s) AND next_attempt_at IS NOT NULL",
                       ([str(order_id) for order_id in order_ids],))


def test_rows_the_broker_refuses_wait_for_their_next_try_and_the_rows_behind_them_go_on(
        in_orders, settings, user_id, monkeypatch):
    """Refused rows at the head of the table, a batch of them and more, do not stop the relay:
    each waits for its next try, longer after each refusal, and the next read passes over it,
    so that the rows of other keys behind it go out meanwhile."""
    # (a loaded machine)
    monkeypatch.setattr("shared.outbox.relaying.FIRST_RETRY_AFTER_SECONDS", 10.0)
    publisher = _refusing_publisher(settings)
    _relay_all(publisher)  # whatever earlier tests left behind
    refused = [_place(f"{user_id}-{n}", "1.00").id for n in range(3)]
    healthy = _place(user_id, "2.00").id
    _send_to(REFUSED_TOPIC, refused)
    try:
        first, second = _relay_once(publisher, 2), _relay_once(publisher, 2)
        assert (first.claimed, first.sent, first.refused_by_the_broker) == (2, 0, 2)
        assert (second.claimed, second.sent, second.refused_by_the_broker) == (2, 1, 1)
        assert _relay_once(publisher, 2).claimed == 0  # none is tried before its time
        db.session.rollback()
        assert _outbox_rows_for([healthy]) == []
        assert _messages_of(settings, [healthy])
        rows = _outbox_rows_for(refused)
        assert [row.attempts for row in rows] == [1, 1, 1]
        assert all("Invalid topic" in row.last_error for row in rows)
        now = db.session.scalar(select(func.now()))
        assert all(row.next_attempt_at > now for row in rows)

        _due_now(refused)
        assert _relay_once(publisher, 5).refused_by_the_broker == 3
        db.session.rollback()
        waits = [row.next_attempt_at - now for row in _outbox_rows_for(refused)]
        assert all(wait.total_seconds() >= 2 * FIRST_RETRY_AFTER_SECONDS for wait in waits)
    finally:
        _delete_outbox_rows_of(refused)


def test_the_later_rows_of_a_refused_rows_key_wait_with_it_and_then_go_with_it_in_order(
        in_orders, settings, user_id):
    """A row the broker refused holds back the later rows with its topic and key while it waits
    for its next try (they must not overtake it), however many reads pass meanwhile; once its
    time has come, they are read with it, and go in order."""
    publisher = _refusing_publisher(settings)
    _relay_all(publisher)
    first, *behind = [_place(user_id, amount).id for amount in ("1.00", "2.00", "3.00")]
    same_key = str(first)
    _send_to(REFUSED_TOPIC, [first, *behind], key=same_key)
    try:
        assert _relay_once(publisher, 1).refused_by_the_broker == 1
        assert _relay_once(publisher, 5).claimed == 0  # it waits, and the rows behind it
        db.session.rollback()
        assert [row.attempts for row in _outbox_rows_for([first, *behind])] == [1, 0, 0]

        _send_to(settings.topic_payment_requested, [first, *behind])  # the topic mended
        _due_now([first])
        assert [_relay_once(publisher, 5).sent for _ in range(2)] == [3, 0]
        messages = _messages_of(settings, [first, *behind])
        assert {m.key().decode() for m in messages} == {same_key}
        assert [json.loads(m.value())["payload"]["amount"] for m in messages] == [
            "1.00", "2.00", "3.00"]
    finally:
        _delete_outbox_rows_of([first, *behind])


def _make_too_large(order_id) -> None:
    """Give the order's outbox row a message over the producer's message.max.bytes (1 MB)."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("UPDATE outbox_messages SET envelope = json_build_object('padding',"
                       " repeat('x', 2000000)) WHERE correlation_id = %s", (str(order_id),))


def _delete_outbox_rows_of(order_ids) -> None:
    with transaction() as session:
        session.execute(delete(OutboxMessage).where(
            OutboxMessage.correlation_id.in_([str(order_id) for order_id in order_ids])))


def test_a_leader_kept_from_one_message_by_its_own_producer_does_not_step_down(
        orders_flask_app, user_id, monkeypatch):
    """Only the broker's refusals count towards stepping down: a row the producer itself will
    not take says nothing about this worker's way to the broker, and another leader would fare
    no better. (With no time allowed, a refused batch would be one too many.)"""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 0.0)
    with orders_flask_app.app_context():
        order_id = _place(user_id).id
        _make_too_large(order_id)
    try:
        with _relay_task_leading(), orders_flask_app.app_context():
            def parked():
                db.session.rollback()
                (row,) = _outbox_rows_for([order_id])
                return row.parked_at is not None

            wait_for(parked, timeout=20, what="the leader to park the row")
            later_order_id = _place(f"{user_id}-other").id
            _wait_until_sent([later_order_id])  # a later wake-up, after the parked row's
            assert "orders" in relay._leading and "orders" not in relay._sitting_out
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([order_id])


def test_the_leader_reminds_of_parked_rows_as_it_starts_and_then_every_while(
        orders_flask_app, settings, user_id, monkeypatch, caplog):
    monkeypatch.setattr("shared.parked_reminder.PARKED_REMINDER_SECONDS", 0.2)
    with orders_flask_app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))
        order_id = _place(user_id).id
        _make_too_large(order_id)
        _relay_all(OutboxPublisher(settings, "orders"))  # parked, before the leader starts
    try:
        with _relay_task_leading():
            def reminded_twice() -> bool:
                return sum("message(s) parked" in record.getMessage()
                           for record in caplog.records) >= 2

            wait_for(reminded_twice, timeout=10, what="two reminders of the parked row")
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([order_id])


def test_a_worker_shut_down_without_a_signal_ends_its_relay_and_exits(settings, tmp_path):
    """`celery control shutdown` (like a SIGHUP restart) stops a worker without the shutdown
    signal: the relay leading in one of its pool's threads must end all the same, or the pool
    waits for that thread, and the worker never exits."""
    node = f"relay-stop-{uuid.uuid4().hex[:8]}@localhost"
    log_path = tmp_path / "worker.log"

    def celery(*args: str, **options) -> subprocess.Popen:
        # In processes of their own, configured from this layer's environment (this process's
        # Celery app may have been configured by another layer's tests).
        return start_child([sys.executable, "-m", "celery", "-A", "tasks", *args],
                           cwd=Path(__file__).parents[2], **options)

    with open(log_path, "w") as log_file:
        worker = celery("worker", "-Q", worker_queues("orders"), "-n", node, "-P", "threads",
                        "-c", "2", "--without-gossip", "--without-mingle", "-l", "INFO",
                        stdout=log_file, stderr=subprocess.STDOUT)
    try:
        assert celery("call", "hseshop.relay_outbox", "--args", '["orders"]',  # as beat sends it
                      stdout=subprocess.DEVNULL).wait(timeout=60) == 0
        wait_for(lambda: "leading the orders outbox relay" in log_path.read_text(), timeout=60,
                 interval=0.5, what="the worker's relay to lead")
        # (The worker stops without a reply, so the command reports that none came: not checked.)
        celery("control", "shutdown", "-d", node, "--timeout", "1", stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL).wait(timeout=60)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert "orders outbox relay stopping with its worker" in log_path.read_text()


def test_with_the_broker_down_rows_pile_up_with_their_error_and_go_out_when_it_is_back(
        in_orders, settings, run_dir, note_started, user_id):
    port = free_port()
    broker = start_broker(port, run_dir / "relay-broker", on_start=note_started)
    try:
        _rows_pile_up_and_go_out(broker, port, settings, user_id)
    finally:
        broker.stop()  # (the test's own broker, whatever happened)


def _rows_pile_up_and_go_out(broker, port: int, settings, user_id: str) -> None:
    own_settings = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")
    ensure_topics(own_settings, own_settings.topics())  # (a broker of its own)
    publisher = OutboxPublisher(own_settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    broker.stop()
    try:
        orders = [_place(user_id, "1.00") for _ in range(3)]
        results = _relay_all(publisher)
        assert results[-1].failed == 3 and results[-1].sent == 0
        db.session.rollback()
        rows = _outbox_rows_for([o.id for o in orders])
        assert len(rows) == 3 and all(r.attempts >= 1 for r in rows)
        # each row keeps the error the producer reported for its own message
        assert all(r.last_error.startswith("_MSG_TIMED_OUT") for r in rows)
    finally:
        start_and_wait_for_broker(broker, port)
    # Back empty (in memory): the topics made again, as the relay does once refused
    # (tasks.relay._ensure_topics), the producer creating none (shared.kafka.producer_config).
    ensure_topics(own_settings, own_settings.topics())
    results = []

    def all_sent() -> bool:  # each once its wait for the next try is over
        results.extend(_relay_all(publisher))
        db.session.rollback()
        return _outbox_rows_for([o.id for o in orders]) == []

    wait_for(all_sent, timeout=30, interval=0.2, what="the refused rows to go out")
    delivered = read_topic(own_settings.kafka_bootstrap_servers, settings.topic_payment_requested,
                           sum(r.sent for r in results))
    ids = {json.loads(m.value())["correlation_id"] for m in delivered}
    assert {str(o.id) for o in orders} <= ids


def test_relays_taking_turns_to_lead_send_each_row_once(orders_flask_app, settings, user_id):
    """Four relays, each leading for one batch at a time while the others fail to lead."""
    with orders_flask_app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))
        order_ids = [_place(user_id, "1.00").id for _ in range(60)]
    url = settings.database_url("orders")
    nothing_left = threading.Event()

    def relay_in_thread():
        publisher, sent = OutboxPublisher(settings, "orders"), 0
        while not nothing_left.is_set():
            with RelayLeaderConnection(url) as leader:
                if not leader.lead():
                    continue
                with leader.cursor() as cursor:
                    result = relay_pending_outbox(cursor, publisher.send_batch, 7)
            sent += result.sent
            if result.claimed == 0:
                nothing_left.set()
        return sent

    threads = [OutcomeThread(relay_in_thread) for _ in range(4)]
    for t in threads:
        t.start()
    sent_counts = all_joined(threads, 60)
    with orders_flask_app.app_context():
        assert _outbox_rows_for(order_ids) == []
        assert sum(sent_counts) == 60
        # Each sent once: read up to an order sent after them all, on their partition (one user).
        marker = _place(user_id, "1.00").id
        _relay_all(OutboxPublisher(settings, "orders"))
    sent = Counter(json.loads(m.value())["correlation_id"]
                   for m in _messages_of(settings, [*order_ids, marker], read_past=True))
    assert {str(order_id): sent[str(order_id)] for order_id in order_ids} == {
        str(order_id): 1 for order_id in order_ids}


def test_a_batch_sent_whole_is_deleted_by_one_walk_along_the_primary_key(in_orders, settings,
                                                                         user_id):
    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    order_ids = [_place(user_id, "1.00").id for _ in range(5)]
    with transaction() as session, driver_cursor(session) as cursor:
        recording = _RecordingCursor(cursor)
        assert relay_pending_outbox(recording, publisher.send_batch, 100).sent == 5
    read, delete_them = recording.statements
    assert read == CLAIM_ROWS
    assert "BETWEEN" in delete_them and "ANY" not in delete_them
    db.session.rollback()
    assert _outbox_rows_for(order_ids) == []


class _RecordingCursor:
    """A driver cursor that keeps the statements it was given."""

    def __init__(self, cursor):
        self._cursor = cursor
        self.statements: list[str] = []

    def execute(self, statement: str, params=None) -> None:
        self.statements.append(statement)
        self._cursor.execute(statement, params)

    def __getattr__(self, name: str):
        return getattr(self._cursor, name)

    def __enter__(self) -> _RecordingCursor:
        return self

    def __exit__(self, *exc_info) -> None:
        self._cursor.close()


@pytest.mark.parametrize("unsent", ["committed late", "refused"])
def test_a_row_among_a_batchs_rows_that_was_not_sent_is_not_deleted(in_orders, settings,
                                                                      user_id, unsent):
    """The relay deletes the rows sent by walking the primary key from the first to the last
    (shared.outbox.relaying._delete_rows): a row between them that was not sent stays. Committed
    late (its id taken before the rows after it were committed, its commit while the batch was out,
    after the read), it was read by no relay yet; refused, it is tried again."""
    publisher = OutboxPublisher(settings, "orders")
    _relay_all(publisher)  # whatever earlier tests left behind
    before = [_place(user_id, "1.00").id for _ in range(20)]
    late_session = Session(db.engine)
    middle = None
    try:
        middle = service.place_order(late_session, user_id=f"{user_id}-middle",
                                     amount=Decimal("2.00"), description="")
        if unsent == "refused":
            late_session.commit()
        after = [_place(user_id, "3.00").id for _ in range(20)]
        db.session.rollback()
        middle_row = _outbox_rows_for([middle.id])[0] if unsent == "refused" else None

        def send_batch(rows):
            if unsent == "committed late":
                late_session.commit()  # once the rows are read, before they are deleted
                return publisher.send_batch(rows)
            refused = publisher.send_batch([row for row in rows if row[0] != middle_row.id])
            return refused | {middle_row.id: Refusal("refused for the test")}

        with transaction() as session, driver_cursor(session) as cursor:
            result = relay_pending_outbox(cursor, send_batch, 100)
        assert (result.claimed, result.sent) == (40 + (unsent == "refused"), 40)
        db.session.rollback()
        assert _outbox_rows_for([*before, *after]) == []
        assert [row.correlation_id for row in _outbox_rows_for([middle.id])] == [str(middle.id)]
        _due_now([middle.id])  # refused, it would wait for its next try
        _relay_all(publisher)
        assert _messages_of(settings, [middle.id])
    finally:
        late_session.close()
        if middle is not None:
            _delete_outbox_rows_of([middle.id])


def _relay_once_elsewhere(url: str, publisher: OutboxPublisher):
    """One relay run on a leader's connection of its own (the test's session is mid-transaction)."""
    with RelayLeaderConnection(url) as leader:
        assert leader.lead()
        with leader.cursor() as cursor:
            return relay_pending_outbox(cursor, publisher.send_batch, 100)


def test_one_users_orders_placed_at_once_go_out_in_the_order_their_rows_were_written(
        orders_flask_app, settings, user_id):
    """Two tabs: the second order waits for the first's transaction (a lock per user), so its
    PaymentRequested row cannot commit, and a relay cannot send it, ahead of the first's, which
    has the lower id. Without the lock, the relay run meanwhile sent the second alone, first."""
    url = settings.database_url("orders")
    publisher = OutboxPublisher(settings, "orders")
    second: dict[str, object] = {}

    def place_the_second():
        try:
            with orders_flask_app.app_context(), transaction() as session:
                # (The shop's 2 s lock limit is for requests; this one waits out the test's steps.)
                session.execute(text("SET LOCAL lock_timeout = '30s'"))
                second["order"] = service.place_order(session, user_id=user_id,
                                                      amount=Decimal("2.00"), description="")
        except Exception as exc:  # shown by the assertion below, not lost with the thread
            second["error"] = exc

    with orders_flask_app.app_context():
        _relay_all(publisher)
        placing = threading.Thread(target=place_the_second)
        with transaction() as session:
            first = service.place_order(session, user_id=user_id, amount=Decimal("1.00"),
                                        description="")
            placing.start()
            watcher = psycopg2.connect(driver_dsn(url))
            watcher.autocommit = True
            try:
                with watcher.cursor() as cursor:
                    wait_for(lambda: other_sessions(cursor, "wait_event_type = 'Lock' AND "
                                                            "wait_event = 'advisory'") > 0
                             or not placing.is_alive(),
                             timeout=10, what="the second order to wait for the first")
            finally:
                watcher.close()
            assert placing.is_alive() and not second
            assert _relay_once_elsewhere(url, publisher).claimed == 0  # nothing of theirs yet
        placing.join(30)
        assert "order" in second, second
        _relay_all(publisher)
    sent = [json.loads(m.value())["correlation_id"]
            for m in _messages_of(settings, [first.id, second["order"].id])]
    assert sent == [str(first.id), str(second["order"].id)]


def test_one_relay_leads_and_a_commit_of_outbox_rows_wakes_it(in_orders, settings, user_id):
    url = settings.database_url("orders")
    with RelayLeaderConnection(url) as leader, RelayLeaderConnection(url) as other:
        assert leader.lead()
        assert not other.lead()  # one leader per database
        assert not leader.wait(0.05)
        with pytest.raises(RuntimeError):
            with transaction() as session:
                service.place_order(session, user_id=user_id, amount=Decimal("1"), description="")
                raise RuntimeError("rolled back: nothing to wake the relay for")
        assert not leader.wait(0.2)
        _place(user_id)
        assert leader.wait(5)
    with RelayLeaderConnection(url) as successor:
        assert successor.lead()  # the lock went with the leader's connection


def test_the_leader_relays_on_its_own_connection(in_orders, settings, user_id):
    """The leader's statements stand alone (what it deletes is gone for everyone at once), and a
    commit that notifies while it relays still wakes its next wait."""
    order = _place(user_id)
    with RelayLeaderConnection(settings.database_url("orders")) as leader:
        assert leader.lead()
        with leader.cursor() as cursor:
            _place(user_id)  # commits, and notifies, while the leader relays
            relay_pending_outbox(cursor, OutboxPublisher(settings, "orders").send_batch, 10_000)
        db.session.rollback()
        assert _outbox_rows_for([order.id]) == []
        assert leader.wait(5)


def test_the_leader_reads_the_oldest_rows_by_the_primary_key_however_many_were_deleted(
        in_orders, settings):
    """Sent rows are deleted, and their dead versions fill the table's pages until a VACUUM (this
    machine's PostgreSQL runs no autovacuum). Planned on the table's size in pages, reading the
    oldest rows became a scan of every page and a sort, a few milliseconds a read after a few
    thousand orders; the leader walks the primary key instead, whatever the planner estimates."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("INSERT INTO outbox_messages (message_id, topic, type, envelope)"
                       " SELECT gen_random_uuid(), 'sent-long-ago', 'X', '{}'"
                       " FROM generate_series(1, 20000)")
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("DELETE FROM outbox_messages WHERE topic = 'sent-long-ago'")
    with RelayLeaderConnection(settings.database_url("orders")) as leader:
        with leader.cursor() as cursor:
            cursor.execute("EXPLAIN " + CLAIM_ROWS, {"batch_size": 5000})
            plan = "\n".join(line for (line,) in cursor)
    assert "Index Scan using outbox_messages_pkey" in plan and "Seq Scan" not in plan, plan


def test_the_leader_looks_each_row_up_among_the_refused_whatever_the_statistics_say(
        in_orders, settings):
    """Planned as a join on statistics taken while no row was refused, the check of the rows a
    read finds against the refused ones compared each with every refused row (seconds a read,
    with thousands refused); it is a lookup in their index instead, and, its estimate growing
    with the rows refused, planned without compiling it first (JIT: 80 ms a read)."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("ANALYZE outbox_messages")  # (statistics with none refused)
        cursor.execute("INSERT INTO outbox_messages (message_id, topic, key, type, envelope,"
                       " attempts, next_attempt_at)"
                       " SELECT gen_random_uuid(), 'refused-long-ago', 'k' || n, 'X', '{}', 1,"
                       " now() + interval '1 hour' FROM generate_series(1, 2000) AS n")
    try:
        with RelayLeaderConnection(settings.database_url("orders")) as leader:
            with leader.cursor() as cursor:
                cursor.execute("SHOW jit")
                assert cursor.fetchone() == ("off",)
                cursor.execute("EXPLAIN " + CLAIM_ROWS, {"batch_size": 5000})
                plan = "\n".join(line for (line,) in cursor)
        assert "SubPlan" in plan, plan
        assert "Index Only Scan using ix_outbox_messages_refused" in plan, plan
    finally:
        with transaction() as session, driver_cursor(session) as cursor:
            cursor.execute("DELETE FROM outbox_messages WHERE topic = 'refused-long-ago'")


def test_the_leader_looks_no_row_up_among_the_refused_while_none_is_parked_or_waiting(
        in_orders, settings):
    """The lookups cost a read of 5,000 rows a third of its time; while no refused row is parked
    or waiting (a refused row whose time has come holds nothing back), the read makes none, and
    makes them as soon as one is. It looks at REFUSED_LOOKED_AT refused rows at most to know:
    with more (all due after a long outage, say), it makes the lookups, as cheap as a look at
    them all."""
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("INSERT INTO outbox_messages (message_id, topic, key, type, envelope)"
                       " SELECT gen_random_uuid(), 'looked-up', 'k' || (n % 10), 'X', '{}'"
                       " FROM generate_series(1, 100) AS n")
        cursor.execute("UPDATE outbox_messages SET attempts = 2,"
                       " next_attempt_at = now() - interval '1 second'"
                       " WHERE id = (SELECT min(id) FROM outbox_messages"
                       "             WHERE topic = 'looked-up')")

    def lookups_made() -> tuple[int, int]:
        """The lookups the read made, and the refused rows it looked at first."""
        with RelayLeaderConnection(settings.database_url("orders")) as leader:
            with leader.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + CLAIM_ROWS,
                               {"batch_size": 5000})
                (plan,), = cursor.fetchall()
        nodes = list(_plan_nodes(plan[0]["Plan"]))
        first_look = next(node for node in nodes
                          if node.get("Subplan Name", "").startswith("InitPlan"))
        return (sum(node["Actual Loops"] for node in nodes
                    if node.get("Subplan Name", "").startswith("SubPlan")),
                max(node["Actual Rows"] for node in _plan_nodes(first_look)
                    if node["Node Type"] == "Limit"))

    try:
        assert lookups_made() == (0, 1)
        with transaction() as session, driver_cursor(session) as cursor:
            cursor.execute("UPDATE outbox_messages SET next_attempt_at = now() + interval '1 hour'"
                           " WHERE topic = 'looked-up' AND attempts > 0")
        lookups, _ = lookups_made()
        assert lookups >= 99
        with transaction() as session, driver_cursor(session) as cursor:
            cursor.execute("UPDATE outbox_messages SET next_attempt_at = now() - interval '1 s'"
                           " WHERE topic = 'looked-up' AND attempts > 0")
            cursor.execute("INSERT INTO outbox_messages (message_id, topic, key, type, envelope,"
                           " attempts, next_attempt_at)"
                           " SELECT gen_random_uuid(), 'looked-up', 'due' || n, 'X', '{}', 1,"
                           " now() - interval '1 second' FROM generate_series(1, %s) AS n",
                           (REFUSED_LOOKED_AT,))
        lookups, looked_at = lookups_made()
        assert looked_at == REFUSED_LOOKED_AT + 1 and lookups >= 99
    finally:
        with transaction() as session, driver_cursor(session) as cursor:
            cursor.execute("DELETE FROM outbox_messages WHERE topic = 'looked-up'")


def _plan_nodes(node: dict) -> Iterator[dict]:
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


def _relay_run_in_a_thread(outcome: list) -> threading.Thread:
    """relay_outbox for orders as beat starts it, in a thread; what it returns goes to `outcome`."""
    from tasks import relay

    run = threading.Thread(target=lambda: outcome.append(
        relay.relay_outbox.apply(args=("orders",)).get()))
    run.start()
    return run


@dataclasses.dataclass(frozen=True)
class _Lead:
    """A relay_outbox run for orders, in a thread, and the list what it returns goes to."""

    run: threading.Thread
    outcome: list


@contextmanager
def _relay_task_leading() -> Iterator[_Lead]:
    """relay_outbox for orders as beat starts it, leading in a thread of its own until the block
    ends (as a worker shutting down ends it): yields the run and the list what it returns goes
    to; on the way out the run is stopped and joined, and the worker's publisher let go."""
    from tasks import relay

    outcome: list = []
    lead = _Lead(_relay_run_in_a_thread(outcome), outcome)
    try:
        _wait_until_leading(relay, lead.run, lead.outcome)
        yield lead
    finally:
        relay._stop_leading()
        lead.run.join(10)
        relay._stopping.clear()
        # The worker's producer goes with its publisher, before the session's broker stops.
        _let_go_of_the_workers_publisher()
    assert not lead.run.is_alive()


def _wait_until_leading(relay, run: threading.Thread, outcome: list) -> None:
    """Wait for `run` to lead orders' relay; a run that returned without leading fails at once,
    saying what the relay was in: stopping, sitting out, or the leader lock taken (and by which
    session, if one still holds it: a lock taken when the run asked and free now was a session's
    still ending)."""
    wait_for(lambda: "orders" in relay._leading or not run.is_alive(), timeout=10,
             what="the relay to lead")
    assert "orders" in relay._leading, (
        f"the run returned {outcome} without leading: stopping={relay._stopping.is_set()},"
        f" sitting out until {relay._sitting_out.get('orders')} (now {time.monotonic():.1f}),"
        f" the leader lock now held by {_leader_lock_holders()}")


def _leader_lock_holders() -> list[tuple]:
    """The sessions that hold the relay leader's lock on the orders database, as pg_stat_activity
    has them."""
    settings = service_app("orders").extensions["hseshop.settings"]
    with closing(psycopg2.connect(driver_dsn(settings.database_url("orders")))) as watcher:
        with watcher.cursor() as cursor:
            cursor.execute("SELECT a.pid, a.application_name, a.backend_start, a.state,"
                           " left(a.query, 80) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                           " WHERE l.locktype = 'advisory' AND l.granted AND l.database ="
                           " (SELECT oid FROM pg_database WHERE datname = current_database())")
            return cursor.fetchall()


def _let_go_of_the_workers_publisher() -> None:
    """Take the orders worker app's publisher away, closed: the app, kept for the process, holds
    a close for each publisher its relay made (tasks.relay._publisher's close_with), so one only
    taken away would live on, its producer's threads and connection with it."""
    from tasks import relay

    publisher = service_app("orders").extensions.pop(relay._PUBLISHER, None)
    if publisher is not None:
        publisher.close()


@contextmanager
def _a_lead_that_sent_an_order(orders_flask_app, user_id) -> Iterator[tuple[_Lead, int]]:
    """_relay_task_leading through a publisher of its own (an earlier test's let go), once it has
    sent an order: yields the lead and how many librdkafka threads ran before it."""
    _let_go_of_the_workers_publisher()  # (an earlier test's)
    gc.collect()  # (clients of earlier tests let go)
    threads_before = librdkafka_threads()
    with _relay_task_leading() as lead:
        with orders_flask_app.app_context():
            _wait_until_sent([_place(user_id).id])
        yield lead, threads_before


def test_a_lead_that_ends_leaves_its_worker_no_producer_running(orders_flask_app, user_id):
    """A worker's app is kept for the process, never closed: the producer its relay sent through
    is closed as the lead ends (here, as the worker stops), its threads with it, though the
    publisher stays for the next lead."""
    from tasks import relay

    with _a_lead_that_sent_an_order(orders_flask_app, user_id) as (lead, threads_before):
        assert librdkafka_threads() > threads_before  # (its producer's)
        relay._stop_leading()
        lead.run.join(10)
        assert not lead.run.is_alive() and lead.outcome[0] >= 1
        assert relay._PUBLISHER in service_app("orders").extensions
        wait_for_librdkafka_threads(threads_before)


def test_a_lead_that_lost_its_database_keeps_its_producer_for_the_next(
        orders_flask_app, settings, user_id):
    """The broker answering, a new producer would only cost the next lead its wait for an
    idempotent producer id (about 0.5 s) before its first batch: the lead that lost its
    database connection leaves the producer it sent through running."""
    with _a_lead_that_sent_an_order(orders_flask_app, user_id) as (lead, threads_before):
        _end_the_leaders_session(settings)
        lead.run.join(10)
        assert not lead.run.is_alive() and lead.outcome == [0]
        assert librdkafka_threads() > threads_before  # (its producer's, still running)


def _wait_until_sent(order_ids) -> None:
    def sent():
        db.session.rollback()
        return _outbox_rows_for(order_ids) == []

    wait_for(sent, timeout=10, what="the leader to send the new rows")


def test_the_relay_task_leads_sends_what_commits_and_stops_with_the_worker(
        orders_flask_app, settings, user_id):
    """relay_outbox as beat starts it: the first run stays and sends rows as their commits wake
    it; a second run returns at once; the worker shutting down ends the first."""
    from tasks import relay

    with _relay_task_leading() as lead:
        assert relay.relay_outbox.apply(args=("orders",)).get() == 0
        with orders_flask_app.app_context():
            order_id = _place(user_id).id
            _wait_until_sent([order_id])
        assert _messages_of(settings, [order_id])
    assert lead.outcome and lead.outcome[0] >= 1


def test_the_relay_makes_the_topics_as_it_starts_to_lead_before_any_row_names_them(
        settings, monkeypatch):
    """docker-compose.yml's broker creates no topic a producer names: the leader makes every
    topic of the shop (ensure_topics: KAFKA_TOPIC_PARTITIONS partitions) as it starts, not only
    once the broker has refused a row, so that a consumer subscribed before finds them."""
    topic = f"{settings.topic_order_status_changed}-{uuid.uuid4().hex[:8]}"
    fresh = dataclasses.replace(settings, topic_order_status_changed=topic)
    monkeypatch.setitem(service_app("orders").extensions, "hseshop.settings", fresh)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    assert fresh.topic_order_status_changed not in admin.list_topics(timeout=5).topics
    with _relay_task_leading():
        made = wait_for(lambda: admin.list_topics(timeout=5).topics.get(
            fresh.topic_order_status_changed), timeout=10, what="the leader to make the topic")
        assert len(made.partitions) == settings.kafka_topic_partitions


@dataclasses.dataclass
class _LeadersPace:
    """When the leading relay's reads began, and when it woke (time.monotonic); and how many
    waits it has begun."""

    reads: list[float] = dataclasses.field(default_factory=list)
    wake_ups: list[float] = dataclasses.field(default_factory=list)
    waits_begun: int = 0

    def wait_for_wake_ups(self, count: int) -> None:
        """Until the leader has woken `count` times more and done what it does then: until it
        has begun to wait again after the last of them. (Waiting for the wake-up after it, as
        this did, waited out RECHECK_SECONDS at each call where no commit woke it.)"""
        begun = len(self.wake_ups) + count + 1  # (the wait after the last: what it woke to is done)
        wait_for(lambda: self.waits_begun >= begun, timeout=10 + 2 * count,
                 what=f"the leader to wake {count} times")


def _paced(monkeypatch) -> _LeadersPace:
    """Have the relay task's reads and wake-ups recorded."""
    from tasks import relay

    pace = _LeadersPace()
    read, wait = relay.relay_pending_outbox, RelayLeaderConnection.wait

    def timed_read(*args, **kwargs):
        pace.reads.append(time.monotonic())
        return read(*args, **kwargs)

    def timed_wait(self, timeout: float) -> bool:
        pace.waits_begun += 1
        woken = wait(self, timeout)
        pace.wake_ups.append(time.monotonic())
        return woken

    monkeypatch.setattr(relay, "relay_pending_outbox", timed_read)
    monkeypatch.setattr(RelayLeaderConnection, "wait", timed_wait)
    return pace


STANDING = "standing"  # the topic of a backlog that cannot go (no relay writes to it)


@contextmanager
def _leading_over_a_standing_backlog(orders_flask_app, settings, monkeypatch,
                                     read_at_least_every: float = 60.0) -> Iterator[_LeadersPace]:
    """The relay task leading over a backlog that cannot go yet: a row of key 'k' the broker
    refused, waiting an hour for its next try, the later rows of its key behind it (one of them
    refused too, its own wait over: it may not go before the first). Every read counts as slow
    (SLOW_WALK_SECONDS 0, where 1.3 s a read takes a million rows waiting); the block begins once
    the leader has read twice (the second read, the newest row known, leaves the backlog
    standing), and ends with the leader."""
    from tasks import relay

    monkeypatch.setattr(relay, "SLOW_WALK_SECONDS", 0.0)
    monkeypatch.setattr(relay, "WALK_AT_LEAST_EVERY_SECONDS", read_at_least_every)
    pace = _paced(monkeypatch)
    with orders_flask_app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))  # whatever earlier tests left behind
    _outbox_statement(orders_flask_app, f"""
        INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,
                                     next_attempt_at)
        VALUES (gen_random_uuid(), '{STANDING}', 'k', 'X', '{{}}', 1, now() + interval '1 hour'),
               (gen_random_uuid(), '{STANDING}', 'k', 'X', '{{}}', 0, NULL),
               (gen_random_uuid(), '{STANDING}', 'k', 'X', '{{}}', 1, now() - interval '1 s'),
               (gen_random_uuid(), '{STANDING}', 'k', 'X', '{{}}', 0, NULL)""")
    try:
        with _relay_task_leading():
            wait_for(lambda: len(pace.reads) >= 2, timeout=10, what="the leader's second read")
            pace.wait_for_wake_ups(0)
            yield pace
    finally:
        _outbox_statement(orders_flask_app,
                          f"DELETE FROM outbox_messages WHERE topic = '{STANDING}'")


def _outbox_statement(app, statement: str, params=None) -> None:
    """Run `statement` in a transaction of its own, committed (and so notifying the leader of the
    rows it inserts)."""
    with app.app_context(), transaction() as session, driver_cursor(session) as cursor:
        cursor.execute(statement, params)


def test_a_leader_over_a_standing_backlog_reads_again_for_a_new_row_that_may_go(
        orders_flask_app, settings, user_id, monkeypatch):
    """Through an outage of some keys every read walks the rows that cannot go yet (1.3 s with a
    million), and every commit woke the leader to walk them again. Now a wake-up asks first
    whether a row newer than the newest known may go: for rows of a stuck key, none does, and
    the leader does not read; a row of a sound key is read, and sent, at the wake-up its commit
    brings."""
    with _leading_over_a_standing_backlog(orders_flask_app, settings, monkeypatch) as pace:
        reads = len(pace.reads)
        for _ in range(3):  # each commit wakes the leader
            _outbox_statement(orders_flask_app,
                              "INSERT INTO outbox_messages (message_id, topic, key, type, envelope)"
                              f" VALUES (gen_random_uuid(), '{STANDING}', 'k', 'X', '{{}}')")
            pace.wait_for_wake_ups(1)
        pace.wait_for_wake_ups(1)  # (and a wake-up with no commit)
        assert len(pace.reads) == reads

        with orders_flask_app.app_context():
            committed_at = time.monotonic()
            order_id = _place(user_id).id
            _wait_until_sent([order_id])
        pace.wait_for_wake_ups(2)
        (read_at,) = pace.reads[reads:]  # the one read, at the wake-up the commit brought
        assert read_at - committed_at < 1.0


def test_a_leader_over_a_standing_backlog_reads_again_when_a_refused_rows_wait_is_over(
        orders_flask_app, settings, user_id, monkeypatch):
    """A refused row is tried again once its wait is over, as ever, though nothing new may go:
    the leader reads then, and not before. (The refused row behind the stuck key's first, its
    own wait over, does not count: it may not go before the first.)"""
    with orders_flask_app.app_context():
        order_id = _place(user_id).id  # refused, and waiting for its next try, 6 s from now
        _outbox_statement(orders_flask_app,
                          "UPDATE outbox_messages SET attempts = 1, last_error = 'refused',"
                          " next_attempt_at = now() + interval '6 seconds'"
                          " WHERE correlation_id = %s", (str(order_id),))
        due_at = time.monotonic() + 6
    try:
        with _leading_over_a_standing_backlog(orders_flask_app, settings, monkeypatch) as pace:
            reads = len(pace.reads)
            assert time.monotonic() < due_at - 1, "the leader took too long to start"
            with orders_flask_app.app_context():
                _wait_until_sent([order_id])
            pace.wait_for_wake_ups(2)
            (read_at,) = pace.reads[reads:]
            assert read_at > due_at - 0.2
        assert _messages_of(settings, [order_id])
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([order_id])


def test_a_leader_over_a_standing_backlog_reads_it_again_after_a_while_in_any_case(
        orders_flask_app, settings, user_id, monkeypatch):
    """What no question finds between reads is read WALK_AT_LEAST_EVERY_SECONDS after the last
    read at worst: here a row committed late under a lower id than the newest the leader knew
    of (it stands for a transaction that took its id before and committed after), with a later
    row of its key, also lower; they go in order. A late row with a row of its key newer than
    the newest known goes at once, the new one after it: a read chooses both."""
    read_at_least_every = 5.0
    with orders_flask_app.app_context(), transaction() as session, \
            driver_cursor(session) as cursor:
        cursor.execute("INSERT INTO outbox_messages (message_id, topic, type, envelope)"
                       " SELECT gen_random_uuid(), 'placeholder', 'X', '{}'"
                       " FROM generate_series(1, 3) RETURNING id")
        low_ids = sorted(row_id for (row_id,) in cursor.fetchall())
        cursor.execute("DELETE FROM outbox_messages WHERE topic = 'placeholder'")
    late = [uuid.uuid4() for _ in low_ids]

    def commit_late(row_id: int, correlation_id: uuid.UUID) -> None:
        envelope = json.dumps({"correlation_id": str(correlation_id), "payload": {}})
        _outbox_statement(orders_flask_app,
                          "INSERT INTO outbox_messages (id, message_id, topic, key, type,"
                          " correlation_id, envelope) VALUES (%s, gen_random_uuid(), %s, %s,"
                          " 'Late', %s, %s)",
                          (row_id, settings.topic_payment_requested, user_id,
                           str(correlation_id), envelope))

    try:
        with _leading_over_a_standing_backlog(orders_flask_app, settings, monkeypatch,
                                              read_at_least_every) as pace:
            last_read = pace.reads[-1]
            commit_late(low_ids[0], late[0])
            commit_late(low_ids[1], late[1])
            pace.wait_for_wake_ups(1)
            with orders_flask_app.app_context():
                assert time.monotonic() < last_read + read_at_least_every
                assert len(_outbox_rows_for(late[:2])) == 2  # not read yet
                _wait_until_sent(late[:2])
            next_read = next(read_at for read_at in pace.reads if read_at > last_read)
            assert next_read > last_read + read_at_least_every - 0.2

            commit_late(low_ids[2], late[2])
            with orders_flask_app.app_context():
                newer = _place(user_id).id
                _wait_until_sent([late[2], newer])
        assert [json.loads(m.value())["correlation_id"]
                for m in _messages_of(settings, [*late, newer])] == [*map(str, late), str(newer)]
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of(late)


def test_a_leader_over_a_standing_backlog_reads_for_many_keys_waits_ending_at_most_every_5_s(
        orders_flask_app, settings, monkeypatch):
    """Many stuck keys, refused at different moments, have their first rows' waits end all
    through the half minute: the leader reads for them WALK_FOR_A_DUE_ROW_AT_MOST_EVERY_SECONDS
    (5 s) apart at the soonest, not at nearly every wake-up."""
    from tasks import relay

    _outbox_statement(orders_flask_app, f"""
        INSERT INTO outbox_messages (message_id, topic, key, type, envelope, attempts,
                                     next_attempt_at)
        SELECT gen_random_uuid(), '{STANDING}', 'due-' || n, 'X', '{{}}', 10,
               now() + make_interval(secs => 3 + 0.5 * n)
        FROM generate_series(1, 12) AS n""")  # (their waits end 0.5 s apart, 3.5 to 9 s on)
    with _leading_over_a_standing_backlog(orders_flask_app, settings, monkeypatch) as pace:
        reads = len(pace.reads)
        pace.wait_for_wake_ups(8)
        between = [later - earlier for earlier, later
                   in zip(pace.reads[reads - 1:], pace.reads[reads:])]
    assert between and min(between) >= relay.WALK_FOR_A_DUE_ROW_AT_MOST_EVERY_SECONDS - 0.2, (
        between)


def test_a_leader_whose_slow_reads_walk_over_no_refused_row_reads_at_every_wake_up(
        orders_flask_app, settings, user_id, monkeypatch):
    """Reads slow for another reason (a busy database, big rows), with no refused row there:
    nothing stands, and a row committed late under a lower id than the newest the leader knew of
    goes at the wake-up its commit brings, not at the read WALK_AT_LEAST_EVERY_SECONDS on."""
    from tasks import relay

    monkeypatch.setattr(relay, "SLOW_WALK_SECONDS", 0.0)
    monkeypatch.setattr(relay, "WALK_AT_LEAST_EVERY_SECONDS", 60.0)
    pace = _paced(monkeypatch)
    with orders_flask_app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))  # whatever earlier tests left behind
        with transaction() as session, driver_cursor(session) as cursor:
            cursor.execute("SELECT nextval(pg_get_serial_sequence('outbox_messages', 'id'))")
            (low_id,) = cursor.fetchone()
    late = uuid.uuid4()
    with _relay_task_leading(), orders_flask_app.app_context():
        wait_for(lambda: len(pace.reads) >= 2, timeout=10, what="the leader's second read")
        _place(user_id)  # a row newer than the late one, read and sent first
        pace.wait_for_wake_ups(1)
        _outbox_statement(orders_flask_app,
                          "INSERT INTO outbox_messages (id, message_id, topic, key, type,"
                          " correlation_id, envelope) VALUES (%s, gen_random_uuid(), %s, %s,"
                          " 'Late', %s, '{}')",
                          (low_id, settings.topic_payment_requested, user_id, str(late)))
        _wait_until_sent([late])


def test_a_leader_whose_reads_are_quick_makes_no_other_statement_as_it_wakes(
        orders_flask_app, user_id, monkeypatch):
    """Reads quicker than SLOW_WALK_SECONDS (1 s here, for a loaded machine: what counts is that
    a quick read costs nothing more) leave the leader as it was: a read at every wake-up, and a
    delete for the rows it sent, with no other statement."""
    from tasks import relay

    monkeypatch.setattr(relay, "SLOW_WALK_SECONDS", 1.0)
    pace = _paced(monkeypatch)
    statements: list[str | None] = []  # None for each wake-up
    cursor, wait = RelayLeaderConnection.cursor, RelayLeaderConnection.wait

    def recorded_cursor(self):
        recording = _RecordingCursor(cursor(self))
        recording.statements = statements
        return recording

    def marked_wait(self, timeout: float) -> bool:
        woken = wait(self, timeout)
        statements.append(None)
        return woken

    monkeypatch.setattr(RelayLeaderConnection, "cursor", recorded_cursor)
    monkeypatch.setattr(RelayLeaderConnection, "wait", marked_wait)
    with _relay_task_leading(), orders_flask_app.app_context():
        pace.wait_for_wake_ups(1)
        order_id = _place(user_id).id
        _wait_until_sent([order_id])
        # (Two of them with no commit: the last one's statements are not held to the rest's, as
        # the leader's stop may cut it short.)
        pace.wait_for_wake_ups(3)
    wake_ups: list[tuple[str, ...]] = []  # what the leader ran at each, after the first
    for statement in statements[statements.index(None):]:
        if statement is None:
            wake_ups.append(())
        else:
            wake_ups[-1] += ("read" if statement == CLAIM_ROWS else statement.split()[0],)
    assert set(wake_ups[:-1]) <= {("read",), ("read", "WITH"), ("read", "WITH", "DELETE")}
    assert {("read",), ("read", "WITH")} <= set(wake_ups), wake_ups  # (a wake-up sent the row)


def _outbox_vacuums() -> int:
    with transaction() as session, driver_cursor(session) as cursor:
        cursor.execute("SELECT vacuum_count FROM pg_stat_user_tables"
                       " WHERE relname = 'outbox_messages'")
        return cursor.fetchone()[0]


def test_the_leading_relay_vacuums_the_outbox_once_it_has_deleted_enough_rows(
        orders_flask_app, user_id, monkeypatch):
    """Every row sent is deleted and stays as a dead version until a VACUUM (this machine's
    PostgreSQL runs no autovacuum), and the leader's read walks over the dead versions: so the
    leader vacuums the outbox each time it has deleted VACUUM_AFTER_ROWS rows."""
    monkeypatch.setattr("tasks.relay.VACUUM_AFTER_ROWS", 3)
    with _relay_task_leading(), orders_flask_app.app_context():
        vacuums_before = _outbox_vacuums()
        order_ids = [_place(user_id).id for _ in range(3)]
        _wait_until_sent(order_ids)
        wait_for(lambda: _outbox_vacuums() > vacuums_before, timeout=10,
                 what="the leader to vacuum the outbox")


def test_the_outbox_vacuum_runs_past_the_sessions_statement_limit(orders_flask_app):
    """After a long broker outage the relay has millions of dead rows to reclaim, for longer than
    a statement of the shop may run: the VACUUM runs without that limit, which then holds again.
    (Here the limit is 10 ms, and 200,000 dead rows take longer.)"""
    dsn = driver_dsn(orders_flask_app.config["SQLALCHEMY_DATABASE_URI"])
    with psycopg2.connect(dsn) as filling, filling.cursor() as cursor:
        # Inserted and deleted in one transaction: dead as they are committed, never relayed.
        cursor.execute("INSERT INTO outbox_messages (message_id, topic, type, envelope)"
                       " SELECT gen_random_uuid(), 'vacuum-test', 'VacuumTest', '{}'"
                       " FROM generate_series(1, 200000)")
        cursor.execute("DELETE FROM outbox_messages WHERE topic = 'vacuum-test'")
    filling.close()
    with orders_flask_app.app_context():
        vacuums_before = _outbox_vacuums()
    leader = psycopg2.connect(dsn, options="-c statement_timeout=10ms")
    leader.autocommit = True
    try:
        with leader.cursor() as cursor:
            vacuum_outbox(cursor)
            cursor.execute("SHOW statement_timeout")
            assert cursor.fetchone()[0] == "10ms"
    finally:
        leader.close()
    with orders_flask_app.app_context():  # (it ran: none was running to skip it for)
        wait_for(lambda: _outbox_vacuums() > vacuums_before, timeout=10,
                 what="the VACUUM to be counted")


def test_rows_written_together_keep_their_order_and_go_with_an_error(in_orders, settings, user_id):
    def add(session, amount):
        event = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": user_id,
                                              "amount": Decimal(amount)})
        add_outbox_message(session, topic=settings.topic_payment_requested, key=user_id,
                           event=event)

    def amounts_written():
        return [row.envelope["payload"]["amount"] for row in db.session.scalars(
            select(OutboxMessage).where(OutboxMessage.key == user_id).order_by(OutboxMessage.id))]

    with transaction() as session:
        with outbox_rows_written_together(session):
            for amount in ("1.00", "2.00", "3.00"):
                add(session, amount)
            assert amounts_written() == []  # kept until the block ends
        assert amounts_written() == ["1.00", "2.00", "3.00"]
    with pytest.raises(RuntimeError):
        with transaction() as session:
            with outbox_rows_written_together(session):
                add(session, "4.00")
                raise RuntimeError("a handler failed")
    assert amounts_written() == ["1.00", "2.00", "3.00"]


def test_a_leader_that_stops_without_closing_its_session_loses_the_lead(in_orders, settings):
    """A leader whose process is paused (or whose host is gone) keeps its session open: PostgreSQL
    ends it once it has been idle too long, and another relay can lead."""
    url = settings.database_url("orders")
    with RelayLeaderConnection(url, idle_timeout_seconds=0.5) as stalled:
        assert stalled.lead()
        with RelayLeaderConnection(url) as successor:
            assert not successor.lead()
            wait_for(successor.lead, timeout=10, what="the stalled leader's session to end")


def test_a_closed_leaders_lock_is_free_as_close_returns(in_orders, settings):
    """The server ends a session after its client has gone, and drops the session's own things
    (here, many temporary tables) before it lets go of its locks: a leader that let go of its lock
    only with its session left it taken a while after close(), and a relay that asked meanwhile
    (the next run, straight after a step-down) found it taken and did not lead."""
    url = settings.database_url("orders")
    with RelayLeaderConnection(url) as leader:
        assert leader.lead()
        with leader.cursor() as cursor:
            cursor.execute("DO $$ BEGIN FOR i IN 1..1000 LOOP"
                           " EXECUTE format('CREATE TEMPORARY TABLE dropped_at_exit_%s ()', i);"
                           " END LOOP; END $$")
    with RelayLeaderConnection(url) as successor:
        assert successor.lead()


@pytest.fixture
def orders_database_behind_a_proxy(settings) -> Iterator[tuple[str, SilencingProxy]]:
    """The orders database's URL through a proxy the test can silence, and the proxy. Closed at
    the end, it closes what it carried, so the server ends a session it left silent, lock and
    all (its client gone), and the test waits until none holds the leader lock."""
    url = make_url(settings.database_url("orders"))
    proxy = SilencingProxy(f"{url.host}:{url.port or 5432}")
    port = int(proxy.address.rsplit(":", 1)[1])
    try:
        yield url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False), proxy
    finally:
        proxy.close()
        wait_for(lambda: not _leader_lock_holders(), timeout=10,
                 what="the silenced leader's session to end")


def test_a_leader_closing_on_a_silent_database_gives_up_on_the_unlock_within_its_bound(
        in_orders, orders_database_behind_a_proxy):
    """A database gone silent (its host cut off or frozen: the proxy carries nothing more, and
    closes nothing) never answers the unlock close() sends: close() gives up on it after
    UNLOCK_WAIT_SECONDS, where it, and the stop of the worker whose relay led, waited for the
    connection's timeouts (shared.db.CONNECTION_TIMEOUTS; here, the proxy's kernel acknowledging
    all it is sent, for ever)."""
    url, proxy = orders_database_behind_a_proxy
    leader = RelayLeaderConnection(url)
    assert leader.lead()
    proxy.silence()
    closing_leader = threading.Thread(target=leader.close, name="closing the silenced leader")
    started = time.monotonic()
    closing_leader.start()
    try:
        closing_leader.join(UNLOCK_WAIT_SECONDS + 2)
        assert not closing_leader.is_alive(), "close() still waiting on the silent database"
        assert time.monotonic() - started >= UNLOCK_WAIT_SECONDS  # (it did ask)
    finally:
        proxy.close()  # (a close() still waiting fails at once, the connection gone)
        closing_leader.join(10)


def test_a_relay_stopping_as_its_database_goes_silent_ends_within_its_bounds(
        orders_flask_app, orders_database_behind_a_proxy, monkeypatch):
    """The leading relay of a worker told to stop as its database goes silent (between two
    wake-ups) ends within RECHECK_SECONDS (its wait), UNLOCK_WAIT_SECONDS (its close) and its
    publisher's close, where its unlock held the worker's stop up for the connection's timeouts
    (here, for ever)."""
    from tasks import relay

    url, proxy = orders_database_behind_a_proxy
    stopped = threading.Event()
    wait = RelayLeaderConnection.wait

    def silenced_and_stopped_as_it_waits(self, timeout: float) -> bool:
        if not stopped.is_set():
            proxy.silence()
            relay._stop_leading()
            stopped.set()
        return wait(self, timeout)

    monkeypatch.setattr(RelayLeaderConnection, "wait", silenced_and_stopped_as_it_waits)
    worker_app = service_app("orders")
    own_settings = worker_app.extensions["hseshop.settings"]
    worker_app.extensions["hseshop.settings"] = dataclasses.replace(
        own_settings, orders_database_url=url)
    outcome: list = []
    run = _relay_run_in_a_thread(outcome)
    try:
        wait_for(stopped.is_set, timeout=30, what="the relay to lead, then wait")
        run.join(relay.RECHECK_SECONDS + UNLOCK_WAIT_SECONDS + 3)
        assert not run.is_alive(), "the relay still stopping on the silent database"
        assert len(outcome) == 1  # (it returned, its lead ended: not raised)
    finally:
        worker_app.extensions["hseshop.settings"] = own_settings
        proxy.close()  # (a run still waiting on the database fails at once)
        run.join(30)
        relay._stopping.clear()
        _let_go_of_the_workers_publisher()


def test_the_unlocks_cut_off_reaches_no_socket_given_the_number_libpq_let_go_of(settings):
    """A statement failing on a connection lost (its session ended: a restart, say) makes libpq
    close its descriptor then and there, before the wait's bound is up: a socket opened meanwhile
    (a pool's, Kafka's, Redis's, by another thread) can be given that number, and the cut-off,
    firing once the bound is up, is not to shut that one down."""
    connection = psycopg2.connect(driver_dsn(settings.database_url("orders")))
    number = connection.fileno()
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        with _cut_off_after(connection, 0.2):
            with pytest.raises(psycopg2.OperationalError), connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
            pairs.extend(socket.socketpair() for _ in range(4))
            given_the_number = [pair for pair in pairs if number in (pair[0].fileno(),
                                                                     pair[1].fileno())]
            assert given_the_number, f"no new socket was given the number {number}"
            wait_for(lambda: not any(isinstance(thread, threading.Timer) and thread.is_alive()
                                     for thread in threading.enumerate()),
                     timeout=5, what="the cut-off's timer to have fired")
            for one, other in given_the_number:
                one.sendall(b"still open")
                assert other.recv(16) == b"still open"
    finally:
        connection.close()
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_a_leader_whose_session_the_database_ends_stops_leading_and_the_next_run_leads(
        orders_flask_app, settings, user_id):
    """Its session ended by the server (a restart, an operator's pg_terminate_backend), the lock
    with it: the run ends at once, where it could have gone on leading nothing on a dead
    connection (and its worker never led again), and the next run beat sends leads and sends
    what was committed meanwhile."""
    from tasks import relay

    outcome = []
    run = _relay_run_in_a_thread(outcome)
    try:
        _end_the_leaders_session(settings)
        run.join(10)
        assert not run.is_alive() and "orders" not in relay._leading
        assert outcome[0] == 0  # (its lost connection said in a warning, not raised)
    finally:
        relay._stop_leading()
        run.join(10)
        relay._stopping.clear()
    with orders_flask_app.app_context():
        order_id = _place(user_id).id  # committed while nobody leads
        with _relay_task_leading():
            _wait_until_sent([order_id])


def _end_the_leaders_session(settings) -> None:
    """End, as an operator's pg_terminate_backend would, the session the orders relay leads by
    (the one holding the advisory lock), once one does."""
    holders = wait_for(_leader_lock_holders, timeout=10, what="the relay to take the lead")
    leader_pid = holders[0][0]
    terminate_backend(settings.database_url("orders"), leader_pid)


def test_a_leader_the_broker_keeps_refusing_steps_down_for_another_to_lead(
        orders_flask_app, settings, user_id, monkeypatch):
    """A leader whose own way to the broker is broken (here: a port nothing listens on) gives up
    the lead once the broker has refused every batch for STEP_DOWN_AFTER_SECONDS, and its worker
    takes no lead for SIT_OUT_SECONDS, so that a relay in another worker leads meanwhile."""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 0.5)
    cut_off = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    worker_app = service_app("orders")
    worker_app.extensions[relay._PUBLISHER] = OutboxPublisher(cut_off, "orders")
    with orders_flask_app.app_context():
        order_id = _place(user_id).id
    first, second = [], []
    runs = []
    try:
        runs.append(_relay_run_in_a_thread(first))
        runs[0].join(60)
        assert first == [0]  # it led, sent nothing and stepped down
        with orders_flask_app.app_context():
            (row,) = _outbox_rows_for([order_id])
            assert row.attempts >= 1 and row.last_error
        with RelayLeaderConnection(settings.database_url("orders")) as successor:
            assert successor.lead()  # the lock is free for a relay elsewhere
        _let_go_of_the_workers_publisher()  # this worker could reach the broker again
        runs.append(_relay_run_in_a_thread(second))
        runs[1].join(10)
        assert second == [0]  # sitting out: it returned at once instead of leading
    finally:
        relay._stop_leading()  # a run that led after all
        for run in runs:
            run.join(30)
        relay._stopping.clear()
        relay._sitting_out.pop("orders", None)
        _let_go_of_the_workers_publisher()
    with _relay_task_leading(), orders_flask_app.app_context():
        _wait_until_sent([order_id])  # its sit-out cleared, it leads and sends


@contextmanager
def _leading_through(publisher) -> Iterator[tuple[threading.Thread, list]]:
    """relay_outbox for orders run in a thread (as _relay_run_in_a_thread), its worker sending
    through `publisher`: yields the run and the list what it returns goes to; on the way out the
    run is stopped and joined, and the worker is as it was (no sit-out, its own publisher)."""
    from tasks import relay

    service_app("orders").extensions[relay._PUBLISHER] = publisher
    led: list = []
    run = _relay_run_in_a_thread(led)
    try:
        yield run, led
    finally:
        relay._stop_leading()
        run.join(30)
        relay._stopping.clear()
        relay._sitting_out.pop("orders", None)
        _let_go_of_the_workers_publisher()


def _waiting_long(monkeypatch) -> None:
    """Have a refused row wait five minutes for its next try."""
    monkeypatch.setattr("shared.outbox.relaying.FIRST_RETRY_AFTER_SECONDS", 300.0)
    monkeypatch.setattr("shared.outbox.relaying.LONGEST_RETRY_AFTER_SECONDS", 300.0)


@pytest.mark.parametrize("refused_before", [False, True])
def test_a_leader_whose_refused_rows_wait_for_their_next_try_still_steps_down(
        orders_flask_app, settings, user_id, monkeypatch, refused_before):
    """Refused rows waiting for their next try are rows waiting: a leader whose every batch had
    no answer from the broker (here: a port nothing listens on, messages timing out after 0.3 s)
    steps down after STEP_DOWN_AFTER_SECONDS, though its reads in between find nothing to send
    yet; rows refused before it led (by a leader that stepped down, say) count as any."""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 2.0)
    monkeypatch.setattr(relay, "TOPIC_CHECK_TIMEOUT_SECONDS", 0.2)
    _waiting_long(monkeypatch)
    with orders_flask_app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))
        order_id = _place(user_id).id
        if refused_before:
            with transaction() as session, driver_cursor(session) as cursor:
                cursor.execute("UPDATE outbox_messages SET attempts = 3, next_attempt_at = now()"
                               " WHERE correlation_id = %s", (str(order_id),))
    monkeypatch.setattr("shared.kafka.MESSAGE_TIMEOUT_MS", 300)  # (read as its producer is made)
    cut_off = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    try:
        with _leading_through(OutboxPublisher(cut_off, "orders")) as (run, led):
            run.join(30)
            assert led == [0] and "orders" in relay._sitting_out  # it led, sent none, stepped down
        assert time.monotonic() - started >= 2.0
        with orders_flask_app.app_context():
            (row,) = _outbox_rows_for([order_id])
            assert "_MSG_TIMED_OUT" in row.last_error
            assert row.attempts == (4 if refused_before else 1)  # refused once, then it waited
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([order_id])


def _a_lone_row_of_the_refused_topic(app, settings, user_id: str, monkeypatch):
    """The id of the order whose outbox row, the only one, goes to REFUSED_TOPIC, and is tried
    again 0.2 s after each refusal (at the leader's next wake-up)."""
    monkeypatch.setattr("shared.outbox.relaying.FIRST_RETRY_AFTER_SECONDS", 0.2)
    monkeypatch.setattr("shared.outbox.relaying.LONGEST_RETRY_AFTER_SECONDS", 0.2)
    with app.app_context():
        _relay_all(OutboxPublisher(settings, "orders"))  # whatever earlier tests left behind
        refused_id = _place(user_id).id
        _send_to(REFUSED_TOPIC, [refused_id])
    return refused_id


def test_a_leader_the_broker_refuses_a_lone_row_for_its_topic_goes_on_leading(
        orders_flask_app, settings, user_id, monkeypatch):
    """A row the broker refuses for what it is (here a topic it will take no message for, as it
    would one the relay may not write to), with no other row to send: every batch is refused
    whole, but with the broker's answer, so this worker reaches it and another would fare no
    better. The leader goes on leading, and trying the row, however long, and a row committed
    meanwhile goes at once (it stepped down at its second refusal here, and each time it came
    back after its sit-out, the rows committed meanwhile waiting for it)."""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 0.5)
    refused_id = _a_lone_row_of_the_refused_topic(orders_flask_app, settings, user_id,
                                                  monkeypatch)
    service_app("orders").extensions[relay._PUBLISHER] = _refusing_publisher(settings)
    try:
        with _relay_task_leading(), orders_flask_app.app_context():
            def refused_again_and_again() -> bool:  # at each wake-up, a second apart
                assert "orders" not in relay._sitting_out, "the leader stepped down"
                db.session.rollback()
                (row,) = _outbox_rows_for([refused_id])
                return row.attempts >= 3

            wait_for(refused_again_and_again, timeout=20, what="the row refused three times")
            later_id = _place(f"{user_id}-other").id
            _wait_until_sent([later_id])  # (deleted once the broker acknowledged it)
            assert "orders" in relay._leading and "orders" not in relay._sitting_out
            (row,) = _outbox_rows_for([refused_id])
            assert "Invalid topic" in row.last_error
    finally:
        relay._sitting_out.pop("orders", None)
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([refused_id])


@pytest.fixture
def leader_out_of_reach(settings, run_dir, note_started) -> Iterator:
    """Settings for a broker of the test's own that a worker reaches for its metadata alone: it
    answers at its bootstrap address, so that a message for a topic it has no partition of
    (REFUSED_TOPIC) is refused with its answer ("Broker: Invalid topic"), but the leader of the
    shop's topics' partitions, at the address it advertises (a proxy to it, cut once they are
    made), is out of reach, and every message for them times out."""
    port = free_port()
    way_to_the_leader = SilencingProxy(f"127.0.0.1:{port}")
    try:
        broker = start_broker(port, run_dir / "leader-out-of-reach", on_start=note_started,
                              advertised=way_to_the_leader.address)
        try:
            own = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{port}")
            ensure_topics(own, own.topics())
            way_to_the_leader.cut()
            yield own
        finally:
            broker.stop()
    finally:
        way_to_the_leader.close()


@pytest.mark.parametrize("batches", ["together", "apart"])
def test_a_leader_answered_for_one_row_while_the_others_time_out_still_steps_down(
        orders_flask_app, settings, leader_out_of_reach, user_id, monkeypatch, batches):
    """The broker's answer for a row of a refused topic says nothing for the rows that had none:
    a leader whose batches take nothing and leave rows without an answer (here: the broker
    answers for REFUSED_TOPIC, the leader of the partitions is out of reach, messages timing out
    after 0.3 s) steps down after STEP_DOWN_AFTER_SECONDS, though a row refused for good is
    tried all the while, in their batches or, its waits out of step with theirs, in batches of
    its own that the broker answers for whole (the leader counted afresh at each of those, and
    led for ever)."""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 4.0)
    monkeypatch.setattr(relay, "TOPIC_CHECK_TIMEOUT_SECONDS", 0.2)
    refused_id = _a_lone_row_of_the_refused_topic(orders_flask_app, settings, user_id,
                                                  monkeypatch)
    order_ids = []
    if batches == "apart":  # each row waits 1.5 s between its tries, the second 0.7 s behind
        monkeypatch.setattr("shared.outbox.relaying.FIRST_RETRY_AFTER_SECONDS", 1.5)
        monkeypatch.setattr("shared.outbox.relaying.LONGEST_RETRY_AFTER_SECONDS", 1.5)
    else:
        with orders_flask_app.app_context():
            order_ids.append(_place(f"{user_id}-other").id)
    monkeypatch.setattr("shared.kafka.MESSAGE_TIMEOUT_MS", 300)  # (read as its producer is made)
    try:
        with _leading_through(_refusing_publisher(leader_out_of_reach)) as (run, led):
            if batches == "apart":
                with orders_flask_app.app_context():
                    wait_for(lambda: _attempts(refused_id) >= 1, timeout=10,
                             what="the refused topic's row answered")
                    time.sleep(0.7)  # (out of step with it: the point of the test)
                    order_ids.append(_place(f"{user_id}-other").id)
            run.join(30)
            assert led == [0] and "orders" in relay._sitting_out  # it led, sent none, stepped down
        with orders_flask_app.app_context():
            assert "Invalid topic" in _last_error(refused_id)
            assert "_MSG_TIMED_OUT" in _last_error(order_ids[0])
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([refused_id, *order_ids])


def test_a_row_left_unanswered_then_parked_leaves_the_count_to_the_brokers_answers(
        orders_flask_app, settings, leader_out_of_reach, user_id, monkeypatch):
    """A row the broker left without an answer, then parked at its next try (too large: the
    test makes it so once it timed out), waits no more: a leader with only a row refused for good
    left, which the broker answers for, ends its count and goes on leading (the parked row,
    still counted as waiting unanswered, kept the count going, and it stepped down)."""
    from tasks import relay

    # (The row timed out is to be parked, and the refused one answered, within this.)
    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 3.0)
    monkeypatch.setattr(relay, "TOPIC_CHECK_TIMEOUT_SECONDS", 0.2)
    refused_id = _a_lone_row_of_the_refused_topic(orders_flask_app, settings, user_id,
                                                  monkeypatch)
    with orders_flask_app.app_context():
        parked_id = _place(f"{user_id}-other").id
    monkeypatch.setattr("shared.kafka.MESSAGE_TIMEOUT_MS", 300)  # (read as its producer is made)
    try:
        with (_leading_through(_refusing_publisher(leader_out_of_reach)),
              orders_flask_app.app_context()):
            wait_for(lambda: "_MSG_TIMED_OUT" in _last_error(parked_id), timeout=10,
                     what="the other row left without an answer")
            # Over the producer's message.max.bytes, refused at produce(), before any broker: the
            # same row as it was cannot be refused for good at its next try, Tansu holding no
            # topic to its max.message.bytes, and the tests' broker validating no record (its
            # refusal as INVALID_RECORD needs a schema registry: test_outbox_schema_refusals.py).
            _make_too_large(parked_id)

            def parked() -> bool:
                db.session.rollback()
                (row,) = _outbox_rows_for([parked_id])
                return row.parked_at is not None

            wait_for(parked, timeout=10, what="the other row parked")
            leading_until = time.monotonic() + relay.STEP_DOWN_AFTER_SECONDS + 1.5
            while time.monotonic() < leading_until:
                assert "orders" not in relay._sitting_out, "the leader stepped down"
                time.sleep(0.1)  # (nothing is to happen for the span: nothing to poll for)
            assert "MSG_SIZE_TOO_LARGE" in _last_error(parked_id)
            assert "Invalid topic" in _last_error(refused_id)
    finally:
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([refused_id, parked_id])


def _last_error(order_id) -> str:
    db.session.rollback()
    (row,) = _outbox_rows_for([order_id])
    return row.last_error or ""


def _attempts(order_id) -> int:
    db.session.rollback()
    (row,) = _outbox_rows_for([order_id])
    return row.attempts


class _PublisherToSwitch:
    """Sends through `publisher`, which a test may replace while a leader uses it."""

    def __init__(self, publisher: OutboxPublisher):
        self.publisher = publisher

    def send_batch(self, rows):
        return self.publisher.send_batch(rows)

    def close(self) -> None:
        self.publisher.close()


def test_a_leader_that_had_no_answer_for_a_while_counts_afresh_once_the_broker_answers(
        orders_flask_app, settings, user_id, monkeypatch):
    """A leader cut off for a moment begins to count towards stepping down; once the broker
    answers again, though only to refuse a lone row for its topic, this worker reaches it: the
    count ends, and the leader goes on leading past STEP_DOWN_AFTER_SECONDS, however often the
    row is refused meanwhile (and waits for its next try, which kept a count going before)."""
    from tasks import relay

    monkeypatch.setattr(relay, "STEP_DOWN_AFTER_SECONDS", 3.0)
    monkeypatch.setattr(relay, "TOPIC_CHECK_TIMEOUT_SECONDS", 0.2)
    refused_id = _a_lone_row_of_the_refused_topic(orders_flask_app, settings, user_id,
                                                  monkeypatch)
    monkeypatch.setattr("shared.kafka.MESSAGE_TIMEOUT_MS", 300)  # (read as its producer is made)
    cut_off = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    switch = _PublisherToSwitch(_refusing_publisher(cut_off))
    worker_app = service_app("orders")
    worker_app.extensions[relay._PUBLISHER] = switch
    try:
        with _relay_task_leading(), orders_flask_app.app_context():
            wait_for(lambda: "_MSG_TIMED_OUT" in _last_error(refused_id), timeout=20,
                     what="the row refused with no answer")
            switch.publisher = _refusing_publisher(settings)  # the way to the broker mended
            answered_since = time.monotonic()
            wait_for(lambda: "Invalid topic" in _last_error(refused_id), timeout=20,
                     what="the row refused by the broker")

            def led_past_the_step_down() -> bool:
                assert "orders" not in relay._sitting_out, "the leader stepped down"
                return time.monotonic() - answered_since > relay.STEP_DOWN_AFTER_SECONDS + 1.5

            wait_for(led_past_the_step_down, timeout=20, what="the leader to lead on")
            assert "orders" in relay._leading and "Invalid topic" in _last_error(refused_id)
    finally:
        relay._sitting_out.pop("orders", None)
        _let_go_of_the_workers_publisher()
        with orders_flask_app.app_context():
            _delete_outbox_rows_of([refused_id])
