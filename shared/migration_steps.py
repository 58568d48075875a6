"""Migration steps every service's database runs (orders, payments, gateway): the outbox, inbox
and idempotency-key tables (the gateway's idempotency keys since dropped: it keeps none).

Written out here (not derived from the models) so that a revision keeps meaning what it meant
when it was written.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

from shared.db import limit_lifted


def _timestamp(name: str, **kwargs) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), **kwargs)


def create_messaging_tables() -> None:
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("message_id", pg.UUID(as_uuid=True), nullable=False, unique=True),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("key", sa.String(255)),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("correlation_id", sa.String(100)),
        sa.Column("payload", pg.JSONB, nullable=False),
        sa.Column("headers", pg.JSONB, nullable=False),
        _timestamp("created_at", nullable=False, server_default=sa.func.now()),
        _timestamp("sent_at"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_outbox_messages_unsent", "outbox_messages", ["id"],
                    postgresql_where=sa.text("sent_at IS NULL"))
    op.create_table(
        "inbox_messages",
        sa.Column("message_id", pg.UUID(as_uuid=True), primary_key=True),
        sa.Column("topic", sa.String(249), nullable=False),
        sa.Column("partition", sa.Integer, nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("key", sa.String(255)),
        sa.Column("type", sa.String(100)),
        sa.Column("correlation_id", sa.String(100)),
        sa.Column("payload", pg.JSONB),
        sa.Column("raw_value", sa.Text),
        _timestamp("received_at", nullable=False, server_default=sa.func.now()),
        _timestamp("processed_at"),
        _timestamp("parked_at"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        _timestamp("last_attempt_at"),
        sa.Column("last_error", sa.Text),
    )
    op.create_index("ix_inbox_messages_pending", "inbox_messages", ["received_at"],
                    postgresql_where=sa.text("processed_at IS NULL AND parked_at IS NULL"))
    _create_idempotency_keys_table()


def _create_idempotency_keys_table() -> None:
    """The idempotency keys' table as the first revision made it."""
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.String(64), primary_key=True),
        sa.Column("endpoint", sa.String(200), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response_status", sa.Integer),
        sa.Column("response_body", pg.JSONB),
        _timestamp("created_at", nullable=False, server_default=sa.func.now()),
    )


def add_inbox_request_id() -> None:
    op.add_column("inbox_messages", sa.Column("request_id", sa.String(128)))


def drop_inbox_request_id() -> None:
    op.drop_column("inbox_messages", "request_id")


def add_inbox_produced_at() -> None:
    op.add_column("inbox_messages", _timestamp("produced_at"))


def add_inbox_try_open() -> None:
    # (A constant default: PostgreSQL adds the column without rewriting the table.)
    op.add_column("inbox_messages", sa.Column("try_open", sa.Boolean, nullable=False,
                                              server_default=sa.false()))


def drop_inbox_try_open() -> None:
    op.drop_column("inbox_messages", "try_open")


def drop_inbox_produced_at() -> None:
    op.drop_column("inbox_messages", "produced_at")


def add_inbox_envelope_version() -> None:
    # (A constant default: PostgreSQL adds the column without rewriting the table, and the rows
    # there, as the release before goes on writing them, are of version 1. That release reads no
    # version, and replays only rows with a payload: a message this one keeps for a version it
    # does not know is kept as its text, without one, and stays parked if it is rolled back to.)
    op.add_column("inbox_messages", sa.Column("envelope_version", sa.SmallInteger,
                                              server_default=sa.text("1")))


class DowngradeRefused(RuntimeError):
    """A downgrade that would leave the release before rows it would mishandle; nothing was
    changed."""


class UpgradeRefused(RuntimeError):
    """An upgrade whose revision cannot carry over what the database holds without losing or
    guessing at some of it (the gateway's 0018: two users whose usernames differ only in case);
    the revision was rolled back, for the operator to put the rows right."""


def _service_migrated() -> str:
    """The service whose database the running revision migrates, as shared.migrations'
    alembic_config names it, for the commands a refusal gives ("SERVICE" under another config)."""
    config = op.get_context().config
    return (config.attributes.get("service") if config is not None else None) or "SERVICE"


def drop_inbox_envelope_version() -> None:
    """Refused while a message the release before would misread awaits handling
    (refuse_while_inbox_messages_await_of_another_version). The same question is asked before any
    revision of the downgrade goes down (shared.migrations), and again here, under the lock the
    drop takes, taken first: no message is stored between the count and the drop."""
    op.execute("LOCK TABLE inbox_messages IN ACCESS EXCLUSIVE MODE")
    refuse_while_inbox_messages_await_of_another_version(
        op.get_bind(), "the database stays at the revision that keeps envelope versions, with the"
        " messages as they were", service=_service_migrated())
    op.drop_column("inbox_messages", "envelope_version")


def refuse_while_inbox_messages_await_of_another_version(
        conn: sa.Connection, left_as: str = "nothing was downgraded",
        service: str = "SERVICE") -> None:
    """Refuse to take the inbox's envelope versions away while a message of a version other than 1
    that holds a payload awaits handling or lies parked (read whole by a release that knew its
    version, or parked for its type or payload): the release before reads every message as
    version 1, and would hand it to its handler as such. The way out said for a parked one is its
    replay, for this release to handle it: a discard leaves undone what it was to do (tasks.parked).
    One kept as its text, its version unknown
    as it came, holds no payload: that release leaves it parked, and a later one reads its version
    from its text again."""
    waiting = conn.scalar(sa.text(
        "SELECT count(*) FROM inbox_messages WHERE processed_at IS NULL AND envelope_version <> 1"
        " AND payload IS NOT NULL"))
    if waiting:
        raise DowngradeRefused(
            f"{waiting} inbox message(s) of an envelope version other than 1 await handling or lie"
            " parked with their payload: the release before reads every message as version 1 and"
            " would hand them to their handlers so. With this release's shop running, let those"
            " awaiting handling be handled, and replay the parked ones once what parked them is"
            f" mended, for it to handle them (python -m tasks.parked replay {service} ID [ID ...],"
            f" or --all for every parked message; `python -m tasks.parked list {service}` shows"
            " them); give one up (`discard` for `replay`) only if it is garbage, as what it was"
            " to do is then never done (a payment event's order stays NEW). Then stop the shop and"
            f" downgrade again; {left_as}")


def create_index_concurrently(name: str, table: str, columns: list[str],
                              where: str | None = None, include: list[str] | None = None) -> None:
    """Build an index without blocking the table's writers for the build (CREATE INDEX
    CONCURRENTLY, outside the revision's transaction: what the revision did before it is
    committed first, so it must bear being done again). A build that failed part way leaves an
    invalid index of the name behind; running the revision again drops that one and builds anew.
    The build (and the drop) waits for every transaction open in the database as it begins, and
    without the migration's lock_timeout (shared/migrations.py: MIGRATION_LIMITS): those waits are
    lock waits, which cut short would leave an invalid index behind, and they hold nobody up (the
    table's writers go on meanwhile)."""
    with op.get_context().autocommit_block(), limit_lifted(op.execute, "lock_timeout"):
        _drop_if_invalid(name)
        op.create_index(name, table, columns,
                        postgresql_where=sa.text(where) if where else None,
                        postgresql_include=include or [],
                        postgresql_concurrently=True, if_not_exists=True)


def create_unique_index_concurrently(name: str, table: str,
                                     columns: list[str | sa.TextClause]) -> None:
    """Build a unique index as create_index_concurrently builds one (which released revisions
    run, and so stays as it was: shared/revision_pins.py), of columns or of expressions
    (`sa.text("lower(name)")`), without blocking the table's writers or readers. A build that
    finds two rows of one value fails with an IntegrityError, the invalid index it left dropped
    first: that one would go on refusing the writers' duplicates, as a valid one does."""
    with op.get_context().autocommit_block(), limit_lifted(op.execute, "lock_timeout"):
        _drop_if_invalid(name)
        try:
            op.create_index(name, table, columns, unique=True, postgresql_concurrently=True,
                            if_not_exists=True)
        except sa.exc.IntegrityError:
            _drop_if_invalid(name)
            raise


def _drop_if_invalid(name: str) -> None:
    invalid = op.get_bind().scalar(sa.text(
        "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
        {"name": name})
    if invalid:
        op.execute(f'DROP INDEX CONCURRENTLY "{name}"')


def index_handled_inbox_rows() -> None:
    """The handled inbox rows by when they were stored, for pruning the old ones (shared.inbox.
    pruning.prune_handled_messages) without reading the table. Only handled rows: the entry is
    written by the update that marks a message processed, which is never a HOT update (the pending
    index's condition names `processed_at`) and so writes index entries anyway. A BRIN index on
    `received_at` would cost less to keep, but finds nothing once pruned pages take new rows.
    Built concurrently: the inbox is the biggest table, and the consumers go on storing
    meanwhile."""
    create_index_concurrently("ix_inbox_messages_handled", "inbox_messages", ["received_at"],
                              "processed_at IS NOT NULL")


def drop_inbox_handled_index() -> None:
    # In the revision's transaction, with its version: a downgrade that fails leaves the index.
    op.drop_index("ix_inbox_messages_handled", "inbox_messages", if_exists=True)


def index_handled_inbox_rows_by_handling() -> None:
    """The handled inbox rows by when they were handled (or discarded), for pruning (shared.inbox.
    pruning.prune_handled_messages, which prunes them in that order), in place of
    index_handled_inbox_rows' index of them by when they were stored: through that one, a message
    handled late (replayed after a park, or discarded: a backlog of parked messages given up on at
    once) stayed at the old end of the index for a whole retention after its handling, and every
    run of the pruner read each such row from the table, and passed over it, before it reached
    one it could prune. Built concurrently, as that one. (Until its workers are replaced, the
    release before prunes through this index too, as it can: reading every row it may prune on
    each of its transactions, and sorting them.)"""
    create_index_concurrently("ix_inbox_messages_handled_at", "inbox_messages", ["processed_at"],
                              "processed_at IS NOT NULL")
    op.drop_index("ix_inbox_messages_handled", "inbox_messages", if_exists=True)


def index_handled_inbox_rows_by_storing_again() -> None:
    """The handled rows' index by when they were stored made again, the one by when they were
    handled dropped (in the revision's transaction, with its version: a downgrade that fails
    leaves it)."""
    index_handled_inbox_rows()
    op.drop_index("ix_inbox_messages_handled_at", "inbox_messages", if_exists=True)


def add_inbox_value_digest() -> None:
    """Inbox rows keep a digest (SHA-256) of the value of the record they were stored from
    (`value_digest`), so that the same bytes sent again under a message id are told a repeat
    exactly (shared.inbox.taken_ids). Nullable and without a default: no rewrite of the table.
    The rows stored before, and those the release before goes on storing, have none, and a record
    under their id is told from a repeat as that release tells it."""
    # IF NOT EXISTS: the revision's index is built outside its transaction, after the column is
    # committed; a build that failed leaves the column, and the revision runs again.
    op.add_column("inbox_messages", sa.Column("value_digest", sa.LargeBinary),
                  if_not_exists=True)


def drop_inbox_value_digest() -> None:
    """Not refused for any row: the release before reads no digest, and tells a record from a
    repeat of the message stored under its id as it does for the rows stored before the column.
    A message it took for a repeat there, and this release parked, stays parked, for an
    operator."""
    op.drop_column("inbox_messages", "value_digest")


def index_parked_inbox_rows() -> None:
    """The parked inbox rows in the order they were parked, for an operator's `python -m
    tasks.parked` (shared.inbox.parked): its list, and its replay or discard of them all, a batch
    a transaction, read the parked rows alone, not the whole inbox. The entry is written as a
    message is parked or stored parked, which updates `parked_at`, named by the pending index's
    condition too (no HOT update there either). Built concurrently, as the handled rows' index."""
    create_index_concurrently("ix_inbox_messages_parked", "inbox_messages",
                              ["parked_at", "message_id"], "parked_at IS NOT NULL")


def drop_inbox_parked_index() -> None:
    # In the revision's transaction, with its version: a downgrade that fails leaves the index.
    op.drop_index("ix_inbox_messages_parked", "inbox_messages", if_exists=True)


def index_idempotency_keys_by_age() -> None:
    """Idempotency keys by when they were recorded, for pruning the expired ones (shared.
    idempotency.prune_expired_keys). Built concurrently: the APIs record keys meanwhile."""
    create_index_concurrently("ix_idempotency_keys_created_at", "idempotency_keys",
                              ["created_at"])


def drop_idempotency_keys_age_index() -> None:
    # In the revision's transaction, with its version: a downgrade that fails leaves the index.
    op.drop_index("ix_idempotency_keys_created_at", "idempotency_keys", if_exists=True)


def add_idempotent_answer_texts() -> None:
    """Idempotency keys keep the first answer's body as the JSON text it was answered with too
    (`response_text`), which a replay reads back in its order (shared.idempotency); jsonb, which
    kept it alone, orders an object's keys by their length. A column added, nullable and without
    a default: no rewrite of the table, which the running shop goes on writing. The jsonb column
    stays for the release before, during the upgrade (see shared/idempotency.py)."""
    op.add_column("idempotency_keys", sa.Column("response_text", sa.Text), if_not_exists=True)


def drop_idempotent_answer_texts() -> None:
    op.drop_column("idempotency_keys", "response_text")


def drop_idempotency_keys() -> None:
    """The idempotency keys' table, and its index, dropped from a database whose service keeps
    none (the gateway's: it passes the key on to the services that keep it). In the revision's
    transaction, under the migration's lock_timeout: nothing writes the table, but a pruner of the
    release before may be deleting nothing from it for a moment. (Until the workers of the release
    before are replaced, their hourly pruning of it fails, an ERROR each time and nothing else.)"""
    op.drop_table("idempotency_keys")


def recreate_idempotency_keys() -> None:
    """The idempotency keys' table as the revisions before `drop_idempotency_keys` left it: with
    its answers' texts, indexed by age. Empty, so the index is built in the revision's
    transaction, not concurrently: a downgrade that fails leaves no table behind."""
    _create_idempotency_keys_table()
    add_idempotent_answer_texts()
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def add_outbox_parking() -> None:
    """Outbox rows whose message is too large ever to be sent are parked (`parked_at`), and the
    relay passes over them and the later rows with their topic and key, found through an index
    that holds the parked rows only (so, nearly always, nothing)."""
    # IF NOT EXISTS: the index is built outside the revision's transaction, after the column is
    # committed; a build that failed leaves the column, and the revision runs again.
    op.add_column("outbox_messages", _timestamp("parked_at"), if_not_exists=True)
    create_index_concurrently("ix_outbox_messages_parked", "outbox_messages",
                              ["topic", "key", "id"], "parked_at IS NOT NULL")


def drop_outbox_parking() -> None:
    """Refused while an outbox row lies parked (refuse_while_outbox_rows_lie_parked). The same
    question is asked before any revision of the downgrade goes down (shared.migrations), and
    again here, under the lock the drop takes, taken first: no row is parked between the count
    and the drop."""
    op.execute("LOCK TABLE outbox_messages IN ACCESS EXCLUSIVE MODE")
    refuse_while_outbox_rows_lie_parked(
        op.get_bind(), "the database stays at the revision that parks rows, with the rows as they"
        " were", service=_service_migrated())
    op.drop_column("outbox_messages", "parked_at")  # its partial index goes with it


def refuse_while_outbox_rows_lie_parked(conn: sa.Connection,
                                        left_as: str = "nothing was downgraded",
                                        service: str = "SERVICE") -> None:
    """Refuse to take the outbox parking away while a row lies parked (too large ever to be sent,
    refused by the broker's validation, or naming a topic that is not the shop's): the release
    before parks nothing, reads the outbox oldest first and tries every row it reads, so it would
    try such a row at every wake-up, holding back the rows of its topic and key behind it (and,
    once they fill a batch, every row), or send it to a topic nobody reads. The column dropped,
    nothing would say the row was ever parked. Replaying one is no way through here: it only clears
    the park, the shop is stopped (a rollback below that revision is one of two releases), and the
    row, unsent, would be tried by the release before all the same; so the way out said is to
    discard it, or to replay it and let this release's relay send it on, with the shop still
    running (parked again if it still cannot be sent)."""
    parked = conn.scalar(sa.text(
        "SELECT count(*) FROM outbox_messages WHERE parked_at IS NOT NULL"))
    if parked:
        raise DowngradeRefused(
            f"{parked} outbox row(s) lie parked: the release before parks no row, and would try"
            " them again at every wake-up, holding back the rows of their topic and key. Give up"
            f" on them (python -m tasks.parked discard {service} --outbox --all; `list {service}"
            " --outbox` shows them)"
            " or, with this release's shop running, replay them and let its relay send them on"
            " (a row the broker still refuses, or of a topic not the shop's, is parked again),"
            f" then stop the shop and downgrade again; {left_as}")


def add_outbox_retry_waits() -> None:
    """Outbox rows the broker refused wait before they are tried again, longer after each refusal
    (`next_attempt_at`), and hold back the later rows with their topic and key meanwhile, as
    parked rows do. The relay finds what holds a row back through an index of every row refused
    (`attempts > 0`: the parked ones count an attempt too; with whether each is parked or
    waiting, so that the index answers alone), which replaces the parked rows' own, and holds,
    nearly always, nothing."""
    # IF NOT EXISTS: the index is built outside the revision's transaction, after the column is
    # committed; a build that failed leaves the column, and the revision runs again.
    op.add_column("outbox_messages", _timestamp("next_attempt_at"), if_not_exists=True)
    create_index_concurrently("ix_outbox_messages_refused", "outbox_messages",
                              ["topic", "key", "id"], "attempts > 0",
                              include=["parked_at", "next_attempt_at"])
    op.drop_index("ix_outbox_messages_parked", "outbox_messages", if_exists=True)


def drop_outbox_retry_waits() -> None:
    create_index_concurrently("ix_outbox_messages_parked", "outbox_messages",
                              ["topic", "key", "id"], "parked_at IS NOT NULL")
    op.drop_index("ix_outbox_messages_refused", "outbox_messages", if_exists=True)
    op.drop_column("outbox_messages", "next_attempt_at")


def index_parked_outbox_rows_by_id() -> None:
    """The parked outbox rows alone, in the order they were written (their id, with their
    message_id, so that the index answers alone), for an operator's `python -m tasks.parked`
    (shared.outbox.parked): `replay --outbox --all` and `discard --outbox --all` read the last
    parked row, then their batches, in that order, and `list --outbox` and the relay's reminder
    read the parked rows. The refused rows' index holds them by topic and key, among every row
    waiting for its next try (a broker outage's, a million): the last parked row was found by
    walking the table back from its newest row, over every row written after it (three million
    behind 10,000 parked: 1.2 s), and a batch read every refused row, or every row between two
    parked ones, however few were parked. The entry is written as a row is parked, replayed or
    discarded, which update or delete a row the refused rows' index names too (no HOT update
    there either), and the index holds nothing while nothing is parked. Built concurrently: the
    services write and relay the outbox meanwhile. The release before runs on with it: it names
    no index, and one not unique trips no write. (`replay --outbox --all --to-topic` is one
    transaction, not batches: it checks every row's type before it sends any on.)"""
    create_index_concurrently("ix_outbox_messages_parked_by_id", "outbox_messages", ["id"],
                              "attempts > 0 AND parked_at IS NOT NULL", include=["message_id"])


def drop_outbox_parked_by_id_index() -> None:
    # In the revision's transaction, with its version: a downgrade that fails leaves the index.
    op.drop_index("ix_outbox_messages_parked_by_id", "outbox_messages", if_exists=True)


# Every statement that inserts outbox rows tells the relay so as its transaction commits (PostgreSQL
# delivers notifications at commit and folds repeats within one transaction into one).
_CREATE_NOTIFY_FUNCTION = """
CREATE FUNCTION notify_outbox_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_messages', '');
    RETURN NULL;
END
$$"""


def delete_sent_outbox_rows_and_notify_relay() -> None:
    """Outbox rows are deleted once the broker has them (no `sent_at` any more), and inserts wake
    the relay through LISTEN/NOTIFY."""
    op.execute("DELETE FROM outbox_messages WHERE sent_at IS NOT NULL")
    op.drop_index("ix_outbox_messages_unsent", "outbox_messages")
    op.drop_column("outbox_messages", "sent_at")
    op.execute(_CREATE_NOTIFY_FUNCTION)
    op.execute("CREATE TRIGGER outbox_messages_notify_relay AFTER INSERT ON outbox_messages"
               " FOR EACH STATEMENT EXECUTE FUNCTION notify_outbox_relay()")


def keep_sent_outbox_rows() -> None:
    op.execute("DROP TRIGGER outbox_messages_notify_relay ON outbox_messages")
    op.execute("DROP FUNCTION notify_outbox_relay()")
    op.add_column("outbox_messages", _timestamp("sent_at"))
    op.create_index("ix_outbox_messages_unsent", "outbox_messages", ["id"],
                    postgresql_where=sa.text("sent_at IS NULL"))


def outbox_request_id_column() -> None:
    """Outbox rows keep the request id they carry on in a column of their own, instead of a JSON
    object of Kafka headers: the relay makes the headers from the row's columns, and reading them
    as JSON was a third of what claiming a row cost."""
    op.add_column("outbox_messages", sa.Column("request_id", sa.String(128)))
    op.execute("UPDATE outbox_messages SET request_id = headers->>'request_id'")
    op.drop_column("outbox_messages", "headers")


def outbox_headers_column() -> None:
    op.add_column("outbox_messages", sa.Column("headers", pg.JSONB))
    op.execute("UPDATE outbox_messages SET headers = jsonb_strip_nulls(jsonb_build_object("
               "'message_id', message_id::text, 'type', type, 'request_id', request_id))")
    op.alter_column("outbox_messages", "headers", nullable=False)
    op.drop_column("outbox_messages", "request_id")


def outbox_envelope_column() -> None:
    """Outbox rows keep the message exactly as the relay sends it (`envelope`, the whole wire
    envelope as JSON text) instead of a JSONB payload the relay wrapped in an envelope on every
    read: the writer serialises the event once, and relaying a row is reading a string."""
    op.add_column("outbox_messages", sa.Column("envelope", pg.JSON))
    op.execute(
        "UPDATE outbox_messages SET envelope = json_build_object("
        "'message_id', message_id, 'type', type, 'version', 1,"
        " 'occurred_at', to_char(created_at AT TIME ZONE 'UTC',"
        " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"'),"
        " 'correlation_id', correlation_id, 'payload', payload)")
    op.alter_column("outbox_messages", "envelope", nullable=False)
    op.drop_column("outbox_messages", "payload")


def outbox_payload_column() -> None:
    op.add_column("outbox_messages", sa.Column("payload", pg.JSONB))
    op.execute("UPDATE outbox_messages SET payload = (envelope->'payload')::jsonb")
    op.alter_column("outbox_messages", "payload", nullable=False)
    op.drop_column("outbox_messages", "envelope")


def drop_messaging_tables() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("inbox_messages")
    op.drop_table("outbox_messages")
