"""What the Payments service does with the events it receives: payment requests are decided."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from payments_app.service import take_payment
from shared.contracts import PAYMENT_REQUESTED
from shared.inbox import Handler, InboxMessage


def on_payment_requested(session: Session, payload: dict[str, Any], message: InboxMessage) -> None:
    take_payment(session, order_id=payload["order_id"], user_id=payload["user_id"],
                 amount=payload["amount"], correlation_id=message.correlation_id)


MESSAGE_HANDLERS: dict[str, Handler] = {PAYMENT_REQUESTED: on_payment_requested}
