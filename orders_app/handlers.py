"""What the Orders service does with the events it receives: payment results settle orders."""

from __future__ import annotations

from sqlalchemy.orm import Session

from orders_app.service import PaymentResult, UnknownOrder, apply_payment_results
from shared.contracts import PAYMENT_FAILED, PAYMENT_SUCCEEDED
from shared.inbox.handling import Handler, PermanentMessageError, ReceivedEvent


def on_payment_results(session: Session, events: list[ReceivedEvent]) -> None:
    """Settle the orders that PaymentSucceeded and PaymentFailed events answer."""
    results = [PaymentResult(order_id=event.payload["order_id"], user_id=event.payload["user_id"],
                             amount=event.payload["amount"],
                             succeeded=event.message.type == PAYMENT_SUCCEEDED,
                             reason=event.payload.get("reason"),
                             request_id=event.message.request_id)
               for event in events]
    try:
        apply_payment_results(session, results)
    except UnknownOrder as exc:  # not a KeyError of a bug, say: that one is retried
        raise PermanentMessageError(f"payment result that matches no order: {exc}") from None


# One handler for both results, so a batch mixing them is settled in one run.
MESSAGE_HANDLERS: dict[str, Handler] = {
    PAYMENT_SUCCEEDED: on_payment_results,
    PAYMENT_FAILED: on_payment_results,
}
