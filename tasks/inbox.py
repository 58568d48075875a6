"""Handling inbox messages in Celery: the consumer dispatches a task for every 50 new messages of a
stored batch, and the task handles its messages many to a transaction (with a savepoint per handler
once one of them fails); a message whose first try fails goes to a task of its own that retries it
with backoff and parks it after the last attempt; a batch that cannot reach its database is retried
whole (unless its tries keep losing the connections they made, under one message's handler, which
then goes to a task of its own, or outside any), and a message's own task then
leaves the message to the sweeper, each saying so once per outage; the sweeper dispatches again the
messages whose handling was lost (a try of a task of their own that began and came to nothing
counting as an attempt; a sweep that loses its database connection says so once per outage, and the
next sweep tries again), and says how many are parked every PARKED_REMINDER_SECONDS; and the
pruner deletes the rows of messages stored and handled (or discarded) long ago."""

from __future__ import annotations

import logging
import random
import uuid
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy.exc import SQLAlchemyError

from shared.celery_settings import QUEUE_COUNT_RETRY_POLICY
from shared.config import SERVICES
from shared.db import (DatabaseOutageLog, connection_lost, database_now, held_up_by_a_lock,
                       said_in_a_line, transaction)
from shared.inbox.handling import (ConnectionLostInHandler, Outcome, StoredMessage,
                                   handle_locked_message, handle_locked_messages_at_once,
                                   lock_in_order, lock_in_order_marking_processed,
                                   note_try_begun, process_inbox_message, record_failed_attempt)
from shared.inbox.parked import count_parked_messages
from shared.inbox.pruning import prune_handled_messages
from shared.inbox.sweeping import claim_stalled_messages, unmark_unsent
from shared.parked_reminder import ParkedReminder
from shared.request_context import request_id_bound, request_ids_bound
from shared.task_queues import handler_queue
from tasks.celery_app import app
from tasks.retention import prune_in_transactions
from tasks.run_request_id import bind_request_id_for_the_rest_of_the_run
from tasks.services import ServiceTask, service_package

log = logging.getLogger(__name__)

# Messages a `handle_inbox_batch` task handles in one transaction: one commit (one WAL flush)
# covers them all, while the row locks they take are held for a few milliseconds only.
HANDLED_PER_TRANSACTION = 50
# A dispatched batch waits in its service's Celery queue behind every task sent before it. With a
# backlog there (a burst, a worker restarting), a message can wait past the sweep's minimum age
# with its dispatch not lost at all, and sweeping it would add its batch to the backlog once more,
# sweep after sweep. So while tasks wait in the queue, the sweeper takes only messages this old.
SWEEP_MIN_AGE_WHILE_QUEUED = timedelta(minutes=5)
# And one it handed over then waits as long again as it had waited, up to this, before the next
# (shared.inbox.sweeping): 5, 10, 20, 40 minutes, not a batch more every 5 while the backlog lasts.
SWEEP_BACKOFF_WHILE_QUEUED_AT_MOST = timedelta(hours=1)
# What this process's sweeps have said of each service database's outage.
_SWEEPS_DATABASE_OUTAGE = {service: DatabaseOutageLog(log, f"the {service} inbox sweeper")
                           for service in SERVICES}
# What this process's handlers (batches and tasks of a message's own) have said of it: a line as
# an outage begins, not two for every try of every message.
_HANDLERS_DATABASE_OUTAGE = {service: DatabaseOutageLog(log, f"the {service} inbox handlers")
                             for service in SERVICES}
# What this process's sweeps remind of each service's parked messages (shared.parked_reminder): a
# count, and how to list them, every PARKED_REMINDER_SECONDS while any stay parked, where each was
# said once as it was parked.
_PARKED_REMINDERS = {service: ParkedReminder(log, f"{service} inbox",
                                             "never handled until replayed or discarded",
                                             f"python -m tasks.parked list {service}")
                     for service in SERVICES}
# What a message's own task returns when it left the message to the sweeper, its database away.
LEFT_TO_THE_SWEEPER = "left_to_the_sweeper"


# A failed try is retried after a random wait up to 1, 2, 4, then 8 s, and never up to the sweep's
# minimum age: a retry waits in the worker's memory, not in the queue, and one waiting longer than
# that would be handed over again beside it (not counted, its failure recorded, but run twice).
RETRY_BACKOFF_MAX_SECONDS = 8.0


def retry_countdown(retries: int, sweep_min_age_seconds: float) -> float:
    """How long the retry after `retries` retries waits (full jitter, as Celery's backoff)."""
    # (The exponent capped: a try retried without end, its database away for the best part of an
    # hour, would reach 2.0 ** 1024, past a float.)
    return random.uniform(0, min(2.0 ** min(retries, 10), RETRY_BACKOFF_MAX_SECONDS,
                                 sweep_min_age_seconds / 2))


# (max_retries: the inbox row counts the attempts and parks the message at the limit;
# watched_for_hangs: the worker ends should it hang, tasks/hung_tasks.py.)
@app.task(name="hseshop.handle_inbox_message", base=ServiceTask, bind=True, ignore_result=True,
          max_retries=None, watched_for_hangs=True)
def handle_inbox_message(self, service: str, message_id: str) -> str:
    """Handle one stored message, its try noted as begun first (note_try_begun); a try that fails
    is recorded and retried with backoff, unless the message is parked, or another goes on with it
    (the sweeper took the try for lost, or another task's try of it ended meanwhile:
    record_failed_attempt). A try whose failure cannot be recorded, the database away, is said
    once per outage and left to the sweeper, which hands the message over once the database is
    back (counting the try as an attempt if it was noted as begun): retried here, every message
    caught by the outage would fail again and again, a pair of warnings each time."""
    handlers = service_package(service).message_handlers()
    settings = current_app.extensions["hseshop.settings"]
    outage = _HANDLERS_DATABASE_OUTAGE[service]
    message = uuid.UUID(message_id)
    begun = None
    try:
        with transaction() as session:
            noted = note_try_begun(session, message)
        begun = noted  # (once committed: a note never committed began no try)
        with transaction() as session:
            outcome = process_inbox_message(session, message, handlers)
    except Exception as exc:
        # The message's own lines (its failure, its parking) are said with its request id, as its
        # handling is (a try not noted, the row held by another task's try or the database away,
        # says them without); the outage's are the process's, of no one message, and say none.
        request_id = begun.request_id if begun else None
        lost = exc.error if isinstance(exc, ConnectionLostInHandler) else exc
        if not outage.said_if_lost(lost):
            with request_id_bound(request_id):
                log.warning("%s inbox: handling %s failed: %r", service, message_id, exc)
        try:
            with request_id_bound(request_id), transaction() as session:
                ended = record_failed_attempt(session, message, repr(exc),
                                              settings.inbox_max_attempts,
                                              counted=not held_up_by_a_lock(exc),
                                              try_began_at=begun.at if begun else None)
        except Exception as noting:  # (the sweeper makes good a try left unnoted)
            if outage.said_if_lost(noting):
                return LEFT_TO_THE_SWEEPER
            with request_id_bound(request_id):
                log.warning("%s inbox: could not note the failed try of %s: %r",
                            service, message_id, noting)
            ended = None
        else:
            outage.back()
        if ended is Outcome.ALREADY_DONE:
            _said_found_handled_already(service, message, request_id)
        if ended is not None:  # parked, handled, or handed over again: no retry of its own
            return ended.value
        bind_request_id_for_the_rest_of_the_run(self, request_id)  # (Celery's line of the retry)
        raise self.retry(exc=exc, countdown=retry_countdown(
            self.request.retries, settings.inbox_sweep_min_age_seconds)) from exc
    outage.back()
    return outcome.value


def _said_found_handled_already(service: str, message_id: uuid.UUID,
                                request_id: str | None) -> None:
    """Say, with its request id, that a message a failed try had left undone is found handled:
    by that try, its COMMIT kept though its answer was lost (which says no "handled" line:
    shared.inbox.committed_lines), or by another task of it meanwhile. Its trace in the log ends
    here, not at the failure. Not said of a message found done at a first look (a repeat delivery,
    a handing over beside its dispatch): that is common, and its trace ends where it was handled."""
    with request_id_bound(request_id):
        log.info("%s inbox: found %s handled already", service, message_id)


def dispatch_inbox_messages(service: str, message_ids: list[uuid.UUID]) -> None:
    """One `handle_inbox_batch` task per HANDLED_PER_TRANSACTION stored messages.

    A task per batch rather than per message saves, for each message, a trip through Redis and the
    worker's task machinery, which profiling showed to cost more than the handler itself. A
    dispatch that is lost (a crash, Redis down) is made good by the sweeper.
    """
    for start in range(0, len(message_ids), HANDLED_PER_TRANSACTION):
        _send_batch(service, message_ids[start:start + HANDLED_PER_TRANSACTION])


def dispatch_handed_over(service: str, message_ids: list[uuid.UUID], marked_at: datetime,
                         own_tasks: bool = False) -> None:
    """Dispatch messages marked handed over at `marked_at` (`last_attempt_at`: claimed by the
    sweeper, or replayed) as `dispatch_inbox_messages` does, or with `own_tasks` each in a task of
    its own. Should sending fail part way (Redis away), the marks of those not sent are cleared,
    as far as the database can be reached, before the failure is raised
    (unmark_for_the_next_sweep): the sweeper takes them at its next sweep, not up to an hour
    on."""
    per_task, send = ((1, _send_own_task) if own_tasks
                      else (HANDLED_PER_TRANSACTION, _send_batch))
    for start in range(0, len(message_ids), per_task):
        try:
            send(service, message_ids[start:start + per_task])
        except Exception:
            unmark_for_the_next_sweep(service, message_ids[start:], marked_at)
            raise


def _send_batch(service: str, message_ids: list[uuid.UUID]) -> None:
    handle_inbox_batch.apply_async((service, [str(message_id) for message_id in message_ids]),
                                   argsrepr=_batch_argsrepr(service, message_ids))


def _send_own_task(service: str, message_ids: list[uuid.UUID]) -> None:
    (message_id,) = message_ids
    handle_inbox_message.apply_async((service, str(message_id)))


def unmark_for_the_next_sweep(service: str, message_ids: list[uuid.UUID],
                              marked_at: datetime) -> None:
    """Unmark messages marked handed over at `marked_at` and never sent (unmark_unsent: those
    a try or another sweep has touched since keep their mark), for the sweeper to take at its
    next sweep; or say in a line why not (the database away too: the marks stay, and the
    messages wait out their backoff)."""
    try:
        with transaction() as session:
            unmark_unsent(session, message_ids, marked_at)
    except SQLAlchemyError as exc:
        log.warning("%s inbox: %d message(s) not dispatched stay marked handed over (%s): while"
                    " tasks wait, the sweeper may leave them up to %d minutes", service,
                    len(message_ids), said_in_a_line(exc),
                    SWEEP_BACKOFF_WHILE_QUEUED_AT_MOST // timedelta(minutes=1))


def _batch_argsrepr(service: str, message_ids: list) -> str:
    """What Flower and the logs show of a batch task's arguments, its sending and its retries
    alike: without it Celery writes a safe repr of every id into each task message."""
    return f"({service!r}, <{len(message_ids)} message ids>)"


# How many of a batch's tries may lose a database connection they had made, outside any handler
# (as its rows are locked, or marked processed, or as it commits), before the batch is split as
# for a failing message: an outage loses one try so at most (the one under way as it begins; the
# tries after it cannot connect at all, and the batch waits them out whole, however many), but
# something in the batch that ends the session reading it (a corrupt row, say) would lose every
# try, for ever.
TRIES_LOST_ONCE_CONNECTED_LIMIT = 3
# How many of a batch's tries may lose the connection while the same message's handler ran before
# that message goes to a task of its own (where its tries count) and the rest is retried without
# it: a handler that ends its own session does so at every try, an outage seldom twice under the
# same message. Till then the message stays in its batch, handled in its key's order.
TRIES_LOST_UNDER_ONE_HANDLER_LIMIT = 2


class BatchCutOff(Exception):
    """A batch's try could not reach its database: `error`, the lost or refused connection's, and
    where it happened (`connected`: whether the try had made its connection; `handling`: the
    message whose handler was running, if one was)."""

    def __init__(self, error: BaseException, connected: bool,
                 handling: uuid.UUID | None = None):
        super().__init__(said_in_a_line(error))
        self.error, self.connected, self.handling = error, connected, handling


@app.task(name="hseshop.handle_inbox_batch", base=ServiceTask, bind=True, ignore_result=True,
          max_retries=None,  # (retried only while its database is away)
          watched_for_hangs=True)  # (tasks/hung_tasks.py)
def handle_inbox_batch(self, service: str, message_ids: list[str],
                       tries_lost_once_connected: int = 0,
                       lost_under: dict[str, int] | None = None) -> int:
    """Handle stored messages in one transaction; hand each that fails to its own retrying task.

    A batch that cannot reach its database is retried, with backoff, until it can, and the outage
    said once: its messages fail for no fault of their own, and kept together they are handled in
    their keys' order once the database is back (handed to tasks of their own, each retried after
    its own random wait, they were handled in any order). Where the connection was lost decides
    what goes on (_after_cut_off)."""
    handlers = service_package(service).message_handlers()
    outage = _HANDLERS_DATABASE_OUTAGE[service]
    try:
        failed = _handle_in_one_transaction(service, [uuid.UUID(m) for m in message_ids],
                                            handlers)
    except BatchCutOff as cut_off:
        outage.lost(cut_off.error)
        return _after_cut_off(self, service, message_ids, cut_off, tries_lost_once_connected,
                              dict(lost_under or {}))
    outage.back()
    for message_id in failed:
        handle_inbox_message.apply_async((service, str(message_id)))
    return len(message_ids) - len(failed)


def _after_cut_off(task, service: str, message_ids: list[str], cut_off: BatchCutOff,
                   tries_lost_once_connected: int, lost_under: dict[str, int]) -> int:
    """What a batch whose try could not reach its database does next.

    Lost while a message's handler ran, the whole batch is retried, that message in it (sent
    alone at once, it could be handled before the earlier messages of its key, which wait for
    the retry), its loss counted in `lost_under`; at the TRIES_LOST_UNDER_ONE_HANDLER_LIMIT-th
    loss under it, the message goes to a task of its own, where its tries count (one whose
    handling ends its own session ends parked, not retrying its batch for ever), and the rest is
    retried without it. Lost anywhere else, or not made at all, the whole batch is retried; but
    once TRIES_LOST_ONCE_CONNECTED_LIMIT of its tries have lost a connection they had made, each
    message goes to a task of its own, as when the batch fails."""
    if cut_off.handling is not None:
        handling = str(cut_off.handling)
        lost_under[handling] = lost_under.get(handling, 0) + 1
        if lost_under[handling] < TRIES_LOST_UNDER_ONE_HANDLER_LIMIT:
            log.info("%s inbox: the database connection was lost while %s was handled; its batch"
                     " of %d is tried again whole", service, handling, len(message_ids))
        else:
            del lost_under[handling]
            message_ids = [message_id for message_id in message_ids if message_id != handling]
            log.info("%s inbox: the database connection was lost %d times while %s was handled;"
                     " it goes to a task of its own, the %d others of its batch are tried again"
                     " together", service, TRIES_LOST_UNDER_ONE_HANDLER_LIMIT, handling,
                     len(message_ids))
            handle_inbox_message.apply_async((service, handling))
            if not message_ids:
                return 0
    elif cut_off.connected:
        tries_lost_once_connected += 1
        if tries_lost_once_connected >= TRIES_LOST_ONCE_CONNECTED_LIMIT:
            log.warning("%s inbox: %d tries of a batch of %d lost the database connection they had"
                        " made (%s); retrying each in a task", service,
                        tries_lost_once_connected, len(message_ids), cut_off)
            for message_id in message_ids:
                handle_inbox_message.apply_async((service, message_id))
            return 0
    settings = current_app.extensions["hseshop.settings"]
    # (`lost_under` sent only when it counts a loss: a worker of before it refuses the retry.)
    kwargs = {"tries_lost_once_connected": tries_lost_once_connected}
    if lost_under:
        kwargs["lost_under"] = lost_under
    raise task.retry(
        args=(service, message_ids), kwargs=kwargs,
        exc=cut_off.error, argsrepr=_batch_argsrepr(service, message_ids),
        countdown=retry_countdown(task.request.retries, settings.inbox_sweep_min_age_seconds),
    ) from cut_off.error


def _handle_in_one_transaction(service: str, message_ids: list[uuid.UUID],
                               handlers) -> list[uuid.UUID]:
    """Handle the messages in one transaction; returns the ones left to retry, and raises
    BatchCutOff when the database's connection was lost or refused.

    Handlers seldom fail, so the batch first runs with no savepoints at all and marks its messages
    processed in the statement that locks them (the savepoint's two round trips and the row's
    flushes were most of what a message cost). If any message fails, that transaction rolls back
    whole, the marks with it, and the batch runs again with a savepoint per handler, so only the
    failing messages are left over. (A connection the database dropped, in a restart, say, fails
    the first run alone: the second runs on a new one.)
    """
    locked: tuple[StoredMessage, ...] = ()
    try:
        with transaction() as session:
            batch = lock_in_order_marking_processed(session, message_ids)
            locked = batch.messages
            handle_locked_messages_at_once(session, batch, handlers)
        return []
    except Exception as exc:
        if not _HANDLERS_DATABASE_OUTAGE[service].said_if_lost(exc):
            # (Said with the request ids of those it handled, known once they were locked: any
            # may be the one that failed. Not those processed or parked before: it passed them.)
            with request_ids_bound(message.request_id for message in locked
                                   if not message.done):
                log.info("%s inbox: a message of a batch of %d failed (%r); handling them again"
                         " one by one", service, len(message_ids), exc)
    return _handle_each_in_a_savepoint(
        service, message_ids, handlers,
        left_undone=frozenset(message.message_id for message in locked if not message.done))


def _handle_each_in_a_savepoint(
        service: str, message_ids: list[uuid.UUID], handlers,
        left_undone: frozenset[uuid.UUID] = frozenset()) -> list[uuid.UUID]:
    """Handle the messages in one transaction, each in a savepoint; returns the ones that failed,
    each with the try counted (but those that used their last attempt: they are parked). One that
    the failed run before found undone (`left_undone`) and this one finds done is said found
    handled already: that run's COMMIT may have been kept, its answer lost. A lost
    connection leaves no message to a task of its own here: it is raised as BatchCutOff, saying
    where it was lost (connecting or once connected, and under which message's handler, if under
    one), for the batch to go on from there."""
    max_attempts = current_app.extensions["hseshop.settings"].inbox_max_attempts
    failed: list[uuid.UUID] = []
    connected = False
    try:
        with transaction() as session:
            session.connection()  # (connecting apart: a try that cannot is an outage's)
            connected = True
            for message in lock_in_order(session, message_ids):
                try:
                    outcome = handle_locked_message(session, message, handlers, max_attempts)
                except Exception as exc:
                    if isinstance(exc, ConnectionLostInHandler) or connection_lost(exc):
                        raise  # (the transaction is lost)
                    with request_id_bound(message.request_id):
                        log.info("%s inbox: %s failed on its first try (%r); retrying in a task",
                                 service, message.message_id, exc)
                    failed.append(message.message_id)
                    continue
                if outcome is Outcome.ALREADY_DONE and message.message_id in left_undone:
                    _said_found_handled_already(service, message.message_id, message.request_id)
    except ConnectionLostInHandler as lost:
        raise BatchCutOff(lost.error, connected, handling=lost.message_id) from lost
    except Exception as exc:
        if connection_lost(exc):
            raise BatchCutOff(exc, connected) from exc
        log.warning("%s inbox: committing %d handled messages failed (%r); retrying each in a task",
                    service, len(message_ids), exc)
        return list(message_ids)
    return failed


@app.task(name="hseshop.sweep_inbox", base=ServiceTask, ignore_result=True)
def sweep_inbox(service: str) -> int:
    """Dispatch again the messages that have waited too long: their dispatch was lost, or their
    handling with its worker.

    With no task waiting in the queue, each message goes to a task of its own, which notes as it
    begins that a try has begun: one whose handling crashes the worker then takes no batch of
    others down with it, again and again, and each such try that came to nothing counts as an
    attempt when it is handed over next (shared.inbox.sweeping), parked at the limit. A task that
    never began (prefetched by a busy worker, or lost with one that crashed for another message's
    sake) counts nothing. (One that was running on another of a crashing worker's threads counts
    too: in a crash loop another message can be parked with the one to blame, for
    `tasks.parked replay`.)
    While tasks wait, a message's own dispatch may wait among them: nothing is counted, the
    messages go in batches, not to swell that backlog, and a message handed over before waits as
    long again as it had waited before the next (up to SWEEP_BACKOFF_WHILE_QUEUED_AT_MOST)."""
    outage = _SWEEPS_DATABASE_OUTAGE[service]
    try:
        swept = _sweep(service)
    except Exception as exc:
        # The next sweep, a beat interval on, tries again: raised, Celery would log the lost
        # connection as unexpected, traceback and all, at every beat while the database is away.
        if not outage.said_if_lost(exc):
            raise
        return 0
    outage.back()
    return swept


def _sweep(service: str) -> int:
    settings = current_app.extensions["hseshop.settings"]
    min_age = timedelta(seconds=settings.inbox_sweep_min_age_seconds)
    backlog = tasks_waiting(handler_queue(service))
    if backlog:
        min_age = max(min_age, SWEEP_MIN_AGE_WHILE_QUEUED)
    with transaction() as session:
        # (The database's clock, as every time the claim compares: their mark, cleared again
        # should their dispatch fail.)
        now = database_now(session)
        stalled = claim_stalled_messages(
            session, min_age, None if backlog else settings.inbox_max_attempts,
            backoff_at_most=SWEEP_BACKOFF_WHILE_QUEUED_AT_MOST if backlog else None, now=now)
    if stalled:
        log.info("%s inbox: re-dispatching %d stalled messages", service, len(stalled))
        dispatch_handed_over(service, [message.message_id for message in stalled], now,
                             own_tasks=not backlog)
    _PARKED_REMINDERS[service].remind(_count_parked)  # (apart: its failure costs the claim nothing)
    return len(stalled)


def _count_parked() -> int:
    with transaction() as session:
        return count_parked_messages(session)


def tasks_waiting(queue: str) -> int:
    """How many tasks wait in a Celery queue, not counting those workers have taken. (Declared,
    not passively: on Redis, kombu's passive check misses a queue under a key prefix.) With Redis
    refusing connections it fails within milliseconds (QUEUE_COUNT_RETRY_POLICY), where kombu's
    own connecting took 6 s: beat counts before each task it sends (tasks/beat.py)."""
    with app.pool.acquire(block=True, timeout=10) as connection:
        connection.ensure_connection(**QUEUE_COUNT_RETRY_POLICY)
        return connection.default_channel.queue_declare(queue=queue).message_count


@app.task(name="hseshop.prune_inbox", base=ServiceTask, ignore_result=True)
def prune_inbox(service: str) -> int:
    """Delete the inbox rows of messages stored and handled over INBOX_RETENTION_SECONDS ago, in
    short transactions, a lost database connection said in a line (tasks/retention.py). Ago by
    the database's clock (prune_in_transactions' own), which `received_at` and `processed_at`
    are written by: a worker's clock ahead of it by a day pruned a day's rows early, one far
    ahead the rows of messages handled moments before, whose repeats Kafka still delivers."""
    settings = current_app.extensions["hseshop.settings"]
    return prune_in_transactions(service, "handled inbox messages", prune_handled_messages,
                                 settings.inbox_retention_seconds)
