"""What the Orders service does with the events it receives: payment results settle orders."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from orders_app.service import apply_payment_result
from shared.contracts import PAYMENT_FAILED, PAYMENT_SUCCEEDED
from shared.inbox import Handler, InboxMessage, PermanentMessageError


def on_payment_succeeded(session: Session, payload: dict[str, Any], _message: InboxMessage) -> None:
    _settle(session, payload, succeeded=True, reason=None)


def on_payment_failed(session: Session, payload: dict[str, Any], _message: InboxMessage) -> None:
    _settle(session, payload, succeeded=False, reason=payload["reason"])


def _settle(session: Session, payload: dict[str, Any], *, succeeded: bool, reason: str | None) -> None:
    try:
        apply_payment_result(session, order_id=payload["order_id"], user_id=payload["user_id"],
                             succeeded=succeeded, reason=reason)
    except LookupError as exc:
        raise PermanentMessageError(f"payment result for an unknown order: {exc}") from None


MESSAGE_HANDLERS: dict[str, Handler] = {
    PAYMENT_SUCCEEDED: on_payment_succeeded,
    PAYMENT_FAILED: on_payment_failed,
}
