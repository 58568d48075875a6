"""Live order notifications: OrderStatusChanged events arrive through the gateway's inbox, are kept
per user (so a page that reconnects can catch up), and are fanned out through Redis pub/sub to
every gateway instance, which pushes them to that user's open WebSockets and nobody else's.

A page follows a user's notifications by id: "everything after the last one I saw". That holds
only if a user's notifications commit in the order of their ids, so the transactions that add
them take a lock per user (two inbox batches for one user, on two worker threads, would otherwise
commit out of order, and the page would skip the earlier one for good). A socket takes Redis
messages as wake-ups and sends what the table holds after its last id, in id order, whatever order
the messages were published in."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from collections import Counter
from datetime import datetime

import redis
from flask import current_app, g, jsonify, request
from flask_sock import Sock
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from psycopg2.extras import Json, execute_values
from simple_websocket import ConnectionClosed
from sqlalchemy import func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.routing import WebsocketMismatch
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping
from wsproto.events import Request as WebSocketRequest
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, ProtocolError

from gateway_app import tokens
from gateway_app.auth import RATE_LIMITER, SIGNED_IN_ERRORS, TOKEN_EXPIRED, BearerRefused
from gateway_app.models import Notification, NotificationPruneMark
from gateway_app.notification_document import (NOTIFICATION_ID_FORMAT, NOTIFICATION_PAGE,
                                                notifications_missed)
from gateway_app.ratelimit import RateLimited, client_address
from gateway_app.sign_out import SIGNED_OUT, is_signed_out
from gateway_app.socket_document import document_socket
from gateway_app.socket_pings import PingSchedule
from gateway_app.socket_tickets import (TICKET_TTL_SECONDS, TokenExpiresTooSoon, UnknownTicket,
                                        issue_ticket, spend_tickets)
from gateway_app.user_channels import channel, channel_listener, publish
from shared.contracts import ORDER_STATUS_CHANGED
from shared.db import after_commit, db, driver_cursor
from shared.documented_errors import (RETRY_AFTER, SEC_WEBSOCKET_VERSION, UPGRADE,
                                      DocumentedError)
from shared.errors import ApiError
from shared.fields import INT64_MAX, WholeNumber
from shared.http_api import Blueprint, EmptySchema, given_more_than_once
from shared.inbox.handling import Handler, ReceivedEvent
from shared.jsonio import dumps_exact
from shared.operation_links import link
from shared.process_stopping import stopping
from shared.request_context import LOGGED_OUTCOME

log = logging.getLogger(__name__)

REPLAY_LIMIT = 500
# A socket waits for its wake-up this long at most before it drops what its page has sent, and
# notices that its page has gone (a wait, on the process's one subscriber, costs nothing).
SOCKET_DRAIN_SECONDS = 1.0
# An open socket reads the table this often even when Redis has not woken it: a publish lost after
# the commit (Redis down a moment, the worker killed in between) is then late, never missing.
SOCKET_RECHECK_SECONDS = 5.0
# How long a socket waits for Redis to confirm its subscription before it reads the table (then it
# is closed with 1011, as when Redis is lost, and the page reconnects): the table is read only once
# it is confirmed, so that a notification committed after the read wakes the socket.
SUBSCRIBE_TIMEOUT_SECONDS = 2.0
# Each open socket holds one of the gateway process's threads (200, as make run and compose start
# it) for as long as it stays open, and a registration on the process's one Redis subscriber. A
# user gets a few (pages in several tabs), a client address GATEWAY_SOCKETS_PER_ADDRESS (signing
# up is cheap: without it one address's users took every slot), and all sockets together leave 8
# threads for the API; past any limit a socket is closed at once with 1013 (try again later), and
# the page reads the orders itself and reconnects later, as after any close. (Idle, 200 sockets on
# two processes cost them 5.6% of a core, mostly the sockets' rechecks of the table, and 2 Redis
# connections: README.)
SOCKETS_PER_USER = 5
SOCKETS_PER_PROCESS = 192
# A page that vanished without closing (a laptop asleep, a network gone) must not keep its thread
# and its slot until TCP gives up, hours on: the kernel probes a socket quiet this long, drops it
# after three probes unanswered 10 s apart, and the stream then ends. (Not simple_websocket's own
# pings, its ping_interval: its reader thread can fail on a socket closed at once, as a refused
# one is. The stream's own pings find a page gone sooner: SOCKET_PONG_SECONDS.)
SOCKET_KEEPALIVE_IDLE_SECONDS = 30
# Keepalive probes only a quiet connection: once a notification has been sent to a page that has
# gone, the kernel retransmits it instead, for about 15 minutes (tcp_retries2). A connection whose
# data has gone unacknowledged this long is dropped too: the same minute as the probes'.
SOCKET_UNACKNOWLEDGED_MS = (SOCKET_KEEPALIVE_IDLE_SECONDS + 3 * 10) * 1000
# A socket sends its page a WebSocket ping (ping_the_page) this often, whatever else it sends
# (PingSchedule): a proxy in front (nginx's proxy_read_timeout, an AWS ALB's idle timeout: 60 s
# each by default) closes a connection whose server has said nothing for a while, and every quiet
# page reconnected each minute (a ticket, a handshake counted against its address, a read of the
# table). Less than SOCKET_KEEPALIVE_IDLE_SECONDS: a page's connection is then never quiet long
# enough to be probed, and one whose page has gone is closed once its ping has gone unanswered
# SOCKET_PONG_SECONDS, however many notifications it was sent meanwhile (a proxy acknowledges
# them itself).
SOCKET_PING_SECONDS = 25.0
# A page that has not answered a ping with a pong this long is taken for gone, and its socket
# closed (PING_UNANSWERED), freeing its thread, its slot and its subscription: within 37 s of the
# ping it last answered where the stream's loop turns each SOCKET_DRAIN_SECONDS (the next ping
# 25 s on, at the turn that comes to it, 10 s for its pong, the turn that finds it unanswered);
# within 35 s and three of its turns where the process is loaded and its turns longer (one late
# look a ping is excused: PingSchedule), however long the load lasts; the time the process was
# stopped (SIGSTOP, a VM frozen: a wait for a wake-up overrunning its second and slack) not
# counted. Before, only TCP ended it: SOCKET_UNACKNOWLEDGED_MS after the ping (85 s) on a
# direct connection, and behind a proxy or load balancer, which acknowledges what the gateway
# sends itself, not until the proxy's own connection to the page failed (its kernel
# retransmitting for some 15 minutes).
# A browser answers a ping as it arrives, in its network code (a hidden tab's too: no page code
# runs for it), a round trip, well under a second; 10 s leaves a slow or lossy mobile link the
# retransmissions of a ping or pong lost three times over (TCP doubles each wait: on such a link
# about 1 s, then 2, then 4). Less than SOCKET_PING_SECONDS: one ping is awaited at a time.
SOCKET_PONG_SECONDS = 10.0
# The page sends nothing on its socket: a message over this many characters (bytes, if binary),
# in one frame or several, closes it (1009: simple_websocket counts them), and what arrives is
# dropped as it arrives, never kept (drop_what_the_page_sends).
SOCKET_MAX_MESSAGE_BYTES = 1024
# How long a page has, once its socket is closed by the gateway, to answer the close before its
# connection is shut down (end_the_socket), holding the socket's server thread and its reader
# meanwhile. A browser answers as the close arrives, a round trip; one slower still has had the
# close, code and reason, before the shutdown, which comes after it on the connection (a close
# answered late meets a connection gone: RFC 6455 7.1.1 has the server end TCP first anyway).
SOCKET_CLOSE_ANSWER_SECONDS = 0.5
# How long end_the_socket waits, once it has shut the connection down, for simple_websocket's
# reader to end (it closes the socket as it does, at once: its recv() returns). Bounded all the
# same: the server thread is not to be held by it.
SOCKET_READER_END_SECONDS = 2.0
SOCKET_PATH = "/api/notifications/ws"
# How a socket is closed when Redis or the database fails it: the page reconnects.
UNAVAILABLE = (1011, "notifications unavailable; reconnect")
# How a socket is closed when opening it failed for a fault of the gateway's (logged, its message
# never sent: it may say what only the gateway should know). The page reconnects.
FAILED = (1011, "internal error; reconnect")
# How a socket is closed when its gateway process stops, told to (a deploy, a restart) or by
# itself (its worker's max_requests served): at the stream loop's next turn (a quiet socket's
# within SOCKET_DRAIN_SECONDS), where the process would wait for it to gunicorn's graceful_timeout
# and then drop it unclosed. The page reconnects at once, to a process that is not stopping.
RESTARTING = (1012, "the gateway is restarting; reconnect")
# How a socket is closed when its page has left a ping unanswered SOCKET_PONG_SECONDS: a page
# gone never reads it, and one still there (its pong held up on the way) reconnects, as after a
# 1011 for Redis lost.
PING_UNANSWERED = (1011, "ping unanswered; reconnect")
SOCKET_ENDPOINT = "notifications_socket"

blueprint = Blueprint("notifications", __name__, url_prefix="/api/notifications",
                      description="What happened to the signed-in user's orders",
                      errors=SIGNED_IN_ERRORS)


# --- receiving: the inbox handler ----------------------------------------------------------------

def on_order_status_changes(session: Session, events: list[ReceivedEvent]) -> None:
    """Keep the notifications (one INSERT for the run; a message seen before is kept once), then
    publish the new ones once the transaction has committed."""
    # The payload in its wire form, whatever form the inbox stored it in (a parked payload
    # replayed is kept as it was sent): a page gets one form of each event type.
    rows = {str(event.message.message_id): (event.payload["user_id"], event.message.type,
                                            event.wire_payload())
            for event in events}
    with driver_cursor(session) as cursor:
        cursor.execute(_LOCK_USERS, {"user_ids": [user for user, _, _ in rows.values()]})
        stored = execute_values(
            cursor, _KEEP_NOTIFICATIONS,
            [(user_id, message_id, event_type, Json(payload, dumps=dumps_exact))
             for message_id, (user_id, event_type, payload) in rows.items()],
            page_size=len(rows), fetch=True)
    if not stored:
        return
    items = []
    for notification_id, message_id, created_at in sorted(stored):
        user_id, event_type, payload = rows[message_id]
        items.append((user_id, {"id": notification_id, "type": event_type, "payload": payload,
                                "created_at": created_at.isoformat()}))
    after_commit(session, lambda: _publish(items))


# The seed of the 64-bit hash of a user id that keys the user's lock (hashtextextended); an
# arbitrary constant (not 0: with 0, the hash's low 32 bits are hashtext's).
NOTIFICATIONS_LOCK_SEED = 0x0B0C
# The key of the lock of the user id in a column `user_id`: that hash with its top bit set, a
# single bigint. Negative, it is never the key of the shop's other bigint advisory locks, the
# migrations' (shared/migrations.py: MIGRATION_LOCK_KEY) and a relay leader's
# (shared/relay_leader.py), positive constants; and PostgreSQL keeps bigint keys apart from
# (int, int) ones, such as the orders' placing lock's (pg_locks: objsubid 1, not 2).
USER_LOCK_KEY = f"hashtextextended(user_id, {NOTIFICATIONS_LOCK_SEED}) | (1::bigint << 63)"
# Held until the transaction ends: another transaction adding the same user's notifications waits,
# and takes its ids (from the sequence, at its INSERT) after this one has committed. Taken in user
# order, the order in which the inbox hands a batch's messages over (by Kafka key, the user id,
# compared as PostgreSQL compares them), whether all at once or, after a failure, one by one: so a
# batch handled one by one and one handled at once do not wait for each other in a circle, as
# they did with the locks taken in the order of their keys (d078612). Two user ids share a lock
# only where their keys are equal, and then batches of users [A, B] and [B, C], A and C sharing
# one, take it first and last and can each wait for the other's: PostgreSQL ends that
# (DeadlockDetected) and the inbox tries the failed messages again; taking the keys in their own
# order would end it only to bring back the far likelier circle above. Keyed by a 32-bit hash
# (hashtext) before, a million users held a hundred such pairs; by 63 bits, the chance that any
# two of a million share a key is one in 18 million.
# The release before keyed the locks (0x0B0C, hashtext(user_id)), an (int, int) key: its locks and
# these do not exclude each other. While gateway workers of both releases run (a rolling deploy),
# one of each can add a user's notifications at once, and the two can commit out of the order of
# their ids: a page sent the later one first (by its socket, or a catch-up) goes on `after` it and
# never gets the earlier, showing that order's status as it was until it reads its orders again
# (a reload, its socket closed). README: Upgrading to the release that keys the notification
# locks by 64 bits.
_LOCK_USERS = f"""
SELECT pg_advisory_xact_lock({USER_LOCK_KEY})
FROM (SELECT DISTINCT user_id FROM unnest(%(user_ids)s::text[]) AS user_id
      ORDER BY user_id) AS users"""
# On the driver, as every statement an order passes through (shared.db.driver_cursor).
_KEEP_NOTIFICATIONS = """
INSERT INTO notifications (user_id, message_id, type, payload) VALUES %s
ON CONFLICT (message_id) DO NOTHING
RETURNING id, message_id::text, created_at"""


def _publish(items: list[tuple[str, dict]]) -> None:
    """Publish each (user id, notification) to its user's channel, oldest first, in one round
    trip."""
    publish([(user_id, dumps_exact(item)) for user_id, item in items],
            what=f"{len(items)} notifications")


MESSAGE_HANDLERS: dict[str, Handler] = {ORDER_STATUS_CHANGED: on_order_status_changes}


# --- catching up over HTTP ------------------------------------------------------------------------

class NotificationQuerySchema(Schema):
    class Meta:
        unknown = RAISE

    after = WholeNumber(load_default=0, validate=validate.Range(min=0),
                        metadata=NOTIFICATION_ID_FORMAT)
    limit = WholeNumber(load_default=100, validate=validate.Range(min=1, max=REPLAY_LIMIT))


class NewestNotificationSchema(Schema):
    id = fields.Integer(required=True, metadata={
        **NOTIFICATION_ID_FORMAT,
        "description": "The newest notification's id, 0 for none (one pruned since counts: a "
                       "page going on after it is not told that it missed notifications)"})


@dataclasses.dataclass(frozen=True)
class CatchUp:
    """A page of a user's notifications after an id, oldest first, and the newest id of theirs
    that retention pruned after that id (`missed_through`, None when none was): those, the
    reader of the page never gets."""

    items: list[dict]
    missed_through: int | None


def _pruned_through(user_id: str):
    """The user's prune mark (NotificationPruneMark), NULL for none, as a scalar subquery."""
    return (select(NotificationPruneMark.pruned_through)
            .where(NotificationPruneMark.user_id == user_id).scalar_subquery())


def catch_up(user_id: str, after: int, limit: int) -> CatchUp:
    """The user's notifications after `after`, `limit` at most, and whether some after it were
    pruned. Ids are not dense (a transaction rolled back takes ids it never keeps), so a gap is
    told by the ids pruned (the user's prune mark), never by the kept ones' numbers. The mark
    is read in the statement that reads the page, as of one snapshot: a prune committed between
    two reads would have left a page short with a mark read before it. (With no page, it is read
    after: a user's notification newer than `after` committed and pruned since the first read
    would be one made 30 days ago.)"""
    rows = db.session.execute(
        select(Notification, _pruned_through(user_id))
        .where(Notification.user_id == user_id, Notification.id > after)
        .order_by(Notification.id)
        .limit(limit)
    ).all()
    mark = rows[0][1] if rows else db.session.scalar(select(_pruned_through(user_id)))
    return CatchUp(items=[row.to_json() for row, _ in rows],
                   missed_through=mark if mark is not None and mark > after else None)


def notifications_after(user_id: str, after: int, limit: int) -> list[dict]:
    """The user's notifications after `after`, `limit` at most, oldest first."""
    return catch_up(user_id, after, limit).items


@blueprint.get("")
@blueprint.arguments(NotificationQuerySchema, location="query")
@blueprint.response(200, NOTIFICATION_PAGE)  # (notification_document.py)
def list_notifications(args):
    """Notifications newer than `after`, oldest first (what a page missed while away).

    A page holds `limit` of them at most (1–500, 100 unless given), and no cursor: for the next
    page, ask again with `after` the last one's `id`. A page of fewer than `limit` is the last,
    for now.

    `missed` is true when some of the user's notifications after `after` were pruned (kept 30
    days: NOTIFICATION_RETENTION_SECONDS) before they were read: the items are what is left, and
    a state built from notifications has skipped some. Read the whole state again (the orders,
    the balance), having read `GET /api/notifications/newest` first, and go on after its `id`.
    """
    page = catch_up(g.user_id, args["after"], args["limit"])
    # Written as the socket and the publish write them: a number in a payload (a replayed one's
    # amount of 10.50, say) as the number it is, where the app's JSON writes a Decimal as text.
    return current_app.response_class(
        dumps_exact({"items": page.items, "missed": page.missed_through is not None}),
        mimetype="application/json")


# Where a page goes on from the newest notification's id: everything after it (the operations
# named by their views: shared.operation_links).
AFTER_THE_NEWEST_LINKS = {
    "Socket": link(SOCKET_ENDPOINT, "The socket, sending every notification after this one",
                   after="$response.body#/id"),
    "Newer": link("list_notifications", "The notifications kept since this one",
                  after="$response.body#/id"),
}


@blueprint.get("/newest")
@blueprint.response(200, NewestNotificationSchema, links=AFTER_THE_NEWEST_LINKS)
def newest_notification():
    """The id of the newest notification (0 for none): a page reads it before it reads the
    orders, then asks the socket for everything `after` it, so no status change falls between
    the two reads however many notifications the user already has. One pruned since counts, as
    when all of the user's have been: going on after an older id, the page would be told, for
    ever, that it missed them."""
    return jsonify({"id": newest_notification_id(g.user_id)})


# --- the socket's tickets -------------------------------------------------------------------------

TICKETS_UNAVAILABLE = DocumentedError(
    503, "NOTIFICATIONS_UNAVAILABLE", "the gateway cannot reach Redis, which keeps the tickets "
    "(and which a socket needs too): read the orders meanwhile, and ask again later",
    headers=(RETRY_AFTER,))
HANDSHAKES_SPENT = DocumentedError(
    429, "SOCKET_HANDSHAKES_LIMITED", "the client's address has had its socket handshakes this "
    "minute: a socket opened now would be refused (429, which a browser cannot read); open it "
    "after Retry-After", headers=(RETRY_AFTER,))
# How long a page is asked to wait, Redis away, before it asks for a ticket again.
TICKETS_UNAVAILABLE_RETRY_AFTER = 5


class SocketTicketSchema(Schema):
    # (an answer: every field always sent)
    ticket = fields.String(required=True, metadata={
        "description": "Open the socket with it, once: `GET /api/notifications/ws?ticket=...`"})
    expires_in = fields.Integer(required=True, metadata={
        "description": f"whole seconds, rounded down: {TICKET_TTL_SECONDS} at most, less when "
                       "the token expires sooner (a token with less than a second left is "
                       "refused 401 TOKEN_EXPIRED)"})


TICKET_LINKS = {"Socket": link(SOCKET_ENDPOINT, "The socket, opened with this ticket, once",
                               ticket="$response.body#/ticket")}


@blueprint.post("/tickets")
@blueprint.arguments(EmptySchema, required=False)
@blueprint.response(201, SocketTicketSchema, description="A ticket for one notification socket",
                    links=TICKET_LINKS)
@blueprint.errors(HANDSHAKES_SPENT, TICKETS_UNAVAILABLE)
def socket_ticket(_args):
    """A ticket to open the notification socket with, once, within `expires_in` seconds, and only
    while this token stays signed in: so that the bearer token is never written in a URL (which
    proxies log). Counted against the user's rate limit as every request is; the socket opened
    with it is not counted again."""
    _refuse_a_ticket_its_handshake_would_be_refused()
    try:
        issued = issue_ticket(g.token)
    except TokenExpiresTooSoon:  # (expired since it was checked, or about to)
        raise BearerRefused(tokens.EXPIRED, TOKEN_EXPIRED.code) from None
    except redis.RedisError as exc:
        log.warning("no socket ticket for %s: Redis is unavailable: %s", g.user_id, exc)
        raise ApiError("Live notifications are unavailable just now; try again later.",
                       code=TICKETS_UNAVAILABLE.code, status=TICKETS_UNAVAILABLE.status,
                       headers={"Retry-After": str(TICKETS_UNAVAILABLE_RETRY_AFTER)}) from None
    return jsonify({"ticket": issued.ticket, "expires_in": issued.expires_in}), 201


def _refuse_a_ticket_its_handshake_would_be_refused() -> None:
    """A ticket is refused, 429 with Retry-After, while its client address has no socket
    handshake left this minute: the handshake would be answered 429, of which a browser learns
    only that its socket closed (1006), not how long to wait; this answer it reads. Nothing is
    counted (the handshake is), so a handshake can still be refused past a ticket given at once
    by another page at the same address."""
    wait = current_app.extensions[RATE_LIMITER].wait_when_spent(
        _handshakes_subject(),
        current_app.extensions["hseshop.settings"].gateway_socket_handshakes_per_address)
    if wait is not None:
        raise ApiError(f"Too many socket handshakes from your address; try again in {wait} s.",
                       code=HANDSHAKES_SPENT.code, status=HANDSHAKES_SPENT.status,
                       details={"retry_after": wait}, headers={"Retry-After": str(wait)})


# --- pushing over WebSocket -----------------------------------------------------------------------

class SocketSlots:
    """The open sockets of this process, per user, per client address and in all, within their
    limits."""

    def __init__(self, per_user: int, per_address: int, in_all: int):
        self._per_user, self._per_address, self._in_all = per_user, per_address, in_all
        self._users: Counter = Counter()
        self._addresses: Counter = Counter()
        self._lock = threading.Lock()

    def take(self, user_id: str, address: str) -> bool:
        """A slot for a socket of `user_id` from `address` (as ratelimit.client_address counts
        it), unless that would pass a limit."""
        with self._lock:
            if (self._users[user_id] >= self._per_user
                    or self._addresses[address] >= self._per_address
                    or self._users.total() >= self._in_all):
                return False
            self._users[user_id] += 1
            self._addresses[address] += 1
            return True

    def give_back(self, user_id: str, address: str) -> None:
        with self._lock:
            for held, key in ((self._users, user_id), (self._addresses, address)):
                held[key] -= 1
                if held[key] <= 0:
                    del held[key]


def register_socket(app, authenticate, redeem) -> None:
    """`GET /api/notifications/ws?ticket=...&after=<id>` (or `?access_token=...`, as clients of
    before open it): a WebSocket of the user's notifications. `redeem` takes a ticket
    (POST /api/notifications/tickets) for its token, `authenticate` a token. With `after`, first
    everything newer than that id, then each one live; without it, each one kept from the moment
    the handshake is answered. Where some after the id it goes on from were pruned, it sends
    notifications_missed (with the newest pruned's id) before the first it sends after them
    (once for them: its first message, or between two pages of a catch-up pruned as it was sent),
    and goes on after the newest pruned. The socket
    is closed with 1008 when the ticket or token is refused, when `after` is no notification id
    and when the token expires; with 1013 (try again later) past the user's rate limit or its
    socket limits, or its address's; with 1011 when Redis or the database fails it, or the
    gateway does (logged), or its page leaves a ping unanswered (SOCKET_PONG_SECONDS). A
    handshake past its address's limit of handshakes is answered 429
    instead, not upgraded."""
    app.config["SOCK_SERVER_OPTIONS"] = {"max_message_size": SOCKET_MAX_MESSAGE_BYTES}
    sock = Sock(app)
    slots = SocketSlots(SOCKETS_PER_USER,
                        app.extensions["hseshop.settings"].gateway_sockets_per_address,
                        SOCKETS_PER_PROCESS)

    @app.before_request
    def before_the_handshake() -> None:
        if request.path == SOCKET_PATH and isinstance(request.routing_exception,
                                                      (WebsocketMismatch, MethodNotAllowed)):
            # Routed nowhere: no handshake asked for (by any method), or a handshake by a method
            # the socket's rule has not (a POST, say). Not Flask's 405, which left the ticket
            # unspent: answered as any request here that is no handshake the socket can take.
            _spend_the_tickets_given(request.args)
            if _asks_for_a_websocket():
                raise _not_a_get()
            raise ApiError("This URL is a WebSocket: open it with a WebSocket handshake"
                           " (`Upgrade: websocket`).", code="WEBSOCKET_REQUIRED", status=426,
                           headers={UPGRADE: "websocket"})
        if request.endpoint == SOCKET_ENDPOINT:
            try:
                _refuse_a_handshake_we_cannot_take()
                _count_the_handshake_against_its_address()
            except ApiError:  # (a 400, a 426, the address's 429)
                _spend_the_tickets_given(request.args)
                raise
            g.socket_opening = _socket_opening(authenticate, redeem, request.args)

    @sock.route(SOCKET_PATH, endpoint=SOCKET_ENDPOINT)
    def notifications_socket(ws):
        try:
            _serve_socket(ws, g.socket_opening, slots, client_address())
        finally:
            end_the_socket(ws)
            request.environ[LOGGED_OUTCOME] = socket_outcome(ws)

    document_socket(app.extensions["hseshop.api"],
                    next(app.url_map.iter_rules(endpoint=SOCKET_ENDPOINT)),
                    SOCKET_MAX_MESSAGE_BYTES, SOCKET_PING_SECONDS, SOCKET_PONG_SECONDS)


def _serve_socket(ws, opening: SocketOpening, slots: SocketSlots, address: str) -> None:
    drop_what_the_page_sends(ws)
    try:
        drop_when_the_peer_vanishes(ws.sock)
    except OSError:  # the page closed it at once: simple_websocket's reader has closed it
        return
    if opening.refusal:
        _close(ws, *opening.refusal)
        return
    if not slots.take(opening.token.user_id, address):
        _close(ws, 1013, "too many open notification sockets; try again later")
        return
    try:
        stream_notifications(ws, opening.token, opening.after)
    finally:
        slots.give_back(opening.token.user_id, address)


def _close(ws, code: int | None = None, message: str | None = None) -> None:
    """Send the close, unless the socket is closed or its connection gone."""
    try:
        ws.close(reason=code, message=message)
    except (ConnectionClosed, OSError):
        pass
    else:  # (for the log: socket_outcome)
        if not hasattr(ws, "hseshop_closed_with"):
            ws.hseshop_closed_with = code or CloseReason.NORMAL_CLOSURE


def socket_outcome(ws) -> str:
    """What a socket's request line logs: its handshake's 101 (not the 200 of the response
    flask-sock returns once it has ended, never sent), and who closed it with what code, so that
    a socket refused after the upgrade (1008, 1013) is told from one served."""
    closed_with = getattr(ws, "hseshop_closed_with", None)
    if closed_with is not None:
        return f"101, closed {int(closed_with)} by the gateway"
    if ws.close_reason == CloseReason.NO_STATUS_RCVD:
        return "101, its connection gone without a close"
    return f"101, closed {int(ws.close_reason)} by the client"


def end_the_socket(ws) -> None:
    """Close the socket, if the stream has not, and end simple_websocket's reader thread with its
    connection. That thread waits in recv() for the page: a page that neither answers the close
    nor closes (a refused one, say) would hold it and the connection for ever, and closing the
    connection from this thread does not wake that recv(); shutting it down does.

    Returns once the reader has ended, and so closed the socket: the server (shared.
    gunicorn_worker) sees the connection closed as the request returns and counts it off. Had the
    reader closed it a moment later, the server would have taken it for one to close itself and
    left it in its poller, a stale entry under a number the kernel then gave the next connection
    (whose keep-alive the poller then refused: KeyError)."""
    _close(ws)
    ws.thread.join(SOCKET_CLOSE_ANSWER_SECONDS)
    if ws.thread.is_alive():
        try:
            ws.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        ws.thread.join(SOCKET_READER_END_SECONDS)


@dataclasses.dataclass(frozen=True)
class SocketOpening:
    """What a socket's handshake asked for, decided before it is answered: the token and the id
    to stream after, or the close code and reason to refuse it with once it is open."""

    token: tokens.VerifiedToken | None = None
    after: int = 0
    refusal: tuple[int, str] | None = None


# The socket's query parameters (gateway_app/socket_document.py), each taken once: given twice, it
# is refused as the API's routes refuse one (shared.http_api), not read first-value-wins.
SOCKET_PARAMETERS = ("ticket", "access_token", "after")


def _socket_opening(authenticate, redeem, args) -> SocketOpening:
    repeated = given_more_than_once(args, SOCKET_PARAMETERS)
    if repeated:
        _spend_the_tickets_given(args)
        return SocketOpening(refusal=(1008, f"`{repeated[0]}` given more than once"))
    if "ticket" in args and "access_token" in args:
        _spend_the_tickets_given(args)
        return SocketOpening(refusal=(1008, "give `ticket` or `access_token`, not both"))
    try:
        # (A ticket is taken before `after` is read: refused for it, it is spent all the same.)
        token = (redeem(args["ticket"]) if "ticket" in args
                 else authenticate(args.get("access_token", "")))
        after = _after_from(args)
    except RateLimited as exc:
        return SocketOpening(refusal=(1013, str(exc)[:120]))
    except SQLAlchemyError as exc:  # (asked whether the token has been signed out)
        log.warning("refused a notification socket: the database failed: %s", exc)
        return SocketOpening(refusal=UNAVAILABLE)
    except redis.RedisError as exc:  # (its ticket, asked for; the stream would need Redis too)
        log.warning("refused a notification socket: Redis failed: %s", exc)
        return SocketOpening(refusal=UNAVAILABLE)
    except (BearerRefused, UnknownTicket, NotANotificationId) as exc:
        return SocketOpening(refusal=(1008, str(exc)[:120]))
    except Exception:  # (a fault of the gateway's: no refusal of the page's socket)
        log.exception("could not open a notification socket")
        return SocketOpening(refusal=FAILED)
    if after is None:
        # "From now on" is from before the page is told its socket is open: whatever the page
        # causes once it is (an order placed) comes after this id, however late the stream starts.
        after = newest_notification_id(token.user_id)
    return SocketOpening(token=token, after=after)


def _spend_the_tickets_given(args) -> None:
    """The tickets of a handshake refused before one is redeemed, spent all the same: whoever has
    its URL (a proxy's access log) could otherwise open a socket with one for the rest of its
    TICKET_TTL_SECONDS. With Redis away, no ticket opens a socket anyway: the refusal is answered
    as it is."""
    try:
        spend_tickets(args.getlist("ticket"))
    except redis.RedisError as exc:
        log.warning("could not spend the tickets of a refused socket handshake: %s", exc)


def _refuse_a_handshake_we_cannot_take() -> None:
    """A WebSocket handshake the socket's code cannot take (RFC 6455 version 13, with its key, and
    one it can answer) is refused with the usual error body, where that code would fail with a
    500. (A request that asks for no upgrade at all is refused before: 426 WEBSOCKET_REQUIRED.)
    A handshake is a GET (RFC 6455, 4.1): a HEAD, which Flask routes with each GET, was upgraded
    and its socket opened (spending its ticket)."""
    if request.method != "GET":
        raise _not_a_get()
    if request.headers.get(SEC_WEBSOCKET_VERSION) != "13":
        raise ApiError("This gateway speaks WebSocket version 13.", code="WEBSOCKET_VERSION",
                       status=426, headers={UPGRADE: "websocket", SEC_WEBSOCKET_VERSION: "13"})
    if not request.headers.get("Sec-WebSocket-Key"):
        raise ApiError("The WebSocket handshake has no Sec-WebSocket-Key.",
                       code="BAD_WEBSOCKET_HANDSHAKE")
    if not _handshake_answered_in_memory(request.environ):
        raise ApiError("The WebSocket handshake cannot be answered (its Host header, say, or an "
                       "extension's parameters).", code="BAD_WEBSOCKET_HANDSHAKE")


def _not_a_get() -> ApiError:
    return ApiError("A WebSocket handshake is a GET.", code="BAD_WEBSOCKET_HANDSHAKE")


def _asks_for_a_websocket() -> bool:
    """Whether the request asks for a WebSocket (`Connection: Upgrade`, `Upgrade: websocket`), as
    the URL map's routing tells it."""
    return current_app.create_url_adapter(request).websocket


def _count_the_handshake_against_its_address() -> None:
    """Count the handshake against its client address's handshakes a minute
    (GATEWAY_SOCKET_HANDSHAKES_PER_ADDRESS), before its token is read: past them, a 429 with
    Retry-After, not upgraded. Each socket upgraded holds a server thread (and simple_websocket's
    reader) until it ends, a refused one until its close is answered or
    SOCKET_CLOSE_ANSWER_SECONDS pass: refused with 1008 after the upgrade, as a token that is no
    token is, a silent client's handshakes held as many threads as it sent, counted against no
    one. A 429 holds none; a browser reads no more of it than that its socket closed (1006), and
    its page reads the orders itself and reconnects later, as after any close (a page that asks for
    a ticket first is told the wait by the ticket's refusal: socket_ticket)."""
    current_app.extensions[RATE_LIMITER].check(
        _handshakes_subject(),
        limit=current_app.extensions["hseshop.settings"].gateway_socket_handshakes_per_address)


def _handshakes_subject() -> str:
    """What the request's client address's socket handshakes are counted under."""
    return f"socket-handshakes:{client_address()}"


def _handshake_answered_in_memory(environ) -> bool:
    """Answer the handshake as simple_websocket's Server will, with nothing sent: the request it
    rebuilds from the environ's headers, accepted with permessage-deflate. What that would fail on
    (a request without Host, a Host that is not ASCII, an extension parameter that is no number)
    fails here, before the socket's code, where it raises a 500."""
    rebuilt = b"GET / HTTP/1.1\r\n"
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            header = "-".join(part.capitalize() for part in key[5:].split("_"))
            rebuilt += f"{header}: {value}\r\n".encode()
    connection = WSConnection(ConnectionType.SERVER)
    try:
        connection.receive_data(rebuilt + b"\r\n")
        for event in connection.events():
            if isinstance(event, WebSocketRequest):
                connection.send(AcceptConnection(extensions=[PerMessageDeflate()]))
                return True
    except (ProtocolError, ValueError) as exc:  # (ValueError: an extension's bad parameter, say)
        log.info("refused a WebSocket handshake: %r", exc)
    return False


_AFTER = NotificationQuerySchema(only=("after",))


class NotANotificationId(ValueError):
    """A socket's `after` that is no notification id."""


def _after_from(args) -> int | None:
    """The socket's `after`, read as the HTTP catch-up reads it; None when not given."""
    if "after" not in args:
        return None
    try:
        return _AFTER.load({"after": args["after"]})["after"]
    except ValidationError:
        raise NotANotificationId("`after` must be a notification id: a whole number from 0 to"
                                 f" {INT64_MAX}") from None


class _DroppedOnArrival(list):
    """simple_websocket's buffer of the messages its reader thread has taken off the connection,
    keeping none: `receive` then finds it empty while the socket is open (None at once, with no
    wait) and raises ConnectionClosed once it has closed, as with a buffer emptied."""

    def append(self, message) -> None:
        pass


def drop_what_the_page_sends(ws) -> None:
    """Have the socket's reader thread drop each message the page sends as it arrives. The reader
    goes on reading while the stream is blocked in a send to a page that does not read (a page
    that reads a byte now and then acknowledges enough for TCP_USER_TIMEOUT never to end it):
    buffered for the stream to drop at its next turn, a page that sent while it read nothing made
    the process hold all it sent, some 500 MB in 8 s over loopback."""
    ws.input_buffer = _DroppedOnArrival()


def drop_when_the_peer_vanishes(connection: socket.socket) -> None:
    """TCP keepalive on a socket's connection, probing once it has been quiet a while, and a limit
    on how long what it sends may go unacknowledged."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux, as the shop runs; elsewhere the system's timing
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE,
                              SOCKET_KEEPALIVE_IDLE_SECONDS)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                              SOCKET_UNACKNOWLEDGED_MS)


def stream_notifications(ws, token: tokens.VerifiedToken, after: int) -> None:
    """Send the token's user's notifications after the id `after`, then each one live, until the
    page goes, or its token expires or is signed out (then closed with 1008: the page signs in
    again, then reconnects), or the process is told to stop (closed with 1012: RESTARTING), or
    the page leaves a ping unanswered SOCKET_PONG_SECONDS (closed with 1011: PING_UNANSWERED)."""
    user_id = token.user_id
    try:
        with channel_listener().listening(channel(user_id), SUBSCRIBE_TIMEOUT_SECONDS) as waiter:
            # The token, and then the table, are read at once once subscribed (a sign-out, or a
            # notification, committed before the subscription is not missed), then at each
            # wake-up (one may say that one of the user's tokens has been signed out), every
            # SOCKET_RECHECK_SECONDS, and before each page of a long catch-up.
            last_sent, woken, recheck_at = after, True, 0.0
            pings = PingSchedule(time.monotonic(), SOCKET_PING_SECONDS, SOCKET_PONG_SECONDS,
                                 SOCKET_DRAIN_SECONDS)
            while time.time() < token.expires_at:
                if stopping():
                    _close(ws, *RESTARTING)
                    return
                if woken or time.monotonic() >= recheck_at:
                    if is_signed_out(token):
                        _close(ws, 1008, SIGNED_OUT)
                        return
                    sent, more = _send_newer(ws, user_id, last_sent)
                    recheck_at = time.monotonic() + SOCKET_RECHECK_SECONDS
                    last_sent = sent
                    if more:  # the next page, once the token has been read again
                        woken = True
                        continue
                if pings.page_gone(time.monotonic(), ws.pong_received):
                    log.info("notification stream for %s ended: its page left a ping unanswered"
                             " %g s", user_id, SOCKET_PONG_SECONDS)
                    _close(ws, *PING_UNANSWERED)
                    return
                if pings.ping_due(time.monotonic()):
                    ping_the_page(ws)
                    pings.pinged(time.monotonic())
                # Raises ConnectionClosed once the page has gone (what it sends is never kept:
                # drop_what_the_page_sends).
                ws.receive(timeout=0)
                wait_began = time.monotonic()
                woken = waiter.wait(SOCKET_DRAIN_SECONDS)
                pings.waited(wait_began, time.monotonic())
        _close(ws, 1008, tokens.EXPIRED)
    except (ConnectionClosed, LocalProtocolError, OSError):
        # The page has gone (LocalProtocolError: its close crossed a send or ours; OSError: its
        # connection broke or went unacknowledged, TCP_USER_TIMEOUT, as a send waited).
        pass
    except (redis.RedisError, SQLAlchemyError) as exc:
        log.warning("notification stream for %s lost Redis or the database: %s", user_id, exc)
        _close(ws, *UNAVAILABLE)
    except Exception:
        # A mistake in the code: closed as any failure is. Left to go up, it would have Flask
        # answer a 500 on a connection that is a WebSocket since its 101.
        log.exception("notification stream for %s failed", user_id)
        _close(ws, *UNAVAILABLE)


def ping_the_page(ws) -> None:
    """Send the page a WebSocket ping, an empty control frame: a browser answers it with a pong by
    itself, and its page sees neither (the socket's messages are its notifications alone). Sent
    from the stream's thread, as its notifications and closes are, not by simple_websocket's
    ping_interval (its reader thread can fail on a socket closed at once, as a refused one is):
    that reader sends only its answers to the page's frames (a pong to a ping, the close to a
    close), as it does while notifications are sent, and wsproto compresses data frames alone
    (permessage-deflate), so a ping shares no state with a message but the connection's.

    That reader sets the socket's `pong_received` as a pong arrives (simple_websocket reads it
    for its ping_interval alone, which is off): cleared here before the ping goes, it says
    whether the page has answered since (stream_notifications: SOCKET_PONG_SECONDS)."""
    if not ws.connected:
        raise ConnectionClosed(ws.close_reason, ws.close_message)
    ws.pong_received = False
    ws.sock.send(ws.ws.send(Ping()))


def _send_newer(ws, user_id: str, last_sent: int) -> tuple[int, bool]:
    """Send a page (REPLAY_LIMIT) of the user's notifications after `last_sent`, oldest first,
    and before them notifications_missed where some after `last_sent` were pruned; returns the
    id the stream goes on after (the last sent, or the newest pruned if newer: told once), and
    whether there may be more. A long catch-up goes a page at a time, the token read again
    before each: sent to a page that reads slowly, it can take days, and the socket of a token
    signed out or expired meanwhile would have streamed on to the end of the table, whatever was
    kept as it went."""
    page = catch_up(user_id, last_sent, REPLAY_LIMIT)
    db.session.rollback()  # the socket stays open for long: hold no connection between reads
    if page.missed_through is not None:
        ws.send(dumps_exact(notifications_missed(page.missed_through)))
    for item in page.items:
        ws.send(dumps_exact(item))
        last_sent = item["id"]
    return max(last_sent, page.missed_through or 0), len(page.items) == REPLAY_LIMIT


def prune_old_notifications(session: Session, cutoff: datetime, limit: int) -> int:
    """Delete notifications kept since before `cutoff`, up to `limit` of the oldest; returns how
    many (the caller repeats, a transaction each, until fewer than `limit`). The oldest by id are
    the oldest kept (ids are taken as they are added): no index of when they were added is
    needed, and a run that reaches a newer one among them stops there. Each user's prune mark
    is moved on to the newest id of theirs deleted, in the same statement: a catch-up from
    before it is told that it missed some (catch_up)."""
    return session.execute(_PRUNE, {"cutoff": cutoff, "limit": limit}).scalar_one()


# The marks are written in user order, as their locks are taken: two runs at once (beat's next
# while one is slow) do not wait for each other in a circle. A mark never moves back.
_PRUNE = text("""
WITH pruned AS (
  DELETE FROM notifications
  WHERE id = ANY(ARRAY(SELECT id FROM notifications ORDER BY id LIMIT :limit))
    AND created_at < :cutoff
  RETURNING user_id, id),
marked AS (
  INSERT INTO notification_prune_marks (user_id, pruned_through)
  SELECT user_id, max(id) FROM pruned GROUP BY user_id ORDER BY user_id
  ON CONFLICT (user_id) DO UPDATE SET pruned_through = GREATEST(
    notification_prune_marks.pruned_through, EXCLUDED.pruned_through))
SELECT count(*) FROM pruned""")


def newest_notification_id(user_id: str) -> int:
    """The id of the user's newest notification, kept now or pruned (0 for none)."""
    newest = db.session.scalar(select(func.greatest(
        select(func.max(Notification.id)).where(Notification.user_id == user_id)
        .scalar_subquery(),
        _pruned_through(user_id))))
    db.session.rollback()
    return newest or 0
