"""The transactional outbox: events are written as rows in the same transaction as the business
change that causes them, and a relay later publishes them to Kafka and deletes them.

One relay sends a database's rows: the leader, which holds a session advisory lock on a connection
of its own (shared/relay_leader.py) and relays on it, so no row locks are needed, and two relays
overtake each other only as far as the batch in flight when a leader loses its lock (its session
ended by the server, say): the next leader reads and sends those rows again while the first is
still sending them, and each arrives twice, its first copy in order; the consumers drop the
repeats by message id. The first leader fails as it goes to delete them, having no connection.

A row is deleted only once the broker has acknowledged it (Kafka is then its record); a row the
broker refused stays, counts the attempt, records the error and is tried again after a wait that
doubles with each refusal (FIRST_RETRY_AFTER_SECONDS up to LONGEST_RETRY_AFTER_SECONDS), and
meanwhile the later rows with its topic and key wait behind it (they must not overtake it; those
of its own batch that went in a later produce request may have: shared.outbox.publishing), while
every other row goes on: refused rows at the head of the table, however many (a topic the relay may
not write to, a partition whose broker is lost), hold up their keys, not the relay. A row whose
message is too large ever to be sent (over the producer's `message.max.bytes` or the topic's
`max.message.bytes`), or whose record the broker's validation refuses (INVALID_RECORD: a record
without a key for a compacted topic, say), is parked instead: it is not tried again, and the later
rows with its topic and key wait behind it until an operator sends it again or discards it
(`python -m tasks.parked ... --outbox`). A leader that dies between sending and deleting leaves its
rows to be sent again by the next one (consumers drop the repeats by message id). Rows that are
gone never need skipping, so the table holds the backlog and nothing else, however long the shop
has run.

A row keeps its message exactly as it goes to Kafka (`envelope`, the event serialised once, by
its writer), so relaying a row is reading strings and handing them to the producer.

Inserting rows wakes the relay: a trigger notifies OUTBOX_CHANNEL (see shared/relay_leader.py).

The modules, each with one job:

- writing: the outbox_messages table (OutboxMessage), and its rows written in the caller's
  transaction (the use cases' side).
- relaying: rows read in order, sent and deleted; the rows the broker refused counted, made to
  wait or parked (the relay's side).
- publishing: a batch of rows sent to Kafka with an idempotent producer, and why the broker did
  not take each row it refused (OutboxPublisher, the relay's sender).
- parked: parked rows listed, handed back to the relay, or discarded (the operator's side).
"""
