"""A WebSocket client that reads every frame it is sent: the chaos soak's notification followers
(bench/chaos/followers.py) and the tests open the gateway's notification socket with it."""

from __future__ import annotations

import simple_websocket


class WebSocketClient(simple_websocket.Client):
    """simple_websocket's client, but for the frames that arrive in the same read as the
    handshake's answer: its own leaves them unread until more data comes, so a replay the gateway
    sent at once went unseen (a test waited for it in vain, now and then)."""

    def handshake(self):
        super().handshake()
        self._handle_events()
        # A close among those frames is found again by the reader thread (the server then closes
        # the connection), so that receive() raises ConnectionClosed as for any close.
        self.connected = True
