"""Network tools for the tests: a TCP proxy whose connections can go silent or be cut on demand, one
that holds what its clients send until told to carry it, a server that never reads what it is
sent, a Redis that says only its version, and an HTTP answer read off a socket (to the
connection's end, or to the answer's on a connection kept open). Each server and proxy accepts in
a thread of its own (Accepting), which has ended once it is closed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

# How long a proxy waits for its target to take a connection (loopback's take at once) before it
# closes its client's, as a real proxy does: a target that never answers (its backlog full, a
# host gone) held the proxy's thread in connect() for the kernel's SYN retries, two minutes.
# Less than Accepting.JOIN_LIMIT_S: a proxy may connect in its accepting thread, which close()
# waits for.
CONNECT_TIMEOUT_S = 3.0


def http_answer_read_off(connection: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """An HTTP answer read to its end (the server closes the connection after it): its status
    line, its headers by name as sent, its body."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return *_http_head_read(head), body


def http_answer_read_off_a_kept_connection(
        connection: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """An HTTP answer with a Content-Length read off a connection that may stay open after it, as
    `http_answer_read_off` gives it; the next request can then be sent on the connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"the connection closed within an answer's head: {received!r}")
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, headers = _http_head_read(head)
    length = int(headers["Content-Length"])
    while len(body) < length:
        chunk = connection.recv(length - len(body))
        if not chunk:
            raise ConnectionError(f"the connection closed within an answer's body: {body!r}")
        body += chunk
    assert len(body) == length, "more was sent than the answer, unasked"
    return status_line, headers, body


def _http_head_read(head: bytes) -> tuple[str, dict[str, str]]:
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    return status_line, dict(line.split(": ", 1) for line in header_lines)


class SilencingProxy:
    """A TCP proxy to `target`. `silence()` turns the connections it carries silent, as a host
    gone without a word leaves them: held open, nothing carried either way. Connections made
    after that are carried (the service, at the address the name now resolves to). `cut()` makes
    the service unreachable, as if it had stopped, until `restore()`; `break_off()` closes the
    connections carried so far alone; `send_to()` carries those made after it to another target.
    A connection its target closes (or resets) is closed to the client too, as by the target.
    With `quiet_limit`, a connection its target has sent nothing on for that many seconds is
    closed both ways, as nginx closes one past its proxy_read_timeout (an AWS ALB past its idle
    timeout): `quiet_cuts` counts them."""

    def __init__(self, target: str, quiet_limit: float | None = None):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._era = 0
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._carriers: list[threading.Thread] = []
        self._carried: list[socket.socket] = []  # both ends of each connection carried
        self._refusing = False
        self._refused = 0
        self._quiet_limit = quiet_limit
        self.quiet_cuts = 0
        self._accepting = threading.Lock()
        self.accepting = Accepting(self._listener, self._accepted)

    def cut(self) -> None:
        """Every connection carried so far is closed, and each one made until `restore()` is
        closed as soon as it is accepted."""
        self._close_carried(refusing=True)

    def break_off(self) -> None:
        """Every connection carried so far is closed, as the service's process dying closes its
        own; those made after it are carried (another process serving in its place)."""
        self._close_carried(refusing=False)

    def _close_carried(self, refusing: bool) -> None:
        with self._accepting:
            self._refusing = refusing
            carried, self._carried = self._carried, []
        for sock in carried:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def send_to(self, target: str) -> None:
        """Every connection accepted from now on is carried to `target`, those carried so far to
        the one they were made to: a load balancer's (or a service address's) new connections
        sent to another replica, none of them to the old one, whatever becomes of it."""
        host, port = target.rsplit(":", 1)
        with self._accepting:
            self._target = (host, int(port))

    def restore(self) -> None:
        with self._accepting:
            self._refusing = False

    def silence(self) -> None:
        """From now on nothing more is carried over the connections made so far."""
        with self._accepting:  # a connection accepted now is carried, in the new era
            carrying = list(self._carriers)
            self._era += 1
        for carrier in carrying:
            carrier.join()

    def connections_carried(self) -> int:
        """How many connections were made through the proxy."""
        return len(self._carriers) // 2

    def connections_refused(self) -> int:
        """How many connections were closed as they were accepted, the service cut off."""
        with self._accepting:
            return self._refused

    def close(self) -> None:
        """Stop accepting, then close every connection carried, and wait for the threads that
        carried them to end."""
        self.accepting.close()  # (first: no connection is accepted after the others are closed)
        self._closed.set()
        for sock in self._sockets:
            _shut(sock)
        for carrier in self._carriers:
            _joined(carrier)

    def _accepted(self, client: socket.socket) -> None:
        with self._accepting:
            refused = self._refusing
            self._refused += refused
            target = self._target
        if refused:
            client.close()
            return
        upstream = _connected_for(client, target)
        if upstream is None:
            return
        self._sockets += [client, upstream]
        with self._accepting:
            if self._refusing:  # cut while connecting
                self._refused += 1
                client.close()
                upstream.close()
                return
            self._carried += [client, upstream]
            # (Set here, not by the carriers: close() may have closed a socket before a carrier
            # got to it, and settimeout on a closed socket raises in the carrier's thread.)
            client.settimeout(0.1)
            upstream.settimeout(0.1)
            for source, sink, quiet_limit in ((client, upstream, None),
                                              (upstream, client, self._quiet_limit)):
                carrier = threading.Thread(
                    target=self._carry, args=(source, sink, self._era, quiet_limit), daemon=True,
                    name=f"carrying for the proxy on {self.address}")
                carrier.start()
                self._carriers.append(carrier)

    def _carry(self, source: socket.socket, sink: socket.socket, era: int,
               quiet_limit: float | None) -> None:
        """What `source` sends carried to `sink` until the proxy is closed or goes silent (the
        connection left open); `source`'s close (or reset), or its sending nothing for
        `quiet_limit` seconds, closes both ends, as a proxy passes it on."""
        heard = time.monotonic()
        while self._era == era and not self._closed.is_set():
            try:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                heard = time.monotonic()
            except TimeoutError:
                if quiet_limit is not None and time.monotonic() - heard > quiet_limit:
                    with self._accepting:
                        self.quiet_cuts += 1
                    break
                continue
            except OSError:
                break
        else:
            return
        _shut(source)
        _shut(sink)


class HoldingProxy:
    """A TCP proxy to `target` that holds what its clients send, from the first piece that holds
    `marker` on, until `release()` (`held` is set once it holds something), and carries the rest,
    and every answer, as it comes: a server that has not yet read what it was sent. With
    `each_connection`, only a connection whose first piece holds `marker` is held, and it is not
    even made to the target until then: a client's request stuck on its way, the others'
    carried. With `first_only`, only the first piece that holds `marker` is held, on whichever
    connection and wherever in it (with what follows it on that connection), and that connection
    is left open to its client whatever its target does until `release()`: one request held
    unanswered (its target, idle on it, may close its side; passed on, that close would have a
    browser send the request again on another connection), every other carried."""

    def __init__(self, target: str, marker: bytes, each_connection: bool = False,
                 first_only: bool = False):
        if each_connection and first_only:
            raise ValueError("a proxy holds each connection's first piece or the first piece, "
                             "not both")
        self._marker = marker
        self._each_connection = each_connection
        self._first_only = first_only
        self._holding = threading.Lock()
        self._held_client: socket.socket | None = None
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.held = threading.Event()
        self._released = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self.accepting = Accepting(self._listener, self._accepted)

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        """Close the listener, then every connection, ending the threads that carry them."""
        self.accepting.close()
        self._closed.set()
        self._released.set()
        for sock in self._sockets:
            _shut(sock)

    def _accepted(self, client: socket.socket) -> None:
        self._sockets.append(client)
        if self._each_connection:
            threading.Thread(target=self._carry_once_seen, args=(client,), daemon=True).start()
        else:
            self._carry_both_ways(client, b"", holding=True)

    def _carry_once_seen(self, client: socket.socket) -> None:
        """A connection's first piece read: held there if it holds the marker, then carried."""
        try:
            first = client.recv(65536)
        except OSError:
            return
        if self._marker in first:
            self.held.set()
            self._released.wait()
        if first and not self._closed.is_set():
            self._carry_both_ways(client, first, holding=False)
        else:
            _shut(client)

    def _carry_both_ways(self, client: socket.socket, first: bytes, holding: bool) -> None:
        """Connect to the target, send it `first`, and carry all else both ways (what the client
        sends held, if `holding`, from the marker on)."""
        upstream = _connected_for(client, self._target)
        if upstream is None:
            return
        self._sockets.append(upstream)
        upstream.sendall(first)
        for source, sink, holds in ((client, upstream, holding), (upstream, client, False)):
            threading.Thread(target=self._carry, args=(source, sink, holds), daemon=True).start()

    def _carry(self, source: socket.socket, sink: socket.socket, holding: bool) -> None:
        try:
            while data := source.recv(65536):
                if holding and self._holds(data, source):
                    self._released.wait()
                sink.sendall(data)
        except OSError:
            pass
        if sink is self._held_client and not self._released.is_set():
            return  # (its target's close not passed on: first_only)
        _shut(source)  # one way ended: the connection with it, and the other way's thread
        _shut(sink)

    def _holds(self, data: bytes, client: socket.socket) -> bool:
        """Whether `data`, sent by `client`, is held (and all after it, but with `first_only`)."""
        with self._holding:
            if self._first_only:
                holds = not self.held.is_set() and self._marker in data
                if holds:
                    self._held_client = client
            else:
                holds = self.held.is_set() or self._marker in data
            if holds:
                self.held.set()
            return holds


class NeverReadingServer:
    """A TCP server on loopback that accepts connections and reads nothing from them, with a
    receive buffer as small as the kernel allows: a service that does not read what it is sent
    (its workers all stuck, say), on whose connections a client's sends wait once the buffers
    between them are full. `read_until_closed()` reads at last, for a test to see the client
    close its connection."""

    RECEIVE_BUFFER_BYTES = 1  # (Linux makes it its least, about 2 KiB)

    def __init__(self):
        self._listener = socket.socket()
        # Set before listen(): the connections accepted take it (their window is agreed as they
        # are made).
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RECEIVE_BUFFER_BYTES)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.accepting = Accepting(self._listener, self.accepted.append)

    def read_until_closed(self, connection: socket.socket, timeout: float) -> bytes:
        """All that was sent on `connection`, read to the client's close (TimeoutError if nothing
        more comes for `timeout`, the connection still open)."""
        connection.settimeout(timeout)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received

    def close(self) -> None:
        self.accepting.close()
        for sock in self.accepted:
            _shut(sock)


class Accepting:
    """The connections made to `listener` accepted in a thread of its own, each handed to
    `accepted` in it, until `close()`: a test's server or proxy, whose thread is over once it is
    closed (not left waiting in accept() for the rest of the run)."""

    JOIN_LIMIT_S = 5.0

    def __init__(self, listener: socket.socket, accepted: Callable[[socket.socket], None]):
        self.listener = listener
        self.thread = threading.Thread(target=self._accept_each, args=(accepted,),
                                       name=f"accepting on {listener.getsockname()}", daemon=True)
        self.thread.start()

    def _accept_each(self, accepted: Callable[[socket.socket], None]) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # shut
                return
            accepted(connection)

    def close(self) -> None:
        """Shut the listener, which wakes the thread in accept() (closing it alone does not, on
        Linux), and wait for the thread to end: once this returns, nothing more is accepted."""
        _shut(self.listener)
        _joined(self.thread)


def _joined(thread: threading.Thread) -> None:
    """Wait for `thread` to end, for Accepting.JOIN_LIMIT_S at most (AssertionError after)."""
    thread.join(Accepting.JOIN_LIMIT_S)
    assert not thread.is_alive(), f"{thread.name} still running {Accepting.JOIN_LIMIT_S} s on"


def _connected_for(client: socket.socket, target: tuple[str, int]) -> socket.socket | None:
    """A connection to `target` for a proxy's `client` (blocking, as accepted ones are); or None,
    `client`'s connection closed, when the target does not take one within CONNECT_TIMEOUT_S
    (or refuses it)."""
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
    except OSError:
        _shut(client)
        return None
    upstream.settimeout(None)
    return upstream


def _shut(sock: socket.socket) -> None:
    """Close `sock`, waking a thread blocked on it (a close alone does not, on Linux)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (a listener), or already shut
    sock.close()


class RedisOfVersion:
    """A TCP server on loopback that speaks just enough of Redis's protocol (RESP) to say which
    version it is: PING answered PONG, INFO a server section naming `version` as redis_version,
    any other command an error (which redis-py passes over for its CLIENT SETINFO). An old Redis,
    for the probe of what is on Redis's usual port."""

    def __init__(self, version: str):
        self.version = version
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        self._connections: list[socket.socket] = []
        self.accepting = Accepting(self._listener, self._serve_in_a_thread)

    def _serve_in_a_thread(self, connection: socket.socket) -> None:
        self._connections.append(connection)
        threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        try:
            while (command := _resp_command_read(reader)) is not None:
                connection.sendall(self._answer(command))
        except OSError:  # closed
            pass

    def _answer(self, command: list[bytes]) -> bytes:
        name = command[0].upper() if command else b""
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"INFO":
            info = f"# Server\r\nredis_version:{self.version}\r\nredis_mode:standalone\r\n"
            return b"$%d\r\n%s\r\n" % (len(info), info.encode())
        return b"-ERR unknown command\r\n"

    def close(self) -> None:
        self.accepting.close()
        for sock in self._connections:
            _shut(sock)


def _resp_command_read(reader) -> list[bytes] | None:
    """One command a client sent (an array of bulk strings), or None at the connection's end."""
    header = reader.readline()
    if not header.startswith(b"*"):
        return None
    command = []
    for _ in range(int(header[1:])):
        length = int(reader.readline()[1:])
        command.append(reader.read(length + 2)[:-2])
    return command
