"""The WebSocket client of the tests and the chaos soak (bench/websocket_client.py) reads the
frames a server sends in the same packet as its handshake's answer, as the gateway does when it
replays at once, and gives up on a server that never answers its handshake."""

import socket
import threading

import pytest
from simple_websocket import ConnectionClosed
from wsproto.events import CloseConnection, TextMessage

from bench.websocket_client import WebSocketClient
from tests.network_tools import NeverReadingServer
from tests.websocket_server import accept_sending, request_head


def _server_sending_with_its_answer(*frames) -> tuple[str, threading.Event]:
    """A one-connection WebSocket server that answers the handshake and sends `frames` in one
    write, then stays silent (holding the connection) until the returned event is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        accept_sending(connection, request_head(connection), frames)
        done.wait(10)
        connection.close()
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"ws://127.0.0.1:{listener.getsockname()[1]}/", done


def test_messages_sent_with_the_handshakes_answer_are_received():
    url, done = _server_sending_with_its_answer(TextMessage(data="one"), TextMessage(data="two"))
    client = WebSocketClient.connect(url)
    try:
        assert [client.receive(timeout=2), client.receive(timeout=2)] == ["one", "two"]
    finally:
        client.close()  # before the server lets go: once it has, the client may have closed first
        done.set()


def test_a_close_sent_with_the_handshakes_answer_closes_the_socket():
    url, done = _server_sending_with_its_answer(CloseConnection(code=1008, reason="refused"))
    client = WebSocketClient.connect(url)
    done.set()  # the server closes the connection after its close frame, as the gateway does
    with pytest.raises(ConnectionClosed) as closed:
        client.receive(timeout=5)
    assert closed.value.reason == 1008


def test_a_handshake_never_answered_is_given_up_after_the_timeout():
    """A server that takes the connection and says nothing (a gateway SIGSTOPped): the client
    waited for its answer for ever, and a chaos run's follower with it, the run's stop too."""
    server = NeverReadingServer()
    outcome = []

    def connect():
        try:
            outcome.append(WebSocketClient.connect(server.url.replace("http://", "ws://") + "/",
                                                   timeout=0.5))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(10)
    server.close()
    assert outcome and isinstance(outcome[0], TimeoutError), outcome
