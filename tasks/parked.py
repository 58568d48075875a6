"""Parked messages, for an operator: list them, hand them back once what parked them is mended,
or give up on them.

    python -m tasks.parked list orders                   # the newest 50 parked (--limit N)
    python -m tasks.parked replay payments ID [ID ...]   # or --all
    python -m tasks.parked discard payments ID [ID ...]  # or --all
    python -m tasks.parked list orders --outbox          # the same for the outbox
    python -m tasks.parked replay orders --outbox --to-topic TOPIC ID [ID ...]  # or --all
    python -m tasks.parked discard payments --all --dry-run  # what it would do, changing nothing

By default these are inbox messages. An inbox message is parked after INBOX_MAX_ATTEMPTS failed
tries, or at once when it cannot succeed as things stand (an unknown order, a payment result of
another amount than its order's, a payload that breaks its contract, a type or an envelope version
the service does not know, as a newer version of its producer may send until the service is upgraded
too, no handler for its type, a message under a message_id a message of another type or payload has
taken already, as a producer reusing ids sends, kept as it came under an id of its own and replayed
under it, a record that could not be parsed). One under a taken message_id of the stored one's
type ("one of another payload under it") may be a repeat all the same, serialised again by a tool,
where a later release stored the one under that id in its own form: compare the two rows before
replaying it (psql "$PAYMENTS_DATABASE_URL" -c "SELECT message_id, type, payload, raw_value FROM
inbox_messages WHERE message_id IN ('TAKEN_ID', 'PARKED_ID')", the taken id in its reason), and
discard it if it is the same message in another form (10.5 and "10.50", a UUID in capitals).

Replaying, once what parked a message is mended, is the way out for nearly every message. Replaying
clears its park and its attempts and dispatches it to the service's worker, where it is
handled like a new message, and still at most once: its handler runs under a lock on its inbox
row and marks it processed in the same transaction. A message kept as its text,
its envelope version unknown as it came, is read again as a new message is, whole, and parked again
if that read refuses it. A record that could not even be parsed holds no event to hand a handler,
and stays parked (`replay --all` says how many it left so). Discarding marks it processed without
handling it, so that Kafka delivering it again changes nothing while its row is kept, a retention
after the discard (delivered again after that, it is stored and handled as a new message: never
handled, no business key stops it). What it was to do is never done, and nothing else does it:
nothing but a payment's result moves an order on from NEW. A PaymentRequested discarded (payments'
inbox) leaves its order NEW, never paid for; a PaymentSucceeded (orders' inbox) leaves it NEW
though the account was debited; a PaymentFailed leaves it NEW, never cancelled; an
OrderStatusChanged (the gateway's) leaves its owner's open pages untold. The command says so in a
WARNING line for each payment event it discards, naming its order (from its payload). Discard only
what is garbage: a record that could not be parsed, the same message again in another form. With
--all, the inbox messages parked as the command begins are replayed (each
transaction's dispatched as it commits) or discarded CHANGED_PER_TRANSACTION a transaction, oldest
parked first; should the database fail part way, the command says how many went through and exits
1; interrupted (Ctrl-C), it says that at least so many went through (a batch committing as the
interrupt came goes uncounted, its replays left to the sweeper, which while tasks wait in the
service's queue hands them over up to an hour on: marked handed over, they wait what a message
handed over long after it came waits) and dies of SIGINT, as Ctrl-C ends a command (a shell says
130; a script running it stops). Run again, it takes up the rest. With the task queue out of reach,
the messages are replayed all the same, and unmarked for the sweeper to hand over at its first
sweep once the queue is back.

With --outbox they are outbox rows whose message is too large to be sent (over the producer's
`message.max.bytes` or the topic's `max.message.bytes`), or whose record the broker refuses as
invalid (INVALID_RECORD: a record without a key for a compacted topic, one its validation fails;
its error names the broker's answer), or that name a topic none of the relay's settings names
(TOPIC_*, OUTBOX_EXTRA_TOPICS: written before such a setting was renamed): the relay holds back the
later rows with their topic and key behind them, and `list` says how many. Replaying hands one back
to the relay, to be sent in its place before them (it is parked again if the broker still refuses
it so, or its topic is still not the shop's): so a newer release's row, parked by a relay of the
release before in a rolling upgrade, once the relays know its topic. With --to-topic (a topic the
service writes, and every row sent on of a type it writes there), a row parked for a topic that is
not the shop's is sent there instead, and the rows waiting behind it with it, in their order (under
--all, the rows of one such topic: name the rows when they name several); on that topic they come
after the rows of their keys written to it under its name meanwhile, which the relay, holding rows
back by topic and key, did not hold behind them. A row whose topic is the shop's is refused so, and
said to be replayed without it. Discarding deletes it, never to be sent, and the rows behind it go:
what it was to tell is never told, as for the inbox. A PaymentRequested row (orders') leaves its
order NEW, never paid for; a PaymentSucceeded or PaymentFailed row (payments') leaves it NEW, the
account debited for a success; the command warns of each as for the inbox. With --all, replay
hands back, and discard deletes, the rows parked as it begins CHANGED_PER_TRANSACTION a
transaction, in the order they were written (up to the last written of them, and parked by the
time it begins: one parked meanwhile is left parked, written before the last or after it, as is
a row replayed and parked again at once, still refused), the relay woken as each batch commits,
discard warning of each batch's payment events as it commits; a failure or an interrupt part
way is said as for the inbox. (--all --to-topic sends its rows on in one transaction: its check of
their types sees every row it sends on; one past the statement timeout says to name fewer rows at
a time.)
Replay the row once it can be sent; discard only what is garbage.

With --dry-run, replay and discard take the messages a run would, in the same transactions, and
roll each back (no task dispatched, no relay woken): they say each message (ID: would be
discarded), how many, and what else the run would say, with its exit code. Each transaction a
replay or a discard commits is audited in a WARNING line of the log (logger tasks.parked) as it
commits, before its messages are handed over: the service and box, the database, the OS user who
ran it (with its uid, and SUDO_USER when set), what it did, and every id (AUDITED_A_LINE a line);
one whose COMMIT goes unanswered (the connection lost as it committed: whether it committed
unknown) is audited as it fails, as one that may have done it, its outcome unknown, with every id
and where to look.
On a terminal (stdin a TTY), discard first asks "discard N rows of DATABASE? [y/N]" on the
terminal (/dev/tty, not stderr, which may go to a log), N counted by a dry run, and does nothing,
exit 1, but on y; then it discards the very messages it counted, by their ids (kept as it
counted them, 16 bytes each, and discarded a batch a transaction as counted), and no other. Under
--all, those its count saw parked: a message parked while it asked, or stamped parked before it
counted by a transaction that committed only after (a handler's, its batch going on), is left
parked, and said to be ("messages parked since they were counted are left parked"); named, those
of them it counted: one parked while it asked is left, "parked since it was counted". --yes or
--dry-run asks nothing, nor does a discard whose stdin is not a terminal (a script): under --all
each takes what it finds parked as it begins. A dry run runs the real statements and rolls them
back: it takes the same row locks, for as long as it runs.
"""

from __future__ import annotations

# Run as a command: Ctrl-C while the modules below load ends it quietly (shared.quiet_interrupt).
if __name__ == "__main__":
    from shared.quiet_interrupt import quiet_while_loading
    quiet_while_loading()

import argparse
import contextlib
import functools
import getpass
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO, TypeVar

import psycopg2
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from shared.config import SERVICES, settings_or_exit
from shared.contracts import PAYMENT_FAILED, PAYMENT_REQUESTED, PAYMENT_SUCCEEDED
from shared.db import (db, database_now, failure_in_a_line, if_commit_unanswered, ran_too_long,
                       transaction)
from shared.inbox.parked import (discard_parked_messages, last_parked, never_parsed_parked,
                                 parked_among, parked_batch, parked_messages, unpark_messages)
from shared.migrations import why_not_ready_for_this_release
from shared.outbox.parked import (NotOfTheTopic, discard_parked_outbox_messages,
                                  last_parked_outbox_row, parked_outbox_batch,
                                  parked_outbox_messages, parked_outbox_rows_among,
                                  parked_topics_not_relayed, redirect_parked_outbox_messages,
                                  unpark_outbox_messages, why_not_sent_on)
from shared.parked_batches import (CountedMessages, all_parked_changed_in_transactions,
                                   changed_in_transactions)
from shared.quiet_interrupt import INTERRUPTED
from shared.request_context import escaped_in_logs
from shared.task_queues import QUEUES_UNREACHABLE
from tasks.inbox import dispatch_handed_over, unmark_for_the_next_sweep
from tasks.services import service_app, service_package


class DatabaseNotReady(Exception):
    """The database named for the service is not one this release's command may work on as the
    service's: another service's, or not migrated to this release (its message says which, and
    what to do); nothing was done."""


@contextlib.contextmanager
def _in_the_services_database(service: str) -> Iterator[None]:
    """The service's app context, once its database is known to be the service's, migrated for
    this release: else DatabaseNotReady, before any statement of the command's runs on it (on a
    database at an older revision, `list` failed on UndefinedColumn with no word of migrating, and
    replay and discard ran)."""
    with service_app(service).app_context():
        with db.engine.connect() as connection:
            why = why_not_ready_for_this_release(service, connection)
        if why is not None:
            raise DatabaseNotReady(why)
        yield


def list_parked(service: str, limit: int, outbox: bool = False) -> None:
    with _in_the_services_database(service), transaction() as session:
        lines = (_parked_outbox_lines if outbox else _parked_inbox_lines)(session, limit)
    # Printed once the transaction has ended: piped to a pager, the output may wait on its reader
    # for minutes, and PostgreSQL ends a transaction left idle for one (shared.db.SESSION_LIMITS).
    for line in lines:
        print(line)


def _parked_outbox_lines(session, limit: int) -> list[str]:
    return [f"{row.message_id}  {row.type}  {row.topic} key {row.key or '(none)'}"
            f"  parked {row.parked_at.isoformat()}  {row.waiting_behind} waiting behind"
            f"  {_one_line(row.last_error)}" for row in parked_outbox_messages(session, limit)]


def _parked_inbox_lines(session, limit: int) -> list[str]:
    # (A type as its producer wrote it, any text of up to 100 characters: escaped, it cannot
    # break its line, or forge or hide one with a carriage return or a terminal's escapes.)
    return [f"{message.message_id}  {escaped_in_logs(message.type or '(unparsed)')}"
            f"  {message.topic}[{message.partition}]@{message.offset}"
            f"  parked {message.parked_at.isoformat()}  attempts {message.attempts}"
            f"  {_one_line(message.last_error)}" for message in parked_messages(session, limit)]


def _one_line(error: str | None) -> str:
    return (error or "").replace("\n", " ")[:200]


# The parked messages `replay --all` or `discard --all` changes in one transaction, inbox messages
# or outbox rows (but those sent on --to-topic): each transaction short (a few million parked in
# one statement ran past SESSION_LIMITS' statement_timeout and changed nothing; the rows a discard
# returns, to warn of payment events, held in memory all at once; every outbox row replayed kept
# locked, and held from the relay, until the last was), and one that fails leaves those before
# it done.
CHANGED_PER_TRANSACTION = 5_000


@dataclass
class NeverParsedLeft:
    """How many records that could not be parsed a replay of inbox messages left parked: they
    hold no event to hand a handler."""
    count: int = 0


@dataclass
class Unanswered:
    """How many messages a transaction whose COMMIT went unanswered (its answer lost with the
    connection) was to change: changed or not, whether it committed unknown."""
    count: int = 0


def replay(service: str, message_ids: list[uuid.UUID] | None, outbox: bool = False,
           to_topic: str | None = None, from_topic: str | None = None,
           never_parsed_left: NeverParsedLeft | None = None,
           dry_run: bool = False,
           unanswered: Unanswered | None = None) -> Iterator[list[uuid.UUID]]:
    """Unpark the messages (every replayable one when `message_ids` is None) and hand them back:
    inbox messages dispatched to be handled, a transaction's at a time as it commits, outbox rows
    to the relay (the commit wakes it); with `to_topic`, only outbox rows parked for a topic that
    is not the shop's (and is `from_topic`, when given), sent to `to_topic` instead with the rows
    waiting behind them, provided every one of them is of a type the service writes there (else
    NotOfTheTopic, nothing changed). Yields the ids each transaction replayed, once it has
    committed. The inbox's records never parsed that it passed over, left parked, are counted
    in `never_parsed_left`, when given, as each transaction passes them over (before it
    commits). A `dry_run` rolls each transaction back and dispatches nothing: it yields what a
    replay would hand back, changing nothing. The messages of a transaction whose COMMIT goes
    unanswered are counted in `unanswered`, when given, as its failure is raised."""
    app = service_app(service)
    outbox_change: _Change = unpark_outbox_messages
    if to_topic is not None:
        settings = app.extensions["hseshop.settings"]
        outbox_change = functools.partial(
            redirect_parked_outbox_messages, topic=to_topic, from_topic=from_topic,
            relayed_topics=settings.relayed_topics(),
            event_types=service_package(service).published_events(settings).get(
                to_topic, frozenset()))
    # When the last transaction's replays were marked handed over, for the dispatch that follows
    # its commit: should it fail, the marks still that one are cleared (unmark_for_the_next_sweep).
    # By the database's clock, as the sweeper measures it (shared.db.database_now); set by each
    # transaction before its replays are dispatched.
    marked_at: datetime | None = None

    def unpark_marked(session: Session, message_ids: list[uuid.UUID] | None) -> list[uuid.UUID]:
        nonlocal marked_at
        marked_at = database_now(session)
        replayed = unpark_messages(session, message_ids, marked_at)
        if never_parsed_left is not None and len(replayed) < len(message_ids):
            never_parsed_left.count += never_parsed_parked(session, message_ids)
        return replayed

    with _in_the_services_database(service):
        queues_reachable = True
        # (A replayed message may be parked again at once, and come back under --all. Sent on
        # --to-topic, the rows are checked in one statement, so in one transaction.)
        audit = functools.partial(_audit, service, outbox, "replay", to_topic)
        for replayed in _changed(unpark_marked, outbox_change, message_ids, outbox, audit,
                                 may_come_back=True, in_batches=to_topic is None,
                                 dry_run=dry_run, unanswered=unanswered):
            if not outbox and not dry_run:  # (a dry run's are parked still: none to hand over)
                if queues_reachable:
                    queues_reachable = _dispatched(service, replayed, marked_at)
                else:  # (the queue, found out of reach, not tried again)
                    unmark_for_the_next_sweep(service, replayed, marked_at)
            yield replayed


def _dispatched(service: str, message_ids: list[uuid.UUID], marked_at: datetime) -> bool:
    """Dispatch the replayed messages (marked handed over at `marked_at`) to be handled; whether
    the task queue could be reached."""
    try:
        dispatch_handed_over(service, message_ids, marked_at)
    except QUEUES_UNREACHABLE as exc:
        # They are unparked all the same (a second replay would call them not parked): the
        # sweeper hands them over, as it does any message left waiting, once Redis is back (at
        # its next sweep: those not sent are no longer marked handed over, unless the database
        # was away too).
        print(f"the task queue is unreachable ({exc}): the sweeper will hand the messages"
              " over to be handled once it is back", file=sys.stderr)
        return False
    return True


# The events whose discard leaves their order NEW for good, each with what it leaves undone
# besides its order's status: nothing but their handling (or, for a PaymentRequested, its
# payment's result) moves a NEW order on.
_LEFT_UNDONE = {PAYMENT_REQUESTED: "never paid for",
                PAYMENT_SUCCEEDED: "though its payment was taken (the account debited)",
                PAYMENT_FAILED: "never cancelled"}
PAYMENT_EVENTS = tuple(_LEFT_UNDONE)


def discard(service: str, message_ids: list[uuid.UUID] | CountedMessages | None,
            outbox: bool = False, payments_left: list | None = None, dry_run: bool = False,
            unanswered: Unanswered | None = None) -> Iterator[list[uuid.UUID]]:
    """Give up on parked messages: those named, in one transaction; those a count found
    (CountedMessages: a discard the operator confirmed), a transaction a batch as counted, and no
    other; or, when `message_ids` is None, every one parked up to the last parked as it begins.
    Yields the ids each transaction discarded, once it has committed. Those of PAYMENT_EVENTS it
    discarded are added to `payments_left`, when given, as the transaction that discarded them
    commits (each with its message_id, type and order_id, None when its payload holds none), as
    the statement that discarded them returned them: a message parked as it ran, and discarded,
    is among them. A `dry_run` rolls each transaction back: it yields what a discard would take,
    changing nothing. The messages of a transaction whose COMMIT goes unanswered are counted in
    `unanswered`, when given, as its failure is raised."""
    def audit(rows: list, outcome_unknown: bool = False) -> None:
        _audit(service, outbox, "discard", None, [row.message_id for row in rows],
               outcome_unknown)

    with _in_the_services_database(service):
        # (A discarded message is processed, a discarded row deleted: neither is parked again.)
        for discarded in _changed(discard_parked_messages, discard_parked_outbox_messages,
                                  message_ids, outbox, audit, may_come_back=False,
                                  dry_run=dry_run, unanswered=unanswered):
            if payments_left is not None:
                payments_left.extend(row for row in discarded if row.type in PAYMENT_EVENTS)
            yield [row.message_id for row in discarded]


_Changed = TypeVar("_Changed")
# A change made to the messages named: returns those it changed (their ids, or rows holding them).
_Change = Callable[[Session, list[uuid.UUID] | None], list[_Changed]]


def _changed(inbox_change: _Change[_Changed], outbox_change: _Change[_Changed],
             message_ids: list[uuid.UUID] | CountedMessages | None, outbox: bool,
             audit: Callable[..., None], may_come_back: bool,
             in_batches: bool = True, dry_run: bool = False,
             unanswered: Unanswered | None = None) -> Iterator[list[_Changed]]:
    """Run the change on the messages named in one transaction; on those a count found
    (CountedMessages), a transaction a batch it counted; on every parked message (None),
    CHANGED_PER_TRANSACTION a transaction (shared.parked_batches), unless not `in_batches` (a
    replay sent on --to-topic, which checks every row it sends on in one statement: in one
    transaction too). Yields what each transaction's change returned (the
    messages it changed), as it commits, once `audit` has logged it (`audit(changed)`); a
    transaction whose COMMIT fails, whether it committed unknown (its answer lost with the
    connection), is audited as such (`audit(changed, outcome_unknown=True)`), and counted in
    `unanswered` when given, as the failure goes on to the caller. Under `dry_run` each
    transaction is rolled back instead (the same statements run: what it yields is what a run
    would change), nothing changed nor audited."""
    box_change = outbox_change if outbox else inbox_change

    def change(session: Session, ids: list[uuid.UUID] | None) -> list[_Changed]:
        changed = box_change(session, ids)
        if changed and not dry_run:
            # (Its commit may have been carried out, its answer lost: then no line said it, and
            # the operator, told the database failed, did not know to look.)
            if_commit_unanswered(session, functools.partial(said_unanswered, changed))
        return changed

    def said_unanswered(changed: list[_Changed]) -> None:
        if unanswered is not None:
            unanswered.count += len(changed)
        audit(changed, outcome_unknown=True)

    if message_ids is None and in_batches:
        # The inbox's in the order they were parked. (Bounded by the last parked as it begins,
        # and also, when a changed message `may_come_back` parked again, by the ids it has taken.
        # Every park of this release is stamped by the database's clock, clock_timestamp(), a
        # record parked as it is stored too, since fecf044, so a message parked again after this
        # command replayed it mostly sorts after the bound. The ids taken still keep one from
        # being taken twice where it does not: rows parked by an earlier release, whose consumers
        # stamped a record parked as it was stored by their own clock, which may run ahead and
        # set the bound itself in the future; and a park stamped at or before the bound whose
        # transaction commits after the bound was read, as a stamp is the clock as its statement
        # runs, not as it commits.) The outbox's in the order they were written, up to the last
        # written of those parked as it begins, and parked by the database's clock as it begins
        # (LastParkedRow): a row parked meanwhile is left parked, written before that last one or
        # after it. A row replayed and parked again at once, still refused, is stamped parked
        # anew, past the bound, and keeps its place (its id) behind the batches read: no ids need
        # keeping to take none twice.
        may_come_back = may_come_back and not outbox
        batches = all_parked_changed_in_transactions(
            *_parked_order(outbox), change, CHANGED_PER_TRANSACTION, may_come_back, dry_run)
    else:
        # (A discard the operator confirmed goes by the ids its count found, not by a bound: a
        # park stamped before the bound and committed after it was read is past no bound.)
        batches = changed_in_transactions(
            message_ids.batches() if isinstance(message_ids, CountedMessages) else [message_ids],
            change, dry_run)
    for changed in batches:
        # Audited as it commits, before the caller hands anything over: a dispatch that fails or
        # is interrupted (Ctrl-C while Redis is slow) leaves what committed audited all the same.
        if changed and not dry_run:
            audit(changed)
        yield changed


def _parked_order(outbox: bool) -> tuple[Callable, Callable]:
    """The box's parked messages in the order --all takes them (shared.parked_batches): how the
    place of the last parked is read, and a batch's."""
    return ((last_parked_outbox_row, parked_outbox_batch) if outbox
            else (last_parked, parked_batch))


# What the command exits with when a reader of its output goes before it is done (`| head -1`),
# its work done, as a command ended by SIGPIPE does in a shell (Python ignores the signal, and
# raises BrokenPipeError instead).
SIGPIPE_EXIT = 128 + signal.SIGPIPE


class _StreamWhoseReaderMayGo:
    """sys.stdout or sys.stderr as the command writes to it: should its reader go before the
    command is done (`| head -1`, on either, or both with `2>&1`), what it writes goes nowhere
    from then on, and the command goes on with its work. A reader gone is an end of its output,
    not of its work: a discard or a replay stopped at the line that met it, between two batches,
    left the rest parked and said nothing of it. Nowhere is /dev/null, under the stream's own file
    descriptor, so that nothing written to it after fails again: Python's own flush of the stream
    as the process ends included (a BrokenPipeError there is one the command cannot catch: exit
    120, said)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_nowhere()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_nowhere()

    def _to_nowhere(self) -> None:
        self.reader_gone = True
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, self._stream.fileno())
        os.close(nowhere)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _readers_may_go() -> Iterator[list[_StreamWhoseReaderMayGo]]:
    """Within the block, sys.stdout and sys.stderr are written as _StreamWhoseReaderMayGo
    writes them, and flushed as it ends (what they hold written while a reader gone can still be
    taken so); yields the two."""
    streams = [_StreamWhoseReaderMayGo(sys.stdout), _StreamWhoseReaderMayGo(sys.stderr)]
    sys.stdout, sys.stderr = streams
    try:
        yield streams
        for stream in streams:
            stream.flush()
    finally:
        sys.stdout, sys.stderr = (stream._stream for stream in streams)


# The most rows `list` shows at once (a limit past PostgreSQL's bigint would end in a traceback).
MAX_LISTED = 10_000


def _list_limit(text: str) -> int:
    number = int(text)
    if not 1 <= number <= MAX_LISTED:
        raise argparse.ArgumentTypeError(f"{text} is not between 1 and {MAX_LISTED}")
    return number


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="python -m tasks.parked", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    helps = {"list": "the newest parked messages",
             "replay": "hand parked messages back to be handled (or sent)",
             "discard": "give up on parked messages"}
    command_parsers = {}
    for command, help_text in helps.items():
        command_parser = command_parsers[command] = commands.add_parser(
            command, help=help_text, allow_abbrev=False)
        command_parser.add_argument("service", choices=SERVICES)
        command_parser.add_argument("--outbox", action="store_true",
                                    help="outbox rows parked by the relay: too large to be"
                                         " sent, refused by the broker as an invalid record, or"
                                         " of a topic none of its settings names")
        if command == "list":
            command_parser.add_argument("--limit", type=_list_limit, default=50,
                                        help=f"how many, newest parked first (1 to {MAX_LISTED};"
                                             " 50 unless given)")
        else:
            if command == "replay":
                command_parser.add_argument(
                    "--to-topic", metavar="TOPIC",
                    help="with --outbox: send rows parked for a topic that is not the shop's to"
                         " TOPIC, a topic the service writes their events to, with the rows"
                         " waiting behind them, in their order; on TOPIC they come after the"
                         " rows of their keys already written to it under its name (held back"
                         " by topic and key, those were not held behind them)")
            command_parser.add_argument("message_ids", nargs="*", type=uuid.UUID,
                                        metavar="MESSAGE_ID")
            command_parser.add_argument("--all", action="store_true",
                                        help="every parked message")
            command_parser.add_argument("--dry-run", action="store_true",
                                        help=f"say what it would {command} (each message, and"
                                             " how many), changing nothing")
            if command == "discard":
                command_parser.add_argument("--yes", action="store_true",
                                            help="do not ask first (on a terminal it asks:"
                                                 " discard N rows of DATABASE? [y/N])")
    return parser, command_parsers


_OUTCOMES = {("replay", False): "handed back to be handled",
             ("replay", True): "handed back to be sent",
             ("discard", False): "discarded", ("discard", True): "discarded"}


def main(argv: list[str] | None = None) -> int:
    """Run the command `argv` (the process's arguments unless given); returns its exit code, or
    SIGPIPE_EXIT when it did all it was to do but a reader of its output went before it was done
    (output that then went nowhere: _StreamWhoseReaderMayGo)."""
    with _readers_may_go() as streams:
        exit_code = _run(argv)
    return SIGPIPE_EXIT if exit_code == 0 and any(s.reader_gone for s in streams) else exit_code


def _run(argv: list[str] | None) -> int:
    parser, command_parsers = _parser()
    argv = sys.argv[1:] if argv is None else argv
    # --outbox may come anywhere, and --all, --dry-run, --yes and --to-topic TOPIC too: argparse,
    # given `replay orders --outbox ID`, would have taken `orders` and no ids before it, and then
    # had no place for the ids ("unrecognized arguments: ID", where `--all ID` must say to name
    # the messages or give --all). (--outbox is left out, the others put last.)
    args = parser.parse_args(_options_last([arg for arg in argv if arg != "--outbox"]))
    args.outbox = "--outbox" in argv  # (no abbreviations: `--out` is an error, not the inbox)
    box = "outbox" if args.outbox else "inbox"
    if args.command != "list" and bool(args.message_ids) == args.all:
        command_parsers[args.command].error("name the messages, or give --all"
                                            + (", not both" if args.all else ""))
    # (A usage error said first, exit 2, whatever the settings.)
    settings_or_exit(f"{args.service} {box}: nothing done")
    if args.command == "list":
        try:
            list_parked(args.service, args.limit, args.outbox)
        except _DATABASE_FAILURES as exc:
            print(f"{args.service} {box}: nothing listed: {_failure_in_a_line(exc)}",
                  file=sys.stderr)
            return 1
        return 0
    to_topic, from_topic = getattr(args, "to_topic", None), None
    if to_topic is not None:
        try:
            refused, from_topic = _topic_to_send_on_from(args.service, to_topic, args.outbox,
                                                         args.all)
        except _DATABASE_FAILURES as exc:
            print(f"{args.service} {box}: nothing {_OUTCOMES[args.command, args.outbox]}:"
                  f" {_failure_in_a_line(exc)}", file=sys.stderr)
            return 1
        if refused:
            command_parsers[args.command].error(refused)
    message_ids = None if args.all else args.message_ids
    asks = args.command == "discard" and not (args.yes or args.dry_run) and sys.stdin.isatty()
    if asks:
        try:
            confirmed = _discard_confirmed(args.service, message_ids, args.outbox)
        except _DATABASE_FAILURES as exc:
            print(f"{args.service} {box}: nothing discarded: {_failure_in_a_line(exc)}",
                  file=sys.stderr)
            return 1
        if confirmed is None:
            with _the_terminal() as terminal:
                print(f"{args.service} {box}: nothing discarded (not confirmed)", file=terminal)
            return 1
        message_ids = confirmed
    never_parsed_left, payments_left, unanswered = NeverParsedLeft(), [], Unanswered()
    act = (functools.partial(replay, to_topic=to_topic, from_topic=from_topic,
                             never_parsed_left=never_parsed_left, dry_run=args.dry_run,
                             unanswered=unanswered)
           if args.command == "replay" else
           functools.partial(discard, payments_left=payments_left, dry_run=args.dry_run,
                             unanswered=unanswered))
    # What is done to each message, as said: under --dry-run, what would be.
    done_to = ("would be " if args.dry_run else "") + _OUTCOMES[args.command, args.outbox]
    outcome = f"{args.service} {box}: {{}} message(s) {done_to}"
    if to_topic is not None:
        outcome += (f" to {to_topic}, with the rows behind them in their order, after the rows of"
                    " their keys sent to it under its name while they were parked")
    # Under --all a count alone: the ids changed are kept only when named, to say which were not.
    count, done = 0, set[uuid.UUID]()
    try:
        for changed in act(args.service, message_ids, args.outbox):
            count += len(changed)
            if not args.all:
                done.update(changed)
            for message_id in changed if args.dry_run else ():
                print(f"{message_id}: {done_to}")
            for payment in payments_left:  # (said as each transaction commits)
                print(_order_left_new(args.service, box, payment, done_to), file=sys.stderr)
            payments_left.clear()
    except _DATABASE_FAILURES as exc:
        # Each transaction that committed stays done, its messages no longer parked: the same
        # command again takes up the rest. (One whose COMMIT was cut off may have committed
        # uncounted, and is said so, as it was audited; its replays, never dispatched, go to the
        # sweeper: while tasks wait, up to an hour on, as they were marked handed over.)
        did = _OUTCOMES[args.command, args.outbox]
        doubt = (f"{unanswered.count} {'more ' if count else ''}message(s) {did} or not (the"
                 f" COMMIT of their transaction went unanswered: list {args.service}"
                 f"{' --outbox' if args.outbox else ''} shows those still parked)"
                 if unanswered.count else "")
        so_far = (f"{args.service} {box}: {doubt or f'nothing {did}'}" if count == 0 else
                  f"{outcome.format(count)} before the database failed"
                  f"{f', and {doubt}' if doubt else ''}; run it again for the rest")
        print(f"{so_far}: {_failure_in_a_line(exc)}"
              + (_fewer_to_send_on(args.service) if to_topic is not None and ran_too_long(exc)
                 else ""), file=sys.stderr)
        return 1
    except NotOfTheTopic as exc:
        command_parsers[args.command].error(str(exc))
    except KeyboardInterrupt:
        # (At least: a batch committed as the interrupt came is not counted, its replays, never
        # dispatched, left to the sweeper: while tasks wait, up to an hour on, as they were
        # marked.)
        print(f"{outcome.format(f'at least {count}')} before it was interrupted; run it again"
              " for the rest", file=sys.stderr)
        return INTERRUPTED  # (run as a command, it dies of SIGINT: shared.quiet_interrupt.run_main)
    print(outcome.format(count) + (" (dry run: nothing changed)" if args.dry_run else ""))
    if asks and args.all and _parked_since(args.service, args.outbox):
        print(f"{args.service} {box}: messages parked since they were counted are left parked"
              f" (list {args.service}{' --outbox' if args.outbox else ''} shows them)")
    if args.all and never_parsed_left.count:
        # (Named, each is said below: not replayed, "or never parsed".)
        print(f"{args.service} {box}: {never_parsed_left.count} record(s) never parsed left"
              f" parked: they hold no event to hand back (list {args.service} shows them as"
              f" (unparsed); discard {args.service} ID [ID ...] gives up on them)")
    left = [message_id for message_id in args.message_ids if message_id not in done]
    why = ("not parked, unknown" + (", or never parsed" if not args.outbox
                                    and args.command == "replay" else ""))
    whys = _why_not_sent_on(args.service, left) if to_topic is not None and left else {}
    if asks and not args.all and left:
        # (Named and not counted, those of them parked now were not parked as the count read
        # them: not asked about, so not discarded. Said "not parked", they seemed gone.)
        counted = set(message_ids)
        uncounted = [message_id for message_id in left if message_id not in counted]
        whys = dict.fromkeys(_parked_now(args.service, args.outbox, uncounted),
                             "parked since it was counted, so not asked about: left parked;"
                             " discard it again to give it up")
    for message_id in left:
        print(f"{message_id}: {'would not be' if args.dry_run else 'not'} {args.command}ed"
              f" ({whys.get(message_id, why)})", file=sys.stderr)
    return 1 if left else 0


def _discard_confirmed(service: str, message_ids: list[uuid.UUID] | None,
                       outbox: bool) -> CountedMessages | None:
    """What the discard the operator confirmed takes, as discard's `message_ids`: the very
    messages a dry run of it counted (named, those of them parked; under --all, every one parked
    and committed as it counted), their ids kept batch by batch as counted, the operator asked on
    the terminal how many rows of which database that is (not asked when none); or None if the
    answer is not y. A message the count did not see is not taken, whenever it was stamped
    parked: one parked while the question waits (a real run reading its own bound after the
    answer discarded 300 PaymentSucceeded parked by a broker outage meanwhile, unconfirmed), or
    one stamped parked before the count by a handler's transaction that committed after it (a
    park is stamped by the database's clock as its statement runs, not as it commits, so a bound
    of the last parked, read as it counted, took it too, never counted nor confirmed)."""
    counted = CountedMessages()
    for ids in discard(service, message_ids, outbox, dry_run=True):
        counted.add(ids)
    if counted.count:
        with _the_terminal() as terminal:
            print(f"discard {counted.count} rows of {_database(service)}? [y/N] ", end="",
                  file=terminal, flush=True)
            if sys.stdin.readline().strip().lower() not in ("y", "yes"):
                return None
    return counted


@contextlib.contextmanager
def _the_terminal() -> Iterator[TextIO]:
    """The controlling terminal (/dev/tty), for a question to the operator and what the answer
    did, as sudo and ssh ask: stderr may go to an audit log (2>>parked-audit.log), where the
    question went unseen and the command seemed to hang. stderr where there is no terminal to
    open (a process without one)."""
    try:
        terminal = open("/dev/tty", "w")
    except OSError:
        yield sys.stderr
        return
    with terminal:
        yield terminal


def _parked_since(service: str, outbox: bool) -> bool:
    """Whether a message of the box is parked still, after a discard --all the operator
    confirmed: one its count did not see, parked (or its park committed) since (False should the
    database fail now: the discard has been said)."""
    try:
        with _in_the_services_database(service), transaction() as session:
            return _parked_order(outbox)[0](session) is not None
    except _DATABASE_FAILURES:
        return False


def _parked_now(service: str, outbox: bool, message_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of the messages of the box are parked now (none should the database fail now: what
    was done has been said)."""
    if not message_ids:
        return set()
    try:
        with _in_the_services_database(service), transaction() as session:
            return (parked_outbox_rows_among if outbox else parked_among)(session, message_ids)
    except _DATABASE_FAILURES:
        return set()


# Where each replay or discard that changed something is said, at WARNING, for an audit: who ran
# it, on which database, and every message it changed (the project's log, as the service's app
# configured it: shared.request_context.configure_logging), as each transaction commits.
_audit_log = logging.getLogger("tasks.parked")
# The most message ids an audit line names: a transaction's 5,000 go in several lines, each short
# enough for a log pipeline to keep whole (Docker's splits a line at 16 KiB).
AUDITED_A_LINE = 100


def _audit(service: str, outbox: bool, command: str, to_topic: str | None,
           message_ids: list[uuid.UUID], outcome_unknown: bool = False) -> None:
    """Log the messages a transaction of `command` changed, as it has committed; or, its
    `outcome_unknown` (its COMMIT failed, its answer lost), that it may have changed them or not,
    and how to tell which."""
    box = "outbox" if outbox else "inbox"
    database, who = _database(service), _who()  # (the same for each of its lines)
    unknown = (f", outcome unknown (its COMMIT went unanswered: list {service}"
               f"{' --outbox' if outbox else ''} shows those still parked)" if outcome_unknown
               else "")
    for start in range(0, len(message_ids), AUDITED_A_LINE):
        ids = message_ids[start:start + AUDITED_A_LINE]
        _audit_log.warning("%s %s of %s: %s %s%sed %d parked message(s)%s%s: %s", service, box,
                           database, who, "may have " if outcome_unknown else "", command,
                           len(ids), f" to {to_topic}" if to_topic else "", unknown,
                           ", ".join(map(str, ids)))


def _who() -> str:
    """Who ran the command: the OS user as getpass names it, then the process's real uid, and
    SUDO_USER when set (run by sudo: the user who ran sudo), `alice (uid 1000)`, `root (uid 0,
    SUDO_USER alice)`. getpass takes LOGNAME or USER first, which whoever runs the command may
    set: the uid is the kernel's. The uid alone where the user has no name (a container's user
    with no passwd entry, nor LOGNAME or USER set). Names from the environment escaped, as any
    text a log line holds that its writer did not choose."""
    sudo_user = os.environ.get("SUDO_USER")
    uid = f"uid {os.getuid()}" + (f", SUDO_USER {escaped_in_logs(sudo_user)}" if sudo_user
                                  else "")
    try:
        return f"{escaped_in_logs(getpass.getuser())} ({uid})"
    except (OSError, KeyError):
        return uid


def _database(service: str) -> str:
    """The service's database as its URL names it, its name and server (no user, no password)."""
    url = make_url(service_app(service).extensions["hseshop.settings"].database_url(service))
    return f"{url.database} at {url.host or 'localhost'}:{url.port or 5432}"


def _fewer_to_send_on(service: str) -> str:
    """What to do when `replay --to-topic` ran past statement_timeout: its rows go in one
    statement, each with every row waiting behind it, so name fewer of them at a time."""
    return (f"; name fewer rows to send on at a time (list {service} --outbox shows them, with how"
            " many rows wait behind each): each goes with the rows behind it, all in one statement")


def _order_left_new(service: str, box: str, payment, discarded: str = "discarded") -> str:
    """The WARNING line for a discarded event of PAYMENT_EVENTS (`discarded`, or "would be
    discarded" in a dry run): its order stays NEW, unless the event was handled under another id
    (a copy in another form, discarded as such: only the order's own service can tell, which this
    command does not read)."""
    # (An order id as its producer wrote it: escaped, as a type is in `list`.)
    order = (f"order {escaped_in_logs(payment.order_id)}" if payment.order_id is not None
             else "its order (no order id in its payload)")
    return (f"WARNING {service} {box}: {payment.message_id} {payment.type} {discarded}: {order}"
            f" stays as it is (NEW), {_LEFT_UNDONE[payment.type]}, unless another copy of"
            " this event was handled (its status tells); nothing else moves a NEW order on")


def _why_not_sent_on(service: str, message_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """Why `replay --to-topic` did not send on the rows named: each row's own reason (none if
    the database fails now: the general one stands)."""
    relayed_topics = service_app(service).extensions["hseshop.settings"].relayed_topics()
    try:
        with service_app(service).app_context(), transaction() as session:
            return why_not_sent_on(session, message_ids, relayed_topics)
    except _DATABASE_FAILURES:
        return {}


# The options of no value that _options_last moves to the end of the command line.
_FLAGS = ("--all", "--dry-run", "--yes")


def _options_last(argv: list[str]) -> list[str]:
    """`argv` with --all, --dry-run and --yes, then --to-topic and its value (the next argument,
    or after `=`), moved to its end."""
    rest, flags, moved = [], [], []
    args = iter(argv)
    for arg in args:
        if arg == "--to-topic":
            moved += [arg, *[value for value in [next(args, None)] if value is not None]]
        elif arg in _FLAGS:
            flags.append(arg)
        else:
            (moved if arg.startswith("--to-topic=") else rest).append(arg)
    return rest + flags + moved


def _topic_to_send_on_from(service: str, to_topic: str, outbox: bool,
                           every_one: bool) -> tuple[str | None, str | None]:
    """For `replay --to-topic`: why it cannot go as asked (None if it can), and under --all the
    one topic, not the shop's, whose parked rows it sends on. The rows to send on are the outbox's,
    to a topic the service writes to, and under --all of one topic (the rows of two renamed settings
    must not end on one topic: a row parked for another topic after this reads them is left
    parked). Reading which topics parked rows name may fail as the database does
    (_DATABASE_FAILURES)."""
    if not outbox:
        return "--to-topic is for outbox rows: give --outbox", None
    settings = service_app(service).extensions["hseshop.settings"]
    relayed_topics = settings.relayed_topics()
    written = service_package(service).published_events(settings)
    if to_topic not in written:
        # (Not any of the shop's: one the service reads itself would hand its own consumers
        # events they never take; the type of each row sent on is checked as it is.)
        return (f"{to_topic!r} is none of the topics {service} writes to:"
                f" {', '.join(written) or 'it writes to none'}"), None
    if not every_one:
        return None, None
    with _in_the_services_database(service), transaction() as session:
        parked_topics = parked_topics_not_relayed(session, relayed_topics)
    if len(parked_topics) > 1:
        return (f"parked rows name {len(parked_topics)} topics that are not the shop's"
                f" ({', '.join(parked_topics)}): name the rows to send to {to_topic}"
                f" (list {service} --outbox shows them)"), None
    # (With none, `to_topic`, one of the shop's, which no row parked for its topic names: a row
    # parked after this read is left parked, whatever its topic.)
    return None, parked_topics[0] if parked_topics else to_topic


# What the database may answer an operator's command with: unreachable, a parked row locked by
# another session past SESSION_LIMITS' lock_timeout, a statement past its statement_timeout; or
# it is not the service's, migrated for this release (DatabaseNotReady).
_DATABASE_FAILURES = (SQLAlchemyError, psycopg2.Error, DatabaseNotReady)


def _failure_in_a_line(exc: BaseException) -> str:
    """What a failure of _DATABASE_FAILURES means, in a line (shared.db.failure_in_a_line)."""
    return str(exc) if isinstance(exc, DatabaseNotReady) else failure_in_a_line(exc)


if __name__ == "__main__":
    from shared.quiet_interrupt import run_main
    run_main(main)
