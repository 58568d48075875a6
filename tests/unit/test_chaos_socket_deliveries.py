"""The chaos soak's check of what the followed shoppers' notification sockets sent
(bench/chaos/invariants.py: socket_deliveries), on crafted sockets and kept notifications: a
notification kept but never sent, one sent out of order, twice or someone else's, is found; one
sent late, by a socket that caught up after a reconnect, is none."""

from __future__ import annotations

import random

from bench.chaos.followers import Delivery, NotificationFollower, SocketRun
from bench.chaos.invariants import socket_deliveries
from bench.chaos.load import Shopper


def _kept(user: str, *ids: int, status: str = "FINISHED") -> dict[int, Delivery]:
    return {n: Delivery(n, user, f"order-{n}", status) for n in ids}


def _follower(user: str, started_after: int | None, *sockets: SocketRun) -> NotificationFollower:
    shopper = Shopper(user, "token", f"shopper-{user}", "a long password")
    follower = NotificationFollower("http://gateway", shopper, random.Random(1))
    follower.started_after = started_after
    follower.sockets = list(sockets)
    return follower


def _socket(after: int, kept: dict[int, Delivery], *ids: int, ended=1011) -> SocketRun:
    return SocketRun(after, [kept[n] for n in ids], ended)


def test_every_notification_sent_live_or_caught_up_after_a_reconnect_is_no_violation():
    """The first socket closed 1011 (Redis restarted) after 3; the next, opened after 3, sent 4
    and 5 as it caught up, then 6 live. Another user's 7, and 1 (kept before the newest id was
    read), are owed to no socket of this user."""
    kept = {**_kept("u1", 1, 2, 3, 4, 5, 6), **_kept("u2", 7)}
    follower = _follower("u1", 1, _socket(1, kept, 2, 3), _socket(3, kept, 4, 5, 6,
                                                                   ended="stopped"))
    assert socket_deliveries(follower, kept) == []


def test_a_notification_kept_but_never_sent_is_a_violation():
    """Kept while the user's socket was away (the gateway's subscription lost with Redis), and
    not sent by the socket that reconnected after it: missing, where the contract says late."""
    kept = _kept("u1", 1, 2, 3)
    follower = _follower("u1", 0, _socket(0, kept, 1), _socket(1, kept, 3, ended="stopped"))
    assert socket_deliveries(follower, kept) == [
        "notification 2 of u1 (order order-2 FINISHED) never reached its sockets: last id seen 3,"
        " 2 opened, the last ended stopped"]


def test_a_socket_sending_out_of_order_or_at_or_before_its_after_is_a_violation():
    kept = _kept("u1", 1, 2, 3)
    follower = _follower("u1", 0, _socket(0, kept, 1, 3, 2), _socket(3, kept, 3))
    problems = socket_deliveries(follower, kept)
    assert problems == ["u1's socket 0, opened after 0, sent [1, 3, 2]: not in id order after it",
                        "u1's socket 1, opened after 3, sent [3]: not in id order after it"]


def test_another_users_notification_or_one_sent_unlike_its_kept_self_is_a_violation():
    kept = {**_kept("u1", 1), **_kept("u2", 2)}
    stale = Delivery(1, "u1", "order-1", "NEW")  # (not the status kept)
    follower = _follower("u1", 0, SocketRun(0, [stale, kept[2]], "stopped"))
    assert socket_deliveries(follower, kept) == [
        f"u1's socket 0 sent {stale}, kept as {kept[1]}",
        f"u1's socket 0 sent another user's notification {kept[2]}"]


def test_a_follower_that_never_read_the_newest_id_is_a_violation():
    assert socket_deliveries(_follower("u1", None), _kept("u1", 1)) == [
        "u1's notifications never followed: the newest id never read"]
