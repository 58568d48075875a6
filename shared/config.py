"""The one home of configuration: every setting any HseShop process reads, from the environment.

`ENVIRONMENT` lists each variable with its local default; deployment files are checked against it.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, fields
from functools import lru_cache
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

# Everything with its own database, outbox and inbox: the two domain services and the gateway.
SERVICES = ("orders", "payments", "gateway")
# The largest request body any app takes (the biggest the API needs is a few kilobytes): a bigger
# one is refused with 413 before it is read, instead of held in memory to be refused once parsed
# (shared.app).
MAX_REQUEST_BYTES = 64 * 1024
# The services the gateway calls, over gRPC (each serves gRPC next to its HTTP API) or HTTP.
GRPC_SERVICES = ("orders", "payments")
# The services that keep idempotency keys (shared/idempotency.py), whose APIs honour them: the
# gateway passes a request's Idempotency-Key on to them and keeps none.
SERVICES_KEEPING_IDEMPOTENCY_KEYS = ("orders", "payments")

# Environment variable -> default that works on a developer's machine.
# What follows REDIS_KEY_PREFIX in every key HseShop writes (`<prefix>:celery:...`,
# `<prefix>:orders:...`): a prefix's keys are the ones starting with it and this.
REDIS_KEY_SEPARATOR = ":"

ENVIRONMENT: dict[str, str] = {
    "ORDERS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_orders",
    "PAYMENTS_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_payments",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "CELERY_BROKER_URL": "",  # empty: the same as REDIS_URL
    # The read cache's Redis (shared/cache.py); empty: REDIS_URL's. One of its own may have a
    # memory limit and evict (allkeys-lru: docker-compose.yml), which the broker's must not: a cache
    # filling a Redis under noeviction had Celery's tasks refused with it.
    "CACHE_REDIS_URL": "",
    # Every Redis key and channel HseShop uses starts with this and REDIS_KEY_SEPARATOR (Celery's
    # queues included), so several shops, or test runs, can share one Redis.
    "REDIS_KEY_PREFIX": "hseshop",
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "KAFKA_CONSUMER_GROUP_PREFIX": "hseshop",
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    "KAFKA_TOPIC_PARTITIONS": "3",
    # Replicas of each topic the shop creates: 1 for a single broker (the compose file's, the test
    # one); 3 on a production cluster (see shared.kafka.new_topic).
    "KAFKA_TOPIC_REPLICATION_FACTOR": "1",
    "TOPIC_PAYMENT_REQUESTED": "orders.payment-requested",
    "TOPIC_PAYMENT_RESULTS": "payments.payment-results",
    # Rows the relay reads and sends at a time: each batch pays a fixed set of round trips (its
    # read and its delete).
    "OUTBOX_RELAY_BATCH_SIZE": "5000",
    # Topics, comma-separated, that the relay sends outbox rows to besides the TOPIC_* ones: a
    # tool's own (the benchmark's relay-speed topic). A row naming any other topic is parked, not
    # sent (shared.outbox.publishing.OutboxPublisher).
    "OUTBOX_EXTRA_TOPICS": "",
    # How often beat checks that a relay leads each outbox (commits wake the leader themselves), so
    # the longest a dead leader goes unreplaced: at least once a second, as issue 2 asks of the
    # relay's safety net (RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS). Each check is a task through
    # Redis: at 0.5 s beat and the workers spent about 5% of a core on them, at 2 s about 1.5%.
    "OUTBOX_RELAY_INTERVAL_SECONDS": "1",
    "INBOX_SWEEP_INTERVAL_SECONDS": "5",
    "INBOX_SWEEP_MIN_AGE_SECONDS": "10",
    "INBOX_MAX_ATTEMPTS": "5",
    # Inbox rows are deleted once stored and handled (or discarded) this long ago (7 days, Kafka's
    # default retention), by a pruner beat runs every INBOX_PRUNE_INTERVAL_SECONDS
    # (shared.inbox.pruning.prune_handled_messages).
    "INBOX_RETENTION_SECONDS": "604800",
    "INBOX_PRUNE_INTERVAL_SECONDS": "600",
    # Idempotency keys are kept a day (a client retries within that; the key is then free again),
    # notifications 30 days (longer than Kafka keeps a message, so a repeat still finds its
    # notification): both pruned by beat every hour (tasks/retention.py).
    "IDEMPOTENCY_KEY_RETENTION_SECONDS": "86400",
    "NOTIFICATION_RETENTION_SECONDS": "2592000",
    "TOPIC_ORDER_STATUS_CHANGED": "orders.order-status-changed",
    # Shared by the gateway and the services: the services trust only identities signed with it.
    "INTERNAL_AUTH_SECRET": "dev-only-internal-secret-change-me-in-production",
    "GATEWAY_DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/hseshop_gateway",
    "ORDERS_SERVICE_URL": "http://127.0.0.1:8001",
    "PAYMENTS_SERVICE_URL": "http://127.0.0.1:8002",
    "UPSTREAM_TIMEOUT_SECONDS": "5",
    "AUTH_TOKEN_SECRET": "dev-only-token-secret-change-me-in-production",
    "AUTH_TOKEN_TTL_SECONDS": "3600",
    "RATE_LIMIT_PER_MINUTE": "300",
    # How many proxies of our own (a load balancer, an ingress) stand in front of the gateway, each
    # adding the address it was reached from to X-Forwarded-For: the client's address, which the
    # per-address limits count, is the one the outermost of them added. 0: none, the header is
    # ignored (a client could write any address in it). It must be the number of proxies we
    # control: one more and a client picks its own address.
    "GATEWAY_TRUSTED_PROXY_HOPS": "0",
    # Notification sockets a gateway process keeps open from one client address (as the
    # per-address rate limits count it: an IPv6 address by its /64), beside its 5 per user and 192
    # in all: one address signing up many users cannot take every slot, and close everyone
    # else's. Clients behind one NAT share it: past it their pages read the orders themselves.
    "GATEWAY_SOCKETS_PER_ADDRESS": "20",
    # Notification socket handshakes a minute from one client address (counted as above), all the
    # gateway's processes together, before the token is read: past them a handshake is answered
    # 429, not upgraded. Each one upgraded holds a server thread until its socket ends, a refused
    # one (a garbage token) for the close's answer: without it one address held every thread.
    "GATEWAY_SOCKET_HANDSHAKES_PER_ADDRESS": "60",
    # How long a sign-up or sign-in waits for its gateway process to hash its password (a few at
    # once: gateway_app/passwords.py), as many waiting at most as it serves in that time at a
    # typical hash's 60 ms (passwords.waiting_at_most, 64 at most): past either, 503 SIGN_IN_BUSY
    # with Retry-After. Each waiting holds a server thread: a burst of sign-ins
    # waited without limit, and from a few addresses held every thread of the gateway.
    "GATEWAY_SIGN_IN_WAIT_SECONDS": "2",
    "CACHE_TTL_SECONDS": "60",
    # gRPC: where each service listens, where the gateway reaches it, and which way the gateway
    # talks to the services ("grpc" or "http").
    "ORDERS_GRPC_BIND": "127.0.0.1:50051",
    "PAYMENTS_GRPC_BIND": "127.0.0.1:50052",
    "ORDERS_GRPC_TARGET": "127.0.0.1:50051",
    "PAYMENTS_GRPC_TARGET": "127.0.0.1:50052",
    "GATEWAY_UPSTREAM_TRANSPORT": "grpc",
    # How long the web servers (shared/gunicorn_worker.py) wait on a request's client, as nginx's
    # client_header_timeout and client_body_timeout do: for each read of its head or body, and for
    # the whole head. Past either the request is answered 408, its connection closed: a client
    # that sends a byte now and then, or less body than it said, held a server thread (one of a
    # service worker's 4) for as long as it liked. Not once the answer has begun: a notification
    # socket reads its page, quiet for minutes, past it.
    "REQUEST_READ_TIMEOUT_SECONDS": "15",
    "REQUEST_HEAD_TIMEOUT_SECONDS": "30",
}


@dataclass(frozen=True)
class Settings:
    orders_database_url: str
    payments_database_url: str
    redis_url: str
    celery_broker_url: str
    cache_redis_url: str
    redis_key_prefix: str
    kafka_bootstrap_servers: str
    kafka_consumer_group_prefix: str
    kafka_session_timeout_ms: int
    kafka_topic_partitions: int
    kafka_topic_replication_factor: int
    topic_payment_requested: str
    topic_payment_results: str
    outbox_relay_batch_size: int
    outbox_extra_topics: str
    outbox_relay_interval_seconds: float
    inbox_sweep_interval_seconds: float
    inbox_sweep_min_age_seconds: float
    inbox_max_attempts: int
    inbox_retention_seconds: float
    inbox_prune_interval_seconds: float
    idempotency_key_retention_seconds: float
    notification_retention_seconds: float
    topic_order_status_changed: str
    internal_auth_secret: str
    gateway_database_url: str
    orders_service_url: str
    payments_service_url: str
    upstream_timeout_seconds: float
    auth_token_secret: str
    auth_token_ttl_seconds: int
    rate_limit_per_minute: int
    gateway_trusted_proxy_hops: int
    gateway_sockets_per_address: int
    gateway_socket_handshakes_per_address: int
    gateway_sign_in_wait_seconds: float
    cache_ttl_seconds: int
    orders_grpc_bind: str
    payments_grpc_bind: str
    orders_grpc_target: str
    payments_grpc_target: str
    gateway_upstream_transport: str
    request_read_timeout_seconds: float
    request_head_timeout_seconds: float

    def cache_url(self) -> str:
        """The read cache's Redis: CACHE_REDIS_URL's, else (empty) REDIS_URL's, read as it is
        asked for (a copy with another REDIS_URL moves the cache with it)."""
        return self.cache_redis_url or self.redis_url

    def database_url(self, service: str) -> str:
        """The service's SQLAlchemy URL, always with the psycopg2 driver."""
        urls = {"orders": self.orders_database_url, "payments": self.payments_database_url,
                 "gateway": self.gateway_database_url}
        if service not in urls:
            raise ValueError(f"unknown service {service!r}")
        url = urls[service]
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg2://" + url[len(plain):]
        return url

    def topics(self) -> list[str]:
        """Every topic the shop uses."""
        return [self.topic_payment_requested, self.topic_payment_results,
                self.topic_order_status_changed]

    def relayed_topics(self) -> list[str]:
        """The topics the relay sends outbox rows to: the shop's, and OUTBOX_EXTRA_TOPICS."""
        extra = [topic.strip() for topic in self.outbox_extra_topics.split(",")]
        return self.topics() + [topic for topic in extra if topic]

    def consumer_group(self, service: str) -> str:
        return f"{self.kafka_consumer_group_prefix}.{service}"


# The longest OUTBOX_RELAY_INTERVAL_SECONDS the relay's safety net is meant to have: beat runs the
# relay at least once a second (issue 2), so that a dead leader is replaced within a second. A
# longer one is taken, and beat warns of it as it starts (tasks/beat.py), not refused: it costs only
# that wait, rows are never lost for it, and 2 was the default before (an operator's env file may
# hold it), which refused would stop every process, the APIs too, on the upgrade.
RELAY_LEAD_CHECKED_AT_LEAST_EVERY_SECONDS = 1.0

# The settings with a fixed set of values.
CHOICES = {"GATEWAY_UPSTREAM_TRANSPORT": ("grpc", "http")}


def _host_and_port(raw: str) -> bool:
    """host:port (an IPv6 host in brackets), the port a number from 1 to 65535."""
    host, _, port = raw.rpartition(":")
    return bool(host) and "/" not in host and port.isdigit() and 1 <= int(port) <= 65535


# gRPC's schemes that name a socket by its path (a file's, or an abstract one), not a host: a path
# may hold a space within it ("unix:/run/my shop/orders.sock" binds and connects).
SOCKET_PATH_SCHEMES = ("unix:", "unix-abstract:")


# gRPC's schemes that name a host to connect to, which a server cannot bind (its add_insecure_port
# failed the server's start in a traceback, "Failed to bind to address", naming no setting).
TARGET_ONLY_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def _grpc_address(raw: str) -> bool:
    """host:port, or a name in one of gRPC's own schemes (dns:///host:port, unix:/path...)."""
    return _grpc_bind_address(raw) or raw.startswith(TARGET_ONLY_SCHEMES)


def _grpc_bind_address(raw: str) -> bool:
    """host:port, a socket's path (unix:/path, unix-abstract:name) or a VM socket's address
    (vsock:cid:port): what a gRPC server binds ("ipv4:127.0.0.1:50051" is no host:port, though it
    splits as one)."""
    if raw.startswith(TARGET_ONLY_SCHEMES):
        return False
    if raw.startswith("vsock:"):  # vsock:cid:port
        cid, _, port = raw.removeprefix("vsock:").partition(":")
        if not all(part.isascii() and part.isdigit() for part in (cid, port)):
            return False
        return 1 <= int(port) <= 65535
    return _host_and_port(raw) or raw.startswith(SOCKET_PATH_SCHEMES)


def _service_root(raw: str) -> bool:
    """http(s)://host[:port], a trailing "/" aside: the gateway appends the route's path ("/orders")
    and signs the path it sends, which a service URL with a path of its own would change
    ("//orders", which one server collapses to "/orders" and another keeps: a 401 on one)."""
    try:
        url = urlsplit(raw)
        url.port  # (a port that is no number raises here)
    except ValueError:
        return False
    return (url.scheme in ("http", "https") and bool(url.hostname) and url.path in ("", "/")
            and not url.query and not url.fragment and not raw.endswith(("?", "#")))


# The schemes a database's URL may name: PostgreSQL's, with the one driver the shop has
# (Settings.database_url gives a bare one psycopg2).
DATABASE_URL_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def _database_url(raw: str) -> bool:
    """postgresql://user[:password]@host[:port]/database, as SQLAlchemy reads it: another scheme,
    or a port that is no number, failed only as the first connection was made, in a traceback
    (an operator's `python -m shared.migrations` or `tasks.parked` too)."""
    try:
        url = make_url(raw)  # (a port that is no number raises here)
    except (ArgumentError, ValueError):
        return False
    return url.drivername in DATABASE_URL_SCHEMES


def _redis_url(raw: str, schemes: tuple[str, ...] = ("redis", "rediss", "unix")) -> bool:
    """redis://[:password@][host][:port][/db] (or rediss://; no host is localhost, for redis-py
    and kombu alike), or a socket's URL, unix:///path, as redis-py reads it (`schemes`): another
    form failed only as the first connection was made, in a traceback (an operator's `python -m
    tasks.parked` too)."""
    try:
        url = urlsplit(raw)
        url.port  # (a port that is no number raises here)
    except ValueError:
        return False
    # (Without its "//", "redis:6379" is a database 6379 of localhost.)
    if url.scheme not in schemes or not raw.startswith(f"{url.scheme}://"):
        return False
    if url.scheme in ("redis", "rediss"):
        db = url.path.strip("/")
        return db == "" or db.isascii() and db.isdigit()
    return bool(url.path.strip("/"))


def _broker_url(raw: str) -> bool:
    """A Redis URL as kombu, Celery's broker, reads it: redis:// or rediss://, or a socket's,
    redis+socket:///path (kombu reads unix:///path as 127.0.0.1 and a database named by the
    path, and a worker failed in a traceback as it connected)."""
    return _redis_url(raw, ("redis", "rediss", "redis+socket"))


# What a Redis URL of a host may be, as each of them takes it (_redis_url, _broker_url).
_REDIS_URL_FORMS = "redis://[:password@]host[:port][/db] (rediss:// for TLS)"
# A URL's password, to hide: what lies between the user's ":" and the last "@" (after a scheme and
# its slashes, if any: postgresql://, postgresql:/, or none; a password with a ":", "/", "?" or
# "@" of its own hidden whole), and the value of a query's password (libpq's, redis-py's).
_PASSWORD_IN_USERINFO = re.compile(r"^((?:[A-Za-z][A-Za-z0-9+.-]*:/+)?+[^:@]*:).*(@)", re.DOTALL)
_PASSWORD_IN_QUERY = re.compile(r"([?&][^=&]*password=)[^&]*", re.IGNORECASE)


def _shown(name: str, raw: str) -> str:
    """`raw` as an error may show it: a URL's password hidden (a database's URL holds one)."""
    if not name.endswith("_URL"):
        return repr(raw)
    hidden = _PASSWORD_IN_USERINFO.sub(r"\1***\2", raw, count=1)
    return repr(_PASSWORD_IN_QUERY.sub(r"\1***", hidden))


def _blank_or_control(char: str) -> bool:
    """Whether `char` is whitespace (Unicode's, a no-break space included) or a control or
    invisible formatting character (a zero-width space, a byte order mark)."""
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf")


def _first_blank_or_control(raw: str) -> int | None:
    """Where the first whitespace or control character of `raw` is; None for none."""
    return next((at for at, char in enumerate(raw) if _blank_or_control(char)), None)


def _first_blank_at_an_end_or_control(raw: str) -> int | None:
    """Where the first whitespace at either end of `raw`, or control or other whitespace character
    but a space within it, is; None for none."""
    within = range(len(raw) - len(raw.lstrip()), len(raw.rstrip()))
    return next((at for at, char in enumerate(raw)
                 if _blank_or_control(char) and not (char == " " and at in within)), None)


def _first_blank_or_control_of_grpc_address(raw: str) -> int | None:
    r"""Where the first whitespace or control character of a gRPC address is, but for a space
    within a socket's path (SOCKET_PATH_SCHEMES): a space at either end of the path, a line end
    ("unix:/run/orders.sock\n", the "\r" an env file written with CRLF line ends leaves) or any
    other such character in it is refused as it is in a host; None for none."""
    scheme = next((scheme for scheme in SOCKET_PATH_SCHEMES if raw.startswith(scheme)), "")
    if not scheme:
        return _first_blank_or_control(raw)
    path = raw[len(scheme):]
    within_the_path = range(len(raw) - len(path.lstrip()), len(raw.rstrip()))
    return next((at for at, char in enumerate(raw)
                 if _blank_or_control(char) and not (char == " " and at in within_the_path)),
                None)


# The settings with a form of their own, and what it is. A value of another form would come to
# light only at the first call that uses it: a gRPC target the gateway cannot make sense of
# answers every call with a 503, "try again shortly", while /health answers 200.
FORMS = {
    **{f"{service.upper()}_GRPC_TARGET": (
        _grpc_address, "host:port, or a gRPC name: dns:///host:port, unix:/path...")
       for service in GRPC_SERVICES},
    **{f"{service.upper()}_GRPC_BIND": (
        _grpc_bind_address,
        "host:port, a socket's unix:/path or unix-abstract:name, or vsock:cid:port")
       for service in GRPC_SERVICES},
    **{f"{service.upper()}_SERVICE_URL": (
        _service_root, "an http:// or https:// URL of a host and port, with no path")
       for service in GRPC_SERVICES},
    **{f"{service.upper()}_DATABASE_URL": (
        _database_url, "a PostgreSQL URL, postgresql://user:password@host:port/database")
       for service in SERVICES},
    "REDIS_URL": (_redis_url, f"a Redis URL, {_REDIS_URL_FORMS}, or a socket's unix:///path"),
    # (Empty: REDIS_URL's.)
    "CELERY_BROKER_URL": (lambda raw: raw == "" or _broker_url(raw),
                          f"a Redis URL as Celery reads it, {_REDIS_URL_FORMS}, or a socket's"
                          " redis+socket:///path"),
    # (Empty: REDIS_URL's.)
    "CACHE_REDIS_URL": (lambda raw: raw == "" or _redis_url(raw),
                        f"a Redis URL, {_REDIS_URL_FORMS}, or a socket's unix:///path"),
}
# The URLs of the databases and Redis.
DATABASE_AND_REDIS_URLS = (*(f"{service.upper()}_DATABASE_URL" for service in SERVICES),
                           "REDIS_URL", "CELERY_BROKER_URL", "CACHE_REDIS_URL")
# The settings refused with a whitespace or control character in them, each with what finds the
# first one it refuses. A service URL: anywhere, as urlsplit drops tabs and line breaks, and takes
# a space in the host, so that "http://orders:8001\t" or "http://ord ers:8001" passed its form and
# failed every call with a 502, and a trailing space had "http://orders:8001/ " refused as a URL
# with a path. A gRPC address: anywhere but for a space within a socket's path, as "ord ers:50051"
# or "dns:///orders :50051" passed as host:port, and then a target failed every call with a 503,
# and a bind failed the gRPC server's start with no word of which setting; a socket's path with a
# line end bound or looked for a socket of another name.
NO_BLANK_NOR_CONTROL = {
    **{f"{service.upper()}_SERVICE_URL": _first_blank_or_control for service in GRPC_SERVICES},
    # A database's or Redis's URL: at either end (a line end a secret written with `echo` left,
    # which passed its form and failed the first connection, in a traceback) or a control
    # character anywhere; a space within is the URL's (SQLAlchemy writes a password's as it is).
    **{name: _first_blank_at_an_end_or_control for name in DATABASE_AND_REDIS_URLS},
    **{f"{service.upper()}_GRPC_{role}": _first_blank_or_control_of_grpc_address
       for service in GRPC_SERVICES for role in ("TARGET", "BIND")},
}
# The settings written one way, whatever way they are given: a service URL's trailing "/".
NORMALISED = {f"{service.upper()}_SERVICE_URL": lambda raw: raw.removesuffix("/")
              for service in GRPC_SERVICES}
# The numbers for which 0 means none (the rest are sizes, counts and lengths of time above 0).
ZERO_MEANS_NONE = ("GATEWAY_TRUSTED_PROXY_HOPS",)
# How far off the gateway's deadline for a call may be (UPSTREAM_TIMEOUT_SECONDS on: AT_MOST): a
# service takes one further off than this and the clocks' disagreement its signature allows as
# none (shared.caller_deadline: a clock far off, or none meant).
FURTHEST_DEADLINE_SECONDS = 3600.0
# The numbers with a greatest value: the gateway's deadline for a call (a longer one was taken by
# the services as none, and one far longer wrote a moment of more digits than they read); a
# socket's timeout (socket.settimeout) raises OverflowError past some 9.2e9 s, which made every
# request's read fail (a 500 for each GET): a day is more than any client is to be waited on. A
# sign-in's wait for a turn to hash, a minute: a longer one holds the threads it is there to free.
AT_MOST = {"UPSTREAM_TIMEOUT_SECONDS": FURTHEST_DEADLINE_SECONDS,
           "REQUEST_READ_TIMEOUT_SECONDS": 86400, "REQUEST_HEAD_TIMEOUT_SECONDS": 86400,
           "GATEWAY_SIGN_IN_WAIT_SECONDS": 60}
# The settings that sign: set but empty (a deployment's missing secret, say) is refused, not read
# as unset, which would have the shop sign with the dev-only default written above for all to see.
SECRETS = ("INTERNAL_AUTH_SECRET", "AUTH_TOKEN_SECRET")
# The fewest bytes a secret may have (in UTF-8), else it is refused: both sign with HMAC-SHA256,
# and anyone holding one token (or one signed request) can try guesses at a short secret offline,
# as fast as they can hash, and once found sign anything ("shop2024" falls in seconds). 32 bytes
# as `make run` makes them: secrets.token_urlsafe(32), 43 characters.
MIN_SECRET_BYTES = 32
HOW_TO_MAKE_A_SECRET = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
# The secrets' values published with the code, which anyone can sign with: the defaults above and
# the placeholders of deploy/token-signing.env and deploy/internal-auth.env
# (tests/unit/test_published_secrets.py keeps them in step). A process signing or verifying with
# one (an API, a gRPC server; no worker) says so in a WARNING as it starts (shared/app.py), and
# starts: `docker compose up` on a fresh clone must work. docker-compose.yml gives a secret only to
# the processes that use it: the others run on the defaults above, and use them for nothing.
PUBLISHED_SECRETS = {
    "INTERNAL_AUTH_SECRET": (ENVIRONMENT["INTERNAL_AUTH_SECRET"],
                             "dev-only-internal-secret-replace-me"),
    "AUTH_TOKEN_SECRET": (ENVIRONMENT["AUTH_TOKEN_SECRET"], "dev-only-token-secret-replace-me"),
}


def published_secrets(settings: Settings, names: Iterable[str] = SECRETS) -> list[str]:
    """Those of the secrets `names` that `settings` holds at a value published with the code."""
    return [name for name in names
            if getattr(settings, name.lower()) in PUBLISHED_SECRETS[name]]


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read the environment now (tests and tools that change it call this directly).

    A value a setting cannot take is refused here, naming its variable (a ValueError): every
    number is a size, a count or a length of time, above 0 (a batch size of 0 had the relay leader
    read nothing forever while holding its lead, an interval of 0 had beat send tasks without a
    pause, a negative retention pruned idempotency keys a minute old), or 0 or above for those
    where 0 means none (ZERO_MEANS_NONE), and for some no more than a greatest value (AT_MOST).
    An empty variable means its default, but for the secrets (SECRETS), which are refused empty
    or shorter than MIN_SECRET_BYTES.
    """
    environ = os.environ if environ is None else environ
    for name in SECRETS:
        if environ.get(name) == "":
            raise ValueError(f"{name}='': a secret cannot be empty (unset, it is the dev-only"
                             " default)")
    values = {}
    for field in fields(Settings):
        name = field.name.upper()
        values[field.name] = _setting(name, field.type, environ.get(name) or ENVIRONMENT[name])
    for name in SECRETS:
        if (length := len(values[name.lower()].encode())) < MIN_SECRET_BYTES:
            raise ValueError(f"{name} is {length} bytes long: a secret must be at least"
                             f" {MIN_SECRET_BYTES} bytes, or anyone holding one token can guess it"
                             f" offline and sign their own; make one with {HOW_TO_MAKE_A_SECRET}")
    if not values["celery_broker_url"]:
        if not _broker_url(values["redis_url"]):  # (unix:///path, which kombu cannot read)
            raise ValueError(
                f"REDIS_URL={_shown('REDIS_URL', values['redis_url'])}: Celery's broker (with"
                " CELERY_BROKER_URL unset) cannot take a unix:// URL: set"
                " CELERY_BROKER_URL=redis+socket:///path as well")
        values["celery_broker_url"] = values["redis_url"]
    return Settings(**values)


def _setting(name: str, kind: str, raw: str) -> str | int | float:
    if kind == "str":
        if name in CHOICES and raw not in CHOICES[name]:
            raise ValueError(f"{name}={raw!r}: expected one of {', '.join(CHOICES[name])}")
        if (name in NO_BLANK_NOR_CONTROL
                and (at := NO_BLANK_NOR_CONTROL[name](raw)) is not None):
            raise ValueError(f"{name}={_shown(name, raw)}: expected no whitespace nor control"
                             f" character, and found {raw[at]!r} at position {at}")
        if name in FORMS and not FORMS[name][0](raw):
            raise ValueError(f"{name}={_shown(name, raw)}: expected {FORMS[name][1]}")
        return NORMALISED[name](raw) if name in NORMALISED else raw
    try:
        value = int(raw) if kind == "int" else float(raw)
    except ValueError:
        expected = "a whole number" if kind == "int" else "a number"
        raise ValueError(f"{name}={raw!r}: expected {expected}") from None
    zero_allowed = name in ZERO_MEANS_NONE
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        raise ValueError(f"{name}={raw!r}: expected a number "
                         + ("of 0 or above" if zero_allowed else "above 0"))
    if name in AT_MOST and value > AT_MOST[name]:
        raise ValueError(f"{name}={raw!r}: expected a number no more than {AT_MOST[name]:g}")
    return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return load_settings()


def settings_or_exit(prefix: str, log: logging.Logger | None = None) -> Settings:
    """The process-wide settings, for an operator's command: a value one cannot take is said in a
    line, `prefix: ...` (`log`'s ERROR, else on stderr; `prefix` says what, and that nothing was
    done), and the command exits 1, having done nothing."""
    try:
        return get_settings()
    except ValueError as exc:
        line = f"{prefix}: {exc}"
        if log is None:
            print(line, file=sys.stderr)
        else:
            log.error("%s", line)
        raise SystemExit(1) from None
