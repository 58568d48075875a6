"""Between protobuf messages and the JSON bodies of the HTTP API, field by field, so a body sent
over gRPC comes out exactly as the HTTP API would have written it (absent optionals are null)."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass


def to_body(message: Message) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            body[field.name] = [to_body(v) if field.message_type else v for v in value]
        elif field.has_presence and not message.HasField(field.name):
            body[field.name] = None
        else:
            body[field.name] = to_body(value) if field.message_type else value
    return body


def to_message(message_class: type[Message], body: dict[str, Any]) -> Message:
    message = message_class()
    for field in message.DESCRIPTOR.fields:
        value = body.get(field.name)
        if value is None:
            continue
        nested = GetMessageClass(field.message_type) if field.message_type else None
        if field.is_repeated:
            getattr(message, field.name).extend(
                [to_message(nested, item) for item in value] if nested else value)
        elif nested:
            getattr(message, field.name).CopyFrom(to_message(nested, value))
        else:
            setattr(message, field.name, value)
    return message
