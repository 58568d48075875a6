"""The chaos soak's copies of published payment requests (bench/chaos/resent_requests.py): a copy
is the message the orders relay sent, under a fresh message id, in its envelope and its header
alike, so that the payments inbox takes it for a message of its own."""

from __future__ import annotations

import uuid
from decimal import Decimal

from bench.chaos.resent_requests import with_a_fresh_id
from shared.contracts import PAYMENT_REQUESTED, decode, new_event
from shared.outbox.relaying import relay_headers


def test_a_copy_is_the_relays_message_but_for_a_fresh_message_id_in_envelope_and_header():
    order_id = uuid.uuid4()
    event = new_event(PAYMENT_REQUESTED, {"order_id": order_id, "user_id": "u1",
                                          "amount": Decimal("12.50")}, str(order_id))
    value = event.to_wire().encode()
    headers = [(name, header.encode()) for name, header in
               relay_headers(str(event.message_id), PAYMENT_REQUESTED, "req-1").items()]

    copy, copy_headers = with_a_fresh_id(value, headers)

    copied = decode(copy)
    assert copied.message_id != event.message_id
    assert dict(copy_headers) == {**dict(headers), "message_id": str(copied.message_id).encode()}
    assert (copied.type, copied.payload, copied.correlation_id, copied.occurred_at) == (
        PAYMENT_REQUESTED, decode(value).payload, str(order_id), event.occurred_at)
    # Byte for byte the relay's text but for the id (compact JSON, its keys in their order).
    assert copy.replace(str(copied.message_id).encode(), str(event.message_id).encode()) == value
