"""What the Payments service does with the events it receives: payment requests are decided."""

from __future__ import annotations

from sqlalchemy.orm import Session

from payments_app.service import PaymentRequest, take_payments
from shared.contracts import PAYMENT_REQUESTED
from shared.inbox.handling import Handler, ReceivedEvent


def on_payment_requests(session: Session, events: list[ReceivedEvent]) -> None:
    take_payments(session, [
        PaymentRequest(order_id=event.payload["order_id"], user_id=event.payload["user_id"],
                       amount=event.payload["amount"], request_id=event.message.request_id)
        for event in events
    ])


MESSAGE_HANDLERS: dict[str, Handler] = {PAYMENT_REQUESTED: on_payment_requests}
