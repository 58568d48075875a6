"""The tests' servers and proxies (tests/network_tools.py) end their threads as they are closed: one
left waiting in accept() stays for the rest of the run, however many tests make one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.network_tools import (CONNECT_TIMEOUT_S, Accepting, HoldingProxy, NeverReadingServer,
                                 RedisOfVersion, SilencingProxy)
from tests.polling import wait_for


@pytest.fixture
def target() -> Iterator[str]:
    """A listener for the proxies to carry connections to, its own connections held open."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    accepting = Accepting(listener, held.append)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    accepting.close()  # (the listener with it)
    for connection in held:
        connection.close()


@pytest.mark.parametrize("make", [
    lambda target: SilencingProxy(target),
    lambda target: HoldingProxy(target, b"never sent"),
    lambda target: NeverReadingServer(),
    lambda target: RedisOfVersion("7.0.0"),
], ids=["SilencingProxy", "HoldingProxy", "NeverReadingServer", "RedisOfVersion"])
def test_a_closed_tool_accepts_no_more_and_its_thread_has_ended(target, make):
    tool = make(target)
    address = tool.accepting.listener.getsockname()
    socket.create_connection(address, timeout=5).close()
    tool.close()
    assert not tool.accepting.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)


@pytest.mark.parametrize("another_thread", [False, True], ids=["alone", "another_thread_started"])
def test_a_closed_silencing_proxy_has_no_thread_left(target, another_thread):
    """Nor any of those that carried its connections. Its own threads are told by their names,
    which name its address: a thread something else started meanwhile is none of its business."""
    unrelated_may_end = threading.Event()
    unrelated = threading.Thread(target=unrelated_may_end.wait, daemon=True)
    proxy = SilencingProxy(target)
    connection = socket.create_connection(proxy.accepting.listener.getsockname(), timeout=5)
    try:
        wait_for(lambda: proxy.connections_carried() == 1, timeout=5, what="the proxy to carry it")
        if another_thread:
            unrelated.start()
        own = {proxy.accepting.thread.name, f"carrying for the proxy on {proxy.address}"}
        assert len([thread for thread in threading.enumerate() if thread.name in own]) == 3
        proxy.close()
        assert [thread for thread in threading.enumerate() if thread.name in own] == []
    finally:
        connection.close()
        unrelated_may_end.set()
        if another_thread:
            unrelated.join()


@pytest.fixture
def unanswering_target() -> Iterator[str]:
    """A listener that takes no more connections and refuses none: its backlog full (one
    connection waiting, on Linux, in a backlog of none), the SYNs of the others dropped, as a
    host gone without a word drops them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    waiting = socket.create_connection(listener.getsockname(), timeout=5)
    with pytest.raises(TimeoutError):  # (full)
        socket.create_connection(listener.getsockname(), timeout=0.5)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    waiting.close()
    listener.close()


@pytest.mark.parametrize("make", [
    lambda target: SilencingProxy(target),
    lambda target: HoldingProxy(target, b"never sent"),
    lambda target: HoldingProxy(target, b"never sent", each_connection=True),
], ids=["SilencingProxy", "HoldingProxy", "HoldingProxy_each_connection"])
def test_a_proxy_whose_target_never_answers_closes_its_clients_connection(unanswering_target,
                                                                          make, monkeypatch):
    """As a real proxy does, after CONNECT_TIMEOUT_S, where its thread waited in connect() for
    the kernel's SYN retries (two minutes), the client's connection open all the while (and
    close() failed waiting for it, where that was its accepting thread)."""
    monkeypatch.setattr("tests.network_tools.CONNECT_TIMEOUT_S", 0.5)  # (3 s a case otherwise)
    proxy = make(unanswering_target)
    try:
        with socket.create_connection(proxy.accepting.listener.getsockname(), timeout=5) as client:
            client.sendall(b"a first piece")  # (HoldingProxy's each_connection connects on it)
            client.settimeout(CONNECT_TIMEOUT_S + 5)  # (TimeoutError, not closed by then)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:  # (closed with what it sent unread: as closed)
                pass
    finally:
        proxy.close()
    assert not proxy.accepting.thread.is_alive()


@pytest.fixture
def echoing_target() -> Iterator[tuple[str, list[socket.socket]]]:
    """A listener that sends each of its connections back what it sends: its address, and the
    connections it took (for a test to close, as a server closes those idle a while)."""
    listener = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []

    def echo_on(connection: socket.socket) -> None:
        taken.append(connection)
        threading.Thread(target=_echoed, args=(connection,), daemon=True).start()

    accepting = Accepting(listener, echo_on)
    yield f"127.0.0.1:{listener.getsockname()[1]}", taken
    accepting.close()
    for connection in taken:
        connection.close()


def _echoed(connection: socket.socket) -> None:
    try:
        while data := connection.recv(65536):
            connection.sendall(data)
    except OSError:  # closed
        pass


def test_a_proxy_holding_the_first_piece_only_holds_it_and_leaves_its_connection_open(
        echoing_target):
    """With first_only, the first piece that holds the marker is held, though another went before
    it on its connection; one after it, on another connection, is carried; and the held
    connection stays open to its client when its target closes its side (as a server closes one
    idle a while: passed on, a browser would send the held request again)."""
    target, taken = echoing_target
    proxy = HoldingProxy(target, b"GET /held", first_only=True)
    address = proxy.accepting.listener.getsockname()
    try:
        with (socket.create_connection(address, timeout=5) as first,
              socket.create_connection(address, timeout=5) as second):
            first.sendall(b"GET /carried")
            assert first.recv(64) == b"GET /carried"
            first.sendall(b"GET /held")
            wait_for(proxy.held.is_set, timeout=5, what="the piece held")
            second.sendall(b"GET /held, again")
            assert second.recv(64) == b"GET /held, again"
            for connection in taken:
                connection.shutdown(socket.SHUT_RDWR)
            first.settimeout(1)
            with pytest.raises(TimeoutError):  # (open, and nothing sent back)
                first.recv(64)
    finally:
        proxy.close()
    assert not proxy.accepting.thread.is_alive()
