"""Relaying outbox rows to Kafka: a Celery task that beat sends, which stays to lead the relay.

Beat sends `relay_outbox` for each service every `outbox_relay_interval_seconds` (a second by
default: the relay's safety net runs at least once a second, shared.config). The first run to take
the service database's leader lock (shared/relay_leader.py) stays: it sends every row waiting, then
sleeps until a commit that inserted outbox rows notifies it, sends again, and so on until its
worker shuts down. Every later run finds the leader and returns at once, so beat only matters when
no leader is alive (its worker died, its database connection broke): the next run takes over
within one interval, a second by default. A row waits for the relay only as long as its commit
takes to notify, never for a poll.

Through an outage of some keys (a topic the relay may not write to, a partition whose broker is
lost) the rows the broker refused wait for their next try, the later rows of their keys behind
them, and a read walks over all of them to find the rows that may go: 1.3 s a read with a million
(shared.outbox.relaying.CLAIM_ROWS). That read stays the only one that chooses rows to send, but
after one slower than SLOW_WALK_SECONDS that found all it could send while refused rows are there,
the leader reads again only once something may have changed for the rows it left (_StandingBacklog):
at each wake-up it first asks whether a row newer than the newest it knew of may go (a walk of the
new rows only), and reads again at once if one may, once the first refused row that holds rows
back may be tried again (WALK_FOR_A_DUE_ROW_AT_MOST_EVERY_SECONDS after the last read at the
soonest), and in any case WALK_AT_LEAST_EVERY_SECONDS after the last read. A row of a sound key
committed meanwhile is sent at the wake-up its commit brings, as ever; a row committed late under
a lower id than the newest known (its id taken before, its commit after), and the rows an
operator hands back or whose parked row it discards (tasks/parked.py), wait for that last read at
worst. A quick read, or a slow one with no refused row there (a busy database), changes nothing:
the leader reads at every wake-up, with no other statement.

A leader that loses its database connection (a restart, a failover) loses its lock with it: the
run ends, saying so in one warning, and beat's next run leads once the database is back. While it
is away, each run says it could not connect once per outage, not at every beat (DatabaseOutageLog).

A leader that has had no answer from the broker for long steps down (STEP_DOWN_AFTER_SECONDS), so
that a worker whose own way to the broker is broken does not hold the lead while others could
relay. A row the broker refuses for what it is (its topic, its record) is an answer: a leader
with nothing else to send goes on leading, and retrying that row, however long it is refused.
"""

from __future__ import annotations

import logging
import threading
import time

from celery import bootsteps
from celery.signals import worker_shutting_down
from flask import current_app

from shared.app_closing import close_with
from shared.config import SERVICES
from shared.db import DatabaseOutageLog
from shared.kafka import ensure_topics
from shared.outbox.publishing import OutboxPublisher
from shared.parked_reminder import ParkedReminder
from shared.outbox.relaying import (count_parked_outbox_messages, first_refused_row_due_in,
                                    newer_row_may_go, newest_row_id, refused_rows_wait,
                                    relay_pending_outbox, rows_were_refused, vacuum_outbox)
from shared.relay_leader import RelayLeaderConnection
from tasks.celery_app import app
from tasks.services import ServiceTask

log = logging.getLogger(__name__)

_PUBLISHER = "hseshop.outbox_publisher"
# The leader sends without being notified this often too: it retries rows the broker refused, and
# makes good a notification lost with a connection.
RECHECK_SECONDS = 1.0
# The leader vacuums the outbox once it has deleted this many rows since it last did
# (shared.outbox.relaying.vacuum_outbox), between one wake-up's sending and its next wait.
VACUUM_AFTER_ROWS = 1000
# How long the leader gives each of the topic check's two broker calls, as it starts to lead and
# after a refused batch.
TOPIC_CHECK_TIMEOUT_SECONDS = 2.0

# A leader whose every batch has had rows without an answer from the broker for this long (no row
# taken; a row refused by the broker for its topic or record,
# shared.outbox.relaying.Refusal.answered, does not end the count while a row left without an answer
# waits), while rows waited (refused rows waiting for their next try count:
# shared.outbox.relaying.FIRST_RETRY_AFTER_SECONDS), steps down: it closes its connection, and the
# lock with it, and this process takes no lead of that outbox for SIT_OUT_SECONDS, so that beat's
# next runs find a relay in another worker, whose way to the broker may be sound. Where the broker
# is down for all, the lead just moves on (or, with one worker, comes back after the sit-out). A row
# the broker answers with a refusal (a topic the relay may not write to, say) says that this worker
# reaches it: another would be refused the same, and a leader stepping down over it would only keep
# the rows committed meanwhile waiting.
STEP_DOWN_AFTER_SECONDS = 60.0
SIT_OUT_SECONDS = 10.0
# A read slower than this that found all it could send (fewer rows than a batch) walked over a
# backlog that cannot go yet: the leader reads again only once something may have changed for it
# (_StandingBacklog), and at least this often, well within the leader session's idle timeout
# (shared.relay_leader.LEADER_IDLE_TIMEOUT_SECONDS; the leader's question at each wake-up is a
# statement too, so the session never idles meanwhile).
SLOW_WALK_SECONDS = 0.05
WALK_AT_LEAST_EVERY_SECONDS = 10.0
# Meanwhile, a refused row whose wait is over is read this long after the last read at the
# soonest: the first refused rows of many keys, refused at different moments, have their waits
# (up to 30 s, shared.outbox.relaying.LONGEST_RETRY_AFTER_SECONDS) end all through the half
# minute, and reading for each would read at nearly every wake-up again.
WALK_FOR_A_DUE_ROW_AT_MOST_EVERY_SECONDS = 5.0

_stopping = threading.Event()
_leading: set[str] = set()  # services whose relay this process leads
_sitting_out: dict[str, float] = {}  # service -> until when (time.monotonic) this process does not
_leading_lock = threading.Lock()
# What this process's runs have said of each service database's outage.
_DATABASE_OUTAGES = {service: DatabaseOutageLog(log, f"the {service} outbox relay")
                     for service in SERVICES}


@worker_shutting_down.connect
def _stop_leading(**kwargs) -> None:
    _stopping.set()


class StopLeadingStep(bootsteps.StartStopStep):
    """Ends this worker's relays as the worker stops, however it was told to: the shutdown signal
    above comes only with SIGTERM, SIGINT or SIGQUIT, not with `celery control shutdown`, a SIGHUP
    restart or an unrecoverable error, and the pool, stopping after this step, waits for its
    threads, one of which leads until told to stop."""

    requires = {"celery.worker.components:Pool"}

    def stop(self, worker) -> None:
        _stop_leading()

    def terminate(self, worker) -> None:  # a cold shutdown, as when the worker gives up on Redis
        _stop_leading()


def _publisher(service: str) -> OutboxPublisher:
    """The worker app's publisher, made on first use and closed with the app (close_app)."""
    app = current_app._get_current_object()
    if _PUBLISHER not in app.extensions:
        publisher = OutboxPublisher(app.extensions["hseshop.settings"], service)
        app.extensions[_PUBLISHER] = publisher
        close_with(app, publisher.close)
    return app.extensions[_PUBLISHER]


def _release_publisher() -> None:
    """Close the worker app's publisher as a lead ends by its worker stopping or by stepping down
    (the broker answering nothing): a worker app is kept for the process and never closed, and
    the lead is the publisher's only user, so its producer would otherwise stay, its threads and
    connections with it, until the process ends. The publisher stays; the next lead sends through
    a new producer, which waits about 0.5 s for its idempotent producer id before its first batch
    goes. So a lead that ended with its database connection lost, the broker answering, keeps
    its producer for the next (called by the leading thread alone, never during a send)."""
    publisher = current_app.extensions.get(_PUBLISHER)
    if publisher is not None:
        publisher.close()


@app.task(name="hseshop.relay_outbox", base=ServiceTask, ignore_result=True)
def relay_outbox(service: str) -> int:
    """Lead this service's relay until the worker stops, unless a relay already leads it; returns
    the number of rows sent (0 when its database connection was lost: those it sent before are
    not counted)."""
    with _leading_lock:
        if (service in _leading or _stopping.is_set()
                or time.monotonic() < _sitting_out.get(service, 0.0)):
            return 0
        _leading.add(service)
    try:
        outage = _DATABASE_OUTAGES[service]
        settings = current_app.extensions["hseshop.settings"]
        with RelayLeaderConnection(settings.database_url(service)) as leader:
            outage.back()
            if not leader.lead():
                return 0
            log.info("leading the %s outbox relay", service)
            sent = _lead(service, settings, leader)
            _release_publisher()
            return sent
    except Exception as exc:
        # A lost connection is the outage this task is built to ride out (beat's next run leads
        # again): raised, Celery would log it as unexpected, traceback and all, at every beat.
        if not outage.said_if_lost(exc):
            raise
        return 0
    finally:
        with _leading_lock:
            _leading.discard(service)


def _lead(service: str, settings, leader: RelayLeaderConnection) -> int:
    # The topics first, made as the shop makes them (a broker that creates a topic a producer
    # names gives it its own defaults, and docker-compose.yml's creates none): a consumer that
    # subscribed before they existed finds them at its next metadata refresh, within seconds.
    _ensure_topics(settings, service)
    publisher = _publisher(service)
    sent = deleted_since_vacuum = 0
    unanswered_since = None  # when the broker stopped answering every batch, if it has
    # The rows the broker left without an answer at their last try, which wait to be tried again:
    # while one does, a batch of others it answered for says nothing of it.
    left_unanswered: set[int] = set()
    # While rows are parked (shared.outbox.relaying), the leader says so as it starts to lead and
    # every PARKED_REMINDER_SECONDS (shared.parked_reminder).
    parked_reminder = ParkedReminder(
        log, f"{service} outbox", "the later rows of their keys waiting behind them",
        f"python -m tasks.parked list {service} --outbox")
    walked_slowly = False  # whether the last read was a slow one that found all it could send
    backlog: _StandingBacklog | None = None  # what such a read left, while nothing changed for it
    while not _stopping.is_set():
        started = time.monotonic()
        parked_reminder.remind(lambda: leader.ask(count_parked_outbox_messages))
        if backlog is not None and not backlog.read_again(leader):
            just_sent = 0  # as a read that found nothing would have
            answered = unanswered = False
        else:
            # The newest row before the read, so that a row the read could not see (committed
            # as it ran) is newer; asked only while reads are slow.
            newest_id = leader.ask(newest_row_id) if walked_slowly else None
            just_sent, answered, unanswered, walked_slowly = _send_waiting_rows(
                service, settings, leader, publisher, left_unanswered)
            backlog = None
            # With no refused row there (waiting, parked, or held behind a parked one), a slow read
            # was slow for another reason (a busy database, big rows), and nothing stands: the
            # leader reads at every wake-up, as a row committed late under a lower id would
            # otherwise wait WALK_AT_LEAST_EVERY_SECONDS for it.
            if walked_slowly and newest_id is not None and leader.ask(rows_were_refused):
                backlog = _StandingBacklog(leader, newest_id, read_at=started)
        sent += just_sent
        deleted_since_vacuum += just_sent
        if just_sent or (answered and not left_unanswered):
            # The broker took a row, or answered for every row it refused, none left unanswered
            # waiting: it is reached. (A row left unanswered that still cannot go is so again at
            # its next try.)
            unanswered_since = None
            left_unanswered.clear()
        elif unanswered:
            unanswered_since = started if unanswered_since is None else unanswered_since
        elif unanswered_since is not None and not leader.ask(refused_rows_wait):
            unanswered_since = None  # nothing refused is left to send
            left_unanswered.clear()
        if (unanswered_since is not None
                and time.monotonic() - unanswered_since >= STEP_DOWN_AFTER_SECONDS):
            _step_down(service, time.monotonic() - unanswered_since)
            return sent
        if deleted_since_vacuum >= VACUUM_AFTER_ROWS:
            leader.ask(vacuum_outbox)
            deleted_since_vacuum = 0
        leader.wait(RECHECK_SECONDS)
    log.info("%s outbox relay stopping with its worker", service)
    return sent


class _StandingBacklog:
    """What a slow read that found all it could send left behind: rows that may not go yet (refused
    ones waiting for their next try, parked ones, and the later rows of their keys), and nothing
    newer than `newest_id` that the read did not see. Until one of them may go, reading them
    again finds nothing, so the leader reads again only when `read_again()` says so."""

    def __init__(self, leader: RelayLeaderConnection, newest_id: int, read_at: float):
        self.newest_id = newest_id  # the newest row's id as the read began (before its snapshot)
        self.read_at = read_at  # when it began (time.monotonic)
        due_in = leader.ask(first_refused_row_due_in)
        # When to read for the first refused row holding rows back, its wait over (time.monotonic).
        self.due_at = None if due_in is None else max(
            time.monotonic() + due_in, read_at + WALK_FOR_A_DUE_ROW_AT_MOST_EVERY_SECONDS)

    def read_again(self, leader: RelayLeaderConnection) -> bool:
        """Whether to read again now: a row newer than the newest known may go, the first refused
        row's wait is over, or WALK_AT_LEAST_EVERY_SECONDS have passed since the read (for the
        rows that may go that no question here finds: one committed late under a lower id, or
        handed back by an operator)."""
        now = time.monotonic()
        if (now - self.read_at >= WALK_AT_LEAST_EVERY_SECONDS
                or (self.due_at is not None and now >= self.due_at)):
            return True
        return leader.ask(newer_row_may_go, self.newest_id)


def _step_down(service: str, unanswered_for: float) -> None:
    log.warning("%s outbox: no batch has had an answer from the broker for %.0f s; stepping down"
                " so that a relay in another worker can lead", service, unanswered_for)
    with _leading_lock:
        _sitting_out[service] = time.monotonic() + SIT_OUT_SECONDS


def _send_waiting_rows(service: str, settings, leader: RelayLeaderConnection,
                       publisher: OutboxPublisher, left_unanswered: set[int],
                       ) -> tuple[int, bool, bool, bool]:
    """Send batch after batch until none is left or the broker takes none of a batch; returns how
    many rows were sent, whether the broker refused any with an answer
    (shared.outbox.relaying.Refusal), whether it took none of a batch and left rows of it without an
    answer, and whether the last read was slower than SLOW_WALK_SECONDS and found all it could send
    (fewer rows than a batch, of which the broker may have refused some, now waiting). The rows it
    refused wait for their next try (shared.outbox.relaying), and the next read passes over them, so
    a batch it took in part is followed by the next; the refusals are logged, and the topics
    checked, once a call. (Messages that can never be sent as they are, too large, invalid records
    or to a topic that is not the shop's, say nothing about the broker: they are parked, and the
    next read passes over them too.) `left_unanswered` becomes the rows left without an answer at
    their last try, of those it held and those read now."""
    sent = refused = 0
    answered = unanswered = walked_slowly = False
    while not _stopping.is_set():
        result = leader.ask(relay_pending_outbox, publisher.send_batch,
                            settings.outbox_relay_batch_size)
        sent += result.sent
        answered = answered or bool(result.answered_ids)
        left_unanswered -= result.claimed_ids  # (sent, answered, parked or held now)
        left_unanswered |= result.unanswered_ids
        walked_slowly = (result.read_seconds >= SLOW_WALK_SECONDS
                         and result.claimed < settings.outbox_relay_batch_size)
        if result.parked:
            log.error("%s outbox: parked %d message(s) that cannot be sent as they are (too"
                      " large, or to a topic that is not the shop's: each one's error says); the"
                      " later rows of their keys wait behind them (python -m tasks.parked list %s"
                      " --outbox)", service, result.parked, service)
        if result.refused_by_the_broker:
            if not refused:
                _ensure_topics(settings, service)
            refused += result.refused_by_the_broker
            if not result.sent:
                unanswered = result.unanswered
                break
        if result.claimed < settings.outbox_relay_batch_size:
            break
    if refused:
        log.warning("%s outbox: %d rows not acknowledged by the broker; each is tried again"
                    " after its wait", service, refused)
    return sent, answered, unanswered, walked_slowly


def _ensure_topics(settings, service: str) -> None:
    # As the leader starts, and when the broker refuses rows: a broker that lost its topics (a
    # fresh in-memory one, say) refuses every message until they are back. Creating them again
    # costs nothing when they exist.
    try:
        ensure_topics(settings, settings.topics(), timeout=TOPIC_CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # broker still down: the next run tries again
        log.info("%s outbox: cannot reach the broker to check topics: %s", service, exc)
