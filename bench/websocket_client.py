"""A WebSocket client that reads every frame it is sent, and gives up on a server that does not
answer its handshake: the chaos soak's notification followers (bench/chaos/followers.py) and the
tests open the gateway's notification socket with it."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

import simple_websocket
from simple_websocket.ws import Base
from wsproto import ConnectionType

# How long connecting and the handshake's answer may take, each read of it.
HANDSHAKE_SECONDS = 10.0


class WebSocketClient(simple_websocket.Client):
    """simple_websocket's client (ws:// only), but
    - for the frames that arrive in the same read as the handshake's answer: its own leaves them
      unread until more data comes, so a replay the gateway sent at once went unseen (a test
      waited for it in vain, now and then);
    - with a timeout on its connect and its handshake (cleared once answered): its own waits for
      ever on a server that takes the connection and says nothing (a gateway SIGSTOPped), and
      whoever opened it with it, a chaos run stopping (Ctrl-C) too."""

    def __init__(self, url: str, headers: dict[str, str] | None = None,
                 timeout: float = HANDSHAKE_SECONDS):
        # (What simple_websocket.Client.__init__ sets for its handshake, but the connection made
        # with a timeout, and closed if the handshake fails.)
        parts = urlsplit(url)
        if parts.scheme != "ws":
            raise ValueError(f"not a ws:// URL: {url}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        self.subprotocols, self.extra_headeers = [], list((headers or {}).items())
        connection = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            Base.__init__(self, connection, connection_type=ConnectionType.CLIENT)
        except BaseException:
            connection.close()
            raise

    @classmethod
    def connect(cls, url: str, headers: dict[str, str] | None = None,
                timeout: float = HANDSHAKE_SECONDS) -> WebSocketClient:
        return cls(url, headers, timeout)

    def handshake(self):
        super().handshake()
        self.sock.settimeout(None)  # (the reader thread waits for frames as long as they take)
        self._handle_events()
        # A close among those frames is found again by the reader thread (the server then closes
        # the connection), so that receive() raises ConnectionClosed as for any close.
        self.connected = True
