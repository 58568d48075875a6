"""The WebSocket client of the tests and the chaos soak (bench/websocket_client.py) reads the
frames a server sends in the same packet as its handshake's answer, as the gateway does when it
replays at once."""

import socket
import threading

import pytest
from simple_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from bench.websocket_client import WebSocketClient


def _server_sending_with_its_answer(*frames) -> tuple[str, threading.Event]:
    """A one-connection WebSocket server that answers the handshake and sends `frames` in one
    write, then stays silent (holding the connection) until the returned event is set."""
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def serve():
        connection, _ = listener.accept()
        protocol = WSConnection(ConnectionType.SERVER)
        while True:
            protocol.receive_data(connection.recv(65536))
            if any(isinstance(event, Request) for event in protocol.events()):
                break
        out = protocol.send(AcceptConnection())
        for frame in frames:
            out += protocol.send(frame)
        connection.sendall(out)
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
