"""The notifications in the gateway's OpenAPI document: one schema for each type of event the
gateway keeps, its payload as the gateway writes it (the event's contract, shared/contracts.py, in
its wire form), told apart by `type` (`Notification`: a oneOf with a discriminator, which
marshmallow cannot say, so written here)."""

from __future__ import annotations

from marshmallow import Schema, fields

from shared.contracts import ORDER_STATUS_CHANGED, OrderStatusChangedSchema
from shared.fields import Amount

# A notification's id is the table's bigint: said, so that a client generated from the document
# does not read one as a 32-bit integer (many generators' `integer` without a format).
NOTIFICATION_ID_FORMAT = {"format": "int64"}
NOTIFICATION = {"$ref": "#/components/schemas/Notification"}
NOTIFICATION_PAGE = {"$ref": "#/components/schemas/NotificationPage"}
# What the socket sends, in place of the notifications, when some after the id it goes on from
# were pruned before it sent them (gateway_app/notifications.py: _send_newer): no `id` (a page
# following the ids skips it, as one of before does), a `type` no notification has, and the id
# of the newest pruned (notifications_missed).
MISSED_TYPE = "NotificationsMissed"
NOTIFICATIONS_MISSED_SCHEMA = {"$ref": f"#/components/schemas/{MISSED_TYPE}"}
MISSED_DESCRIPTION = (
    "Some of the user's notifications after the id asked after were pruned (kept for "
    "NOTIFICATION_RETENTION_SECONDS, 30 days unless set) before they were read: what follows is "
    "what is left, and a state built from notifications has skipped some. Read the whole state "
    "again (the orders, the balance)")


def notifications_missed(through: int) -> dict:
    """The socket's message telling its page that notifications up to the id `through` (the
    newest of the user's pruned) were pruned before it sent them."""
    return {"type": MISSED_TYPE, "through": through}


class OrderStatusChangedPayloadSchema(OrderStatusChangedSchema):
    """OrderStatusChanged's payload as a notification carries it: the contract's fields, dumped
    (ReceivedEvent.wire_payload)."""

    # Dumped, a string with 2 decimals; a notification kept before the gateway dumped payloads
    # (f90dee0) from a payload parked and replayed holds it as the number its producer sent.
    amount = Amount(required=True, metadata={
        "description": "A string with 2 decimals; a JSON number in a notification kept before "
                       "the gateway wrote payloads in their contract's form, from a message "
                       "parked and replayed as its producer sent it",
        "oneOf": [{"type": "string", "pattern": r"^[0-9]+\.[0-9]{2}$"}, {"type": "number"}]})


# Each type of event the gateway keeps as notifications (gateway_app.notifications'
# MESSAGE_HANDLERS), and its payload as a notification carries it.
PAYLOADS: dict[str, type[Schema]] = {ORDER_STATUS_CHANGED: OrderStatusChangedPayloadSchema}


def _notification_schema(event_type: str) -> type[Schema]:
    """A notification of `event_type`, every field always sent (Notification.to_json)."""
    return Schema.from_dict({
        "id": fields.Integer(required=True, metadata=NOTIFICATION_ID_FORMAT),
        "type": fields.String(required=True, metadata={"enum": [event_type]}),
        "payload": fields.Nested(PAYLOADS[event_type], required=True),
        "created_at": fields.DateTime(required=True, format="iso"),
    }, name=f"{event_type}NotificationSchema")


def document_notifications(api, kept_types) -> None:
    """Put the notifications of `kept_types` (each one PAYLOADS documents) in `api`'s document:
    a schema for each, `Notification` (any one of them, by its `type`), `NotificationPage`, and
    what the socket sends when it would have skipped some (`NotificationsMissed`)."""
    missing = set(kept_types) - PAYLOADS.keys()
    if missing:  # (a type kept with no payload documented: its notifications would be refused)
        raise ValueError(f"no payload documented for notifications of {sorted(missing)}")
    mapping = {}
    for event_type in kept_types:
        name = f"{event_type}Notification"
        api.spec.components.schema(name, schema=_notification_schema(event_type))
        mapping[event_type] = f"#/components/schemas/{name}"
    api.spec.components.schema("Notification", {
        "description": "What happened to one of the user's orders: its `type` says which kind "
                       "of event, and so the shape of its `payload`.",
        "oneOf": [{"$ref": reference} for reference in mapping.values()],
        "discriminator": {"propertyName": "type", "mapping": mapping}})
    api.spec.components.schema("NotificationPage", {
        "type": "object", "required": ["items", "missed"],
        "properties": {
            "items": {"type": "array", "items": NOTIFICATION},
            "missed": {"type": "boolean", "description": MISSED_DESCRIPTION + ", having read "
                       "`GET /api/notifications/newest` first, and go on after its `id` (a page "
                       "asked after this one's last id does not tell it again)"}}})
    api.spec.components.schema(MISSED_TYPE, {
        "type": "object", "required": ["type", "through"],
        "description": "What the notification socket sends, once for them, when some of the "
                       "notifications it would send next were pruned: before the first it sends "
                       "after them (the socket's first message, or, where they were pruned while "
                       "it was sending its catch-up a page at a time, after the notifications "
                       "older than them already sent). " + MISSED_DESCRIPTION
                       + "; the socket goes on by itself, after `through`.",
        "properties": {
            "type": {"type": "string", "enum": [MISSED_TYPE]},
            "through": {"type": "integer", **NOTIFICATION_ID_FORMAT,
                        "description": "The id of the newest of the user's notifications pruned: "
                                       "go on after it (a socket opened `after` it is not told "
                                       "again)"}}})
