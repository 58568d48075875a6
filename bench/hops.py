"""Where an order's time goes on its way to a final status, from when its request was due to be
sent and the timestamps the shop keeps anyway: the order's creation and settlement, and when each
inbox stored and handled its message."""

from __future__ import annotations

import statistics
from datetime import datetime, timezone

from bench.shop import OrderTimes, service_cursor
from devstack.stack import Stack

# Each hop: its name and what it covers, in the order an order passes them.
# (A message's "produced" time is its Kafka record's timestamp, which its inbox row keeps.)
HOPS = (
    ("POST due -> ordered",
     "the generator's send (as scheduled), a server thread taking it, the request read and "
     "checked, up to the order's time"),
    ("-> request produced",
     "the order's commit, waking the orders relay, its read, up to its producer taking it"),
    ("-> in the payments inbox",
     "the producer, Kafka, the payments consumer's fetch, up to its storing transaction"),
    # (Ended by the payments inbox's processed_at, which the handler's batch sets as it locks the
    # message, before the payment is decided: the decision's time is the next hop's.)
    ("-> payment request taken up",
     "the payments consumer's dispatch, Celery, up to the payments handler's batch locking the "
     "message (and marking it processed)"),
    ("-> result produced",
     "the payments handler and its commit, waking the payments relay, its read, up to its "
     "producer taking it"),
    ("-> in the orders inbox",
     "the producer, Kafka, the orders consumer's fetch, up to its storing transaction"),
    ("-> final status",
     "the orders consumer's dispatch, Celery, the orders handler up to the status it sets (its "
     "commit follows)"),
)


def hop_medians_ms(stack: Stack, orders: list[OrderTimes],
                   due_at: dict[str, float]) -> dict[str, float | None]:
    """The median of each hop over the settled `orders` that passed them all (the inbox rows of a
    message and the order it is about share its correlation id, the order's id); `due_at`: when
    the generator was due to send each order's request (epoch seconds)."""
    settled = [order for order in orders if order.seconds_to_final is not None]
    order_ids = [order.order_id for order in settled]
    payments_inbox = _times(stack, "payments", order_ids)
    orders_inbox = _times(stack, "orders", order_ids)
    hops: list[list[float]] = [[] for _ in HOPS]
    for order in settled:
        if order.order_id not in payments_inbox or order.order_id not in orders_inbox:
            continue
        request_produced, request_stored, taken_up_at = payments_inbox[order.order_id]
        result_produced, result_stored, _handled_at = orders_inbox[order.order_id]
        due = datetime.fromtimestamp(due_at[order.order_id], tz=timezone.utc)
        marks = (due, order.created_at, request_produced, request_stored, taken_up_at,
                 result_produced, result_stored, order.updated_at)
        if any(mark is None for mark in marks):
            continue
        for hop, (start, end) in zip(hops, zip(marks, marks[1:])):
            hop.append((end - start).total_seconds() * 1000)
    return {name: round(statistics.median(values), 1) if values else None
            for (name, _covers), values in zip(HOPS, hops)}


_INBOX_TIMES = """
SELECT correlation_id, produced_at, received_at, processed_at FROM inbox_messages
WHERE correlation_id = ANY(%s)"""


def _times(stack: Stack, service: str, order_ids: list[str]) -> dict[str, tuple[datetime, ...]]:
    """(produced_at, received_at, processed_at) of the inbox rows about each order, by order id."""
    with service_cursor(stack, service) as cursor:
        cursor.execute(_INBOX_TIMES, (order_ids,))
        return {key: tuple(times) for key, *times in cursor}
