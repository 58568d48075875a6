"""The inbox tasks as Celery runs them: the handler retried on failure and parked at the attempt
limit, the pruner of old rows, and parked messages replayed by an operator."""

from __future__ import annotations

import contextlib
import getpass
import io
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import urlsplit

import psycopg2
import pytest
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy import case, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

import payments_app
import shared.db
from devstack.infra import free_port
from devstack.stack import REPO_ROOT
from shared.config import SERVICES
from shared.contracts import PAYMENT_REQUESTED, encode, new_event
from shared.db import db, driver_dsn, held_up_by_a_lock, transaction
from shared.inbox.handling import (PermanentMessageError, process_inbox_message,
                                   record_failed_attempt)
from shared.inbox.model import InboxMessage
from shared.inbox.storing import ConsumedRecord
from shared.inbox.sweeping import claim_stalled_messages
from shared.outbox.writing import OutboxMessage
from shared.request_context import (REQUEST_ID_KAFKA_HEADER, current_request_id,
                                    log_with_request_ids)
from tasks.celery_app import app as celery_app
from tasks.inbox import (handle_inbox_batch, handle_inbox_message, prune_inbox, retry_countdown,
                         sweep_inbox, tasks_waiting)
from tasks.services import service_app
from tests.celery_tools import sending_to, worker_optimizations
from tests.discard_warnings import order_left_new
from tests.clock_tools import inbox_clock_off_by
from tests.network_tools import NeverReadingServer, SilencingProxy
from tests.polling import wait_for
from tests.postgres_tools import (account_row_held, called_at_the_first_statement_naming,
                                  committed_on_a_connection_of_its_own,
                                  ending_its_session_by_a_driver_cursor,
                                  ending_its_session_by_a_statement, terminate_backend,
                                  the_next_commits_answer_lost,
                                  wait_for_sessions_waiting_on_a_lock)
from tests.parked_terminal import (database_named, discarded_all_confirmed_leaving_some_parked,
                                   discarded_named_confirmed_leaving_one_parked,
                                   environment_without_sudo, on_a_terminal, said_until)
from tests.process_tools import start_child
from tests.thread_tools import OutcomeThread, all_joined


def _stored_request(store, user: str, key: str | None = None,
                    amount: Decimal = Decimal("1.00"), request_id: str | None = None) -> uuid.UUID:
    """A PaymentRequested of `user` stored in the payments inbox (under Kafka key `key`, with
    `request_id` as its header)."""
    event = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": user,
                                          "amount": amount})
    headers = {REQUEST_ID_KAFKA_HEADER: request_id.encode()} if request_id else {}
    store([ConsumedRecord("task-test", 0, 0, key.encode() if key else None,
                          encode(event.to_json()), headers)])
    return event.message_id


def _row(message_id) -> InboxMessage:
    with service_app("payments").app_context():
        return db.session.get(InboxMessage, message_id)


def test_a_handler_that_keeps_failing_is_retried_then_parked(settings, payments_inbox, monkeypatch,
                                                            user_id):
    calls = []

    def broken(session, events):
        calls.extend(event.message.message_id for event in events)
        raise ConnectionError("ledger unavailable")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: broken})
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_message.apply(args=("payments", str(message_id)))
    row = _row(message_id)
    assert len(calls) == settings.inbox_max_attempts
    assert row.attempts == settings.inbox_max_attempts
    assert row.parked_at is not None and row.processed_at is None
    assert "ledger unavailable" in row.last_error


@contextmanager
def _lines_logged() -> Iterator[io.StringIO]:
    """What the process logs meanwhile, as its log handlers write it (with request ids)."""
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    log_with_request_ids(handler)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield written
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.mark.parametrize("how", ["its own task, retried until parked", "a batch, parked",
                                 "the sweeper, its tries lost"])
def test_every_line_logged_of_a_failing_message_carries_its_request_id(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, how):
    """The click's id follows the message to the end, a failed one included: each try's failure,
    and the line that parks it (its final status), can be found by the id as its handled line
    can."""
    request_id = f"click-{uuid.uuid4().hex}"

    def broken(session, events):
        if how.startswith("a batch"):
            raise PermanentMessageError("no such ledger")
        raise ConnectionError("ledger unavailable")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: broken})
    message_id = _stored_request(payments_inbox, user_id, request_id=request_id)
    with _lines_logged() as written:
        if how.startswith("a batch"):
            handle_inbox_batch.apply(args=("payments", [str(message_id)]))
        elif how.startswith("the sweeper"):
            with service_app("payments").app_context(), transaction() as session:
                session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                                .values(attempts=settings.inbox_max_attempts - 1))
            _received_ago(message_id, timedelta(minutes=1), handed_over_ago=timedelta(minutes=1),
                          tried_since=True)
            sweep_inbox.apply(args=("payments",)).get()
        else:
            handle_inbox_message.apply(args=("payments", str(message_id)))
    assert _row(message_id).parked_at is not None
    # Its lines: those naming it, and those of its task or batch, which name the task (Celery's
    # of a retry) or no message (a batch failing).
    lines = [line for line in written.getvalue().splitlines()
             if str(message_id) in line or " retry: Retry in " in line
             or "a message of a batch of" in line]
    assert any("parked" in line for line in lines), lines
    if how.startswith("its own task"):
        assert any(" retry: Retry in " in line for line in lines), lines
    if how.startswith("a batch"):
        assert any("a message of a batch of 1 failed" in line for line in lines), lines
    assert [line for line in lines if f"[request_id={request_id}]" not in line] == []


@pytest.mark.parametrize("task", [handle_inbox_message, handle_inbox_batch],
                         ids=["its own task", "a batch"])
def test_a_message_whose_commits_answer_was_lost_ends_its_trace_found_handled_already(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, task):
    """Its handling committed, the COMMIT's answer lost: nothing says it handled (only a known
    commit does), and the failed try's record, or the batch handling it again one by one, finds
    it done: that is said, with its request id, so that the click's trace does not end at a
    failure. A message found done at a first look (a repeat) is not said so."""
    request_id = f"click-{uuid.uuid4().hex}"
    answers_lost, lost = ExitStack(), []

    def handled_its_commits_answer_to_be_lost(session, events):
        lost.append(answers_lost.enter_context(the_next_commits_answer_lost(session.get_bind())))

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: handled_its_commits_answer_to_be_lost})
    message_id = _stored_request(payments_inbox, user_id, request_id=request_id)
    args = ("payments", str(message_id) if task is handle_inbox_message else [str(message_id)])
    with _lines_logged() as written, answers_lost:
        task.apply(args=args).get()
        task.apply(args=args).get()  # (a repeat, found done at its first look)
    assert lost == [[True]] and _row(message_id).processed_at is not None
    found = [line for line in written.getvalue().splitlines()
             if f"found {message_id} handled already" in line]
    assert len(found) == 1 and f"[request_id={request_id}]" in found[0], found


def test_a_retry_sent_by_a_worker_is_said_with_its_messages_request_id_bound_no_longer(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """Celery says the retry once the task's body is done: with the message's request id, which
    the worker's thread keeps bound no longer than the task's run."""
    request_id = f"click-{uuid.uuid4().hex}"

    def broken(session, events):
        raise ConnectionError("ledger unavailable")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: broken})
    message_id = _stored_request(payments_inbox, user_id, request_id=request_id)
    with _lines_logged() as written:
        _run_as_a_worker_runs_it(handle_inbox_message, ("payments", str(message_id)))
        logging.getLogger("tests.after_the_run").info("the run is over")
    assert _tasks_sent() == [(handle_inbox_message.name, ["payments", str(message_id)])]
    lines = written.getvalue().splitlines()
    [retry] = [line for line in lines if " retry: Retry in " in line]
    assert f"[request_id={request_id}]" in retry
    [after] = [line for line in lines if "the run is over" in line]
    assert "[request_id=-]" in after


def _request_ids_on(lines: list[str], saying: str) -> list[list[str]]:
    """The request ids written on each line saying `saying`, sorted."""
    return [sorted(re.search(r"\[request_id=(\S+)\]", line)[1].split(","))
            for line in lines if saying in line]


def test_a_batchs_lines_of_several_messages_at_once_carry_the_request_ids_of_them_all(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """What a handler says of a run of messages handled at once, and the line saying that their
    batch failed, carry the ids of all their clicks (comma-separated: a grep for any finds them);
    a message its handler writes meanwhile answers none of them (it gives the id of its own).
    Handled again one by one, each message's lines carry its own."""
    request_ids = sorted(f"click-{uuid.uuid4().hex}" for _ in range(2))
    message_ids = [_stored_request(payments_inbox, user_id, request_id=request_id)
                   for request_id in request_ids]
    said, answering = logging.getLogger("tests.handler"), []

    def refusing_the_second(session, events):
        said.info("handling a run of %d", len(events))
        answering.append(current_request_id())
        if any(event.message.message_id == message_ids[1] for event in events):
            raise PermanentMessageError("no such ledger")

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: refusing_the_second})
    with _lines_logged() as written:
        handle_inbox_batch.apply(args=("payments", [str(m) for m in message_ids]))
    assert _row(message_ids[0]).processed_at is not None
    assert _row(message_ids[1]).parked_at is not None
    lines = written.getvalue().splitlines()
    assert _request_ids_on(lines, "handling a run of 2") == [request_ids]
    assert _request_ids_on(lines, "a message of a batch of 2 failed") == [request_ids]
    assert sorted(_request_ids_on(lines, "handling a run of 1")) == [[r] for r in request_ids]
    assert answering[0] is None and sorted(answering[1:]) == request_ids


def test_a_batchs_failure_line_names_no_request_id_of_a_message_done_before_it(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """A message already processed (or parked) when the batch ran was passed over: it cannot be
    the one that failed, and the line leaves its id out."""
    request_ids = sorted(f"click-{uuid.uuid4().hex}" for _ in range(3))
    message_ids = [_stored_request(payments_inbox, user_id, request_id=request_id)
                   for request_id in request_ids]

    def refusing_the_second(session, events):
        if any(event.message.message_id == message_ids[1] for event in events):
            raise PermanentMessageError("no such ledger")

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: refusing_the_second})
    handle_inbox_message.apply(args=("payments", str(message_ids[0])))
    assert _row(message_ids[0]).processed_at is not None
    with _lines_logged() as written:
        handle_inbox_batch.apply(args=("payments", [str(m) for m in message_ids]))
    assert _row(message_ids[1]).parked_at is not None
    assert _request_ids_on(written.getvalue().splitlines(),
                           "a message of a batch of 3 failed") == [request_ids[1:]]


def test_a_database_outages_lines_carry_no_request_id_of_the_message_that_met_it(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """The outage is the process's, not one message's: its lines (that the connection was lost,
    that it is back), said by a message's own task whose try met it, are written [request_id=-],
    not with that message's id, which a reader following the click would take for its own
    trouble (and one following the outage would not find)."""
    import tasks.inbox

    outage = shared.db.DatabaseOutageLog(tasks.inbox.log, "the payments inbox handlers")
    monkeypatch.setitem(tasks.inbox._HANDLERS_DATABASE_OUTAGE, "payments", outage)
    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: lambda session, events:
                                 ending_its_session_by_a_statement(session)})
    message_id = _stored_request(payments_inbox, user_id,
                                 request_id=f"click-{uuid.uuid4().hex}")
    with _lines_logged() as written:
        _run_as_a_worker_runs_it(handle_inbox_message, ("payments", str(message_id)))
    assert _tasks_sent() == [(handle_inbox_message.name, ["payments", str(message_id)])]
    lines = [line for line in written.getvalue().splitlines()
             if "the payments inbox handlers" in line]
    assert [("lost its database connection" in line, "connection back" in line)
            for line in lines] == [(True, False), (False, True)], lines
    assert [line for line in lines if "[request_id=-]" not in line] == []


def test_a_task_of_its_own_notes_its_try_begun_before_the_handler_runs(
        settings, payments_inbox, monkeypatch, user_id):
    """Committed before the handler runs, so that a try whose worker dies in the handler is on
    record for the sweeper (which counts it: shared.inbox.sweeping.claim_stalled_messages)."""
    seen = []

    def looking(session, events):
        other = psycopg2.connect(driver_dsn(settings.database_url("payments")))
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT try_open FROM inbox_messages WHERE message_id = %s",
                               (str(events[0].message.message_id),))
                seen.append(cursor.fetchone()[0])
        finally:
            other.close()

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: looking})
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_message.apply(args=("payments", str(message_id)))
    assert seen == [True] and _row(message_id).processed_at is not None


def test_a_handler_that_fails_once_succeeds_on_retry(settings, payments_inbox, monkeypatch,
                                                     user_id):
    calls = []

    def flaky(session, events):
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("blip")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: flaky})
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_message.apply(args=("payments", str(message_id)))
    row = _row(message_id)
    assert len(calls) == 2
    assert row.processed_at is not None and row.parked_at is None and row.attempts == 2


def test_batches_debiting_the_same_accounts_at_once_never_deadlock(settings, payments_inbox,
                                                                   user_id, monkeypatch):
    """Two batches list the same users' payment requests in opposite orders; handled at the same
    time, each must take the locks in one order, or PostgreSQL aborts one of them. Each batch must
    go through in one transaction: the fallback of a savepoint per message, which would make good
    a deadlock of the first pass, is not taken."""
    import tasks.inbox
    from payments_app import service as payments
    from tasks.inbox import _handle_in_one_transaction

    fell_back = []
    monkeypatch.setattr(tasks.inbox, "_handle_each_in_a_savepoint",
                        lambda service, message_ids, handlers, **_:
                        fell_back.append(message_ids) or [])

    users = [f"{user_id}-{n}" for n in range(8)]
    with service_app("payments").app_context():
        for user in users:
            with transaction() as session:
                payments.open_account(session, user_id=user)
                payments.deposit(session, user_id=user, amount=Decimal("100"))
    batches = [[_stored_request(payments_inbox, user, key=user) for user in users]
               for _ in range(2)]
    batches[1].reverse()

    def handle(batch):
        with service_app("payments").app_context():
            return _handle_in_one_transaction("payments", batch, payments_app.message_handlers())

    # Both batches made to meet on the accounts: a row in the middle held until both wait, so
    # that locks taken in two orders would deadlock for sure, not only when the threads interleave.
    threads = [OutcomeThread(handle, batch) for batch in batches]
    with account_row_held(settings.database_url("payments"), users[4]):
        for thread in threads:
            thread.start()
        wait_for_sessions_waiting_on_a_lock(settings.database_url("payments"), count=2,
                                            timeout=1.5,
                                            what="both batches waiting on the accounts")
    assert all_joined(threads, 60) == [[], []]  # (nothing left to retry)
    assert fell_back == []
    assert all(_row(m).processed_at is not None for batch in batches for m in batch)


def test_a_batch_commits_its_good_messages_and_undoes_the_failing_ones(settings, payments_inbox,
                                                                       monkeypatch, user_id):
    """The batch runs without savepoints first; when handlers fail it runs again with one each:
    the good messages are handled once, the failing ones leave nothing but a counted attempt."""
    from payments_app import service as payments
    from payments_app.models import Account, Payment
    from tasks.inbox import _handle_in_one_transaction

    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 3600.0)  # as if used a moment ago
    with service_app("payments").app_context():
        db.engine.dispose()  # from here the worker's pool holds the one connection used below
        with transaction() as session:
            payments.open_account(session, user_id=user_id)
            payments.deposit(session, user_id=user_id, amount=Decimal("100"))
    good, transient, permanent, also_good = (_stored_request(payments_inbox, user_id, key=user_id)
                                             for _ in range(4))
    failures = {transient: ConnectionError("blip"), permanent: PermanentMessageError("never")}
    take_payments = payments_app.message_handlers()[PAYMENT_REQUESTED]
    calls = []

    def failing_after_its_writes(session, events):
        calls.extend(event.message.message_id for event in events)
        take_payments(session, events)  # debits and writes the outbox rows first
        for event in events:
            if event.message.message_id in failures:
                raise failures[event.message.message_id]

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: failing_after_its_writes})
    with service_app("payments").app_context():
        left = _handle_in_one_transaction("payments", [good, transient, permanent, also_good],
                                          payments_app.message_handlers())
        assert left == [transient]
        assert db.session.get(Account, user_id).balance == Decimal("98.00")
        paid = {payment.order_id
                for payment in db.session.query(Payment).filter_by(user_id=user_id)}
        announced = [(row.type, uuid.UUID(row.envelope["payload"]["order_id"]))
                     for row in db.session.query(OutboxMessage).filter_by(key=user_id)]
    assert len(paid) == 2  # each payment made announced once, the undone ones not at all
    assert sorted(announced) == sorted(("PaymentSucceeded", order_id) for order_id in paid)
    assert calls.count(good) == 2  # once in the batch that rolled back, once for good
    rows = {m: _row(m) for m in (good, transient, permanent, also_good)}
    assert rows[good].processed_at and rows[also_good].processed_at
    assert rows[permanent].parked_at and "never" in rows[permanent].last_error
    assert rows[transient].processed_at is None and rows[transient].parked_at is None
    assert rows[transient].attempts == 1


def test_a_message_failing_its_last_attempt_in_a_batch_is_parked_there_not_tried_again(
        settings, payments_inbox, monkeypatch, user_id):
    """A batch handling its messages one by one counts each failure for good: one that used the
    message's last attempt parks it, with its error, rather than hand it to a task for one try
    more than INBOX_MAX_ATTEMPTS; one with attempts left is handed on, its error kept."""
    from tasks.inbox import _handle_in_one_transaction

    calls = []

    def broken(session, events):
        calls.extend(event.message.message_id for event in events)
        raise ConnectionError("ledger unavailable")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: broken})
    last_try, first_try = (_stored_request(payments_inbox, user_id) for _ in range(2))
    with service_app("payments").app_context():
        with transaction() as session:
            session.execute(update(InboxMessage).where(InboxMessage.message_id == last_try)
                            .values(attempts=settings.inbox_max_attempts - 1))
        left = _handle_in_one_transaction("payments", [last_try, first_try],
                                          payments_app.message_handlers())
    assert left == [first_try]
    parked, handed_on = _row(last_try), _row(first_try)
    assert parked.parked_at is not None and parked.attempts == settings.inbox_max_attempts
    assert "ledger unavailable" in parked.last_error
    assert handed_on.parked_at is None and handed_on.attempts == 1
    assert "ledger unavailable" in handed_on.last_error
    handle_inbox_message.apply(args=("payments", str(last_try)))
    assert calls.count(last_try) == 2  # in the batch, then one by one: no try after the last


def test_a_batch_survives_the_database_dropping_the_workers_connection(settings, payments_inbox,
                                                                       user_id, monkeypatch):
    """A pooled connection used a moment ago is not pinged before use (shared.db). When the
    database has just dropped it (a restart, say), the batch's first transaction fails on it and
    its retry, on a fresh connection, handles every message."""
    from payments_app import service as payments
    from tasks.inbox import _handle_in_one_transaction

    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 3600.0)  # as if used a moment ago
    with service_app("payments").app_context():
        db.engine.dispose()  # from here the worker's pool holds the one connection used below
        with transaction() as session:
            payments.open_account(session, user_id=user_id)
            payments.deposit(session, user_id=user_id, amount=Decimal("10"))
        pooled_pid = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        db.session.rollback()
    batch = [_stored_request(payments_inbox, user_id, key=user_id) for _ in range(3)]
    terminate_backend(settings.payments_database_url, pooled_pid)
    with service_app("payments").app_context():
        left = _handle_in_one_transaction("payments", batch, payments_app.message_handlers())
        new_pid = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        db.session.rollback()
    assert left == []
    assert new_pid != pooled_pid
    assert all(_row(m).processed_at is not None for m in batch)


def test_a_batch_whose_connection_is_lost_under_a_handler_twice_hands_its_message_on(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """The connection lost while a message's handler runs may be an outage's doing or the
    handler's: the whole batch is retried, that message in it (its key's order kept), the loss
    counted in the retry's kwargs; lost under it again, the message goes to a task of its own and
    the rest of the batch is retried whole. Each retry shows no ids in the logs and Flower
    (argsrepr, as a dispatch), and no try of it is counted."""
    take_payments = payments_app.message_handlers()[PAYMENT_REQUESTED]
    first, ends_its_session, last = (_stored_request(payments_inbox, user_id, key=user_id)
                                     for _ in range(3))

    def ending_its_session(session, events):
        if any(event.message.message_id == ends_its_session for event in events):
            session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        take_payments(session, events)

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: ending_its_session})
    batch = [str(first), str(ends_its_session), str(last)]
    _run_as_a_worker_runs_it(handle_inbox_batch, ("payments", batch))
    ((name, args, kwargs, argsrepr),) = _tasks_sent()
    assert (name, args) == (handle_inbox_batch.name, ["payments", batch])
    assert kwargs == {"tries_lost_once_connected": 0, "lost_under": {str(ends_its_session): 1}}
    assert argsrepr == "('payments', <3 message ids>)"

    _run_as_a_worker_runs_it(handle_inbox_batch, tuple(args), kwargs, retries=1)
    sent = _tasks_sent()
    assert sent[0] == (handle_inbox_message.name, ["payments", str(ends_its_session)])
    name, args, kwargs, argsrepr = sent[1]
    assert (name, args) == (handle_inbox_batch.name, ["payments", [str(first), str(last)]])
    assert kwargs == {"tries_lost_once_connected": 0}
    assert argsrepr == "('payments', <2 message ids>)"
    for message_id in (first, ends_its_session, last):
        row = _row(message_id)
        assert row.processed_at is None and row.attempts == 0


def _refusing_the_message(session) -> None:
    raise PermanentMessageError("the ledger said no")  # (raised afresh: no lost error behind it)


def _returning(session) -> None:
    pass


def _running_another_statement(session) -> None:
    session.execute(text("SELECT 1"))  # the session's own error, PendingRollbackError, let out


@pytest.mark.parametrize("ends_its_session", [ending_its_session_by_a_statement,
                                              ending_its_session_by_a_driver_cursor],
                         ids=["by a statement", "by a driver cursor"])
@pytest.mark.parametrize("then", [_refusing_the_message, _returning, _running_another_statement],
                         ids=["refuses the message", "returns", "runs another statement"])
def test_a_connection_lost_under_a_handler_that_catches_its_error_keeps_its_batch_together(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, ends_its_session, then):
    """A handler that catches the lost connection's error itself, then refuses the message
    (PermanentMessageError), returns as if it had handled it, or runs on into the session's own
    error, hides nothing: the connection was noted lost where the error was met, and the batch is
    retried whole, the loss counted under that message, as for a handler that let the error out.
    Before, the message was taken for a bad one (refused: parked, or tried to be, on the lost
    transaction) and the batch split into tasks of their own, one by one."""
    take_payments = payments_app.message_handlers()[PAYMENT_REQUESTED]
    first, loses_it, last = (_stored_request(payments_inbox, user_id, key=user_id)
                             for _ in range(3))

    def catching_the_error(session, events):
        if any(event.message.message_id == loses_it for event in events):
            try:
                ends_its_session(session)
            except DBAPIError:
                pass
            else:
                raise AssertionError("the session was not ended")
            then(session)
            return
        take_payments(session, events)

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: catching_the_error})
    batch = [str(first), str(loses_it), str(last)]
    _run_as_a_worker_runs_it(handle_inbox_batch, ("payments", batch))
    ((name, args, kwargs, _),) = _tasks_sent()
    assert (name, args) == (handle_inbox_batch.name, ["payments", batch])
    assert kwargs == {"tries_lost_once_connected": 0, "lost_under": {str(loses_it): 1}}
    for message_id in (first, loses_it, last):
        row = _row(message_id)
        assert (row.processed_at, row.parked_at, row.attempts) == (None, None, 0)


@pytest.mark.parametrize("ends_its_session", [ending_its_session_by_a_statement,
                                              ending_its_session_by_a_driver_cursor],
                         ids=["by a statement", "by a driver cursor"])
def test_a_messages_own_task_whose_handler_catches_the_lost_connections_error_retries_it(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, ends_its_session):
    """A message's own task: its handler catches the lost connection's error and refuses the
    message; the try is a connection lost under its handler (recorded on a fresh connection and
    retried, as any such try: a handler ending its own session must end parked), not a refusal
    that parks the message at once; and its error is the one the connection was lost with, not
    what the statements after it met ("connection already closed")."""
    message_id = _stored_request(payments_inbox, user_id)

    def catching_the_error(session, events):
        try:
            ends_its_session(session)
        except DBAPIError:
            pass
        _refusing_the_message(session)

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: catching_the_error})
    _run_as_a_worker_runs_it(handle_inbox_message, ("payments", str(message_id)))
    assert _tasks_sent() == [(handle_inbox_message.name, ["payments", str(message_id)])]
    row = _row(message_id)
    assert (row.processed_at, row.parked_at, row.attempts) == (None, None, 1)
    assert "connection was lost while the handler" in row.last_error
    assert "connection already closed" not in row.last_error


def _executing_on_a_cursor_it_closed(session) -> None:
    """A handler's bug on a sound connection: psycopg2's "cursor already closed", which
    SQLAlchemy's dialect takes for a disconnection by its words."""
    with shared.db.driver_cursor(session) as cursor:
        cursor.close()
        cursor.execute("SELECT 1")


def _bug_let_out(session, user_id) -> None:
    _executing_on_a_cursor_it_closed(session)


def _bug_caught_then_returning(session, user_id) -> None:
    try:
        _executing_on_a_cursor_it_closed(session)
    except DBAPIError:
        pass
    else:
        raise AssertionError("the closed cursor ran a statement")


def _statement_timeout_let_out(session, user_id) -> None:
    with shared.db.driver_cursor(session) as cursor:
        cursor.execute("SET LOCAL statement_timeout = '50ms'")
        cursor.execute("SELECT pg_sleep(2)")


def _lock_timeout_caught_then_refusing(session, user_id) -> None:
    try:
        with shared.db.driver_cursor(session) as cursor:
            cursor.execute("SET LOCAL lock_timeout = '50ms'")
            cursor.execute("SELECT 1 FROM accounts WHERE user_id = %s FOR UPDATE", (user_id,))
    except DBAPIError as exc:
        raise PermanentMessageError("the account is held elsewhere") from exc
    raise AssertionError("the account was not held")


@pytest.mark.parametrize("meeting_an_error, outcome, error", [
    (_bug_let_out, "retried", "cursor already closed"),
    (_bug_caught_then_returning, "processed", None),
    (_statement_timeout_let_out, "retried", "canceling statement due to statement timeout"),
    (_lock_timeout_caught_then_refusing, "parked", "the account is held elsewhere"),
], ids=["a closed cursor's error let out", "a closed cursor's error caught, then returning",
        "a statement timeout let out", "a lock timeout caught, then refusing the message"])
def test_an_error_on_a_sound_connection_under_a_handler_is_no_lost_connection(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, caplog,
        meeting_an_error, outcome, error):
    """A message's own task whose handler meets an error the connection goes on after: the try
    takes the path of that error (a failure counted and retried, the message handled, or parked
    when refused), not that of a connection lost under the handler, with an outage said. Before,
    the closed cursor's error was noted as the connection's loss (the dialect's is_disconnect
    matches its words), whether the handler let it out or caught it."""
    from payments_app import service as payments

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
    message_id = _stored_request(payments_inbox, user_id)
    monkeypatch.setattr(payments_app, "message_handlers", lambda: {
        PAYMENT_REQUESTED: lambda session, events: meeting_an_error(session, user_id)})
    with account_row_held(settings.payments_database_url, user_id):
        _run_as_a_worker_runs_it(handle_inbox_message, ("payments", str(message_id)))
    row = _row(message_id)
    if outcome == "processed":
        assert (row.processed_at is not None, row.parked_at, row.attempts) == (True, None, 1)
    elif outcome == "parked":
        assert (row.processed_at, row.parked_at is not None, row.attempts) == (None, True, 1)
    else:
        assert (row.processed_at, row.parked_at, row.attempts) == (None, None, 1)
    assert error is None or error in row.last_error
    assert "connection was lost" not in (row.last_error or "")
    assert _tasks_sent() == ([(handle_inbox_message.name, ["payments", str(message_id)])]
                             if outcome == "retried" else [])
    assert not any("lost its database connection" in record.getMessage()
                   for record in caplog.records)


def test_a_batch_whose_handler_runs_a_statement_on_a_cursor_it_closed_hands_its_message_on(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, caplog):
    """A handler's bug on a sound connection fails its message's first try, which goes to a task
    of its own, the rest of the batch handled: the batch is not retried whole, the loss counted
    under the message, with an outage said in a WARNING line, as it was when the closed cursor's
    error was taken for a lost connection."""
    first, buggy, last = (_stored_request(payments_inbox, user_id, key=user_id) for _ in range(3))

    def buggy_for_one(session, events):
        if any(event.message.message_id == buggy for event in events):
            _executing_on_a_cursor_it_closed(session)

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: buggy_for_one})
    _run_as_a_worker_runs_it(handle_inbox_batch, ("payments", [str(first), str(buggy), str(last)]))
    assert _tasks_sent() == [(handle_inbox_message.name, ["payments", str(buggy)])]
    assert all(_row(message_id).processed_at is not None for message_id in (first, last))
    row = _row(buggy)
    assert (row.processed_at, row.parked_at, row.attempts) == (None, None, 1)
    assert "cursor already closed" in row.last_error
    assert not any("lost its database connection" in record.getMessage()
                   for record in caplog.records)


def test_a_batch_sent_by_a_newer_release_with_an_argument_this_one_does_not_take_is_handled(
        settings, payments_inbox, payments_queue, user_id, caplog):
    """A rolling deploy: a newer release's worker retries a batch with a keyword argument this
    release does not know. It is handled, the argument dropped and said, not refused with a
    TypeError and left to the sweeper (tasks/newer_kwargs.py)."""
    from payments_app import service as payments

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    batch = [_stored_request(payments_inbox, user_id, key=user_id) for _ in range(2)]
    _run_as_a_worker_runs_it(handle_inbox_batch, ("payments", [str(m) for m in batch]),
                             {"tries_lost_once_connected": 1, "lost_under": {},
                              "added_by_a_newer_release": {"any": "thing"}}, retries=1)
    assert all(_row(m).processed_at is not None for m in batch)
    assert _tasks_sent() == []
    assert any("added_by_a_newer_release" in record.getMessage()
               and record.levelname == "WARNING" for record in caplog.records)


def test_a_messages_own_task_sent_by_a_newer_release_is_retried_with_the_arguments_it_takes(
        settings, payments_inbox, payments_queue, monkeypatch, user_id):
    """A rolling deploy: a message's own task carries a keyword argument this release does not
    take, and its try fails. In a worker the body runs under the request as sent (Celery's stack
    protection), and its retry, sent from that request with the newer argument, was refused with
    a TypeError and lost (a Reject, not requeued): the message was left to the sweeper. It is
    sent with the arguments this release takes."""
    message_id = _stored_request(payments_inbox, user_id)

    def failing(session, events):
        raise RuntimeError("the ledger is busy")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: failing})
    _run_as_a_worker_runs_it(handle_inbox_message, ("payments", str(message_id)),
                             {"added_by_a_newer_release": True})
    assert _tasks_sent(with_kwargs=True) == [
        (handle_inbox_message.name, ["payments", str(message_id)], {})]
    row = _row(message_id)
    assert (row.processed_at, row.parked_at, row.attempts) == (None, None, 1)


def _run_as_a_worker_runs_it(task, args: tuple, kwargs: dict | None = None,
                             retries: int = 0) -> None:
    """Run `task` here as a worker runs one it took from its queue, under the optimisations a
    worker process installs (its stack protection runs a task's body under the tracer's request
    alone): its retry is sent to the queue, where no worker takes it."""
    from celery.app.trace import build_tracer

    task_id = str(uuid.uuid4())
    with worker_optimizations(celery_app):
        build_tracer(task.name, task, app=celery_app)(
            task_id, args, kwargs or {}, {"id": task_id, "task": task.name, "retries": retries,
                                          "is_eager": False, "delivery_info": {}})


def _tasks_sent(queue: str = "payments", with_kwargs: bool = False) -> list[tuple]:
    """Takes every task off the queue: its name and arguments (and keyword arguments, for a
    message's own task `with_kwargs`), and the arguments' repr it carries for a batch."""
    sent = []
    with celery_app.pool.acquire(block=True) as connection:
        while (task := connection.default_channel.basic_get(queue, no_ack=True)) is not None:
            args, kwargs, _ = task.decode()
            name = task.headers["task"]
            if name != handle_inbox_message.name:
                sent.append((name, args, kwargs, task.headers["argsrepr"]))
            else:
                sent.append((name, args, kwargs) if with_kwargs else (name, args))
    return sent


def test_a_handler_held_up_by_a_stalled_lock_is_retried_without_using_its_attempts(
        settings, payments_inbox, user_id):
    """A transaction stalled holding the user's account (here, another session's) holds the
    payment's handling up for shared.db.SESSION_LIMITS' lock_timeout at a time, not for ever; each
    try so cancelled is retried and counts none of the message's attempts (the wait is no fault of
    its own, and may outlast them all), and the retry, once the lock is free, pays once."""
    from payments_app import service as payments
    from payments_app.models import Account
    from tasks.inbox import _handle_in_one_transaction

    with service_app("payments").app_context():
        with transaction() as session:
            payments.open_account(session, user_id=user_id)
            payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    message_id = _stored_request(payments_inbox, user_id, key=user_id)
    retrying = OutcomeThread(handle_inbox_message.apply, ("payments", str(message_id)))
    with account_row_held(settings.database_url("payments"), user_id) as holder_pid:
        with service_app("payments").app_context():
            left = _handle_in_one_transaction("payments", [message_id],
                                              payments_app.message_handlers())
        assert left == [message_id]
        held_up = _row(message_id)
        assert held_up.attempts == 0 and held_up.last_attempt_at is not None  # (so not swept)
        retrying.start()
        _wait_for_tries_held_up_by(holder_pid, settings, tries=2)
    assert not retrying.joined(30).failed()
    row = _row(message_id)
    assert row.processed_at is not None and row.parked_at is None and row.attempts == 1
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("9.00")


def test_a_message_its_own_task_takes_while_its_batch_holds_it_past_lock_timeout_pays_once(
        settings, payments_inbox, monkeypatch, user_id):
    """The same message run by its batch and by a task of its own at once (handed over by the
    sweeper, a replay, or a batch's failure while another batch has it), the batch's handler
    held past lock_timeout: the batch's row lock keeps the other task off the message. That
    task's try notes nothing (the row is held: SKIP LOCKED), waits for the row until
    lock_timeout, counts nothing, and is retried; the retry finds the message done. The handler
    runs once, the account is debited once, one payment is made, and the one attempt is the
    batch's."""
    import tasks.inbox
    from payments_app import service as payments
    from payments_app.models import Account, Payment

    with service_app("payments").app_context():
        with transaction() as session:
            payments.open_account(session, user_id=user_id)
            payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    message_id = _stored_request(payments_inbox, user_id, key=user_id)
    take_payments = payments_app.message_handlers()[PAYMENT_REQUESTED]
    calls, tries = [], []
    holding, released = threading.Event(), threading.Event()

    def held_the_first_time(session, events):
        calls.extend(event.message.message_id for event in events)
        if len(calls) == 1:
            holding.set()
            assert released.wait(30), "the batch's handler was never released"
        take_payments(session, events)

    def released_as_the_own_task_tries_again(session, message, handlers):
        if tries:  # (its first try is over)
            released.set()
        try:
            outcome = process_inbox_message(session, message, handlers)
        except Exception as exc:
            tries.append("held up by the row's lock" if held_up_by_a_lock(exc) else repr(exc))
            raise
        tries.append(outcome.value)
        return outcome

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: held_the_first_time})
    monkeypatch.setattr(tasks.inbox, "process_inbox_message",
                        released_as_the_own_task_tries_again)
    batch = OutcomeThread(lambda: handle_inbox_batch.apply(
        args=("payments", [str(message_id)])).get(), name="batch")
    own_task = OutcomeThread(lambda: handle_inbox_message.apply(
        args=("payments", str(message_id))).get(), name="own task")
    with _worker_lock_timeout("200ms"):
        batch.start()
        try:
            assert holding.wait(10), "the batch's handler never ran"
            own_task.start()
            wait_for(lambda: released.is_set() or not own_task.is_alive(), timeout=30,
                     what="the own task's try held up, then tried again")
        finally:
            released.set()
        assert all_joined([batch, own_task], 30) == [1, "already_done"]
    assert tries == ["held up by the row's lock", "already_done"]
    # (The handler called once is what shows the inbox kept the other task off: a second call
    # would debit nothing more, take_payments inserting an order's decision once.)
    assert calls == [message_id]
    row = _row(message_id)
    assert row.processed_at is not None and row.parked_at is None
    assert (row.attempts, row.try_open, row.last_error) == (1, False, None)
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("9.00")
        assert db.session.query(Payment).filter_by(user_id=user_id).count() == 1


@contextmanager
def _worker_lock_timeout(lock_timeout: str) -> Iterator[None]:
    """The payments worker app's connections opened under `lock_timeout`, not shared.db's
    SESSION_LIMITS' (PGOPTIONS wins over those), for a wait past it to take a moment; its pool
    emptied before and after, the tests after it connecting under the shop's own."""
    with pytest.MonkeyPatch.context() as patched:
        patched.setenv("PGOPTIONS", f"-c lock_timeout={lock_timeout}")
        _worker_pool_emptied()
        try:
            yield
        finally:
            _worker_pool_emptied()


def _worker_pool_emptied() -> None:
    with service_app("payments").app_context():
        db.engine.dispose()


def test_a_handler_whose_statement_runs_too_long_uses_its_attempts_and_is_parked(
        settings, payments_inbox, monkeypatch, user_id):
    """A statement cancelled for running too long (statement_timeout) is the work's own doing,
    unlike a wait on another session's lock: each such try counts, up to the limit."""
    def too_slow(session, events):
        session.execute(text("SET LOCAL statement_timeout = '50ms'"))
        session.execute(text("SELECT pg_sleep(1)"))

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: too_slow})
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_message.apply(args=("payments", str(message_id)))
    row = _row(message_id)
    assert row.parked_at is not None and row.attempts == settings.inbox_max_attempts
    assert "statement timeout" in row.last_error


def test_a_failed_try_the_sweeper_hands_over_meanwhile_is_left_to_it_not_retried(
        settings, payments_inbox, monkeypatch, user_id):
    """A try that ran past the sweep's minimum age and failed, found open by a sweep between its
    rollback and the record of its failure, and so counted as lost and handed over again: the
    task counts it no more and leaves the message to the sweeper's handing over (a retry of its
    own would hand it out twice)."""
    import tasks.inbox

    calls, swept = [], []

    def failing(session, events):
        calls.append(events[0].message.message_id)
        raise ConnectionError("statement timeout")

    def recorded_after_a_sweep(*args, **kwargs):
        with db.engine.connect() as other, Session(bind=other) as sweeping:
            swept.extend(stalled.message_id for stalled in claim_stalled_messages(
                sweeping, timedelta(seconds=-1), settings.inbox_max_attempts))
            sweeping.commit()
        return record_failed_attempt(*args, **kwargs)

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: failing})
    monkeypatch.setattr(tasks.inbox, "record_failed_attempt", recorded_after_a_sweep)
    message_id = _stored_request(payments_inbox, user_id)
    assert handle_inbox_message.apply(args=("payments", str(message_id))).get() == "handed_over"
    assert calls == [message_id] and message_id in swept
    row = _row(message_id)
    assert row.attempts == 1 and row.parked_at is None
    assert "statement timeout" in row.last_error


def test_a_failed_try_not_noted_as_begun_whose_message_was_parked_meanwhile_is_not_retried(
        settings, payments_inbox, monkeypatch, user_id):
    """Another task's try holds the row as this one begins (so nothing is noted), this try's wait
    for the row runs out (lock_timeout), and the other parks the message, its last attempt failed,
    before this one records its failure: the task ends there, the message parked, rather than
    retry a message only a replay hands on; the park's error is left as it is."""
    import tasks.inbox

    message_id = _stored_request(payments_inbox, user_id)
    other = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    tries = []

    def tried(*args, **kwargs):
        tries.append(args[1])
        return process_inbox_message(*args, **kwargs)

    def recorded_once_the_other_parked_it(*args, **kwargs):
        with other.cursor() as cursor:
            cursor.execute("UPDATE inbox_messages SET attempts = attempts + 1,"
                           " last_attempt_at = now(), parked_at = now(),"
                           " last_error = 'the other try''s', try_open = false"
                           " WHERE message_id = %s", (str(message_id),))
        other.commit()
        return record_failed_attempt(*args, **kwargs)

    monkeypatch.setattr(tasks.inbox, "process_inbox_message", tried)
    monkeypatch.setattr(tasks.inbox, "record_failed_attempt", recorded_once_the_other_parked_it)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT FROM inbox_messages WHERE message_id = %s FOR UPDATE",
                           (str(message_id),))
        outcome = handle_inbox_message.apply(args=("payments", str(message_id))).get()
    finally:
        other.rollback()
        other.close()
    assert outcome == "parked" and tries == [message_id]
    row = _row(message_id)
    assert row.parked_at is not None and row.attempts == 1 and row.last_error == "the other try's"


def test_retries_wait_less_than_the_sweeps_minimum_age():
    for retries in [*range(10), 1024, 10**6]:  # (a try retried for an hour, or for ever)
        for _ in range(50):
            assert 0 <= retry_countdown(retries, 10.0) <= min(2 ** retries, 8)
            assert retry_countdown(retries, 3.0) <= 1.5


def _wait_for_tries_held_up_by(holder_pid: int, settings, tries: int) -> None:
    """Until `tries` statements, one after another, have waited on the holder's locks."""
    seen: set = set()

    def held_up() -> bool:
        with psycopg2.connect(driver_dsn(settings.database_url("payments"))) as watcher:
            with watcher.cursor() as cursor:
                cursor.execute("SELECT pid, query_start FROM pg_stat_activity"
                               " WHERE %s = ANY(pg_blocking_pids(pid))", (holder_pid,))
                seen.update(cursor.fetchall())
            watcher.rollback()
        return len(seen) >= tries

    wait_for(held_up, timeout=30, what=f"{tries} tries held up by the stalled lock")


def _stored_long_ago(message_ids, settings) -> None:
    """Date the messages' inbox rows back past the inbox's retention: when they were stored and,
    for those handled, when they were."""
    long_ago = func.now() - timedelta(seconds=settings.inbox_retention_seconds, hours=1)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(
            update(InboxMessage)
            .where(InboxMessage.message_id.in_(message_ids))
            .values(received_at=long_ago, processed_at=case(
                (InboxMessage.processed_at.is_not(None), long_ago), else_=None)))


def test_the_pruner_deletes_old_handled_rows_and_keeps_the_rest(settings, payments_inbox,
                                                                monkeypatch, user_id):
    def park_the_unpayable(session, events):
        if any(event.payload["amount"] == Decimal("2.00") for event in events):
            raise PermanentMessageError("unpayable")

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: park_the_unpayable})
    monkeypatch.setattr("tasks.retention.PRUNED_PER_TRANSACTION", 2)  # so that it takes two turns
    prune_inbox.apply(args=("payments",)).get()  # what earlier tests left old enough: the counts
    old_handled, also_old_handled, more_old_handled, old_parked, old_waiting, new_handled = (
        _stored_request(payments_inbox, user_id, amount=Decimal(amount))
        for amount in ("1.00", "1.00", "1.00", "2.00", "3.00", "4.00"))
    old_handled_ones = [old_handled, also_old_handled, more_old_handled]
    handle_inbox_batch.apply(args=("payments", [str(m) for m in [*old_handled_ones, old_parked]]))
    handle_inbox_batch.apply(args=("payments", [str(new_handled)]))
    _stored_long_ago([*old_handled_ones, old_parked, old_waiting], settings)

    assert prune_inbox.apply(args=("payments",)).get() == 3
    assert all(_row(message_id) is None for message_id in old_handled_ones)
    assert _row(old_parked).parked_at is not None
    assert _row(old_waiting).processed_at is None
    assert _row(new_handled).processed_at is not None
    assert prune_inbox.apply(args=("payments",)).get() == 0


def test_a_pruner_whose_clock_runs_ahead_of_the_databases_keeps_a_message_handled_just_now(
        settings, payments_inbox, monkeypatch, user_id):
    """A message's `processed_at` is the database's clock, and so is the pruner's cutoff: one
    taken on the worker's clock, a retention and a day ahead here, pruned the rows of messages
    handled moments before (whose repeats Kafka may still deliver). The cutoff is asked for, and
    nothing pruned with it: a cutoff a day ahead would prune the rows of tests running at once."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply(args=("payments", [str(message_id)]))
    handled_at = _row(message_id).processed_at
    cutoffs = []
    monkeypatch.setattr("tasks.inbox.prune_handled_messages",
                        lambda session, cutoff, limit: cutoffs.append(cutoff) or 0)
    retention = timedelta(seconds=settings.inbox_retention_seconds)
    with inbox_clock_off_by(retention + timedelta(days=1)):
        prune_inbox.apply(args=("payments",)).get()
    [cutoff] = cutoffs
    # (A retention before the database's clock as the pruner ran, moments after the handling.)
    assert handled_at - retention <= cutoff < handled_at - retention + timedelta(minutes=1)


def test_a_request_delivered_again_after_its_row_was_pruned_changes_nothing(
        settings, payments_inbox, user_id):
    """Past the inbox's retention the payments row keyed by order id keeps the debit single."""
    from payments_app import service as payments
    from payments_app.models import Account, Payment

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    order_id = uuid.uuid4()
    event = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user_id,
                                          "amount": Decimal("3.00")})
    record = ConsumedRecord("task-test", 0, 0, user_id.encode(), encode(event.to_json()), {})
    assert payments_inbox([record]) == [event.message_id]
    handle_inbox_batch.apply(args=("payments", [str(event.message_id)]))
    _stored_long_ago([event.message_id], settings)
    assert prune_inbox.apply(args=("payments",)).get() >= 1

    assert payments_inbox([record]) == [event.message_id]  # stored anew: the inbox forgot it
    handle_inbox_batch.apply(args=("payments", [str(event.message_id)]))
    assert _row(event.message_id).processed_at is not None
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("7.00")
        assert db.session.query(Payment).filter_by(user_id=user_id).count() == 1
        results = db.session.query(OutboxMessage).filter_by(correlation_id=str(order_id)).count()
    assert results == 1  # the first decision's result only (no relay runs here)


def test_a_request_with_a_field_a_newer_orders_service_added_is_paid_once_not_parked(
        settings, payments_inbox, user_id):
    """A rolling upgrade: orders' new version adds an optional field to PaymentRequested before
    payments knows it. Stored by the inbox and handled by payments' own handler, the request is
    paid, once however often it is delivered, rather than parked until payments is upgraded."""
    from payments_app import service as payments
    from payments_app.models import Account, Payment

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    order_id = uuid.uuid4()
    body = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user_id,
                                         "amount": Decimal("3.00")}).to_json()
    body["payload"]["channel"] = "web"
    record = ConsumedRecord("task-test", 0, 0, user_id.encode(), encode(body), {})
    message_id = uuid.UUID(body["message_id"])
    assert payments_inbox([record]) == [message_id]
    assert payments_inbox([record]) == []  # delivered again: the same row
    for _ in range(2):
        handle_inbox_batch.apply(args=("payments", [str(message_id)]))
    row = _row(message_id)
    assert row.processed_at is not None and row.parked_at is None and row.last_error is None
    assert "channel" not in row.payload  # stored as the reader's contract has it
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("7.00")
        assert db.session.query(Payment).filter_by(order_id=order_id).count() == 1


def _received_ago(message_id, age: timedelta, handed_over_ago: timedelta | None = None,
                  tried_since: bool = False) -> None:
    """Stored `age` ago; if so asked, last handed over (or tried) `handed_over_ago` ago, and a try
    of a task of its own begun since, lost with its worker."""
    since = {}
    if handed_over_ago is not None:
        since["last_attempt_at"] = func.now() - handed_over_ago
    if tried_since:
        since["try_open"] = True
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(received_at=func.now() - age, **since))


def _handed_over(message_id) -> bool:
    return _row(message_id).last_attempt_at is not None


@pytest.fixture
def payments_queue(settings):
    """The payments Celery queue (no worker takes from it here), emptied before and after."""
    def purge():
        with celery_app.pool.acquire(block=True) as connection:
            connection.default_channel.queue_purge("payments")

    purge()
    yield
    purge()


@pytest.fixture
def task_queue(settings, payments_queue) -> Iterator[SilencingProxy]:
    """Redis as this process's Celery app sends tasks to it (and reads its queues), through a
    proxy for the test to `cut()` (Redis away: kombu's publish, retries and all, fails) and
    `restore()`; the payments queue emptied before and after."""
    broker = urlsplit(settings.celery_broker_url)
    proxy = SilencingProxy(f"{broker.hostname}:{broker.port or 6379}")
    try:
        with sending_to(celery_app, broker._replace(netloc=proxy.address).geturl()):
            yield proxy
    finally:
        proxy.close()


def test_while_tasks_wait_in_the_queue_the_sweeper_takes_only_long_stalled_messages(
        settings, payments_inbox, payments_queue, user_id):
    """A message can wait in a queue's backlog longer than the sweep's minimum age with its
    dispatch not lost: sweeping it then would only add to the backlog."""
    stalled = _stored_request(payments_inbox, user_id)
    _received_ago(stalled, timedelta(minutes=1))
    assert tasks_waiting("payments") == 0
    sweep_inbox.apply(args=("payments",)).get()
    assert _handed_over(stalled)
    assert _dispatches_of(stalled) == [handle_inbox_message.name]  # dispatched again, alone

    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    waiting = _stored_request(payments_inbox, user_id)
    _received_ago(waiting, timedelta(minutes=1))
    sweep_inbox.apply(args=("payments",)).get()
    assert not _handed_over(waiting)  # its batch may well be in the queue
    _received_ago(waiting, timedelta(minutes=6))
    sweep_inbox.apply(args=("payments",)).get()
    assert _handed_over(waiting)


def test_a_sweeper_whose_clock_runs_ahead_of_the_databases_leaves_a_message_just_stored(
        settings, payments_inbox, payments_queue, user_id):
    """A message's `received_at` is the database's clock: a sweeper that measured its age by its
    own, a minute ahead, took every message for stalled as soon as it was stored, and handed it
    over beside its own dispatch. It measures by the database's clock now, and still takes a
    message that has waited past the sweep's minimum age."""
    message_id = _stored_request(payments_inbox, user_id)
    with inbox_clock_off_by(timedelta(minutes=1)):
        sweep_inbox.apply(args=("payments",)).get()
        assert not _handed_over(message_id) and _dispatches_of(message_id) == []

        _received_ago(message_id, timedelta(seconds=settings.inbox_sweep_min_age_seconds + 1))
        sweep_inbox.apply(args=("payments",)).get()
        assert _dispatches_of(message_id) == [handle_inbox_message.name]


def test_a_try_begun_by_a_worker_whose_clock_runs_behind_is_not_taken_for_lost(
        settings, payments_inbox, payments_queue, user_id):
    """A try's beginning is noted on the database's clock, as the sweeper measures: noted on the
    worker's, a minute behind, it looked a minute old to the sweeper as it began, and was counted
    as an attempt lost and handed over again while it ran (five such, and the message parked)."""
    from shared.inbox.handling import note_try_begun

    message_id = _stored_request(payments_inbox, user_id)
    _received_ago(message_id, timedelta(minutes=1))
    with inbox_clock_off_by(-timedelta(minutes=1)), service_app("payments").app_context(), \
            transaction() as session:
        assert note_try_begun(session, message_id) is not None
    sweep_inbox.apply(args=("payments",)).get()
    row = _row(message_id)
    assert row.try_open and row.attempts == 0
    assert _dispatches_of(message_id) == []


def test_a_failed_try_recorded_by_a_worker_whose_clock_runs_behind_is_left_to_its_retry(
        settings, payments_inbox, payments_queue, user_id):
    """A failed try's record marks the message on the database's clock: marked on the worker's,
    a minute behind, the sweeper handed the message over beside the try's retry, due in
    seconds."""
    from shared.inbox.handling import note_try_begun

    message_id = _stored_request(payments_inbox, user_id)
    _received_ago(message_id, timedelta(minutes=1))
    with inbox_clock_off_by(-timedelta(minutes=1)), service_app("payments").app_context():
        with transaction() as session:
            begun = note_try_begun(session, message_id)
        with transaction() as session:
            assert record_failed_attempt(session, message_id, "RuntimeError('boom')",
                                         settings.inbox_max_attempts,
                                         try_began_at=begun.at) is None
    sweep_inbox.apply(args=("payments",)).get()
    row = _row(message_id)
    assert row.attempts == 1 and not row.try_open
    assert _dispatches_of(message_id) == []


def _dispatches_of(message_id, queue: str = "payments") -> list[str]:
    """Takes every task off the queue (as a worker lost with them would) and names the ones that
    carry the message: a batch, or a task of its own."""
    taken = []
    with celery_app.pool.acquire(block=True) as connection:
        while (task := connection.default_channel.basic_get(queue, no_ack=True)) is not None:
            args, _, _ = task.decode()
            if str(message_id) in (args[1] if isinstance(args[1], list) else [args[1]]):
                taken.append(task.headers["task"])
    return taken


def test_a_message_whose_handling_is_lost_again_and_again_goes_alone_and_is_parked(
        settings, payments_inbox, payments_queue, user_id):
    """As a message whose handling crashes its worker every time: with the queue idle, the
    sweeper hands it over in a task of its own (crashing, it takes no batch of others down with
    it), counting each try that began since the last handing over, and parks it once they reach
    the attempt limit."""
    message_id = _stored_request(payments_inbox, user_id)
    for tries in range(1, settings.inbox_max_attempts):
        _received_ago(message_id, timedelta(minutes=1), handed_over_ago=timedelta(minutes=1),
                      tried_since=True)
        sweep_inbox.apply(args=("payments",)).get()
        assert _dispatches_of(message_id) == [handle_inbox_message.name]
        assert _row(message_id).attempts == tries
    _received_ago(message_id, timedelta(minutes=1), handed_over_ago=timedelta(minutes=1),
                  tried_since=True)
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == []
    row = _row(message_id)
    assert row.parked_at is not None and row.attempts == settings.inbox_max_attempts
    assert row.last_error.startswith(
        f"tried {settings.inbox_max_attempts} times and never handled")


def test_a_message_whose_tasks_wait_in_a_busy_workers_memory_is_never_counted(
        settings, payments_inbox, payments_queue, user_id):
    """A busy worker takes tasks from the queue ahead of its turn (prefetch), so the queue reads
    empty while its threads are all at work (on a slow database, say): the sweeper, taking the
    handlers for idle, hands the message over again and again, and none of its tasks begins.
    None of those handings over counts: the message is not parked for tries it never had."""
    message_id = _stored_request(payments_inbox, user_id)
    for _ in range(settings.inbox_max_attempts + 1):
        _received_ago(message_id, timedelta(minutes=1), handed_over_ago=timedelta(minutes=1))
        sweep_inbox.apply(args=("payments",)).get()
        assert _dispatches_of(message_id) == [handle_inbox_message.name]  # (taken, not begun)
    row = _row(message_id)
    assert row.attempts == 0 and row.parked_at is None


def test_while_tasks_wait_the_sweeper_counts_no_attempt_and_sends_batches(
        settings, payments_inbox, payments_queue, user_id):
    """A message's own dispatch may wait in a backlog past any minimum age: handed over again
    then, it is not counted (else a long backlog would park what it holds), and goes in a batch."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    for _ in range(settings.inbox_max_attempts + 1):
        _received_ago(message_id, timedelta(minutes=6), handed_over_ago=timedelta(minutes=6),
                      tried_since=True)
        sweep_inbox.apply(args=("payments",)).get()
    row = _row(message_id)
    assert row.attempts == 0 and row.parked_at is None
    assert _dispatches_of(message_id) == [handle_inbox_batch.name] * (
        settings.inbox_max_attempts + 1)


def test_a_message_waiting_out_an_hours_backlog_is_handed_over_four_times_not_twelve(
        settings, payments_inbox, payments_queue, user_id):
    """Workers down, their queue holding the message's batch: a sweep every minute of the hour
    hands the message over at 5, 11, 23 and 47 minutes (as long again as it had waited each
    time), where one every 5 minutes added a batch more to the backlog each time."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    _received_ago(message_id, timedelta(seconds=30))  # (off the minute: no sweep on the edge)
    for _ in range(60):
        _a_minute_passes(message_id)
        sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name] * 4
    row = _row(message_id)
    assert row.attempts == 0 and row.parked_at is None


def _a_minute_passes(message_id) -> None:
    """The message's times, as the sweeper sees them, a minute further back."""
    minute = timedelta(minutes=1)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(received_at=InboxMessage.received_at - minute,
                                last_attempt_at=InboxMessage.last_attempt_at - minute))


def test_while_tasks_wait_a_message_handed_over_waits_as_long_again_up_to_an_hour(
        settings, payments_inbox, payments_queue, user_id):
    """While tasks wait in the queue, a message handed over 6 minutes ago, after it had waited
    14, waits; one handed over 11 minutes ago, after it had waited 9, is handed over, and so is
    one handed over an hour and a minute ago after it had waited days (parked, then replayed).
    With no task waiting, it waits no longer than the sweep's minimum age."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    _received_ago(message_id, timedelta(minutes=20), timedelta(minutes=6))
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == []

    handle_inbox_batch.apply_async(("payments", []))
    _received_ago(message_id, timedelta(minutes=20), timedelta(minutes=11))
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]

    handle_inbox_batch.apply_async(("payments", []))
    _received_ago(message_id, timedelta(days=3), timedelta(minutes=61))
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]

    _received_ago(message_id, timedelta(minutes=20), timedelta(minutes=1))
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_message.name]


def test_while_tasks_wait_a_message_tried_waits_as_long_again_and_is_counted_once_none_wait(
        settings, payments_inbox, payments_queue, user_id):
    """Its last_attempt_at from a try of a task of its own (begun 6 minutes ago, after it had
    waited 14), the message waits while tasks wait, its try not counted; once none wait it is
    handed over alone, the try counted as lost."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    _received_ago(message_id, timedelta(minutes=20), timedelta(minutes=6), tried_since=True)
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == []  # (the backlog taken off the queue with it)
    row = _row(message_id)
    assert row.attempts == 0 and row.try_open

    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_message.name]
    row = _row(message_id)
    assert row.attempts == 1 and not row.try_open


def test_while_tasks_wait_a_message_handed_over_before_it_came_is_taken_at_once(
        settings, payments_inbox, payments_queue, user_id):
    """A last_attempt_at before its received_at (the worker's clock behind the database's) is no
    wait at all: the message is handed over as if never before."""
    message_id = _stored_request(payments_inbox, user_id)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    _received_ago(message_id, timedelta(minutes=10), timedelta(minutes=11))
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]


def test_a_sweep_whose_dispatch_fails_part_way_unmarks_the_messages_it_did_not_send(
        settings, payments_inbox, task_queue, user_id, monkeypatch):
    """Redis lost as the sweep sent its second batch: the messages of the first stay marked handed
    over, those of the second are unmarked, and the next sweep takes them while tasks wait, where,
    replayed days after they came and marked, they would have waited an hour."""
    import tasks.inbox

    first, second = (_stored_request(payments_inbox, user_id) for _ in range(2))
    _received_ago(first, timedelta(days=3, minutes=1), timedelta(minutes=61))
    _received_ago(second, timedelta(days=3), timedelta(minutes=61))
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    monkeypatch.setattr(tasks.inbox, "HANDLED_PER_TRANSACTION", 1)
    send = handle_inbox_batch.apply_async
    sent = []

    def redis_lost_after_one(args, **options):
        result = send(args, **options)
        sent.extend(args[1])
        task_queue.cut()
        return result

    monkeypatch.setattr(handle_inbox_batch, "apply_async", redis_lost_after_one)
    with pytest.raises(KombuOperationalError):
        sweep_inbox.apply(args=("payments",)).get()
    assert sent == [str(first)]
    assert _handed_over(first) and not _handed_over(second)

    monkeypatch.setattr(handle_inbox_batch, "apply_async", send)
    task_queue.restore()
    sweep_inbox.apply(args=("payments",)).get()  # (the backlog and the first's batch wait)
    assert _dispatches_of(second) == [handle_inbox_batch.name]


def _swept_with_redis_refusing(monkeypatch, task_queue: SilencingProxy,
                               meanwhile=lambda session: None) -> None:
    """A sweep while tasks wait whose dispatch finds Redis away, `meanwhile` run (in a
    transaction of its own) after the claim, and Redis cut, as the dispatch is sent."""
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    send = handle_inbox_batch.apply_async

    def refused(args, **options):
        with service_app("payments").app_context(), transaction() as session:
            meanwhile(session)
        task_queue.cut()
        return send(args, **options)

    monkeypatch.setattr(handle_inbox_batch, "apply_async", refused)
    with pytest.raises(KombuOperationalError):
        sweep_inbox.apply(args=("payments",)).get()
    monkeypatch.setattr(handle_inbox_batch, "apply_async", send)
    task_queue.restore()  # (Redis back)


def test_a_try_begun_between_the_sweeps_claim_and_its_failed_dispatch_keeps_its_mark(
        settings, payments_inbox, task_queue, user_id, monkeypatch):
    """A task of the message's own begins its try as the sweep's dispatch fails: the unmark
    leaves the try's mark, which the sweeper counts from (cleared, the try was handed over again
    under it at the next sweep)."""
    from shared.inbox.handling import note_try_begun

    message_id = _stored_request(payments_inbox, user_id)
    _received_ago(message_id, timedelta(days=3), timedelta(minutes=61))
    begun = []
    _swept_with_redis_refusing(
        monkeypatch, task_queue, lambda session: begun.append(note_try_begun(session, message_id)))
    row = _row(message_id)
    assert row.try_open and row.last_attempt_at == begun[0].at


def test_a_try_ended_between_the_sweeps_claim_and_its_failed_dispatch_keeps_its_mark(
        settings, payments_inbox, task_queue, user_id, monkeypatch):
    """A try begun before the claim (a task taken early from the queue) fails and records its
    failure as the sweep's dispatch fails: the unmark leaves the failure's mark, its retry due in
    seconds; cleared, the next sweep handed the message over beside that retry."""
    message_id = _stored_request(payments_inbox, user_id)
    _received_ago(message_id, timedelta(days=3), timedelta(minutes=61), tried_since=True)
    try_began_at = _row(message_id).last_attempt_at
    _swept_with_redis_refusing(monkeypatch, task_queue, lambda session: record_failed_attempt(
        session, message_id, "RuntimeError('boom')", settings.inbox_max_attempts,
        try_began_at=try_began_at))
    row = _row(message_id)
    assert not row.try_open and row.attempts == 1 and row.last_error == "RuntimeError('boom')"
    assert row.last_attempt_at > try_began_at

    sweep_inbox.apply(args=("payments",)).get()  # (the backlog waits)
    assert _dispatches_of(message_id) == []


def test_a_lost_try_claimed_while_tasks_wait_is_unmarked_when_its_dispatch_fails(
        settings, payments_inbox, task_queue, user_id, monkeypatch):
    """Claimed while tasks wait, a lost try stays open (counted only once none wait): its
    dispatch refused, it is unmarked all the same, and the next sweep hands it over."""
    message_id = _stored_request(payments_inbox, user_id)
    _received_ago(message_id, timedelta(days=3), timedelta(minutes=61), tried_since=True)
    _swept_with_redis_refusing(monkeypatch, task_queue)
    assert not _handed_over(message_id) and _row(message_id).try_open

    sweep_inbox.apply(args=("payments",)).get()  # (the backlog waits)
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]


def test_this_processs_celery_queues_are_the_runs_own(settings):
    """Two runs at once (or a run beside `make run`) never take each other's tasks."""
    prefix = celery_app.conf.broker_transport_options["global_keyprefix"]
    assert prefix == f"{settings.redis_key_prefix}:celery:"


def test_beat_prunes_every_services_inbox(settings):
    import celeryconfig

    pruned = {entry["args"] for entry in celeryconfig.beat_schedule.values()
              if entry["task"] == prune_inbox.name}
    assert pruned == {(service,) for service in SERVICES}


def test_a_parked_request_replayed_once_mended_is_paid_once(settings, payments_inbox, monkeypatch,
                                                            payments_queue, user_id, capsys):
    """An operator lists the parked messages and replays one once what parked it is mended
    (python -m tasks.parked): it is dispatched to the service's queue and handled as if new
    (here run as a worker would, off the queue), and a second replay finds nothing to do."""
    from payments_app import service as payments
    from payments_app.models import Account
    from tasks import parked

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    mended_handlers = payments_app.message_handlers

    def ledger_closed(session, events):
        raise PermanentMessageError("ledger closed for the night")

    monkeypatch.setattr(payments_app, "message_handlers",
                        lambda: {PAYMENT_REQUESTED: ledger_closed})
    message_id = _stored_request(payments_inbox, user_id, amount=Decimal("3.00"))
    handle_inbox_batch.apply(args=("payments", [str(message_id)]))
    assert _row(message_id).parked_at is not None
    assert parked.main(["list", "payments"]) == 0
    assert f"{message_id}  PaymentRequested" in capsys.readouterr().out

    monkeypatch.setattr(payments_app, "message_handlers", mended_handlers)
    assert parked.main(["replay", "payments", str(message_id)]) == 0
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]
    handle_inbox_batch.apply(args=("payments", [str(message_id)]))
    row = _row(message_id)
    assert row.processed_at is not None and row.parked_at is None and row.last_error is None
    assert parked.main(["replay", "payments", str(message_id)]) == 1  # handled: nothing to replay
    assert _dispatches_of(message_id) == []
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("7.00")
    with pytest.raises(SystemExit):
        parked.main(["replay", "payments"])  # neither ids nor --all
    for limit in ("0", "10001", "100000000000000000000", "ten"):
        with pytest.raises(SystemExit):
            parked.main(["list", "payments", "--limit", limit])  # argparse's usage, no traceback
    assert parked.main(["list", "payments", "--limit", "10000"]) == 0


def test_a_message_parked_under_a_taken_id_is_listed_with_its_type_and_replayed_as_its_own(
        settings, payments_inbox, payments_queue, user_id, capsys):
    """A request under the message_id of another, stored before (a producer reusing ids), is
    parked under an id of its own, kept as it came: `list` shows it with its type, and a replay
    hands it to its handler, under that id, as any parked message."""
    from payments_app import service as payments
    from payments_app.models import Account
    from tasks import parked

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    first = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": user_id,
                                          "amount": Decimal("1.00")})
    other = first.to_json()
    other["payload"] = other["payload"] | {"order_id": str(uuid.uuid4()), "amount": "3.00"}
    offset = uuid.uuid4().int % 10**9
    assert payments_inbox([
        ConsumedRecord("task-test", 9, offset, None, encode(first.to_json()), {}),
        ConsumedRecord("task-test", 9, offset + 1, None, encode(other), {})]) == [first.message_id]
    with service_app("payments").app_context():
        (parked_id,) = db.session.scalars(select(InboxMessage.message_id).where(
            InboxMessage.partition == 9, InboxMessage.offset == offset + 1)).all()
    assert parked.main(["list", "payments", "--limit", "10000"]) == 0
    assert f"{parked_id}  PaymentRequested  task-test[9]@{offset + 1}" in capsys.readouterr().out

    assert parked.main(["replay", "payments", str(parked_id)]) == 0
    assert _dispatches_of(parked_id) == [handle_inbox_batch.name]
    handle_inbox_batch.apply(args=("payments", [str(parked_id)]))
    assert _row(parked_id).processed_at is not None and _row(parked_id).parked_at is None
    assert _row(first.message_id).processed_at is None  # (waiting its own dispatch)
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("7.00")


def test_a_replayed_message_gets_all_its_tries_again(settings, payments_inbox, monkeypatch,
                                                     user_id):
    """As `python -m tasks.parked replay` promises: its attempts cleared, a message parked after
    its last try is tried as often again, not parked after one more."""
    from tasks import parked

    tries = []

    def down(session, events):
        tries.append(events[0].message.message_id)
        raise ConnectionError("down")

    monkeypatch.setattr(payments_app, "message_handlers", lambda: {PAYMENT_REQUESTED: down})
    monkeypatch.setattr(parked, "dispatch_handed_over", lambda service, ids, marked_at: None)
    message_id = _stored_request(payments_inbox, user_id)
    for _ in range(2):  # tried, parked, replayed; then tried again
        tries.clear()
        handle_inbox_message.apply(args=("payments", str(message_id)))
        assert len(tries) == settings.inbox_max_attempts
        assert _row(message_id).parked_at is not None
        assert parked.main(["replay", "payments", str(message_id)]) == 0


def test_a_replay_with_the_task_queue_unreachable_says_so_and_leaves_them_to_the_sweeper(
        settings, payments_inbox, task_queue, user_id, capsys):
    """The messages are unparked in a transaction of their own before they are dispatched: with
    Redis away that dispatch fails, and the replay says what happened (a traceback, then "not
    parked" at the next try, sent the operator hunting for the wrong ids)."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(parked_at=func.now(), last_error="ledger closed"))
    task_queue.cut()
    assert parked.main(["replay", "payments", str(message_id)]) == 0
    said = capsys.readouterr()
    assert "payments inbox: 1 message(s) handed back to be handled" in said.out
    assert "the sweeper will hand the messages over" in said.err
    row = _row(message_id)
    assert row.parked_at is None and row.processed_at is None  # the sweeper's to hand over


def test_a_message_replayed_with_the_task_queue_unreachable_goes_at_the_next_sweep_while_tasks_wait(
        settings, payments_inbox, task_queue, user_id):
    """Replayed days after it came, with Redis away, the message is unmarked as its dispatch
    fails: the first sweep once Redis is back hands it over, though tasks wait, where marked
    handed over it waited an hour (as long as it had waited by then, up to the hour)."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(parked_at=func.now(), last_error="ledger closed",
                                received_at=func.now() - timedelta(days=3)))
    task_queue.cut()
    assert parked.main(["replay", "payments", str(message_id)]) == 0
    assert not _handed_over(message_id)

    task_queue.restore()  # (Redis back)
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]


def test_a_message_replayed_by_an_operator_whose_clock_runs_behind_is_left_to_its_dispatch(
        settings, payments_inbox, payments_queue, user_id):
    """A replay marks its messages handed over on the database's clock, as the sweeper measures:
    marked on the operator's, an hour behind, a message replayed days after it came looked to
    have waited out its backoff already, and the next sweep handed it over beside the replay's
    own dispatch, though tasks wait."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(parked_at=func.now(), last_error="ledger closed",
                                received_at=func.now() - timedelta(days=3)))
    handle_inbox_batch.apply_async(("payments", []))  # a backlog of one task
    with inbox_clock_off_by(-timedelta(hours=1)):
        assert parked.main(["replay", "payments", str(message_id)]) == 0
    sweep_inbox.apply(args=("payments",)).get()
    assert _dispatches_of(message_id) == [handle_inbox_batch.name]  # the replay's alone


def test_replay_all_with_the_task_queue_unreachable_unmarks_the_later_transactions_too(
        settings, payments_inbox, task_queue, monkeypatch, user_id):
    """Under --all, the transactions after the one whose dispatch found Redis away are not
    dispatched at all: their messages are unmarked too, for the sweeper's next sweep."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 1)
    first, second = (_stored_request(payments_inbox, user_id) for _ in range(2))
    _parked_first([first, second])
    task_queue.cut()
    replaying = parked.replay("payments", None)
    try:
        assert [next(replaying), next(replaying)] == [[first], [second]]
    finally:
        replaying.close()  # (no other test's parked messages taken)
    assert not _handed_over(first) and not _handed_over(second)


def test_parked_messages_discarded_are_never_handled_and_their_repeats_are_dropped(
        settings, payments_inbox, user_id):
    """python -m tasks.parked discard: a parked request given up on is marked processed without
    being handled (no debit), leaves the list, cannot be replayed, and a second delivery of it,
    like one of a record never parsed, is dropped as a repeat."""
    from payments_app import service as payments
    from payments_app.models import Account
    from tasks import parked

    with service_app("payments").app_context(), transaction() as session:
        payments.open_account(session, user_id=user_id)
        payments.deposit(session, user_id=user_id, amount=Decimal("10"))
    request = new_event(PAYMENT_REQUESTED, {"order_id": uuid.uuid4(), "user_id": user_id,
                                            "amount": Decimal("4.00")})
    record = ConsumedRecord("task-test", 0, 0, None, encode(request.to_json()), {})
    offset = uuid.uuid4().int % 10**9
    broken = ConsumedRecord("task-test", 8, offset, None, b"{broken", {})
    assert payments_inbox([record, broken]) == [request.message_id]
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == request.message_id)
                        .values(parked_at=func.now(), last_error="ledger closed"))
        (never_parsed,) = session.scalars(select(InboxMessage.message_id).where(
            InboxMessage.partition == 8, InboxMessage.offset == offset)).all()

    assert parked.main(["discard", "payments", str(request.message_id), str(never_parsed)]) == 0
    for message_id, error in ((request.message_id, "ledger closed"), (never_parsed, "")):
        row = _row(message_id)
        assert row.processed_at is not None and row.parked_at is None
        assert row.last_error.startswith("discarded by an operator; parked for: " + error)
    assert parked.main(["replay", "payments", str(request.message_id)]) == 1
    assert parked.main(["discard", "payments", str(request.message_id)]) == 1  # not parked now
    assert payments_inbox([record, broken]) == []  # delivered again: repeats
    handle_inbox_batch.apply(args=("payments", [str(request.message_id)]))
    with service_app("payments").app_context():
        assert db.session.get(Account, user_id).balance == Decimal("10.00")


def test_discarding_a_parked_payment_message_warns_that_its_order_stays_new(
        settings, payments_inbox, user_id, capsys):
    """Nothing else moves a NEW order on: a discarded PaymentRequested leaves its order NEW for
    good, and the command says so in a WARNING line naming the order; a message of no payment
    event (here a record never parsed) is discarded without one."""
    from tasks import parked

    order_id = uuid.uuid4()
    request = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user_id,
                                            "amount": Decimal("4.00")})
    offset = uuid.uuid4().int % 10**9
    assert payments_inbox([ConsumedRecord("task-test", 0, 0, None, encode(request.to_json()), {}),
                           ConsumedRecord("task-test", 8, offset, None, b"{broken", {})]
                          ) == [request.message_id]
    with service_app("payments").app_context():
        (never_parsed,) = db.session.scalars(select(InboxMessage.message_id).where(
            InboxMessage.partition == 8, InboxMessage.offset == offset)).all()
    _parked_first([request.message_id])

    assert parked.main(["discard", "payments", str(request.message_id), str(never_parsed)]) == 0
    said = capsys.readouterr()
    assert said.out == "payments inbox: 2 message(s) discarded\n"
    assert said.err.splitlines() == [
        order_left_new("payments inbox", request.message_id, order_id)]


def test_a_payment_message_parked_as_it_is_discarded_is_warned_of(settings, payments_inbox,
                                                                    user_id, capsys):
    """The WARNING is of the messages the discarding statement itself discarded: a PaymentRequested
    named, parked by another transaction that commits just before that statement runs, is
    discarded and warned of. (Read by a statement of its own before the discard, the payment
    events to warn of missed it, though the discard, a later statement, took it.)"""
    from tasks import parked

    order_id = uuid.uuid4()
    request = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": user_id,
                                            "amount": Decimal("4.00")})
    assert payments_inbox([ConsumedRecord("task-test", 0, 0, None, encode(request.to_json()),
                                          {})]) == [request.message_id]
    with called_at_the_first_statement_naming(
            "UPDATE inbox_messages", before=True, call=lambda: committed_on_a_connection_of_its_own(
                settings.database_url("payments"),
                "UPDATE inbox_messages SET parked_at = clock_timestamp(),"
                " last_error = 'ledger closed' WHERE message_id = %s",
                (str(request.message_id),))) as parked_meanwhile:
        assert parked.main(["discard", "payments", str(request.message_id)]) == 0
    assert parked_meanwhile, "nothing parked: the discarding statement was not run"
    said = capsys.readouterr()
    assert said.out == "payments inbox: 1 message(s) discarded\n"
    assert said.err.splitlines() == [
        order_left_new("payments inbox", request.message_id, order_id)]
    assert _row(request.message_id).processed_at is not None


def test_a_message_stored_long_ago_and_discarded_now_keeps_its_row_a_retention(
        settings, payments_inbox, user_id):
    """Its row is what makes a second delivery a repeat: the pruner counts from the discard."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                        .values(parked_at=func.now(), last_error="ledger closed"))
    _stored_long_ago([message_id], settings)
    assert parked.main(["discard", "payments", str(message_id)]) == 0
    prune_inbox.apply(args=("payments",)).get()
    assert _row(message_id).processed_at is not None


def test_a_record_never_parsed_is_not_replayed(settings, payments_inbox):
    from shared.inbox.parked import unpark_messages

    offset = uuid.uuid4().int % 10**9
    assert payments_inbox([ConsumedRecord("task-test", 7, offset, None, b"{broken", {})]) == []
    with service_app("payments").app_context():
        (unparsed,) = db.session.scalars(select(InboxMessage.message_id).where(
            InboxMessage.partition == 7, InboxMessage.offset == offset)).all()
        assert unpark_messages(db.session, [unparsed]) == []  # (--all: test_all_parked_...)
        db.session.rollback()


def test_the_sweeper_reminds_of_parked_messages_at_first_and_then_every_while(
        settings, payments_inbox, payments_queue, user_id, monkeypatch, caplog):
    """A message is said parked once, as it is parked: a line easily missed, and the message is
    never handled till an operator replays it. The sweeper says how many are parked, and how to
    list them, at its first sweep and then every PARKED_REMINDER_SECONDS (shortened here) while any
    stay parked, as the relay's leader does of parked outbox rows; not at every sweep."""
    monkeypatch.setattr("shared.parked_reminder.PARKED_REMINDER_SECONDS", 1.0)
    parked = _stored_request(payments_inbox, user_id)
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == parked)
                        .values(parked_at=func.now(), last_error="ledger closed"))
        count = session.scalar(select(func.count()).where(InboxMessage.parked_at.is_not(None)))

    def reminders() -> list[logging.LogRecord]:
        return [record for record in caplog.records
                if record.name == "tasks.inbox" and "message(s) parked" in record.getMessage()]

    time.sleep(1.0)  # (due, whatever sweeps before this test's said)
    sweep_inbox.apply(args=("payments",)).get()
    sweep_inbox.apply(args=("payments",)).get()  # (not due again yet)
    (reminder,) = reminders()
    assert reminder.levelno == logging.ERROR
    assert reminder.getMessage() == (
        f"payments inbox: {count} message(s) parked, never handled until replayed or discarded"
        " (python -m tasks.parked list payments)")
    time.sleep(1.0)
    sweep_inbox.apply(args=("payments",)).get()
    assert len(reminders()) == 2


def _parked_first(message_ids: list[uuid.UUID]) -> None:
    """Park the messages a day before any other parked, one a second in the order given: the
    oldest parked, taken first by --all before any other test's."""
    with service_app("payments").app_context(), transaction() as session:
        first = (session.scalar(select(func.min(InboxMessage.parked_at)))
                 or datetime.now(timezone.utc))
        for position, message_id in enumerate(message_ids):
            session.execute(update(InboxMessage).where(InboxMessage.message_id == message_id)
                            .values(parked_at=first - timedelta(days=1, seconds=-position),
                                    last_error="ledger closed"))


def _parked_now(message_ids: list[uuid.UUID]) -> None:
    """Park the messages now, by the database's clock, in a transaction of its own."""
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id.in_(message_ids))
                        .values(parked_at=func.clock_timestamp(), last_error="outage"))


def _parked_row_held(database_url: str, message_id: uuid.UUID):
    """Another session's transaction holding the message's inbox row locked; roll it back."""
    holder = psycopg2.connect(driver_dsn(database_url))
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1 FROM inbox_messages WHERE message_id = %s FOR UPDATE",
                       (message_id,))
    return holder


@pytest.mark.parametrize("command", ["replay", "discard"])
def test_all_parked_messages_go_a_batch_a_transaction_and_a_failure_leaves_the_batches_done(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, capsys, command):
    """`replay --all` / `discard --all` change the parked messages CHANGED_PER_TRANSACTION a
    transaction, oldest parked first (a few million in one statement ran past the statement
    timeout and changed nothing), each replayed batch dispatched as it commits. One that fails (a
    row held locked past the lock timeout) leaves the batches before it done, says how many in a
    line, and the command run again takes up the rest. A record never parsed stays parked under
    replay --all, counted in its batch all the same."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 10)
    requests = [_stored_request(payments_inbox, user_id) for _ in range(24)]
    offset = uuid.uuid4().int % 10**9
    assert payments_inbox([ConsumedRecord("task-test", 9, offset, None, b"{broken", {})]) == []
    with service_app("payments").app_context():
        (unparsed,) = db.session.scalars(select(InboxMessage.message_id).where(
            InboxMessage.partition == 9, InboxMessage.offset == offset)).all()
    in_order = requests[:4] + [unparsed] + requests[4:]  # the unparsed one in the first batch
    _parked_first(in_order)
    changed_first = 9 if command == "replay" else 10

    holder = _parked_row_held(settings.database_url("payments"), in_order[14])  # (2nd batch)
    try:
        assert parked.main([command, "payments", "--all"]) == 1
    finally:
        holder.rollback()
        holder.close()
    said = capsys.readouterr()
    outcome = "handed back to be handled" if command == "replay" else "discarded"
    assert said.out == ""
    # (A discarded PaymentRequested is warned of, as its transaction commits: those of the first.)
    *warnings, failure = said.err.splitlines()
    assert len(warnings) == (0 if command == "replay" else changed_first - 1)  # (one unparsed)
    assert all(line.startswith("WARNING payments inbox: ") for line in warnings)
    assert "Traceback" not in said.err
    assert failure.startswith(f"payments inbox: {changed_first} message(s) {outcome} before the"
                              " database failed")
    assert "run it again" in failure and "locked by another session" in failure
    still_parked = [m for m in in_order if _row(m).parked_at is not None]
    assert still_parked == ([unparsed] if command == "replay" else []) + in_order[10:]

    assert parked.main([command, "payments", "--all"]) == 0
    said = capsys.readouterr()
    if command == "replay":
        assert said.err == ""
    else:  # (any other test's parked messages discarded too)
        warned_of = {line.split()[3] for line in said.err.splitlines()}
        assert warned_of >= {str(message_id) for message_id in in_order[10:]}
    assert f"message(s) {outcome}" in said.out
    for message_id in in_order:
        row = _row(message_id)
        assert (row.parked_at is not None) == (command == "replay" and message_id == unparsed)
        assert (row.processed_at is not None) == (command == "discard")
    if command == "replay":
        dispatched = _dispatched_batches()
        carried = [ids & set(map(str, requests)) for ids in dispatched]
        # A dispatch a batch: the first run's (the record never parsed passed over), then the
        # second run's two (that record, still parked, in its first).
        assert sorted(len(ids) for ids in carried if ids) == [6, 9, 9]
        assert set().union(*carried) == set(map(str, requests))


def test_replay_all_says_how_many_records_never_parsed_it_left_parked(
        settings, payments_inbox, payments_queue, monkeypatch, user_id, capsys):
    """A record that could not be parsed holds no event to hand a handler: `replay --all` passes
    it over, left parked, and says how many it so left (counted over its batches), where it said
    only how many it handed back, as if every parked message had gone."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 2)
    unparsed = []
    for _ in range(3):
        offset = uuid.uuid4().int % 10**9
        assert payments_inbox([ConsumedRecord("task-test", 11, offset, None, b"{broken",
                                              {})]) == []
        with service_app("payments").app_context():
            unparsed += db.session.scalars(select(InboxMessage.message_id).where(
                InboxMessage.partition == 11, InboxMessage.offset == offset)).all()
    requests = [_stored_request(payments_inbox, user_id) for _ in range(2)]
    _parked_first([unparsed[0], requests[0], unparsed[1], unparsed[2], requests[1]])
    with service_app("payments").app_context():  # (other tests' left parked too: --all takes all)
        never_parsed = db.session.scalar(select(func.count()).select_from(InboxMessage).where(
            InboxMessage.parked_at.is_not(None), InboxMessage.type.is_(None)))
    try:
        assert parked.main(["replay", "payments", "--all"]) == 0
        said = capsys.readouterr()
        handed_back, left = said.out.splitlines()
        assert handed_back.startswith("payments inbox: ") and handed_back.endswith(
            " message(s) handed back to be handled")
        assert left == (f"payments inbox: {never_parsed} record(s) never parsed left parked:"
                        " they hold no event to hand back (list payments shows them as"
                        " (unparsed); discard payments ID [ID ...] gives up on them)")
        assert said.err == ""
        assert all(_row(message_id).parked_at is not None for message_id in unparsed)
        assert all(_row(message_id).parked_at is None for message_id in requests)
    finally:  # (no other test's --all to count them)
        with service_app("payments").app_context(), transaction() as session:
            session.execute(update(InboxMessage).where(InboxMessage.message_id.in_(unparsed))
                            .values(parked_at=None, processed_at=func.clock_timestamp()))


def test_replay_all_takes_each_message_once_though_one_parked_it_again_with_a_clock_ahead(
        payments_inbox, payments_queue, monkeypatch, user_id, capsys):
    """`parked_at` is the clock of the process that parked the row: with one running 20 s ahead
    (the last parked, the run's bound, parked by it), messages replayed and parked again at once
    by a worker whose clock is right sort before the bound, after the batch that took them. They
    are not taken up again: each message is handed back once, and counted once."""
    from tasks import parked

    monkeypatch.setattr(parked, "CHANGED_PER_TRANSACTION", 10)
    requests = [_stored_request(payments_inbox, user_id) for _ in range(25)]
    _parked_first(requests[:-1])
    with service_app("payments").app_context(), transaction() as session:
        session.execute(update(InboxMessage).where(InboxMessage.message_id == requests[-1])
                        .values(parked_at=func.clock_timestamp() + timedelta(seconds=20)))
    handed_back: list[uuid.UUID] = []
    dispatched = parked._dispatched

    def parked_again_at_once(service, message_ids, marked_at):  # (a handler that fails for good)
        handed_back.extend(message_ids)
        with service_app("payments").app_context(), transaction() as session:
            session.execute(update(InboxMessage).where(InboxMessage.message_id.in_(message_ids))
                            .values(parked_at=func.clock_timestamp(),
                                    last_error="ledger still closed"))
        return dispatched(service, message_ids, marked_at)

    monkeypatch.setattr(parked, "_dispatched", parked_again_at_once)
    try:
        assert parked.main(["replay", "payments", "--all"]) == 0
        assert len(handed_back) == len(set(handed_back))
        assert set(requests) <= set(handed_back)
        # (Its first line: records never parsed other tests left parked are said on the next.)
        assert capsys.readouterr().out.splitlines()[0] == (
            f"payments inbox: {len(handed_back)} message(s) handed back to be handled")
    finally:  # (no other test's --all to take them up)
        with service_app("payments").app_context(), transaction() as session:
            session.execute(update(InboxMessage).where(InboxMessage.message_id.in_(requests))
                            .values(parked_at=None, processed_at=func.clock_timestamp()))
        _dispatched_batches()


def _dispatched_batches(queue: str = "payments") -> list[set[str]]:
    """Takes every task off the queue: the message ids each carries."""
    batches = []
    with celery_app.pool.acquire(block=True) as connection:
        while (task := connection.default_channel.basic_get(queue, no_ack=True)) is not None:
            args, _, _ = task.decode()
            batches.append(set(args[1] if isinstance(args[1], list) else [args[1]]))
    return batches


@pytest.mark.parametrize("setting, value, said", [
    ("PAYMENTS_DATABASE_URL", "postgresql://shop:not-to-be-shown@127.0.0.1:port/hseshop_payments",
     "PAYMENTS_DATABASE_URL='postgresql://shop:***@127.0.0.1:port/hseshop_payments': expected a"
     " PostgreSQL URL"),
    ("PAYMENTS_DATABASE_URL", "mysql://shop@127.0.0.1/hseshop_payments",
     "PAYMENTS_DATABASE_URL='mysql://shop@127.0.0.1/hseshop_payments': expected a PostgreSQL"
     " URL"),
    ("REDIS_URL", "redis://:not-to-be-shown@127.0.0.1:port/12",
     "REDIS_URL='redis://:***@127.0.0.1:port/12': expected a Redis URL"),
    ("INBOX_MAX_ATTEMPTS", "five", "INBOX_MAX_ATTEMPTS='five': expected a whole number"),
])
def test_the_operators_command_given_a_setting_it_cannot_take_names_it_in_a_line(
        settings, payments_inbox, user_id, setting, value, said):
    """An operator's mistyped setting (a database's URL of another form, whose password is not
    shown) is said in a line, not a traceback, and the parked message is left as it was."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    _parked_first([message_id])
    try:
        ran = subprocess.run([sys.executable, "-m", "tasks.parked", "replay", "payments",
                              str(message_id)], env=os.environ | {setting: value},
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert ran.returncode == 1, ran.stderr
        assert ran.stdout == ""
        (line,) = ran.stderr.splitlines()
        assert line.startswith(f"payments inbox: nothing done: {said}"), line
        assert "not-to-be-shown" not in line
        assert _row(message_id).parked_at is not None
    finally:
        assert parked.main(["discard", "payments", str(message_id)]) == 0


@pytest.mark.parametrize("argv", [["replay", "payments"],
                                  ["discard", "payments", "--all", str(uuid.uuid4())]])
def test_the_operators_command_says_its_usage_error_before_a_setting_it_cannot_take(argv):
    """A command line it cannot take is said as one (exit 2), whatever the settings: before, the
    setting was said (exit 1), and the usage error only once it was put right."""
    ran = subprocess.run([sys.executable, "-m", "tasks.parked", *argv],
                         env=os.environ | {"INBOX_MAX_ATTEMPTS": "five"}, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.splitlines()[-1].startswith(
        f"python -m tasks.parked {argv[0]}: error: name the messages, or give --all"), ran.stderr
    assert "INBOX_MAX_ATTEMPTS" not in ran.stderr


@pytest.mark.parametrize("order", ["--all first", "--all last"])
@pytest.mark.parametrize("command", ["replay", "discard"])
def test_naming_messages_and_giving_all_is_refused_whichever_comes_first(
        settings, payments_inbox, user_id, capsys, command, order):
    """`replay payments --all ID` is refused as `replay payments ID --all` is, saying to name the
    messages or give --all, not both, and nothing changes. Before, --all first left the ids to the
    command's parser, which said only "unrecognized arguments: ID"."""
    from tasks import parked

    message_id = _stored_request(payments_inbox, user_id)
    _parked_first([message_id])
    argv = [command, "payments", str(message_id)]
    argv.insert(2 if order == "--all first" else len(argv), "--all")
    try:
        with pytest.raises(SystemExit) as refused:
            parked.main(argv)
        assert refused.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == (
            f"python -m tasks.parked {command}: error: name the messages, or give --all, not both")
        assert _row(message_id).parked_at is not None and _row(message_id).processed_at is None
    finally:
        assert parked.main(["discard", "payments", str(message_id)]) == 0


@pytest.mark.parametrize("argv", [["list", "payments"], ["replay", "payments", "--all"],
                                  ["discard", "payments", str(uuid.uuid4())]])
def test_the_operators_command_says_in_a_line_that_the_database_could_not_be_reached(
        settings, argv):
    """No traceback: one line on stderr, saying nothing was done, and exit code 1."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/hseshop_payments"
    ran = subprocess.run([sys.executable, "-m", "tasks.parked", *argv],
                         env=os.environ | {"PAYMENTS_DATABASE_URL": unreachable},
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1, ran.stderr
    assert ran.stdout == ""
    said = ran.stderr.splitlines()
    assert len(said) == 1, ran.stderr
    assert "the database was out of reach" in said[0]
    assert said[0].startswith({"list": "payments inbox: nothing listed: ",
                               "replay": "payments inbox: nothing handed back to be handled: ",
                               "discard": "payments inbox: nothing discarded: "}[argv[0]])


# The operator's command run as an operator runs it, in a process of its own, its
# CHANGED_PER_TRANSACTION made small, so that a few messages make several batches.
_COMMAND_IN_SMALL_BATCHES = """
import sys
from shared.quiet_interrupt import run_main
from tasks import parked
parked.CHANGED_PER_TRANSACTION = 5
run_main(lambda: parked.main(sys.argv[1:]))
"""


def _run_with_its_reader_gone(argv: list[str], also_stderr: bool) -> tuple[int, str]:
    """Run tasks.parked with `argv`, its stdout (and its stderr too, when `also_stderr`: `2>&1`) a
    pipe whose reader has gone before it writes (`| head -0`, or a reader gone after its first
    line); returns its exit code and what it said on a stderr of its own (none when
    `also_stderr`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader, gone
    try:
        ran = subprocess.run([sys.executable, "-c", _COMMAND_IN_SMALL_BATCHES, *argv],
                             cwd=REPO_ROOT, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)},
                             stdout=write_end, stderr=write_end if also_stderr else subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write_end)
    return ran.returncode, ran.stderr or ""


def test_discard_all_whose_reader_goes_discards_every_batch_and_ends_as_by_sigpipe(
        settings, payments_inbox, user_id):
    """`discard payments --all 2>&1 | head -1`: the reader gone after the first WARNING line, the
    next one ended the command part way, a batch discarded and the rest left parked, exit 1 and
    nothing said. It goes on with its output going nowhere, discards every batch, and exits as
    `list` does when its reader goes, as a command ended by SIGPIPE (141)."""
    from tasks import parked

    requests = [_stored_request(payments_inbox, user_id) for _ in range(12)]
    _parked_first(requests)  # three batches of 5, each warned of as it commits
    returncode, said = _run_with_its_reader_gone(["discard", "payments", "--all"],
                                                 also_stderr=True)
    assert (returncode, said) == (parked.SIGPIPE_EXIT, "")
    assert [_row(message_id).processed_at is not None for message_id in requests] == [True] * 12
    assert [_row(message_id).parked_at for message_id in requests] == [None] * 12


def test_replay_all_whose_reader_goes_replays_every_batch_and_ends_as_by_sigpipe(
        settings, payments_inbox, payments_queue, user_id):
    """`replay payments --all | head -0`: its count, the one line on stdout, met a reader gone
    once every batch was replayed, and the command ended in a traceback, exit 1, as though it
    had failed part way. It ends as `list` does when its reader goes (141), nothing said on its
    stderr but each batch's audit line, every batch replayed and dispatched."""
    from tasks import parked

    requests = [_stored_request(payments_inbox, user_id) for _ in range(12)]
    _parked_first(requests)
    returncode, said = _run_with_its_reader_gone(["replay", "payments", "--all"],
                                                 also_stderr=False)
    assert returncode == parked.SIGPIPE_EXIT, said
    assert all(" WARNING tasks.parked " in line and " replayed " in line
               for line in said.splitlines()), said
    assert [_row(message_id).parked_at for message_id in requests] == [None] * 12
    dispatched = set().union(*_dispatched_batches())
    assert dispatched >= set(map(str, requests))


def _as_stored(message_id) -> tuple:
    """What a replay or a discard changes of a message's row, as committed."""
    row = _row(message_id)
    return row.parked_at, row.attempts, row.last_error, row.processed_at, row.last_attempt_at


def _audited(caplog) -> list[str]:
    """The audit lines the operator's command logged (at WARNING, the only level it logs at)."""
    return [record.getMessage() for record in caplog.records
            if record.name == "tasks.parked" and record.levelno == logging.WARNING]


def _payments_database(settings) -> str:
    """The payments database as the operator's command names it: its name and server."""
    return database_named(settings, "payments")


@pytest.mark.parametrize("command, outcome", [("replay", "handed back to be handled"),
                                              ("discard", "discarded")])
def test_a_dry_run_says_what_it_would_replay_or_discard_and_changes_nothing(
        settings, payments_inbox, payments_queue, user_id, capsys, caplog, command, outcome):
    """--dry-run takes the messages a run would (named, or --all), says each and how many, as the
    run would say them, and rolls back: the rows are as they were, no task is dispatched, and
    nothing is audited. Before, an operator could not see what a discard would destroy."""
    from tasks import parked

    message_id, unknown = _stored_request(payments_inbox, user_id), uuid.uuid4()
    _parked_first([message_id])
    before = _as_stored(message_id)
    try:
        assert parked.main([command, "payments", "--dry-run", str(message_id), str(unknown)]) == 1
        said = capsys.readouterr()
        assert said.out == (f"{message_id}: would be {outcome}\npayments inbox: 1 message(s)"
                            f" would be {outcome} (dry run: nothing changed)\n")
        assert said.err.splitlines()[-1] == (
            f"{unknown}: would not be {command}ed (not parked, unknown"
            + (", or never parsed)" if command == "replay" else ")"))
        if command == "discard":  # (its warning, said as the discard would say it)
            assert said.err.startswith(
                f"WARNING payments inbox: {message_id} PaymentRequested would be discarded: order")
        assert parked.main([command, "payments", "--all", "--dry-run"]) == 0  # (first parked)
        said = capsys.readouterr().out.splitlines()
        each = [line for line in said if line.endswith(f": would be {outcome}")]
        assert f"{message_id}: would be {outcome}" in each  # (in the first batch, in any order)
        assert (f"payments inbox: {len(each)} message(s) would be {outcome} (dry run: nothing"
                " changed)") in said
        assert _as_stored(message_id) == before
        assert _dispatches_of(message_id) == []
        assert _audited(caplog) == []
    finally:
        assert parked.main(["discard", "payments", str(message_id)]) == 0


def test_each_replay_or_discard_is_audited_in_the_log_with_who_ran_it_where_and_what(
        settings, payments_inbox, payments_queue, user_id, caplog, monkeypatch):
    """Each transaction that changed messages says so at WARNING, through the project's logging:
    the service and box, the database, the OS user who ran it, what it did and to how many, and
    every id (AUDITED_A_LINE to a line). A run that changed nothing says nothing. Before, a
    discard destroyed a message and left no trace of who did it."""
    from tasks import parked

    first, second = (_stored_request(payments_inbox, user_id) for _ in range(2))
    _parked_first([first, second])
    monkeypatch.delenv("SUDO_USER", raising=False)
    where = f"payments inbox of {_payments_database(settings)}: {_who_ran_it()}"
    assert parked.main(["replay", "payments", str(first)]) == 0
    assert _audited(caplog) == [f"{where} replayed 1 parked message(s): {first}"]
    caplog.clear()
    _parked_first([first])
    monkeypatch.setattr(parked, "AUDITED_A_LINE", 1)
    assert parked.main(["discard", "payments", str(first), str(second)]) == 0
    assert sorted(_audited(caplog)) == sorted(
        f"{where} discarded 1 parked message(s): {message_id}" for message_id in (first, second))
    caplog.clear()
    assert parked.main(["discard", "payments", str(first)]) == 1  # (no longer parked)
    assert _audited(caplog) == []


def test_a_discard_whose_commit_goes_unanswered_is_audited_as_of_unknown_outcome(
        settings, payments_inbox, user_id, caplog, capsys, monkeypatch):
    """A transaction whose COMMIT's answer is lost (the connection gone as it committed: a
    failover, a network cut) may have discarded its messages or not: it is audited all the same,
    at WARNING, saying that its outcome is unknown, with every id and where to look, and the
    command says so too. Before, only a transaction known to have committed was audited, and one
    whose commit went unanswered, carried out as it was here, left no trace of who discarded what,
    the command saying "nothing discarded"."""
    from tasks import parked

    messages = [_stored_request(payments_inbox, user_id) for _ in range(2)]
    _parked_first(messages)
    monkeypatch.delenv("SUDO_USER", raising=False)
    with service_app("payments").app_context():
        engine = db.engine
    answer_lost, made = ExitStack(), []
    with answer_lost, called_at_the_first_statement_naming(  # (the discard's own COMMIT)
            "UPDATE inbox_messages", before=True,
            call=lambda: made.append(answer_lost.enter_context(
                the_next_commits_answer_lost(engine)))):
        assert parked.main(["discard", "payments", *map(str, messages)]) == 1
    assert made == [[True]]
    assert capsys.readouterr().err.startswith(
        "payments inbox: 2 message(s) discarded or not (the COMMIT of their transaction went"
        " unanswered: list payments shows those still parked): the database was out of reach")
    (line,) = _audited(caplog)
    said, ids = line.rsplit(": ", 1)
    assert said == (f"payments inbox of {_payments_database(settings)}: {_who_ran_it()} may have"
                    " discarded 2 parked message(s), outcome unknown (its COMMIT went unanswered:"
                    " list payments shows those still parked)")
    assert sorted(ids.split(", ")) == sorted(map(str, messages))
    assert all(_row(message_id).processed_at is not None for message_id in messages)


def _who_ran_it() -> str:
    """Who the audit line of a command run by this process (or a child of it, with
    _environment_without_sudo) says ran it, SUDO_USER unset."""
    return f"{getpass.getuser()} (uid {os.getuid()})"


@pytest.mark.parametrize("answer", ["y", "n", ""])
def test_discard_on_a_terminal_asks_first_and_discards_only_when_answered_y(
        settings, payments_inbox, user_id, tmp_path, answer):
    """Run from a terminal (its stdin a TTY, here a pseudo-terminal), discard says how many rows
    of which database it would discard and waits for y: anything else (Enter alone too) discards
    nothing, exit 1. It asks on the terminal itself, /dev/tty, and says there what an answer
    other than y did: stderr, where README has the audit lines kept (2>>parked-audit.log), took
    the question, and the command seemed to hang. What the discard did is audited in that log.
    Before, a discard --all typed on a terminal destroyed every parked message at once."""
    messages = [_stored_request(payments_inbox, user_id) for _ in range(2)]
    _parked_first(messages)
    before = [_as_stored(message_id) for message_id in messages]
    with open(tmp_path / "parked-audit.log", "wb") as audit_log, on_a_terminal(
            ["discard", "payments", *map(str, messages)], stderr=audit_log) as (command, terminal):
        asked = said_until(terminal, "[y/N] ", timeout=60)
        assert asked.endswith(f"discard 2 rows of {_payments_database(settings)}? [y/N] ")
        assert [_as_stored(message_id) for message_id in messages] == before  # (not yet)
        os.write(terminal, f"{answer}\n".encode())
        out, _ = command.communicate(timeout=60)
        if answer != "y":  # (after the answer echoed)
            assert said_until(terminal, "(not confirmed)\r\n", timeout=60).endswith(
                "\r\npayments inbox: nothing discarded (not confirmed)\r\n")
    err = (tmp_path / "parked-audit.log").read_text()
    assert "[y/N]" not in err and "not confirmed" not in err
    audit = (f" WARNING tasks.parked [request_id=-] payments inbox of"
             f" {_payments_database(settings)}: {_who_ran_it()} discarded 2 parked message(s)")
    if answer == "y":
        assert (command.returncode, out) == (0, b"payments inbox: 2 message(s) discarded\n"), err
        assert audit in err
        assert all(_row(message_id).processed_at is not None for message_id in messages)
    else:
        assert (command.returncode, out) == (1, b""), err
        assert audit not in err
        assert [_as_stored(message_id) for message_id in messages] == before


def test_a_discard_confirmed_on_a_terminal_leaves_the_messages_parked_while_it_asked(
        settings, payments_inbox, user_id):
    """`discard --all` on a terminal discards what it counted as it asked, up to the last parked
    as it counted: messages parked while the question waits (a broker outage parking hundreds of
    PaymentSucceeded) are left parked, and it says so. Before, the discard took its own bound
    once answered, and discarded them too, never counted nor confirmed."""
    from tasks import parked

    assert parked.main(["discard", "payments", "--all", "--yes"]) == 0  # (other tests' parked)
    counted = [_stored_request(payments_inbox, user_id) for _ in range(2)]
    _parked_first(counted)
    meanwhile = [_stored_request(payments_inbox, user_id) for _ in range(3)]
    try:
        discarded_all_confirmed_leaving_some_parked(settings, "payments", outbox=False, counted=2,
                                                    while_it_asks=lambda: _parked_now(meanwhile))
        assert all(_row(message_id).processed_at is not None for message_id in counted)
        assert [_row(message_id).parked_at is not None for message_id in meanwhile] == [True] * 3
        assert [_row(message_id).processed_at for message_id in meanwhile] == [None] * 3
    finally:
        parked.main(["discard", "payments", *map(str, meanwhile)])


def test_a_discard_confirmed_on_a_terminal_leaves_a_message_parked_before_it_counted_uncommitted(
        settings, payments_inbox, user_id):
    """`discard --all` on a terminal discards the very messages its count saw parked: one a
    worker's batch stamped parked before the count, in a transaction that went on with other
    messages and committed only once the count was done, was not counted, and is left parked, and
    said to be. Before, the discard took every message parked up to the last parked as it counted,
    by the time each was stamped parked, and a park is stamped as its statement runs, not as its
    transaction commits: that message, stamped before the bound, was discarded, never counted nor
    confirmed."""
    from tasks import parked

    assert parked.main(["discard", "payments", "--all", "--yes"]) == 0  # (other tests' parked)
    in_a_batch, counted = (_stored_request(payments_inbox, user_id) for _ in range(2))
    batch = psycopg2.connect(driver_dsn(settings.database_url("payments")))
    try:
        with batch.cursor() as cursor:  # (parked as a handler parks it: its batch goes on)
            cursor.execute("UPDATE inbox_messages SET attempts = attempts + 1,"
                           " parked_at = clock_timestamp(), last_error = 'ledger closed'"
                           " WHERE message_id = %s RETURNING parked_at", (str(in_a_batch),))
            (stamped_in_the_batch,) = cursor.fetchone()
        _parked_now([counted])
        assert stamped_in_the_batch < _row(counted).parked_at
        discarded_all_confirmed_leaving_some_parked(settings, "payments", outbox=False, counted=1,
                                                    while_it_asks=batch.commit)
        assert _row(counted).processed_at is not None
        left = _row(in_a_batch)
        assert (left.parked_at, left.processed_at) == (stamped_in_the_batch, None)
    finally:
        batch.rollback()
        batch.close()
        parked.main(["discard", "payments", str(in_a_batch)])


def test_a_named_message_parked_while_a_discard_asked_is_left_parked_and_said_to_be(
        settings, payments_inbox, user_id):
    """A discard of named messages on a terminal discards those it counted as it asked: one of
    them not parked then, and parked while the question waits, is not discarded, unconfirmed, and
    it says so of that one: parked since it was counted, left parked. Before, it said "not
    parked, unknown" of a message parked there and then, which seemed gone for good."""
    counted, parked_meanwhile = (_stored_request(payments_inbox, user_id) for _ in range(2))
    _parked_first([counted])
    try:
        discarded_named_confirmed_leaving_one_parked(
            settings, "payments", outbox=False, counted=counted, parked_meanwhile=parked_meanwhile,
            while_it_asks=lambda: _parked_now([parked_meanwhile]))
        assert _row(counted).processed_at is not None
        meanwhile = _row(parked_meanwhile)
        assert meanwhile.parked_at is not None and meanwhile.processed_at is None
    finally:
        from tasks import parked
        parked.main(["discard", "payments", str(parked_meanwhile)])


@pytest.mark.parametrize("option", ["--yes", "--dry-run"])
def test_discard_on_a_terminal_given_yes_or_dry_run_asks_nothing(settings, payments_inbox,
                                                                  user_id, option):
    """--yes discards without asking, --dry-run says what it would without asking, on a terminal
    as in a script (a command that asked would wait on the terminal, nothing written to it)."""
    message_id = _stored_request(payments_inbox, user_id)
    _parked_first([message_id])
    with on_a_terminal(["discard", "payments", str(message_id), option],
                        stderr=subprocess.PIPE) as (command, terminal):
        out, err = command.communicate(timeout=60)
        os.set_blocking(terminal, False)
        on_the_terminal = b""
        with contextlib.suppress(BlockingIOError):
            on_the_terminal = os.read(terminal, 4096)
    assert on_the_terminal == b""
    assert command.returncode == 0, err
    assert b"[y/N]" not in err
    assert out.decode().endswith(
        "payments inbox: 1 message(s) discarded\n" if option == "--yes" else
        "payments inbox: 1 message(s) would be discarded (dry run: nothing changed)\n")
    assert (_row(message_id).processed_at is not None) == (option == "--yes")
    if option == "--dry-run":
        from tasks import parked
        assert parked.main(["discard", "payments", str(message_id)]) == 0


def test_a_replay_interrupted_as_it_dispatches_has_audited_what_it_committed(
        settings, payments_inbox, user_id):
    """Each transaction's audit line is logged as it commits, before its messages are
    dispatched: Ctrl-C while the dispatch waits on a Redis that does not answer leaves the
    replayed (unparked, committed) messages audited. Before, the line came after the dispatch,
    and a dispatch interrupted or failing left committed changes with no audit line."""
    message_id = _stored_request(payments_inbox, user_id)
    _parked_first([message_id])
    redis_not_answering = NeverReadingServer()
    try:
        broker = redis_not_answering.url.replace("http://", "redis://") + "/0"
        command = start_child([sys.executable, "-m", "tasks.parked", "replay", "payments",
                               str(message_id)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
                              env=environment_without_sudo() | {"CELERY_BROKER_URL": broker})
        try:
            wait_for(lambda: _row(message_id).parked_at is None, timeout=60,
                     what="the replay's commit")
            wait_for(lambda: redis_not_answering.accepted, timeout=60,
                     what="the dispatch connecting to Redis")
            command.send_signal(signal.SIGINT)  # (Ctrl-C, as the dispatch waits for Redis)
            out, err = command.communicate(timeout=60)
        finally:
            command.kill()
            command.wait()
    finally:
        redis_not_answering.close()
    assert command.returncode == -signal.SIGINT, err
    assert b"before it was interrupted" in err, err  # (the dispatch was under way)
    assert (f" WARNING tasks.parked [request_id=-] payments inbox of"
            f" {_payments_database(settings)}: {_who_ran_it()} replayed 1 parked message(s):"
            f" {message_id}").encode() in err, err
