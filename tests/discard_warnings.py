"""The WARNING line the operator's discard writes for a payment request it gives up on, as the
README quotes it (tasks/parked.py): written out here, once, for the tests of the inbox's and the
outbox's discard."""

from __future__ import annotations


def order_left_new(box: str, message_id, order_id) -> str:
    """The line for a discarded PaymentRequested of `box` ("payments inbox", "orders outbox")
    whose payload names `order_id`."""
    return (f"WARNING {box}: {message_id} PaymentRequested discarded: order {order_id} stays as it"
            " is (NEW), never paid for, unless another copy of this event was handled (its status"
            " tells); nothing else moves a NEW order on")
