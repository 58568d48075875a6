"""The server's side of a WebSocket for a test's scripted server (test_websocket_client.py's,
test_chaos_followers.py's stand-in gateway): a request's head read off a connection, and its
handshake answered with frames sent in the same write, as the gateway sends a replay at once."""

from __future__ import annotations

import socket
from collections.abc import Iterable

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, Request


def request_head(connection: socket.socket) -> bytes | None:
    """The head of the request sent on `connection`, to its blank line; None if the client closed
    the connection before it."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        head += chunk
    return head


def accept_sending(connection: socket.socket, head: bytes, frames: Iterable[Event] = ()) -> None:
    """Answer the WebSocket handshake `head` (read off `connection`) and send `frames` (wsproto's
    events: TextMessage, CloseConnection) in the same write."""
    protocol = WSConnection(ConnectionType.SERVER)
    protocol.receive_data(head)
    assert any(isinstance(event, Request) for event in protocol.events()), head
    out = protocol.send(AcceptConnection())
    for frame in frames:
        out += protocol.send(frame)
    connection.sendall(out)
