"""Signing out (`POST /api/auth/logout`): the token is refused from then on by every gateway
instance, no other token is, and a gateway that cannot ask its database whether a token has been
signed out lets nobody through."""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid

import jwt
import psycopg2
import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import OperationalError
from werkzeug.datastructures import MultiDict

import gateway_app
from devstack.infra import free_port
from gateway_app import auth, notifications, sign_out
from gateway_app.models import SignedOutToken
from gateway_app.tokens import issue_token, verify_token
from shared.app_closing import close_app
from shared.db import db, driver_dsn
from tests.clock_tools import rate_limit_windows_the_test_ends_in
from tests.postgres_tools import sign_out_lookups

NEWEST = "/api/notifications/newest"  # a signed-in route the gateway answers itself


@pytest.fixture(scope="module")
def gateways(settings):
    """Two gateway instances on one database, as compose could run them."""
    clients = [gateway_app.create_app(settings=settings).test_client() for _ in range(2)]
    yield clients
    for client in clients:  # (a module's: see tests/conftest.py's apps_made_are_closed)
        close_app(client.application)


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _signed_in(client, username: str, register: bool) -> str:
    response = client.post(f"/api/auth/{'register' if register else 'login'}",
                           json={"username": username, "password": "correct horse"})
    assert response.status_code in (200, 201), response.get_json()
    return response.get_json()["access_token"]


def _error_code(response) -> str:
    return response.get_json()["error"]["code"]


def _kept(app, *tokens: str) -> int:
    """How many of `tokens` are kept as signed out (all of them, with none given)."""
    secret = app.extensions["hseshop.settings"].auth_token_secret
    with app.app_context():
        query = select(func.count()).select_from(SignedOutToken)
        if tokens:
            query = query.where(SignedOutToken.digest.in_(
                [verify_token(token, secret).digest for token in tokens]))
        return db.session.scalar(query)


def test_a_signed_out_token_is_refused_by_every_gateway_and_no_other_token_is(gateways):
    first, second = gateways
    username = f"leaver-{uuid.uuid4().hex[:8]}"
    leaving, staying = _signed_in(first, username, True), _signed_in(first, username, False)
    assert first.get(NEWEST, headers=_bearer(leaving)).status_code == 200

    signed_out = first.post("/api/auth/logout", headers=_bearer(leaving))
    assert (signed_out.status_code, signed_out.data) == (204, b"")

    for gateway in gateways:
        refused = gateway.get(NEWEST, headers=_bearer(leaving))
        assert (refused.status_code, _error_code(refused)) == (401, "TOKEN_SIGNED_OUT")
        assert gateway.get(NEWEST, headers=_bearer(staying)).status_code == 200
    again = second.post("/api/auth/logout", headers=_bearer(leaving))
    assert again.status_code == 204
    assert _kept(first.application, leaving, staying) == 1
    # The same token written another way that verifies too is the same token, and signed out.
    rewritten = first.get(NEWEST, headers=_bearer(leaving + "="))
    assert (rewritten.status_code, _error_code(rewritten)) == (401, "TOKEN_SIGNED_OUT")


def test_tokens_issued_in_one_second_are_signed_out_one_at_a_time(settings, gateways):
    """Two sign-ins of a user in the same second are two tokens, not one."""
    gateway, _ = gateways
    now, user_id = time.time(), f"usr_{uuid.uuid4().hex[:16]}"
    one, other = (issue_token(user_id, "twin", settings.auth_token_secret, 600,
                              now=now).access_token for _ in range(2))
    assert gateway.post("/api/auth/logout", headers=_bearer(one)).status_code == 204
    assert gateway.get(NEWEST, headers=_bearer(other)).status_code == 200


@pytest.mark.parametrize("authorization, code", [
    (None, "MISSING_TOKEN"), ("Bearer not-a-token", "INVALID_TOKEN"), ("expired", "TOKEN_EXPIRED"),
])
def test_signing_out_takes_only_a_token_the_gateway_would_take(settings, gateways,
                                                              authorization, code):
    gateway, _ = gateways
    if authorization == "expired":
        authorization = "Bearer " + issue_token(
            "usr_gone", "gone", settings.auth_token_secret, 60, now=time.time() - 3600).access_token
    headers = {"Authorization": authorization} if authorization else {}
    kept_before = _kept(gateway.application)
    refused = gateway.post("/api/auth/logout", headers=headers)
    assert (refused.status_code, _error_code(refused)) == (401, code)
    assert _kept(gateway.application) == kept_before


def test_a_gateway_that_cannot_ask_its_database_lets_no_token_through(settings):
    """Whether the token has been signed out cannot be known: 503, and the service is never
    called (a listener standing for it, over HTTP, is never connected to)."""
    with socket.create_server(("127.0.0.1", 0)) as service:
        service.setblocking(False)
        unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/gateway"
        gateway = gateway_app.create_app(settings=dataclasses.replace(
            settings, gateway_database_url=unreachable, gateway_upstream_transport="http",
            payments_service_url=f"http://127.0.0.1:{service.getsockname()[1]}")).test_client()
        token = issue_token("usr_someone", "someone", settings.auth_token_secret, 600)
        refused = gateway.get("/api/accounts/balance", headers=_bearer(token.access_token))
        assert (refused.status_code, _error_code(refused)) == (503, "DATABASE_UNAVAILABLE")
        with pytest.raises(BlockingIOError):
            service.accept()


def test_asking_whether_a_token_was_signed_out_waits_no_longer_than_its_limit(settings, gateways,
                                                                           monkeypatch):
    """Held up (the table locked, as a migration may), the lookup gives up after LOOKUP_LIMIT:
    503 DATABASE_BUSY, where the session's own limits would hold the request 2 s for the lock,
    30 s for a statement."""
    monkeypatch.setattr(sign_out, "LOOKUP_LIMIT", "200ms")
    gateway, _ = gateways
    token = issue_token("usr_someone", "someone", settings.auth_token_secret, 600).access_token
    locker = psycopg2.connect(driver_dsn(settings.database_url("gateway")))
    try:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE signed_out_tokens IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        busy = gateway.get(NEWEST, headers=_bearer(token))
        waited = time.monotonic() - started
    finally:
        locker.close()
    assert (busy.status_code, _error_code(busy)) == (503, "DATABASE_BUSY")
    # (Without its own limit the lookup waits the session's lock_timeout, 2 s, at the least; the
    # bound leaves the 0.2 s it is given here room for a slow machine.)
    assert waited < 1.75
    assert gateway.get(NEWEST, headers=_bearer(token)).status_code == 200  # the limits were its own
    # The connection of the lookup that failed is back in the pool as it was: in transactions,
    # with the session's limits.
    with gateway.application.app_context():
        engine = db.engine
    pooled = [engine.connect() for _ in range(engine.pool.checkedin())]
    try:
        for connection in pooled:
            assert connection.connection.dbapi_connection.autocommit is False
            assert connection.exec_driver_sql("SHOW lock_timeout").scalar() != "200ms"
    finally:
        for connection in pooled:
            connection.close()


def test_asking_whether_a_token_was_signed_out_is_one_round_trip_in_autocommit(settings,
                                                                            gateways):
    """The lookup and its limits go as one string in autocommit (no BEGIN, no ROLLBACK, no SET to
    put the connection back), and the connection goes back to the pool in transactions: the next
    request's writes are a transaction again."""
    gateway, _ = gateways
    engine = _engine_of(gateway.application)
    token = issue_token("usr_someone", "someone", settings.auth_token_secret, 600).access_token
    sent: list[tuple[str, bool]] = []

    def _executing(connection, cursor, statement, parameters, context, executemany):
        sent.append((statement, connection.connection.dbapi_connection.autocommit))

    event.listen(engine, "before_cursor_execute", _executing)
    try:
        assert gateway.get(NEWEST, headers=_bearer(token)).status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", _executing)
    lookups = [autocommit for statement, autocommit in sent if "signed_out_tokens" in statement]
    assert lookups == [True]
    pooled = [engine.connect() for _ in range(engine.pool.checkedin())]
    try:
        assert pooled and not any(c.connection.dbapi_connection.autocommit for c in pooled)
    finally:
        for connection in pooled:
            connection.close()


def test_a_socket_whose_token_cannot_be_checked_is_closed_for_the_page_to_reconnect():
    """Not refused as a bad token (1008, and the page would ask whether to sign in again): the
    database is away, and the page reconnects later (1011); opened with a ticket, whose token is
    asked about as it is redeemed, the same."""
    def database_away(token_or_ticket):
        raise OperationalError("SELECT", {}, Exception("the database went away"))

    for asked in ({"access_token": "anything"}, {"ticket": "anything"}):
        opening = notifications._socket_opening(database_away, database_away, MultiDict(asked))
        assert opening.refusal == notifications.UNAVAILABLE, asked


def test_signing_out_everywhere_refuses_every_token_of_the_user_issued_until_then(settings,
                                                                                gateways):
    """Two devices and a token issued before tokens had generations: one call refuses them all,
    on every gateway instance, and no other user's; signing in again gives a token that is
    taken."""
    first, second = gateways
    username = f"everywhere-{uuid.uuid4().hex[:8]}"
    phone, laptop = _signed_in(first, username, True), _signed_in(first, username, False)
    user_id = verify_token(phone, settings.auth_token_secret).user_id
    older = jwt.encode({"sub": user_id, "username": username, "iss": "hseshop-gateway",
                        "iat": int(time.time()), "exp": int(time.time()) + 600},
                       settings.auth_token_secret, algorithm="HS256")
    someone_else = _signed_in(first, f"bystander-{uuid.uuid4().hex[:8]}", True)
    assert first.get(NEWEST, headers=_bearer(older)).status_code == 200

    signed_out = second.post("/api/auth/logout/everywhere", headers=_bearer(phone))
    assert (signed_out.status_code, signed_out.data) == (204, b"")

    for gateway in gateways:
        for token in (phone, laptop, older):
            refused = gateway.get(NEWEST, headers=_bearer(token))
            assert (refused.status_code, _error_code(refused)) == (401, "TOKEN_SIGNED_OUT")
        assert gateway.get(NEWEST, headers=_bearer(someone_else)).status_code == 200
    again = second.post("/api/auth/logout/everywhere", headers=_bearer(laptop))
    assert (again.status_code, _error_code(again)) == (401, "TOKEN_SIGNED_OUT")
    fresh = _signed_in(second, username, False)
    assert first.get(NEWEST, headers=_bearer(fresh)).status_code == 200


def test_a_sign_in_whose_password_check_ends_after_signing_out_everywhere_gets_a_taken_token(
        settings, gateways, monkeypatch):
    """The user's generation of tokens moves on while the sign-in checks the password (as another
    request's commit would, in a session of its own): the token the sign-in gives is of the new
    generation, and taken."""
    first, _ = gateways
    username = f"racing-{uuid.uuid4().hex[:8]}"
    lost_phone = verify_token(_signed_in(first, username, True), settings.auth_token_secret)
    verify = auth.verify_password

    def checked_as_everywhere_commits(*args) -> bool:
        with first.application.app_context():
            sign_out.sign_out_everywhere(lost_phone)
        return verify(*args)

    monkeypatch.setattr(auth, "verify_password", checked_as_everywhere_commits)
    fresh = _signed_in(first, username, False)
    assert verify_token(fresh, settings.auth_token_secret).generation == lost_phone.generation + 1
    assert first.get(NEWEST, headers=_bearer(fresh)).status_code == 200


def _engine_of(app):
    with app.app_context():
        return db.engine


def _limited(settings, monkeypatch, per_minute: int):
    """A gateway instance on the shared database allowing each user `per_minute` requests (in
    windows the test ends in: its requests must not straddle two, as a minute's can)."""
    rate_limit_windows_the_test_ends_in(monkeypatch)
    return gateway_app.create_app(
        settings=dataclasses.replace(settings, rate_limit_per_minute=per_minute)).test_client()


def test_past_the_rate_limit_a_request_asks_the_database_nothing(settings, monkeypatch):
    """The limit comes before the lookup: a flood of requests past it holds none of the pool's
    connections (each one asking would: DATABASE_BUSY for everybody)."""
    gateway = _limited(settings, monkeypatch, per_minute=3)
    token = issue_token(f"usr_{uuid.uuid4().hex[:16]}", "flooder", settings.auth_token_secret,
                        600).access_token
    with sign_out_lookups(_engine_of(gateway.application)) as lookups:
        answers = [gateway.get(NEWEST, headers=_bearer(token)) for _ in range(10)]
    assert [answer.status_code for answer in answers] == [200] * 3 + [429] * 7
    assert {_error_code(answer) for answer in answers[3:]} == {"RATE_LIMITED"}
    assert len(lookups) == 3


@pytest.mark.parametrize("everywhere", [False, True], ids=["signed out", "everywhere"])
def test_a_signed_out_token_used_again_asks_the_database_once_per_process(
        settings, gateways, monkeypatch, everywhere):
    """Found signed out once, a token is remembered by the process that found it, and refused
    from then on with no lookup and without counting against its user's limit; the user's tokens
    that are taken still are (signed out everywhere: the one signed in after)."""
    signing_out, _ = gateways
    gateway = _limited(settings, monkeypatch, per_minute=3)
    username = f"remembered-{uuid.uuid4().hex[:8]}"
    leaving = _signed_in(signing_out, username, True)
    if everywhere:
        assert signing_out.post("/api/auth/logout/everywhere",
                                headers=_bearer(leaving)).status_code == 204
    else:
        staying = _signed_in(signing_out, username, False)
        assert signing_out.post("/api/auth/logout", headers=_bearer(leaving)).status_code == 204
    if everywhere:
        staying = _signed_in(signing_out, username, False)

    with sign_out_lookups(_engine_of(gateway.application)) as lookups:
        refused = [gateway.get(NEWEST, headers=_bearer(leaving)) for _ in range(20)]
        # Written another way, the same token: remembered too.
        refused.append(gateway.get(NEWEST, headers=_bearer(leaving + "=")))
    assert {(answer.status_code, _error_code(answer)) for answer in refused} == {
        (401, "TOKEN_SIGNED_OUT")}
    assert len(lookups) == 1
    # Twenty-one uses cost the user one request of their three at most.
    assert [gateway.get(NEWEST, headers=_bearer(staying)).status_code for _ in range(2)] == \
        [200, 200]
    # Another process (another instance) has not found it yet: it asks, once, as well.
    with sign_out_lookups(_engine_of(signing_out.application)) as lookups:
        for _ in range(3):
            assert signing_out.get(NEWEST, headers=_bearer(leaving)).status_code == 401
    assert len(lookups) == 1
