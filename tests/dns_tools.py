"""A DNS server for the tests, answering for names whose address moves as a redeploy moves a
container's: grpc's resolver is pointed at it by the target's authority
(`dns://127.0.0.1:PORT/name:port`), so a test can change what the gateway's name resolves to, or
make it resolve to nothing, while a channel to it is open."""

from __future__ import annotations

import socket
import struct
import threading

_A, _IN = 1, 1
_ANSWER_FLAGS = 0x8180  # a response, recursion desired and available, no error
_NXDOMAIN_FLAGS = 0x8183  # the same, the name does not exist
_TTL_SECONDS = 1


class MovableNameServer:
    """Answers every name's A query (over UDP, on 127.0.0.1) with `address`, or with NXDOMAIN
    while it is None; any other query with no record (no AAAA: the name is IPv4 alone).
    `lookups` counts the A queries answered, NXDOMAIN or not. Serves in a thread of its own
    until `close()`."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.lookups = 0
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, name="movable-name-server",
                                        daemon=True)
        self._thread.start()

    def target(self, name: str, port: int) -> str:
        """A gRPC target for `name`:`port` resolved by this server."""
        return f"dns://127.0.0.1:{self._socket.getsockname()[1]}/{name}:{port}"

    def close(self) -> None:
        self._socket.close()  # (its recvfrom fails, and the thread ends)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while True:
            try:
                query, client = self._socket.recvfrom(512)
                self._socket.sendto(self._answer(query), client)
            except OSError:
                return

    def _answer(self, query: bytes) -> bytes:
        query_id = struct.unpack(">H", query[:2])[0]
        end_of_name = query.index(b"\0", 12)
        question = query[12:end_of_name + 5]  # the name, its type and its class
        query_type = struct.unpack(">H", query[end_of_name + 1:end_of_name + 3])[0]
        address = self.address
        if query_type == _A:
            self.lookups += 1
        if address is None:
            return struct.pack(">6H", query_id, _NXDOMAIN_FLAGS, 1, 0, 0, 0) + question
        if query_type != _A:
            return struct.pack(">6H", query_id, _ANSWER_FLAGS, 1, 0, 0, 0) + question
        record = (b"\xc0\x0c"  # the name, as the question's (a pointer to offset 12)
                  + struct.pack(">HHIH", _A, _IN, _TTL_SECONDS, 4) + socket.inet_aton(address))
        return struct.pack(">6H", query_id, _ANSWER_FLAGS, 1, 1, 0, 0) + question + record
