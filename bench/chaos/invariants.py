"""Exactly once, checked in the databases once the shop has settled: every order it accepted is
final, paid once if FINISHED and never if CANCELLED, each notified once; every balance is what was
deposited less what was paid; no message is left owed or parked. And what the followed shoppers'
notification sockets sent, against what the gateway keeps for them: every notification owed."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from decimal import Decimal

from bench.chaos.followers import STOP_SECONDS, Delivery, Followers, NotificationFollower
from bench.chaos.load import Ledger, Shopper, Span
from bench.shop import FINAL_STATUSES, service_cursor, wait_until_idle
from devstack.stack import Stack
from shared.config import SERVICES

_LEFT_IN_INBOX = """SELECT message_id, topic, type, parked_at, last_error FROM inbox_messages
                    WHERE processed_at IS NULL OR parked_at IS NOT NULL"""
_LEFT_IN_OUTBOX = "SELECT id, topic, correlation_id, parked_at, last_error FROM outbox_messages"


def settle(stack: Stack, timeout: float) -> bool:
    """Wait until no service owes a message (bench.shop.wait_until_idle) and every order is final
    and notified with its status; False if not by `timeout` (the checks then say what is left).
    Idle is not enough: a status record may be in Kafka still, in no outbox or inbox, for as long
    as the gateway worker's group takes to rebalance after a kill (its session's seconds)."""
    deadline = time.monotonic() + timeout
    while wait_until_idle(stack, deadline - time.monotonic()):
        if _every_order_final_and_notified(stack):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return False


def _every_order_final_and_notified(stack: Stack) -> bool:
    with service_cursor(stack, "orders") as cursor:
        cursor.execute("SELECT id::text, status FROM orders")
        orders = set(cursor.fetchall())
    with service_cursor(stack, "gateway") as cursor:
        cursor.execute("SELECT payload->>'order_id', payload->>'status' FROM notifications")
        notified = set(cursor.fetchall())
    return all(status in FINAL_STATUSES for _id, status in orders) and orders <= notified


def check(stack: Stack, shoppers: list[Shopper], ledger: Ledger,
          database_crashes: Sequence[Span] = ()) -> tuple[list[str], Counter]:
    """Each invariant broken, as a line saying how; and the orders counted by status
    (`database_crashes`: requests_placed's)."""
    problems = _messages_left(stack)
    with service_cursor(stack, "orders") as cursor:
        cursor.execute("SELECT id::text, user_id, amount, status, description FROM orders")
        rows = cursor.fetchall()
        orders = {order_id: (user, amount, status) for order_id, user, amount, status, _ in rows}
        problems += requests_placed(ledger, {order_id: (user, amount, tag)
                                             for order_id, user, amount, _, tag in rows},
                                    database_crashes)
        # (An order answered under two keys would mean a key's stored answer was not its own.)
        cursor.execute("SELECT response_text::json->>'id', count(*) FROM idempotency_keys"
                       " WHERE endpoint = 'POST /orders' GROUP BY 1 HAVING count(*) > 1")
        problems += [f"order {order_id} stored under {n} keys" for order_id, n in cursor]
    with service_cursor(stack, "payments") as cursor:
        cursor.execute("SELECT order_id::text, user_id, amount, status FROM payments")
        payments = {row[0]: row[1:] for row in cursor.fetchall()}
        cursor.execute("SELECT user_id, balance FROM accounts")
        balances = dict(cursor.fetchall())
    with service_cursor(stack, "gateway") as cursor:
        cursor.execute("SELECT payload->>'order_id', payload->>'status', count(*)"
                       " FROM notifications GROUP BY 1, 2")
        notified = defaultdict(list)
        for order_id, status, n in cursor:
            notified[order_id] += [status] * n
    problems += _orders_and_payments(orders, payments, notified, ledger)
    problems += _balances(orders, payments, balances, shoppers, ledger)
    return problems, Counter(status for _user, _amount, status in orders.values())


def _messages_left(stack: Stack) -> list[str]:
    """Outbox rows not sent, inbox messages not handled or parked as unhandleable."""
    problems = []
    for service in SERVICES:
        with service_cursor(stack, service) as cursor:
            cursor.execute(_LEFT_IN_INBOX)
            problems += [f"{service} inbox left {row}" for row in cursor.fetchall()]
            cursor.execute(_LEFT_IN_OUTBOX)
            problems += [f"{service} outbox left {row}" for row in cursor.fetchall()]
    return problems


def requests_placed(ledger: Ledger, orders: dict[str, tuple[str, Decimal, str]],
                    database_crashes: Sequence[Span] = ()) -> list[str]:
    """Each order request (its tag the order's description) placed at most one order, of the user
    and amount it sent, the one its 202s named; an order no 202 named only by a request one of
    whose tries may have placed it unanswered (no answer, a 502 or 504, or a 503
    DATABASE_UNAVAILABLE as PostgreSQL crashed: one of `database_crashes`, from its kill until
    it answered again, the soak's, and failed as the order committed, shared.idempotency), never
    by one answered only another 503 (a DATABASE_UNAVAILABLE with no crash about among them) or
    a 4xx: a violation (Request.ambiguous)."""
    problems = []
    by_tag = defaultdict(list)
    for order_id, (user, amount, tag) in orders.items():
        by_tag[tag].append(order_id)
        request = ledger.requests.get(tag)
        if request is None:
            problems.append(f"order {order_id} ({user}, {amount}) of no request sent: {tag!r}")
        elif (user, amount) != (request.user, request.amount):
            problems.append(f"order {order_id} ({user}, {amount}) stored for request {tag}"
                            f" of ({request.user}, {request.amount})")
        elif order_id not in request.acknowledged and not request.ambiguous(database_crashes):
            problems.append(f"order {order_id} placed by request {tag}, never acknowledged"
                            f" and no try of it unanswered: {request.answers}")
    for tag, request in ledger.requests.items():
        placed = sorted(by_tag.get(tag, []))
        if len(placed) > 1 or len(request.acknowledged) > 1:
            problems.append(f"request {tag} of {request.user} placed orders {placed},"
                            f" acknowledged {sorted(request.acknowledged)}: {request.answers}")
        problems += [f"order {order_id} acknowledged to request {tag} stored as another's"
                     for order_id in request.acknowledged - set(placed) if order_id in orders]
    return problems


def _orders_and_payments(orders: dict, payments: dict, notified: dict, ledger: Ledger
                         ) -> list[str]:
    problems = []
    for order_id, (user, amount) in ledger.accepted.items():
        if order_id not in orders:
            problems.append(f"accepted order {order_id} ({user}, {amount}) not stored")
    for order_id, (user, amount, status) in orders.items():
        payment = payments.get(order_id)
        paid = payment is not None and payment[2] == "SUCCEEDED"
        if status not in FINAL_STATUSES:
            problems.append(f"order {order_id} {status}, not final")
        elif status == "FINISHED" and not paid:
            problems.append(f"FINISHED order {order_id} not paid: {payment}")
        elif status == "CANCELLED" and paid:
            problems.append(f"CANCELLED order {order_id} ({user}, {amount}) paid: {payment}")
        if payment is not None and payment[:2] != (user, amount):
            problems.append(f"payment {payment} of order {order_id} not its ({user}, {amount})")
        if notified.get(order_id, []) != [status]:
            problems.append(f"order {order_id} {status} notified {notified.get(order_id, [])}")
    problems += [f"payment {payment} of no order {order_id}"
                 for order_id, payment in payments.items() if order_id not in orders]
    return problems


def _balances(orders: dict, payments: dict, balances: dict, shoppers: list[Shopper],
              ledger: Ledger) -> list[str]:
    """Each shopper's balance is what they deposited less their FINISHED orders, which is less
    what they were debited. Deposited as confirmed: each deposit the load left unconfirmed was
    sent again after the run if the shop settled, and in time (Load.resolve_unconfirmed_deposits),
    and one still unconfirmed is a violation of its own."""
    finished, debited = defaultdict(Decimal), defaultdict(Decimal)
    for user, amount, status in orders.values():
        if status == "FINISHED":
            finished[user] += amount
    for user, amount, status in payments.values():
        if status == "SUCCEEDED":
            debited[user] += amount
    problems = [f"deposit of {deposit.amount} for {deposit.shopper.user_id} (key {deposit.key},"
                f" {deposit.via}) unconfirmed after the run: {deposit.last_answer}"
                for deposit in ledger.unconfirmed_deposits]
    for shopper in shoppers:
        user = shopper.user_id
        balance, deposited = balances.get(user), ledger.deposited[user]
        if balance is None and deposited == 0 and not debited[user]:
            continue  # a late shopper whose account the run's end came before
        if balance != deposited - finished[user] or balance != deposited - debited[user]:
            problems.append(
                f"{user}'s balance {balance} is not deposited {deposited} less FINISHED"
                f" {finished[user]} (debited {debited[user]})")
        if balance is not None and balance < 0:
            problems.append(f"{user}'s balance {balance} is below zero")
    return problems


def sockets_caught_up(stack: Stack, followers: Followers, timeout: float) -> list[str]:
    """Once the shop has settled: give the followed shoppers' sockets up to `timeout` to send
    every notification kept for them (an open socket reads the table every 5 s, one closed
    reconnects and catches up `after` the last id it saw), stop them, and check what they sent
    (socket_deliveries)."""
    users = [follower.user_id for follower in followers.followers]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kept = kept_notifications(stack, users)
        if all(not _missed(follower, kept) for follower in followers.followers):
            break
        time.sleep(0.25)
    stuck = followers.stop()
    kept = kept_notifications(stack, users)
    return [f"{user}'s notification follower did not stop within {STOP_SECONDS:.0f} s (held in a"
            " request or a handshake past their timeouts)" for user in stuck] + [
        problem for follower in followers.followers
        for problem in socket_deliveries(follower, kept)]


def kept_notifications(stack: Stack, users: list[str]) -> dict[int, Delivery]:
    """The notifications the gateway keeps for `users`, by id."""
    with service_cursor(stack, "gateway") as cursor:
        cursor.execute("SELECT id, user_id, payload->>'order_id', payload->>'status'"
                       " FROM notifications WHERE user_id = ANY(%s)", (users,))
        return {row[0]: Delivery(*row) for row in cursor.fetchall()}


def socket_deliveries(follower: NotificationFollower, kept: dict[int, Delivery]) -> list[str]:
    """What the gateway promises a page's socket (README, Live updates): each socket sends the
    user's notifications, that user's only, as kept, in id order, each after the id it was opened
    `after`; and a page that reads the newest id first and opens each socket after the last id it
    saw is sent every notification kept after that newest id, live or as it catches up (a
    publish lost makes one late, not missing). `kept`: the notifications kept for the followed
    users, by id, read once the sockets have had their time."""
    user = follower.user_id
    if follower.started_after is None:
        return [f"{user}'s notifications never followed: the newest id never read"]
    problems = []
    for n, run in enumerate(follower.sockets):
        ids = [item.id for item in run.received]
        if any(later <= earlier for earlier, later in zip([run.after, *ids], ids)):
            problems.append(f"{user}'s socket {n}, opened after {run.after}, sent {ids}:"
                            " not in id order after it")
        for item in run.received:
            if item.user_id != user:
                problems.append(f"{user}'s socket {n} sent another user's notification {item}")
            elif kept.get(item.id) != item:
                problems.append(f"{user}'s socket {n} sent {item}, kept as {kept.get(item.id)}")
    ended = follower.sockets[-1].ended if follower.sockets else None
    problems += [f"notification {item.id} of {user} (order {item.order_id} {item.status}) never"
                 f" reached its sockets: last id seen {follower.last_seen()},"
                 f" {len(follower.sockets)} opened, the last ended {ended}"
                 for item in _missed(follower, kept)]
    return problems


def _missed(follower: NotificationFollower, kept: dict[int, Delivery]) -> list[Delivery]:
    """The notifications kept for the follower's user after the newest id it read first that no
    socket of its sent."""
    if follower.started_after is None:
        return []
    received = follower.received_ids()
    return [item for item_id, item in sorted(kept.items())
            if item.user_id == follower.user_id and item_id > follower.started_after
            and item_id not in received]
