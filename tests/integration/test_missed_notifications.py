"""A page that catches up from before notifications retention has pruned is told that it missed
some, over HTTP (`missed`) and on its socket (a NotificationsMissed message), by the ids
pruned (each user's prune mark), never by gaps among the ids kept: ids are not dense."""

from __future__ import annotations

import dataclasses
import json
import uuid

import pytest
from openapi_schema_validator import OAS30Validator, oas30_format_checker
from werkzeug.serving import make_server

import gateway_app
from bench.websocket_client import WebSocketClient
from gateway_app import notifications
from gateway_app.tokens import issue_token
from shared.app_closing import close_app
from shared.db import transaction
from tasks.retention import prune_notifications
from tasks.services import service_app
from tests.integration.test_gateway import _Served, _sign_up, _status_changes
from tests.integration.test_retention import _age

MISSED = "NotificationsMissed"


@pytest.fixture(scope="module")
def gateway(settings):
    """A gateway served on a loopback port (its socket handshakes not limited): its test client
    and its socket's ws:// base URL."""
    app = gateway_app.create_app(settings=dataclasses.replace(
        settings, gateway_socket_handshakes_per_address=1_000_000))
    served = _Served(make_server("127.0.0.1", 0, app, threaded=True))
    yield app.test_client(), served.url.replace("http://", "ws://")
    served.close()
    close_app(app)  # (a module's: see tests/conftest.py's apps_made_are_closed)


def _kept(user: str, count: int) -> list[int]:
    """`count` new notifications of `user`: their ids."""
    with service_app("gateway").app_context():
        with transaction() as session:
            notifications.on_order_status_changes(session, _status_changes(*[user] * count))
        return [item["id"] for item in notifications.notifications_after(user, 0, 1000)]


def _pruned_through(last: int) -> None:
    """Retention run with every notification up to the id `last` (anyone's) past it."""
    _age("gateway", "notifications", "id <= :last", {"last": last}, days=31)
    assert prune_notifications.apply(args=("gateway",)).get() >= 1


def _caught_up(client, auth: dict, after: int) -> dict:
    answer = client.get(f"/api/notifications?after={after}", headers=auth)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()


def _ids(page: dict) -> list[int]:
    return [item["id"] for item in page["items"]]


def test_a_catch_up_from_before_a_pruned_notification_is_told_it_missed_some(gateway):
    """Of a user's three notifications the first two are pruned: a catch-up after none of them,
    or after the first, is told `missed` with the third; one after the second (the newest
    pruned), or the third, is not. Another user's cursor is not told of this user's prunes."""
    client, _ = gateway
    user, auth = _sign_up(client)
    other, other_auth = _sign_up(client)
    first, second, third = _kept(user, 3)
    (others,) = _kept(other, 1)
    _pruned_through(second)

    told = {after: (_ids(page), page["missed"]) for after in (0, first, second, third)
            for page in [_caught_up(client, auth, after)]}
    assert told == {0: ([third], True), first: ([third], True), second: ([third], False),
                    third: ([], False)}
    page = _caught_up(client, other_auth, 0)
    assert (_ids(page), page["missed"]) == ([others], False)


def test_a_user_with_nothing_pruned_is_never_told_of_a_gap_in_the_ids(gateway):
    """Ids are taken from a sequence that a rolled-back transaction moves on too, and that other
    users share: a cursor whose next kept id is not its own plus one missed nothing."""
    client, _ = gateway
    user, auth = _sign_up(client)
    (first,) = _kept(user, 1)
    with service_app("gateway").app_context(), pytest.raises(RuntimeError):
        with transaction() as session:  # an id of the user's taken, and rolled back
            notifications.on_order_status_changes(session, _status_changes(user))
            raise RuntimeError("rolled back")
    _kept(f"user-{uuid.uuid4().hex[:10]}", 1)  # someone else's id in between
    second = _kept(user, 1)[-1]
    assert second > first + 2

    for after in (0, first):
        page = _caught_up(client, auth, after)
        assert (page["missed"], _ids(page)[-1]) == (False, second), after


def test_the_newest_id_counts_a_pruned_one_so_a_page_going_on_after_it_is_not_told_again(
        gateway):
    """All of a user's notifications pruned: the newest id a page reads before its orders is the
    newest pruned, not 0, after which nothing is missed (after 0 the page would be told, read its
    state again, and be told again, for ever)."""
    client, _ = gateway
    user, auth = _sign_up(client)
    ids = _kept(user, 2)
    _pruned_through(ids[-1])
    newest = client.get("/api/notifications/newest", headers=auth).get_json()["id"]
    assert newest == ids[-1]
    assert _caught_up(client, auth, newest) == {"items": [], "missed": False}
    assert _caught_up(client, auth, 0) == {"items": [], "missed": True}


def _socket(settings, base: str, user: str, after: int | None) -> WebSocketClient:
    token = issue_token(user, f"missed-{uuid.uuid4().hex[:8]}", settings.auth_token_secret,
                        settings.auth_token_ttl_seconds)
    query = f"access_token={token.access_token}" + ("" if after is None else f"&after={after}")
    return WebSocketClient.connect(f"{base}/api/notifications/ws?{query}")


def _received(socket: WebSocketClient) -> dict:
    return json.loads(socket.receive(timeout=10) or "null")


def _documented_socket_message(client, message: dict) -> bool:
    """Whether `message` holds to NotificationsMissed as the gateway's OpenAPI document gives it,
    one of the messages it says its socket sends (x-socket-messages)."""
    spec = client.get("/docs/openapi.json").get_json()
    (socket_get,) = [path["get"] for path in spec["paths"].values()
                     if "x-socket-messages" in path.get("get", {})]
    missed = {"$ref": f"#/components/schemas/{MISSED}"}
    return missed in socket_get["x-socket-messages"]["oneOf"] and OAS30Validator(
        {**missed, "components": spec["components"]},
        format_checker=oas30_format_checker).is_valid(message)


def test_a_socket_resumed_from_before_a_pruned_notification_is_told_first_then_goes_on(
        settings, gateway):
    """A socket opened `after` the first of three notifications, the first two pruned, sends
    NotificationsMissed through the second, then the third, then a new one live, told once;
    opened after the second, it sends the third at once; opened without `after`, for a user all
    of whose notifications were pruned, only what comes next."""
    client, base = gateway
    user = f"usr_{uuid.uuid4().hex[:16]}"
    first, second, third = _kept(user, 3)
    _pruned_through(second)

    told = _socket(settings, base, user, after=first)
    try:
        missed = _received(told)
        assert missed == {"type": MISSED, "through": second}  # the newest pruned
        assert _documented_socket_message(client, missed)
        assert _received(told)["id"] == third
        (live,) = _kept(user, 1)[-1:]
        assert _received(told)["id"] == live
    finally:
        told.close()
    at_the_mark = _socket(settings, base, user, after=second)
    try:
        assert _received(at_the_mark)["id"] == third
    finally:
        at_the_mark.close()

    emptied = f"usr_{uuid.uuid4().hex[:16]}"
    _pruned_through(_kept(emptied, 1)[-1])
    from_now = _socket(settings, base, emptied, after=None)
    try:
        (live,) = _kept(emptied, 1)
        assert _received(from_now)["id"] == live
    finally:
        from_now.close()
