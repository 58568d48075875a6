"""What the shop's Kafka clients (librdkafka's producers and consumers) say, in the Python log.

Left to itself, librdkafka prints every line to stderr, and with a broker away it says so at
every try to connect: an inbox consumer some twenty lines a second, a producer two, each client
anew. Each client built from shared.kafka's settings hands its lines to a ClientLog instead
(confluent-kafka's `logger`, served from the client's poll(), consume() and flush(): a line waits
for the next of those). A line saying that a broker cannot be connected to is an outage, said
once for all the clients of the process (a producer replaced at every batch says nothing anew):
once as it begins, once a minute while it lasts and once as it ends (shared.outage_log), a probe
of the broker's own (a request it must answer) telling that it is away and that it is back. Such a
line of a broker the probe finds answering (a broker that has stalled, its connections accepted)
is said as librdkafka said it, once a minute with a count. A probe no client's line has called for
in UNWATCHED_AFTER_SECONDS ends (the broker removed, or its clients closed), the outage unended.
Every other line (an authentication or TLS failure, a configuration warning, a consumer group's
session timing out) goes to the logger `shared.kafka.librdkafka` at its own level, as librdkafka
said it. The probe speaks Kafka in plain text, as the shop's clients do: clients given TLS or SASL
would need it to use their settings, or every outage it confirms would never end."""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable

from shared.outage_log import OUTAGE_REMINDER_SECONDS, OutageLog, OutageWords

log = logging.getLogger("shared.kafka.librdkafka")

# While a broker is away, its probe asks it again this often (and gives each ask this long); one
# that answered is not asked again sooner.
PROBE_EVERY_SECONDS = 2.0
PROBE_TIMEOUT_SECONDS = 2.0
# A probe of a broker still away ends once no client has tried it for this long: two reminders'
# worth (a client trying says so at least every 30 s, librdkafka's suppressing identical lines).
UNWATCHED_AFTER_SECONDS = 2 * OUTAGE_REMINDER_SECONDS

BROKER_AWAY_WORDS = OutageWords(
    begun="Kafka clients cannot connect to broker %(what)s: %(said)s",
    still="Kafka clients still cannot connect to broker %(what)s after %(seconds).0f s"
          " (%(tries)d failed tries): %(said)s",
    over="Kafka clients reach broker %(what)s again after %(seconds).0f s")
# A client's lines of a broker that answers the probe, at their own level.
BROKER_ANSWERING_WORDS = OutageWords(
    begun="%(said)s (broker %(what)s answers a probe; such lines said once a minute)",
    still="%(said)s (broker %(what)s answering: %(tries)d such lines in %(seconds).0f s)",
    over="")  # (never said: nothing tells a client's trouble over; one after 30 s begins anew)

# librdkafka's line begins with its thread's name ("[thrd:127.0.0.1:9092/bootstrap]: "), then the
# broker's ("127.0.0.1:9092/1: ", "GroupCoordinator: 127.0.0.1:9092: ").
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")
_BROKER = re.compile(r"^(?:GroupCoordinator: )?(?P<address>\S+?:\d+)(?:/\S*?)?: ")
# A try to connect that failed, or a connection that broke before it was up or whose requests
# had no answer.
_CANNOT_CONNECT = re.compile(r"Connect to \S+ failed|Failed to resolve|Connection setup timed out"
                             r"|request\(s\) timed out|Disconnected|Receive failed|Send failed")
_TIMED_OUT = "timed out"
# A connection that was up and broke: a broker going away, or closing a connection idle for long
# (connections.max.idle.ms), so not in itself an outage (one follows if connecting again fails).
_WAS_UP = "in state UP)"


def why_unanswered(address: str, timeout: float) -> str | None:
    """None if the broker at `address` (host:port) answers a request (ApiVersions v0) within
    `timeout` (for each step: connecting, sending, the answer's first bytes), else why not.
    Asked over Kafka's protocol itself, not through a librdkafka client, whose threads (a
    test counts them to see its clients released) and lines a probe would add to the process's."""
    host, _, port = address.rpartition(":")
    request = struct.pack(">hhih", _API_VERSIONS, 0, 1, len(_CLIENT_ID)) + _CLIENT_ID
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as broker:
            broker.sendall(struct.pack(">i", len(request)) + request)
            if not broker.recv(8):
                return "the broker closed the connection without an answer"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_API_VERSIONS = 18
_CLIENT_ID = b"hseshop-probe"


class ClientLog:
    """A Kafka client's `logger` (confluent-kafka calls log(level, "%s [%s] %s", facility, client,
    line)): see the module's docstring. One serves any number of clients of `bootstrap_servers`
    (a line that names no broker is taken for the first of them). A broker's outage is timed by
    `clock` of the first ClientLog to name it."""

    def __init__(self, bootstrap_servers: str, clock: Callable[[], float] = time.monotonic):
        self._first_broker = bootstrap_servers.split(",")[0].strip()
        self._clock = clock

    def log(self, level: int, template: str, *args) -> None:
        if len(args) != 3:  # (not confluent-kafka's call)
            log.log(level, template, *args)
            return
        facility, client, line = args
        said = _THREAD.sub("", str(line), count=1)
        if not _CANNOT_CONNECT.search(said):
            log.log(level, "%s [%s] %s", facility, client, said)
        elif _WAS_UP in said and _TIMED_OUT not in said:
            log.debug("%s [%s] %s", facility, client, said)
        else:
            broker = _BROKER.match(said)
            address = broker["address"] if broker else self._first_broker
            _away(address, self._clock).failed(said, level, f"{facility} [{client}] {said}")


class _BrokerAway:
    """One broker's outage, as this process's clients see it. A client's failed try starts a probe
    of the broker, unless one runs or the broker answered one in the last PROBE_EVERY_SECONDS,
    which asks it every PROBE_EVERY_SECONDS until it answers: the outage begins only once the probe
    too finds the broker away (a line served late, from before the broker came back, begins none),
    lasts while it does (a try each round: the clients' own tries are not counted, only their
    latest line kept to say why), and ends as it answers, or, unended, as the probe does once no
    client has tried the broker for UNWATCHED_AFTER_SECONDS. The lines of a broker that answers
    are the clients' own trouble, said as they are, once a minute."""

    def __init__(self, address: str, clock: Callable[[], float]):
        self._address, self._clock = address, clock
        self._outage = self._new_outage()
        self._answering = OutageLog(log, address, BROKER_ANSWERING_WORDS, clock=clock)
        self._lock = threading.Lock()
        self._probing = False
        self._begun = False  # whether the probe confirmed the outage
        self._last_said = ""  # the latest failed try's line
        self._tried_at = self._answered_at = float("-inf")
        self._answer_ended_outage = False
        self._unsaid: list[tuple[int, str]] = []  # lines (level, line) awaiting the probe's answer

    def failed(self, said: str, level: int, line: str) -> None:
        with self._lock:
            now = self._clock()
            self._last_said, self._tried_at = said, now
            if not self._probing and now - self._answered_at < PROBE_EVERY_SECONDS:
                if self._answer_ended_outage:  # (a line served late, of the outage just over)
                    log.debug("%s", line)
                else:
                    self._answering.failed(line, level)
                return
            self._unsaid.append((level, line))
            if not self._probing:
                self._probing = True
                threading.Thread(target=self._probe, name=f"kafka-probe {self._address}",
                                 daemon=True).start()

    def _probe(self) -> None:
        while True:
            why = why_unanswered(self._address, PROBE_TIMEOUT_SECONDS)
            with self._lock:
                now = self._clock()
                unsaid, self._unsaid = self._unsaid, []
                if why is None:
                    self._answered(now, unsaid)
                    return
                if now - self._tried_at >= UNWATCHED_AFTER_SECONDS:
                    self._unwatched(now, why)
                    return
                self._begun = True
                self._outage.failed(self._last_said)
            time.sleep(PROBE_EVERY_SECONDS)

    def _answered(self, now: float, unsaid: list[tuple[int, str]]) -> None:
        if self._begun:
            self._outage.back()
        else:  # (the clients' lines: the broker answers)
            for level, line in unsaid:
                self._answering.failed(line, level)
        self._answer_ended_outage, self._answered_at = self._begun, now
        self._begun = self._probing = False

    def _unwatched(self, now: float, why: str) -> None:
        log.info("Kafka broker %s no longer watched: no client has tried it for %.0f s (it still"
                 " does not answer: %s)", self._address, now - self._tried_at, why)
        self._outage = self._new_outage()  # (its outage unended, not said to be over)
        self._begun = self._probing = False

    def _new_outage(self) -> OutageLog:
        return OutageLog(log, self._address, BROKER_AWAY_WORDS, clock=self._clock)


_brokers_away: dict[str, _BrokerAway] = {}
_brokers_away_lock = threading.Lock()


def _away(address: str, clock: Callable[[], float]) -> _BrokerAway:
    with _brokers_away_lock:
        if address not in _brokers_away:
            _brokers_away[address] = _BrokerAway(address, clock)
        return _brokers_away[address]
