"""The two HTTP APIs in-process against real PostgreSQL: contracts, bad input, idempotency."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import hmac
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select, text

import gateway_app
import orders_app
import payments_app
import shared.db
import shared.health
from devstack.infra import free_port
from orders_app.models import Order
from payments_app.models import Account
from shared.cache import CACHE_EXTENSION
from shared.caller_deadline import DEADLINE_HEADER, deadline_headers
from shared.contracts import FAILURE_REASONS
from shared.db import db, transaction
from shared.idempotency import REPLAYED, REPLAYED_HEADER, IdempotencyKey
from shared.identity import CALL_THROUGH_THE_GATEWAY
from shared.internal_auth import identity_headers
from shared.kafka import broker_reachable
from shared.money import MAX_BALANCE
from shared.outbox.writing import OutboxMessage
from tests.environment import TEST_SECRETS
from tests.held_calls import first_call_held
from tests.network_tools import SilencingProxy
from tests.openapi_tools import (ERROR_SCHEMA, HEALTH, assert_default_error_described,
                                 assert_documented, assert_headers_documented, asked, codes_named,
                                 documented_answers, documented_errors, operations,
                                 responses_documenting, with_a_body_in_chunks)
from tests.postgres_tools import (account_row_held, commits_of_orders_taking, key_row_held,
                                  no_connection_free, second_waiting_on_the_first,
                                  terminate_backend, wait_for_other_sessions,
                                  wait_for_sessions_waiting_on_a_lock)
from tests.replay_tools import assert_only_the_repeat_said_replayed, replayed_responses
from tests.signed_requests import MALFORMED_DEADLINES
from tests.thread_tools import OutcomeThread, all_joined


@pytest.fixture
def orders_http(orders_flask_app):
    return orders_flask_app.test_client()


@pytest.fixture
def payments_http(payments_flask_app):
    return payments_flask_app.test_client()


def _assert_error(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] and error["message"]
    return error


def _order_writes(app, user_id) -> tuple[int, int]:
    with app.app_context():
        return (db.session.scalar(select(func.count()).where(Order.user_id == user_id)),
                db.session.scalar(select(func.count()).where(OutboxMessage.key == user_id)))


def test_placing_an_order_answers_202_with_the_new_order(orders_http, user_id):
    response = orders_http.post("/orders", json={"amount": 30, "description": "book"},
                                signed_as=user_id)
    assert response.status_code == 202
    order = response.get_json()
    assert order["status"] == "NEW" and order["amount"] == "30.00"
    assert order["user_id"] == user_id and order["description"] == "book"
    assert set(order) >= {"id", "created_at", "updated_at"}
    fetched = orders_http.get(f"/orders/{order['id']}", signed_as=user_id).get_json()
    assert fetched == order


def test_an_order_reads_back_in_utc_as_its_answer_gave_it(settings, user_id, monkeypatch):
    """Whatever time zone a session starts in (here PGTZ's; a server's own, an embedded one's
    taken from the host), an order's times come back in UTC, as POST answered them."""
    monkeypatch.setenv("PGTZ", "Europe/Moscow")
    shop = orders_app.create_app(settings=settings)
    try:
        client = shop.test_client()
        order = client.post("/orders", json={"amount": "30"}, signed_as=user_id).get_json()
        fetched = client.get(f"/orders/{order['id']}", signed_as=user_id).get_json()
        listed = client.get("/orders", signed_as=user_id).get_json()["items"]
    finally:
        with shop.app_context():
            db.engine.dispose()
    assert order["created_at"].endswith("+00:00")
    assert fetched == order and listed == [order]


BAD_ORDER_BODIES = [
    ("not json", "text/plain", (415,)),
    ('{"amount": 1}', "text/plain", (415,)),
    ("amount=1", "application/x-www-form-urlencoded", (415,)),
    ('{"amount": 1}', None, (415,)),
    ("{broken", "application/json", (400,)),
    ('{"amount": NaN}', "application/json", (400,)),
    ('{"amount": Infinity}', "application/json", (400,)),
    ('{"amount": "NaN"}', "application/json", (422,)),
    ('{"amount": "Infinity"}', "application/json", (422,)),
    ('{"amount": -5}', "application/json", (422,)),
    ('{"amount": 0}', "application/json", (422,)),
    ('{"amount": 1.001}', "application/json", (422,)),
    ('{"amount": 1000000000.01}', "application/json", (422,)),
    ('{"amount": true}', "application/json", (422,)),
    ('{"amount": [1]}', "application/json", (422,)),
    ('{"amount": "ten"}', "application/json", (422,)),
    ('{"amount": 1, "description": 5}', "application/json", (422,)),
    ('{"amount": 1, "description": "' + "x" * 501 + '"}', "application/json", (422,)),
    ('{"amount": 1, "status": "FINISHED"}', "application/json", (422,)),
    ('{"description": "no amount"}', "application/json", (422,)),
    ("[1, 2]", "application/json", (422,)),
    ("null", "application/json", (422,)),
    ('"just a string"', "application/json", (422,)),
    # Valid JSON that PostgreSQL or UTF-8 cannot take, JSON nested too deep for the parser to
    # read, and numbers past what Python reads into an int or Decimal holds (valid JSON: 422).
    ('{"amount": 1, "description": "a\\u0000b"}', "application/json", (422,)),
    ('{"amount": 1, "description": "\\udc80"}', "application/json", (422,)),
    ("[" * 5000 + "]" * 5000, "application/json", (400,)),
    ('{"amount": ' + "1" * 5000 + "}", "application/json", (422,)),
    ('{"amount": 1e1000000000000000000}', "application/json", (422,)),
    ('{"amount": 1, "description": ' + "1" * 5000 + "}", "application/json", (422,)),
]

# Amounts that are valid JSON, each as the JSON sent, with what the answer says of it: huge and
# tiny exponents, and numbers past what Python reads into an int (4300 digits: a 400 "not valid
# JSON" before) or a Decimal holds (an exponent past 10**18 either way: a 400 as a number, "must
# be a number" as a string, before).
AMOUNTS_BEYOND_THE_READERS = [
    ("1e999999999", "must be at most 1000000000.00"),
    ('"1E+999999999"', "must be at most 1000000000.00"),
    ("1e-999999999", "must have at most 2 decimal places"),
    ("1" * 5000, "must be at most 1000000000.00"),
    ("-" + "1" * 5000, "must be greater than 0"),
    ('"' + "1" * 5000 + '"', "must be at most 1000000000.00"),
    ("1e1000000000000000000", "must be at most 1000000000.00"),
    ('"1e1000000000000000000"', "must be at most 1000000000.00"),
    ("1e" + "9" * 5000, "must be at most 1000000000.00"),
    ("-1e1000000000000000000", "must be greater than 0"),
    ("0e1000000000000000000", "must be greater than 0"),
    ("1e-1999999999999999999", "must have at most 2 decimal places"),
    ('"1e-1999999999999999999"', "must have at most 2 decimal places"),
]


@pytest.mark.parametrize("body, content_type, statuses", BAD_ORDER_BODIES)
def test_a_bad_order_gets_a_clear_4xx_and_writes_nothing(
        orders_http, orders_flask_app, user_id, body, content_type, statuses):
    response = orders_http.post("/orders", data=body, content_type=content_type,
                                signed_as=user_id)
    error = _assert_error(response, response.status_code)
    assert response.status_code in statuses, error
    assert _order_writes(orders_flask_app, user_id) == (0, 0)


@pytest.mark.parametrize("written, reason", AMOUNTS_BEYOND_THE_READERS)
def test_an_amount_past_what_int_or_decimal_reads_is_a_422_saying_what_is_wrong_with_it(
        orders_http, payments_http, orders_flask_app, user_id, written, reason):
    """By either service, which name the field and say why, as of any amount refused; and
    nothing is written (an order, its outbox row, a deposit)."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    body = f'{{"amount": {written}}}'
    for response in (
            orders_http.post("/orders", data=body, content_type="application/json",
                             signed_as=user_id),
            payments_http.post("/accounts/deposit", data=body, content_type="application/json",
                               signed_as=user_id)):
        error = _assert_error(response, 422)
        assert error["code"] == "VALIDATION_ERROR"
        assert error["details"] == {"json": {"amount": [reason]}}
    assert _order_writes(orders_flask_app, user_id) == (0, 0)
    balance = payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"]
    assert balance == "0.00"


def test_a_query_parameter_a_route_does_not_take_is_refused_and_writes_nothing(
        orders_http, payments_http, orders_flask_app, payments_flask_app, user_id):
    """Every route refuses what it does not know, as the README says: a query parameter on a
    route that takes none (`?amount=` beside the body, say) is a 422 naming it, before any work."""
    refused = [
        orders_http.post("/orders?amount=999", json={"amount": "1.00"}, signed_as=user_id),
        orders_http.get(f"/orders/{uuid.uuid4()}?expand=1", signed_as=user_id),
        payments_http.post("/accounts?x=1", json={}, signed_as=user_id),
        payments_http.post("/accounts/deposit?amount=5", json={"amount": "1.00"},
                           signed_as=user_id),
        payments_http.get("/accounts/balance?foo=1&amount=5", signed_as=user_id),
    ]
    for response in refused:
        error = _assert_error(response, 422)
        assert error["code"] == "VALIDATION_ERROR"
        assert "query" in error["details"], error
    assert error["details"]["query"] == {"foo": ["Unknown field."], "amount": ["Unknown field."]}
    assert _order_writes(orders_flask_app, user_id) == (0, 0)
    with payments_flask_app.app_context():
        assert db.session.scalar(select(func.count()).where(Account.user_id == user_id)) == 0
    # A route that takes query parameters holds them to its schema, as before.
    _assert_error(orders_http.get("/orders?limit=5&unknown=1", signed_as=user_id), 422)
    assert orders_http.get("/orders?limit=5", signed_as=user_id).status_code == 200


def test_a_method_a_route_does_not_take_is_a_405_that_says_which_it_does(orders_http,
                                                                         payments_http, user_id):
    """With the usual error body, and Allow as HTTP asks of a 405."""
    for response in (orders_http.put("/orders", signed_as=user_id),
                     payments_http.delete("/accounts/balance", signed_as=user_id)):
        error = _assert_error(response, 405)
        assert error["code"] == "METHOD_NOT_ALLOWED"
        assert response.content_type == "application/json"
    # In one order, whichever process answers (Werkzeug lists them from a set).
    assert orders_http.put("/orders").headers["Allow"] == "GET, HEAD, OPTIONS, POST"
    assert "GET" in response.headers["Allow"] and "DELETE" not in response.headers["Allow"]


@pytest.mark.parametrize("query, name", [
    ("limit=1&limit=x", "limit"), ("limit=x&limit=1", "limit"), ("limit=5&limit=5", "limit"),
    ("cursor=a&limit=5&cursor=b", "cursor")])
def test_a_query_parameter_given_more_than_once_is_a_422_naming_it(orders_http, user_id, query,
                                                                    name):
    """Ambiguous, whichever value comes first: not read first-value-wins (`?limit=1&limit=x` was
    a page of one, `?limit=x&limit=1` a 422), but refused as a query that does not hold to its
    schema is."""
    error = _assert_error(orders_http.get(f"/orders?{query}", signed_as=user_id), 422)
    assert error["code"] == "VALIDATION_ERROR"
    assert list(error["details"]["query"]) == [name]
    assert error["details"]["query"][name][-1] == "Given more than once."


@pytest.mark.parametrize("body, name", [
    ('{"amount": "1", "amount": "900"}', "amount"),
    ('{"amount": "900", "amount": "1"}', "amount"),
    ('{"amount": "5", "description": "a", "amount": "5"}', "amount"),
    ('{"description": "a", "amount": "5", "description": "b"}', "description")])
def test_a_body_giving_a_name_more_than_once_is_a_422_naming_it_and_writes_nothing(
        orders_http, orders_flask_app, payments_http, user_id, body, name):
    """Ambiguous as a query parameter given twice is, whichever value comes first: read
    last-name-wins (`{"amount": "1", "amount": "900"}` an order of 900.00), where another JSON
    reader on its way may read the first; refused alike, with whatever else is wrong."""
    error = _assert_error(orders_http.post("/orders", data=body, content_type="application/json",
                                           signed_as=user_id), 422)
    assert error["code"] == "VALIDATION_ERROR"
    assert error["details"] == {"json": {name: ["Given more than once."]}}
    assert _order_writes(orders_flask_app, user_id) == (0, 0)
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    error = _assert_error(payments_http.post("/accounts/deposit", data=body.replace(
        name, "amount"), content_type="application/json", signed_as=user_id), 422)
    assert error["details"]["json"]["amount"][-1] == "Given more than once."
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == (
        "0.00")


@pytest.mark.parametrize("body, details", [
    ('{"amount": "1", "amount": "2", "x": 1}',
     {"amount": ["Given more than once."], "x": ["Unknown field."]}),
    # (beside what is wrong with the field itself, not in its place)
    ('{"amount": "abc", "description": "a", "amount": "x"}',
     {"amount": ["must be a number or a numeric string", "Given more than once."]}),
    ('{"amount": "1", "description": "a", "x": 1, "x": 2}',
     {"x": ["Unknown field.", "Given more than once."]}),
    ('[{"a": 1, "a": 2}]', {"_schema": ["Invalid input type."], "0.a": ["Given more than once."]}),
    # (a name with a dot in it repeated, and the same path repeated within: said once)
    ('{"amount": "1", "a.b": 1, "a.b": 2, "a": {"b": 1, "b": 2}}',
     {"a.b": ["Unknown field.", "Given more than once."], "a": ["Unknown field."]}),
    # (a name given three times, and the same path twice: each named once and counted once
    # toward the first ten named, where the path met again took the tenth's place)
    ('{"amount": "1", "amount": "2", "amount": "3", "l": [{"a.b": 1, "a.b": 1, "a": {"b": 1,'
     ' "b": 1}}, {' + ", ".join(f'"n{index}": 1, "n{index}": 1' for index in range(9)) + "}]}",
     {"amount": ["Given more than once."], "l": ["Unknown field."],
      "l.0.a.b": ["Given more than once."]}
     | {f"l.1.n{index}": ["Given more than once."] for index in range(8)})])
def test_a_name_given_twice_in_a_body_is_refused_with_whatever_else_is_wrong_with_it(
        orders_http, user_id, body, details):
    response = orders_http.post("/orders", data=body, content_type="application/json",
                                signed_as=user_id)
    assert _assert_error(response, 422)["details"] == {"json": details}


@pytest.mark.parametrize("body, details", [
    ('{"amount": "5", "description": {"amount": 1, "amount": 2}}',
     {"description": ["Not a valid string."], "description.amount": ["Given more than once."]}),
    ('{"amount": "5", "description": [{"a": 1}, {"b": {"c": 1, "c": 2}}]}',
     {"description": ["Not a valid string."], "description.1.b.c": ["Given more than once."]})])
def test_a_name_given_twice_in_a_nested_object_is_named_at_its_path(
        orders_http, orders_flask_app, user_id, body, details):
    """Not as the top level's field of that name (`amount` given once was said to be given
    twice): the path to the object that repeats it, names and indexes joined by dots."""
    response = orders_http.post("/orders", data=body, content_type="application/json",
                                signed_as=user_id)
    assert _assert_error(response, 422)["details"] == {"json": details}
    assert _order_writes(orders_flask_app, user_id) == (0, 0)


@pytest.mark.parametrize("coding, gzipped", [
    ("gzip", False), ("gzip", True), ("br", False), ("identity, gzip", True), ("x-gzip", False)])
def test_a_body_in_a_content_coding_is_a_415_and_writes_nothing(
        orders_http, orders_flask_app, payments_http, user_id, coding, gzipped):
    """No coding is read: a body said to be gzipped was read as it came, "not valid JSON" (a 400)
    when it was gzipped, and carried out when it was not, an order placed from bytes the client
    had said were something else. A 415 (RFC 9110 15.5.16: with Accept-Encoding, the codings
    taken), and nothing written."""
    body = b'{"amount": "5", "description": "coded"}'
    sent = gzip.compress(body) if gzipped else body
    response = orders_http.post("/orders", data=sent, content_type="application/json",
                                headers={"Content-Encoding": coding}, signed_as=user_id)
    assert _assert_error(response, 415)["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert response.headers["Accept-Encoding"] == "identity"
    assert_headers_documented(orders_http.get("/docs/openapi.json").get_json(), "post", "/orders",
                              response)
    assert _order_writes(orders_flask_app, user_id) == (0, 0)
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    response = payments_http.post("/accounts/deposit", data=sent.replace(b', "description": '
                                                                         b'"coded"', b""),
                                  content_type="application/json",
                                  headers={"Content-Encoding": coding}, signed_as=user_id)
    assert _assert_error(response, 415)["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == (
        "0.00")
    taken = orders_http.post("/orders", data=body, content_type="application/json",
                             headers={"Content-Encoding": "identity"}, signed_as=user_id)
    assert taken.status_code == 202, taken.get_json()


def test_a_repeated_query_parameter_is_refused_with_whatever_else_is_wrong_with_the_query(
        orders_http, user_id):
    """Every field's fault at once, as a query given each parameter once gets them."""
    response = orders_http.get("/orders?limit=1&limit=2&x=1&cursor=zz", signed_as=user_id)
    details = _assert_error(response, 422)["details"]["query"]
    assert details["limit"] == ["Given more than once."]
    assert details["x"] == ["Unknown field."]
    # (beside what is wrong with the parameter itself, not in its place)
    response = orders_http.get("/orders?limit=x&limit=1", signed_as=user_id)
    assert _assert_error(response, 422)["details"] == {
        "query": {"limit": ["Not a valid integer.", "Given more than once."]}}


def test_an_options_is_a_204_that_says_which_methods_the_path_takes(orders_http, payments_http,
                                                                   user_id):
    """As a JSON API answers it: no content, so no text/html type (Flask's own: a 200 with an
    empty text/html body), and Allow as a 405's."""
    for client, path, allowed in (
            (orders_http, "/orders", "GET, HEAD, OPTIONS, POST"),
            (orders_http, f"/orders/{uuid.uuid4()}", "GET, HEAD, OPTIONS"),
            (orders_http, "/health", "GET, HEAD, OPTIONS"),
            (payments_http, "/accounts", "OPTIONS, POST"),
            (payments_http, "/accounts/deposit", "OPTIONS, POST"),
            (payments_http, "/accounts/balance", "GET, HEAD, OPTIONS")):
        response = client.options(path, signed_as=user_id)
        assert (response.status_code, response.data) == (204, b""), (path, response.data)
        assert "Content-Type" not in response.headers, path
        assert response.headers["Allow"] == allowed, path  # (sorted, as a 405's)


@pytest.mark.parametrize("identity", [
    {}, {"headers": {"X-User-ID": ""}}, {"headers": {"X-User-ID": "a b"}},
    {"headers": {"X-User-ID": "x" * 65}}, {"headers": {"X-User-ID": "ü"}},
    {"headers": {"X-User-ID": "alice"}},  # no gateway signature at all
    {"signed_as": "mallory", "signed_with": "not-the-secret"},  # signed with the wrong secret
    {"signed_as": "mallory", "headers": {"X-User-ID": "alice"}},  # re-labelled
    {"signed_as": "mallory", "headers": {"X-Gateway-Timestamp": "0"}},  # stale
    {"signed_as": "mallory", "headers": {"X-Gateway-Signature": "é" * 64}},
    {"signed_as": "mallory", "headers": {"X-Gateway-Nonce": "0" * 32}},  # another nonce
    {"signed_as": "mallory", "headers": {"X-Gateway-Nonce": "é"}},  # no nonce's form
])
def test_a_caller_without_a_valid_gateway_signed_user_id_gets_401(orders_http, payments_http,
                                                                  identity):
    _assert_error(orders_http.post("/orders", json={"amount": 1}, **identity), 401)
    _assert_error(orders_http.get("/orders", **identity), 401)
    _assert_error(payments_http.post("/accounts", **identity), 401)
    _assert_error(payments_http.get("/accounts/balance", **identity), 401)


def test_a_service_called_directly_says_to_call_the_shop_through_the_gateway(orders_http,
                                                                           payments_http):
    """A request with no identity at all (`curl 127.0.0.1:8001/orders`) is told to go through the
    gateway: it was told the X-User-ID header was required, and one sent unsigned was then
    refused UNTRUSTED_IDENTITY. Its code stays MISSING_USER_ID (clients go by codes)."""
    for answer in (orders_http.get("/orders"), payments_http.get("/accounts/balance")):
        error = _assert_error(answer, 401)
        assert error["code"] == "MISSING_USER_ID"
        assert error["message"] == CALL_THROUGH_THE_GATEWAY
    assert "through its gateway (port 8000" in CALL_THROUGH_THE_GATEWAY


def _signed_for(user_id, method, target, body=b"", now=None, sent_with=None):
    """The identity headers the gateway sends with the request `method target` and `body` (and
    the Idempotency-Key and X-Gateway-Deadline of `sent_with`, sent with them), with a nonce of
    their own."""
    return {**(sent_with or {}), **identity_headers(
        user_id, TEST_SECRETS["INTERNAL_AUTH_SECRET"], method, target, body, now=now,
        sent_with=sent_with)}


def test_headers_signed_for_one_request_are_refused_on_any_other(orders_http, payments_http,
                                                                 user_id):
    """Captured off a balance read (or a deposit, a list), the headers vouch for that request
    alone: not for a deposit, another query or another body. They did for any operation."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    read = _signed_for(user_id, "GET", "/accounts/balance")
    assert payments_http.get("/accounts/balance", headers=read).status_code == 200  # its own
    deposit = b'{"amount": "1.00"}'
    signed_deposit = _signed_for(user_id, "POST", "/accounts/deposit", deposit)
    listing = _signed_for(user_id, "GET", "/orders?limit=1")
    assert orders_http.get("/orders?limit=1", headers=listing).status_code == 200
    for refused in (
            # another path (and method)
            payments_http.post("/accounts/deposit", data=deposit, headers=read,
                               content_type="application/json"),
            # another method, same path: a list's headers placing an order
            orders_http.post("/orders", headers=_signed_for(user_id, "GET", "/orders")),
            # another query
            orders_http.get("/orders?limit=200", headers=listing),
            orders_http.get("/orders", headers=listing),
            # another body
            payments_http.post("/accounts/deposit", data=b'{"amount": "9999.00"}',
                               headers=signed_deposit, content_type="application/json")):
        assert _assert_error(refused, 401)["code"] == "UNTRUSTED_IDENTITY"
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
        "0.00"
    assert payments_http.post("/accounts/deposit", data=deposit, headers=signed_deposit,
                              content_type="application/json").status_code == 200


def test_a_signed_deposit_captured_is_no_new_deposit_with_another_key_none_or_another_deadline(
        payments_http, user_id):
    """The key and the deadline were not signed: the same signed deposit sent again within the
    minute with a new key (or none) was a new deposit each time (10, 20, 30, 40), and with a later
    deadline one committed after the gateway's 504."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    deposit = b'{"amount": "10.00"}'
    sent_with = {"Idempotency-Key": f"deposit-{uuid.uuid4()}", **deadline_headers(30)}
    signed = _signed_for(user_id, "POST", "/accounts/deposit", deposit, sent_with=sent_with)

    def sent(headers):
        return payments_http.post("/accounts/deposit", data=deposit, headers=headers,
                                  content_type="application/json")

    assert sent(signed).status_code == 200
    no_key = {name: value for name, value in signed.items() if name != "Idempotency-Key"}
    no_deadline = {name: value for name, value in signed.items() if name != DEADLINE_HEADER}
    for replayed in ({**signed, "Idempotency-Key": f"deposit-{uuid.uuid4()}"}, no_key,
                     {**signed, DEADLINE_HEADER: f"{time.time() + 3000:.3f}"}, no_deadline):
        assert _assert_error(sent(replayed), 401)["code"] == "UNTRUSTED_IDENTITY"
    assert sent(signed).headers.get(REPLAYED_HEADER) == REPLAYED  # the same request: its answer
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
        "10.00"


def test_a_captured_unkeyed_write_sent_again_is_refused_and_done_once(orders_http, payments_http,
                                                                     user_id):
    """An order or a deposit without an Idempotency-Key, captured and sent again within its
    signature's minute, was carried out again: a second order, a second 10.00. Its signature is
    taken once now (shared.single_use_signatures); a read's and a keyed write's are not: the
    gateway sends those again, and a keyed write's repeat is its first answer."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    deposit, order = b'{"amount": "10.00"}', b'{"amount": "3.00", "description": "book"}'
    keyed = {"Idempotency-Key": f"deposit-{uuid.uuid4()}", **deadline_headers(30)}
    for client, path, body, sent_with, repeat in (
            (payments_http, "/accounts/deposit", deposit, deadline_headers(30), 401),
            (orders_http, "/orders", order, deadline_headers(30), 401),
            (payments_http, "/accounts/deposit", deposit, keyed, 200),
            (payments_http, "/accounts/balance", b"", deadline_headers(30), 200)):
        method = "POST" if body else "GET"
        signed = _signed_for(user_id, method, path, body, sent_with=sent_with)
        answers = [client.open(path, method=method, data=body, headers=signed,
                               content_type="application/json" if body else None)
                   for _ in range(2)]
        assert answers[0].status_code in (200, 202), answers[0].get_data(as_text=True)
        assert answers[1].status_code == repeat, (path, answers[1].get_data(as_text=True))
        if repeat == 401:
            error = _assert_error(answers[1], 401)
            assert error["code"] == "SIGNATURE_USED" and "used before" in error["message"]
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
        "20.00"  # the unkeyed deposit once, the keyed one once (its repeat a replay)
    assert _order_writes(orders_http.application, user_id) == (1, 1)


def test_two_unkeyed_writes_alike_signed_at_one_moment_are_both_carried_out(orders_http,
                                                                          payments_http, user_id):
    """A user's two orders alike without an Idempotency-Key (and two deposits), signed in the same
    second with the same deadline, as two gateway processes or threads may sign them: they were
    one signature, the second refused 401 SIGNATURE_USED (a 502 to the shopper). Each signature
    carries a nonce of its own now, so both are carried out; each sent again is still refused."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    now, sent_with = time.time(), deadline_headers(30)
    for client, path, body in ((orders_http, "/orders", b'{"amount": "3.00"}'),
                               (payments_http, "/accounts/deposit", b'{"amount": "10.00"}')):
        signed = [_signed_for(user_id, "POST", path, body, now=now, sent_with=sent_with)
                  for _ in range(2)]
        for headers in signed:
            answer = client.post(path, data=body, headers=headers, content_type="application/json")
            assert answer.status_code in (200, 202), (path, answer.get_data(as_text=True))
        repeat = client.post(path, data=body, headers=signed[1], content_type="application/json")
        assert _assert_error(repeat, 401)["code"] == "SIGNATURE_USED", path
    assert _order_writes(orders_http.application, user_id) == (2, 2)
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
        "20.00"


def test_with_redis_unreachable_an_unkeyed_write_goes_through_unchecked_and_says_so(
        settings, user_id, caplog):
    """A shop takes orders with Redis down: the signature's use cannot be noted, so the write is
    carried out, and its repeat too (as before the check, for as long as Redis is away), said at
    WARNING once as the outage begins, not once a write, and at INFO once Redis answers again,
    when a repeat is refused once more."""
    url = urlsplit(settings.redis_url)
    redis = SilencingProxy(f"{url.hostname}:{url.port or 6379}")
    app = orders_app.create_app(settings=dataclasses.replace(
        settings, redis_url=url._replace(netloc=redis.address).geturl()))
    try:
        client = app.test_client()

        def placed(body: bytes, signed: dict[str, str]):
            return client.post("/orders", data=body, headers=signed,
                               content_type="application/json")

        order = b'{"amount": "3.00"}'
        signed = _signed_for(user_id, "POST", "/orders", order, sent_with=deadline_headers(30))
        redis.cut()
        with caplog.at_level(logging.INFO, logger="shared.single_use_signatures"):
            for _ in range(3):
                assert placed(order, signed).status_code == 202
            redis.restore()
            after = _signed_for(user_id, "POST", "/orders", order, sent_with=deadline_headers(30))
            assert placed(order, after).status_code == 202
            assert _assert_error(placed(order, after), 401)["code"] == "SIGNATURE_USED"
    finally:
        app.extensions[CACHE_EXTENSION].close()  # (its thread trying the bumps kept, stopped)
        redis.close()
    said = [(record.levelno, record.getMessage()) for record in caplog.records
            if record.name == "shared.single_use_signatures"]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO], said
    assert "taking unkeyed writes' signatures as unused" in said[0][1]
    assert "available again" in said[1][1] and "3 unkeyed writes" in said[1][1]
    assert _order_writes(app, user_id) == (4, 4)


def test_headers_dated_more_than_a_few_seconds_ahead_are_refused(payments_http, user_id):
    """Accepted up to a minute ahead before: a captured set was good for two."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    now = time.time()
    assert payments_http.get("/accounts/balance", headers=_signed_for(
        user_id, "GET", "/accounts/balance", now=now + 2)).status_code == 200
    ahead = payments_http.get("/accounts/balance", headers=_signed_for(
        user_id, "GET", "/accounts/balance", now=now + 30))
    assert "dated in the future" in _assert_error(ahead, 401)["message"]


def test_a_signature_of_an_earlier_release_is_refused_with_a_code_of_its_own(payments_http,
                                                                              user_id):
    """A gateway not deployed with the service: a 401 that says so, not a 500. The release
    before's (v2: signed without a nonce, which it did not send) and the one before that's."""
    timestamp = str(int(time.time()))
    secret = TEST_SECRETS["INTERNAL_AUTH_SECRET"].encode()
    old = hmac.new(secret, f"{user_id}|{timestamp}".encode(), hashlib.sha256).hexdigest()
    v2_lines = ("hseshop-identity-v2", user_id, timestamp, "POST", "/accounts",
                hashlib.sha256(b"").hexdigest(), "", "")
    v2 = "v2=" + hmac.new(secret, "\n".join(v2_lines).encode(), hashlib.sha256).hexdigest()
    for earlier in (v2, old):
        refused = payments_http.post("/accounts", headers={
            "X-User-ID": user_id, "X-Gateway-Timestamp": timestamp, "X-Gateway-Signature": earlier})
        assert _assert_error(refused, 401)["code"] == "SIGNATURE_VERSION_MISMATCH", earlier
    # Of no release's format (garbage, a version to come): not the gateway's, whatever its version.
    for unknown in ("garbage", "v4=" + old):
        refused = payments_http.post("/accounts", headers={
            "X-User-ID": user_id, "X-Gateway-Timestamp": timestamp, "X-Gateway-Signature": unknown})
        assert _assert_error(refused, 401)["code"] == "UNTRUSTED_IDENTITY"


def test_someone_elses_order_and_a_malformed_id_are_404(orders_http, user_id):
    order = orders_http.post("/orders", json={"amount": 1}, signed_as=user_id).get_json()
    _assert_error(orders_http.get(f"/orders/{order['id']}", signed_as=user_id + "x"), 404)
    _assert_error(orders_http.get("/orders/not-a-uuid", signed_as=user_id), 404)


def test_orders_are_listed_newest_first_page_by_page(orders_http, user_id):
    placed = [orders_http.post("/orders", json={"amount": n}, signed_as=user_id).get_json()["id"]
              for n in range(1, 6)]
    assert sum(_pages(orders_http, user_id, limit=2), []) == list(reversed(placed))


def _pages(orders_http, user_id, limit: int) -> list[list[str]]:
    """The ids of each page of the user's orders, `limit` a page, cursor after cursor."""
    pages, cursor = [], None
    while True:
        query = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        page = orders_http.get("/orders", query_string=query, signed_as=user_id).get_json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages


def test_orders_placed_at_the_same_moment_are_each_listed_once(orders_http, orders_flask_app,
                                                              user_id):
    """Ordered by id among themselves, across the pages' boundaries."""
    placed = [orders_http.post("/orders", json={"amount": 1}, signed_as=user_id).get_json()["id"]
              for _ in range(7)]
    with orders_flask_app.app_context():
        db.session.execute(text("UPDATE orders SET created_at = '2026-01-01T00:00:00Z'"
                                " WHERE user_id = :user_id"), {"user_id": user_id})
        db.session.commit()
    pages = _pages(orders_http, user_id, limit=2)
    assert [len(page) for page in pages] == [2, 2, 2, 1]
    assert sum(pages, []) == sorted(placed, key=uuid.UUID, reverse=True)


def test_a_page_that_holds_the_last_order_has_no_next_cursor(orders_http, user_id):
    for _ in range(2):
        orders_http.post("/orders", json={"amount": 1}, signed_as=user_id)
    assert [len(page) for page in _pages(orders_http, user_id, limit=2)] == [2]


def test_an_order_is_timed_once_its_users_placing_lock_is_held(orders_http, orders_flask_app,
                                                              settings, user_id):
    """So that one user's orders are listed in the order they were placed (and paid) in: an order
    waiting on the lock was timed as it arrived, before one placed ahead of it."""
    from orders_app.service import PLACING_LOCK_CLASS

    released, placed = {}, {}

    def placing_ahead(hold):
        with orders_flask_app.app_context(), transaction() as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:user_id))"),
                            {"lock_class": PLACING_LOCK_CLASS, "user_id": user_id})
            hold()
            released["at"] = session.execute(text("SELECT clock_timestamp()")).scalar()

    def placing():
        placed["order"] = orders_http.post("/orders", json={"amount": 1},
                                           signed_as=user_id).get_json()

    second_waiting_on_the_first(settings.database_url("orders"), placing_ahead, placing,
                                what="the order waiting on its user's placing lock")
    assert datetime.fromisoformat(placed["order"]["created_at"]) > released["at"]


def test_an_order_waiting_on_its_users_placing_lock_takes_its_event_row_after_the_one_ahead(
        orders_http, orders_flask_app, settings, user_id):
    """The PaymentRequested row is written in the round trip of the lock and the order (one trip
    fewer), but after the lock: an order waiting on it gets the later outbox id, the order the
    relay sends in, though it began first."""
    from orders_app.service import PLACING_LOCK_CLASS, place_order

    placed = {}

    def placing_ahead(hold):
        with orders_flask_app.app_context(), transaction() as session:
            session.execute(text("SELECT pg_advisory_xact_lock(:lock_class, hashtext(:user_id))"),
                            {"lock_class": PLACING_LOCK_CLASS, "user_id": user_id})
            hold()
            placed["ahead"] = str(place_order(session, user_id=user_id, amount=Decimal("1.00"),
                                              description="ahead").id)

    def placing():
        placed["waiting"] = orders_http.post("/orders", json={"amount": 1},
                                             signed_as=user_id).get_json()["id"]

    second_waiting_on_the_first(settings.database_url("orders"), placing_ahead, placing,
                                what="the order waiting on its user's placing lock")
    with orders_flask_app.app_context():
        sent_in = db.session.scalars(select(OutboxMessage.correlation_id)
                                     .where(OutboxMessage.key == user_id)
                                     .order_by(OutboxMessage.id)).all()
    assert sent_in == [placed["ahead"], placed["waiting"]]


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=abc", "cursor=%%%",
                                   "cursor=bm9wZQ", "limt=5", "limit=5&unknown=1",
                                   # what int() reads and no client means: not ASCII digits
                                   "limit=%D9%A5", "limit=1_0", "limit=%2B5", "limit=%205"])
def test_bad_list_queries_are_4xx(orders_http, user_id, query):
    response = orders_http.get(f"/orders?{query}", signed_as=user_id)
    assert response.status_code in (400, 422)
    _assert_error(response, response.status_code)


@pytest.mark.parametrize("cursor, status", [
    ("WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgN10", 400),  # [time, 7]: an id that is no string
    # [2024-01-01T00:00:00+20:00, id]: an offset Python reads and PostgreSQL would refuse
    ("WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzIwOjAwIiwgIjAwMDAwMDAwLTAwMDAtNDAwMC04MDAwLTAwMDAwMDAwMDAwMCJd",
     200),
    # [0001-01-01T00:00:00+20:00, id]: before the year 1 in UTC
    ("WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzIwOjAwIiwgIjAwMDAwMDAwLTAwMDAtNDAwMC04MDAwLTAwMDAwMDAwMDAwMCJd",
     400),
])
def test_a_crafted_cursor_is_a_400_or_a_page_never_a_500(orders_http, user_id, cursor, status):
    response = orders_http.get(f"/orders?cursor={cursor}", signed_as=user_id)
    assert response.status_code == status, response.get_data(as_text=True)


def test_the_cursor_none_is_refused_whatever_the_cache_holds(orders_http, user_id):
    assert orders_http.get("/orders", signed_as=user_id).status_code == 200  # cached now
    _assert_error(orders_http.get("/orders?cursor=None", signed_as=user_id), 400)


def test_default_page_size_is_50(orders_http, user_id):
    assert orders_http.get("/orders", signed_as=user_id).get_json() == {
        "items": [], "next_cursor": None}
    for _ in range(51):
        assert _placed(orders_http, user_id, "1.00") == 202
    page = orders_http.get("/orders", signed_as=user_id).get_json()
    assert len(page["items"]) == 50 and page["next_cursor"] is not None


def test_a_retried_order_with_the_same_idempotency_key_is_placed_once(
        orders_http, orders_flask_app, user_id):
    headers = {"Idempotency-Key": "retry-1"}
    first = orders_http.post("/orders", json={"amount": "7.5"}, signed_as=user_id, headers=headers)
    again = orders_http.post("/orders", json={"amount": 7.50}, signed_as=user_id, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.get_json() == first.get_json()
    assert _order_writes(orders_flask_app, user_id) == (1, 1)
    other = orders_http.post("/orders", json={"amount": 8}, signed_as=user_id, headers=headers)
    assert _assert_error(other, 422)["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert _order_writes(orders_flask_app, user_id) == (1, 1)


def test_accounts_open_once_deposit_and_report_the_balance(payments_http, user_id):
    created = payments_http.post("/accounts", signed_as=user_id)
    assert created.status_code == 201
    assert created.get_json() == {"user_id": user_id, "balance": "0.00"}
    assert _assert_error(payments_http.post("/accounts", signed_as=user_id), 409)["code"] == \
        "ACCOUNT_EXISTS"
    deposited = payments_http.post("/accounts/deposit", json={"amount": "100"},
                                   signed_as=user_id)
    assert deposited.status_code == 200
    assert deposited.get_json() == {"user_id": user_id, "balance": "100.00"}
    balance = payments_http.get("/accounts/balance", signed_as=user_id)
    assert balance.status_code == 200
    assert balance.get_json() == {"user_id": user_id, "balance": "100.00"}


def test_a_request_held_up_by_a_lock_is_a_503_that_changed_nothing(payments_http, settings,
                                                                     user_id):
    """A transaction that stalls holding the account's row (here, another session's) holds a
    deposit up for shared.db.SESSION_LIMITS' lock_timeout, not for ever: the deposit answers 503
    DATABASE_BUSY, and changed nothing, as its retry under the same key shows."""
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    with account_row_held(settings.database_url("payments"), user_id):
        held_up = payments_http.post("/accounts/deposit", json={"amount": "5"},
                                     signed_as=user_id, headers=headers)
        assert _assert_error(held_up, 503)["code"] == "DATABASE_BUSY"
        assert held_up.headers["Retry-After"] == "1"
    retried = payments_http.post("/accounts/deposit", json={"amount": "5"}, signed_as=user_id,
                                 headers=headers)
    assert retried.status_code == 200 and retried.get_json()["balance"] == "5.00"


def test_a_keyed_request_held_up_by_an_earlier_one_under_its_key_is_503_key_in_use(
        payments_http, payments_flask_app, user_id, monkeypatch):
    """A deposit under a key whose earlier deposit (the same) has claimed it and is still at its
    work (held here 3 s past its claim, as a gateway's second try meets the first still under
    way) waits on the earlier one's key for lock_timeout (2 s), then is answered 503
    IDEMPOTENCY_KEY_IN_USE with Retry-After, saying to retry under the same key: the earlier one
    then commits, and the retry is answered its answer, replayed, the money moved once. It was
    DATABASE_BUSY, "nothing was changed", while the earlier one went on to change it."""
    from payments_app import service

    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    at_work = first_call_held(monkeypatch, service, "deposit", 3)  # (the earlier request's work)

    def deposited():
        return payments_flask_app.test_client().post(
            "/accounts/deposit", json={"amount": "10"}, signed_as=user_id, headers=headers)

    earlier = OutcomeThread(deposited, name="earlier deposit")
    earlier.start()
    assert at_work.wait(timeout=10)
    held_up = deposited()
    error = _assert_error(held_up, 503)
    assert error["code"] == "IDEMPOTENCY_KEY_IN_USE", error
    assert "same Idempotency-Key" in error["message"] and "nothing" not in error["message"]
    # (Not said to be an earlier request's for sure: the pruner's DELETE of an expired row under
    # the key, uncommitted, or a migration's lock holds it up alike.)
    assert error["message"].startswith(
        "This Idempotency-Key is held by another transaction: most likely an earlier request under"
        " it, still in progress, which may yet take effect."), error
    assert held_up.headers["Retry-After"] == "1"
    first = earlier.joined(timeout=10)
    assert (first.status_code, first.get_json()["balance"]) == (200, "10.00")
    retried = deposited()
    assert (retried.status_code, retried.get_json()["balance"]) == (200, "10.00")
    assert retried.headers.get(REPLAYED_HEADER) == REPLAYED
    assert payments_http.get("/accounts/balance",
                             signed_as=user_id).get_json()["balance"] == "10.00"


def test_no_account_is_404_for_balance_and_deposit(payments_http, user_id):
    _assert_error(payments_http.get("/accounts/balance", signed_as=user_id), 404)
    _assert_error(payments_http.post("/accounts/deposit", json={"amount": 1},
                                      signed_as=user_id), 404)


@pytest.mark.parametrize("body", ['{"amount": 0}', '{"amount": -1}', '{"amount": "1.234"}',
                                  '{"amount": NaN}', '{}', '{"amount": 1, "x": 2}', "{",
                                  '{"amount": 1000000000.01}',
                                  # Spaces around it that are not JSON's: no amount in ASCII.
                                  '{"amount": "\\u00a05"}', '{"amount": "\\u001c5\\u001f"}'])
def test_a_bad_deposit_is_4xx_and_changes_nothing(payments_http, payments_flask_app, user_id, body):
    payments_http.post("/accounts", signed_as=user_id)
    response = payments_http.post("/accounts/deposit", data=body, content_type="application/json",
                                  signed_as=user_id)
    assert response.status_code in (400, 422)
    _assert_error(response, response.status_code)
    with payments_flask_app.app_context():
        assert db.session.get(Account, user_id).balance == 0


def test_a_deposit_past_the_balance_limit_is_422_and_changes_nothing(payments_http,
                                                                    payments_flask_app, user_id):
    from shared.money import MAX_BALANCE

    payments_http.post("/accounts", signed_as=user_id)
    with payments_flask_app.app_context():
        db.session.get(Account, user_id).balance = MAX_BALANCE - 1
        db.session.commit()
    refused = payments_http.post("/accounts/deposit", json={"amount": "1.01"},
                                 signed_as=user_id)
    assert _assert_error(refused, 422)["code"] == "BALANCE_LIMIT_EXCEEDED"
    to_the_limit = payments_http.post("/accounts/deposit", json={"amount": "1"},
                                      signed_as=user_id)
    assert to_the_limit.get_json()["balance"] == str(MAX_BALANCE)


def test_a_retried_deposit_with_the_same_key_counts_once(payments_http, payments_flask_app,
                                                         user_id):
    payments_http.post("/accounts", signed_as=user_id)
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    for _ in range(3):
        response = payments_http.post("/accounts/deposit", json={"amount": 25},
                                      signed_as=user_id, headers=headers)
        assert response.get_json()["balance"] == "25.00"
    assert _assert_error(payments_http.post("/accounts/deposit", json={"amount": 26},
                                            signed_as=user_id, headers=headers), 422)["code"] == \
        "IDEMPOTENCY_KEY_REUSED"
    with payments_flask_app.app_context():  # the account's own, not only the answer replayed
        assert db.session.get(Account, user_id).balance == Decimal("25.00")


def _two_deposits_under_one_key_at_once(app, settings, monkeypatch, user_id: str, *,
                                        held_after_its_deposit: bool) -> dict:
    """Two top-ups of 25 by `user_id` under one new key, "first" and "second", the second sent as
    the first is held in its transaction (before its deposit, or after it where
    `held_after_its_deposit`) and let go on once the second waits on the first's key: each one's
    answer by name."""
    from payments_app import service as payments

    headers = {"Idempotency-Key": str(uuid.uuid4())}
    answers = {}

    def send(name):
        answers[name] = app.test_client().post(
            "/accounts/deposit", json={"amount": "25"}, signed_as=user_id, headers=headers)

    def first(hold):
        real_deposit = payments.deposit

        def held_deposit(session, **kwargs):
            monkeypatch.setattr(payments, "deposit", real_deposit)  # (the second's is not held)
            if not held_after_its_deposit:
                hold()
            account = real_deposit(session, **kwargs)  # (or its refusal, raised)
            if held_after_its_deposit:
                hold()
            return account

        monkeypatch.setattr(payments, "deposit", held_deposit)
        send("first")

    second_waiting_on_the_first(settings.database_url("payments"), first, lambda: send("second"),
                                what="the second waiting on the first's key")
    return answers


def test_a_deposit_sent_again_while_the_first_is_in_flight_waits_for_it_and_replays_it(
        payments_flask_app, settings, monkeypatch, user_id):
    """The second request's key waits on the first one's uncommitted record, then reads its answer
    (shared/idempotency.py); the deposit is made once."""
    payments_flask_app.test_client().post("/accounts", signed_as=user_id)
    answers = _two_deposits_under_one_key_at_once(payments_flask_app, settings, monkeypatch,
                                                  user_id, held_after_its_deposit=True)

    assert answers["first"].status_code == answers["second"].status_code == 200
    assert answers["first"].get_json() == answers["second"].get_json()
    assert REPLAYED_HEADER not in answers["first"].headers
    assert answers["second"].headers.get(REPLAYED_HEADER) == REPLAYED
    with payments_flask_app.app_context():
        assert db.session.get(Account, user_id).balance == Decimal("25.00")


def _keys_kept(app, user_id) -> dict[str, tuple[int, str]]:
    """The keys kept for `user_id`, each with its answer's status and the fingerprint it keeps."""
    with app.app_context():
        rows = db.session.execute(select(
            IdempotencyKey.key, IdempotencyKey.response_status, IdempotencyKey.request_hash)
            .where(IdempotencyKey.user_id == user_id))
        return {key: (status, request_hash) for key, status, request_hash in rows}


def test_a_keyed_deposit_refused_by_its_operation_is_answered_its_refusal_again(
        payments_http, payments_flask_app, user_id):
    """Issue 2's contract, as a reviewer found it broken: a top-up under a key refused 404
    ACCOUNT_NOT_FOUND, sent again under that key once the account is open, is answered that 404
    again (its very text, said replayed) and moves no money, where it was carried out afresh; the
    key with another body is a 422 IDEMPOTENCY_KEY_REUSED. So is a 422 BALANCE_LIMIT_EXCEEDED,
    made once the account's row is read, sent again once the balance has room. Each answer's
    headers as the service's document gives them."""
    spec = payments_http.get("/docs/openapi.json").get_json()
    path = "/accounts/deposit"

    def deposit(amount: str, key: str):
        return payments_http.post(path, json={"amount": amount}, signed_as=user_id,
                                  headers={"Idempotency-Key": key})

    def balance_set(balance: Decimal) -> None:
        with payments_flask_app.app_context():
            db.session.get(Account, user_id).balance = balance
            db.session.commit()

    missing = deposit("5", "topup-1")
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    missing_again, missing_reused = deposit("5", "topup-1"), deposit("6", "topup-1")
    balance_set(MAX_BALANCE - 1)
    over = deposit("1.01", "topup-2")
    balance_set(MAX_BALANCE - 2)  # (room for it now)
    over_again, over_reused = deposit("1.01", "topup-2"), deposit("1.02", "topup-2")

    assert_only_the_repeat_said_replayed(path, 404, missing, missing_again, missing_reused,
                                         lambda answer: answer.get_data())
    assert_only_the_repeat_said_replayed(path, 422, over, over_again, over_reused,
                                         lambda answer: answer.get_data())
    assert _assert_error(missing, 404)["code"] == "ACCOUNT_NOT_FOUND"
    assert _assert_error(over, 422)["code"] == "BALANCE_LIMIT_EXCEEDED"
    with payments_flask_app.app_context():
        assert db.session.get(Account, user_id).balance == MAX_BALANCE - 2
    for answer in (missing, missing_again, missing_reused, over, over_again, over_reused):
        assert_headers_documented(spec, "post", path, answer)


def test_a_keyed_deposit_refused_for_its_body_keeps_nothing_and_its_correction_is_carried_out(
        payments_http, payments_flask_app, user_id):
    """Refused before its operation ran (422 VALIDATION_ERROR: its amount), a request keeps
    nothing under its key, as Stripe keeps nothing for a request that failed validation: its
    correction under the same key, another body, is carried out (here refused 404, no account
    yet), not refused as the key reused; that refusal, its operation's, is kept."""
    keyed = {"Idempotency-Key": "topup-1"}
    invalid = payments_http.post("/accounts/deposit", json={"amount": "-5"}, signed_as=user_id,
                                 headers=keyed)
    assert _assert_error(invalid, 422)["code"] == "VALIDATION_ERROR"
    assert _keys_kept(payments_flask_app, user_id) == {}
    corrected = payments_http.post("/accounts/deposit", json={"amount": "5"}, signed_as=user_id,
                                   headers=keyed)
    assert _assert_error(corrected, 404)["code"] == "ACCOUNT_NOT_FOUND"
    assert REPLAYED_HEADER not in corrected.headers
    assert [status for status, _ in _keys_kept(payments_flask_app, user_id).values()] == [404]


def test_a_kept_refusal_is_refused_by_the_release_before_not_answered_as_a_success(
        payments_http, payments_flask_app, user_id):
    """The release before kept no refusal, and answered a kept body with its operation's success
    status, whatever the row's (a 200 of the 404's error). It replays only a row that keeps the
    request's fingerprint as it is and refuses any other 422 IDEMPOTENCY_KEY_REUSED, nothing
    done: a refusal's row keeps it marked, unlike the same body's success."""
    refused = payments_http.post("/accounts/deposit", json={"amount": "5"}, signed_as=user_id,
                                 headers={"Idempotency-Key": "refused"})
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    done = payments_http.post("/accounts/deposit", json={"amount": "5"}, signed_as=user_id,
                              headers={"Idempotency-Key": "done"})
    assert (refused.status_code, done.status_code) == (404, 200)
    kept = _keys_kept(payments_flask_app, user_id)
    assert (kept["refused"][0], kept["done"][0]) == (404, 200)
    assert kept["refused"][1] != kept["done"][1]  # (what the release before compares)


def test_a_deposit_sent_twice_at_once_and_refused_alike_keeps_its_refusal_once(
        payments_flask_app, settings, monkeypatch, user_id):
    """Two top-ups under one key at once, for a user with no account: the second waits on the
    first's key, is carried out as the first's work rolls back, and is refused alike. One refusal
    is kept, and the other request answers it, replayed: the same 404, byte for byte."""
    answers = _two_deposits_under_one_key_at_once(payments_flask_app, settings, monkeypatch,
                                                  user_id, held_after_its_deposit=False)

    assert [_assert_error(answer, 404)["code"] for answer in answers.values()] == [
        "ACCOUNT_NOT_FOUND"] * 2
    assert answers["first"].get_data() == answers["second"].get_data()
    assert sorted(answer.headers.get(REPLAYED_HEADER) == REPLAYED
                  for answer in answers.values()) == [False, True]
    assert [status for status, _ in _keys_kept(payments_flask_app, user_id).values()] == [404]


# The operations that honour an Idempotency-Key (by service, method and path as documented): a
# body, the status it is answered with, and another body.
KEYED_OPERATIONS = {
    ("orders", "post", "/orders"): ({"amount": "7.50", "description": "pen"}, 202,
                                    {"amount": "7.51", "description": "pen"}),
    ("payments", "post", "/accounts/deposit"): ({"amount": "25"}, 200, {"amount": "26"}),
}
# The statuses of the refusals a keyed operation's own work makes (by service, method and path
# as documented), kept under the key and answered again.
KEPT_REFUSALS = {("payments", "post", "/accounts/deposit"): (404, 422)}


@pytest.mark.parametrize("service, method, path", KEYED_OPERATIONS)
def test_a_replayed_answer_says_so_and_a_fresh_one_does_not(orders_http, payments_http, user_id,
                                                           service, method, path):
    """`Idempotent-Replayed: true` on the answer to a repeat with the same key and body (the first
    answer's status and body, its very text, the work done once), and on no other: not on the
    first answer, nor on the 422 for the key reused with another body; as the service's document
    gives it."""
    client = {"orders": orders_http, "payments": payments_http}[service]
    body, status, other = KEYED_OPERATIONS[service, method, path]
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    keyed = {"Idempotency-Key": str(uuid.uuid4())}
    first = asked(client, method, path, body, signed_as=user_id, headers=keyed)
    again = asked(client, method, path, body, signed_as=user_id, headers=keyed)
    reused = asked(client, method, path, other, signed_as=user_id, headers=keyed)

    assert_only_the_repeat_said_replayed(path, status, first, again, reused,
                                         lambda answer: answer.get_data())
    _assert_error(reused, 422)
    unkeyed = asked(client, method, path, body, signed_as=user_id)
    assert unkeyed.status_code == status and REPLAYED_HEADER not in unkeyed.headers
    spec = client.get("/docs/openapi.json").get_json()
    for answer in (first, again, reused, unkeyed):
        assert_headers_documented(spec, method, path, answer)


@pytest.mark.parametrize("service, method, path", KEYED_OPERATIONS)
def test_a_key_the_release_before_kept_is_replayed_from_its_jsonb(
        orders_flask_app, payments_flask_app, orders_http, payments_http, user_id, service,
        method, path):
    """A key kept by the release before 0012 (its answer in jsonb only, no text) still replays its
    first answer: the same status and values, said replayed, the work done once."""
    client = {"orders": orders_http, "payments": payments_http}[service]
    app = {"orders": orders_flask_app, "payments": payments_flask_app}[service]
    body, status, _ = KEYED_OPERATIONS[service, method, path]
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    key = str(uuid.uuid4())
    keyed = {"Idempotency-Key": key}
    first = asked(client, method, path, body, signed_as=user_id, headers=keyed)
    with app.app_context():
        db.session.execute(text("UPDATE idempotency_keys SET response_text = NULL"
                                " WHERE key = :key"), {"key": key})
        db.session.commit()
    again = asked(client, method, path, body, signed_as=user_id, headers=keyed)
    assert (again.status_code, again.get_json()) == (status, first.get_json())
    assert again.headers.get(REPLAYED_HEADER) == REPLAYED
    if service == "orders":
        assert len(orders_http.get("/orders", signed_as=user_id).get_json()["items"]) == 1
    else:
        balance = payments_http.get("/accounts/balance", signed_as=user_id).get_json()
        assert balance["balance"] == "25.00"


def test_a_replay_no_transport_answered_is_not_taken_for_the_next_requests(orders_flask_app,
                                                                           user_id):
    """A use case run in an app context that requests then share (as here, or a command's) marks
    its replay where no transport takes the mark: the next request in that context is fresh."""
    from orders_app import endpoints

    args = {"amount": Decimal("3.00"), "description": "pen"}
    with orders_flask_app.app_context():
        for _ in range(2):  # (the second a replay)
            endpoints.place_order(user_id, args, idempotency_key="in-the-context")
        fresh = orders_flask_app.test_client().post(
            "/orders", json={"amount": "4.00"}, signed_as=user_id)
    assert fresh.status_code == 202 and REPLAYED_HEADER not in fresh.headers


def test_the_replayed_header_is_documented_where_answers_are_replayed_and_nowhere_else(
        orders_http, payments_http):
    """On the success response of each operation that honours a key, and on those of the
    refusals its own work makes, kept under the key; none other."""
    for service, client in (("orders", orders_http), ("payments", payments_http)):
        spec = client.get("/docs/openapi.json").get_json()
        assert responses_documenting(spec, REPLAYED_HEADER) == replayed_responses(
            {operation: answer for operation, answer in KEYED_OPERATIONS.items()
             if operation[0] == service},
            {operation: statuses for operation, statuses in KEPT_REFUSALS.items()
             if operation[0] == service}), service


@pytest.mark.parametrize("service", ["orders", "payments"])
def test_a_replay_refreshes_the_cached_reads_the_first_request_changed(
        orders_http, payments_http, monkeypatch, user_id, service):
    """The first request's invalidation lost, as with its commit's answer (a 503 for a commit
    that went through): the retry that finds the change leaves no read cached from before it."""
    from shared.cache import VersionedCache

    client, post, read, fresh = {
        "orders": (orders_http, ("/orders", {"amount": "5"}), "/orders",
                   lambda body: len(body["items"]) == 1),
        "payments": (payments_http, ("/accounts/deposit", {"amount": "5"}), "/accounts/balance",
                     lambda body: body["balance"] == "5.00"),
    }[service]
    payments_http.post("/accounts", signed_as=user_id)
    assert client.get(read, signed_as=user_id).status_code == 200  # cached now
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    with monkeypatch.context() as lost:
        lost.setattr(VersionedCache, "invalidate", lambda self, *namespaces: None)
        assert client.post(post[0], json=post[1], signed_as=user_id,
                           headers=headers).status_code in (200, 202)
    assert not fresh(client.get(read, signed_as=user_id).get_json())  # (the loss, as it was)

    assert client.post(post[0], json=post[1], signed_as=user_id,
                       headers=headers).status_code in (200, 202)

    assert fresh(client.get(read, signed_as=user_id).get_json())


def test_health_reports_each_dependency(orders_http, payments_http):
    for client in (orders_http, payments_http):
        response = client.get("/health")
        assert response.status_code == 200
        assert response.get_json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}


def test_health_does_not_check_the_read_caches_redis(settings, user_id):
    """The cache is optional: with its Redis (CACHE_REDIS_URL) down, reads and writes work from
    the database, and /health says the app is fine ("redis" is REDIS_URL's)."""
    no_cache = dataclasses.replace(settings, cache_redis_url=f"redis://127.0.0.1:{free_port()}/0")
    pay = payments_app.create_app(settings=no_cache)
    cache = pay.extensions[CACHE_EXTENSION]
    try:
        client = pay.test_client()
        client.post("/accounts", signed_as=user_id)
        client.post("/accounts/deposit", json={"amount": 4}, signed_as=user_id)
        assert client.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == "4.00"
        health = client.get("/health")
        assert health.status_code == 200
        assert health.get_json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}
    finally:
        cache.close()  # (its thread trying the deposit's bump again)


def test_health_requests_at_once_share_one_round_of_checks(settings, monkeypatch):
    """With the broker down its check takes 2 s: requests arriving meanwhile wait for that one
    round, not for a round each (the gateway's /health is public)."""
    no_broker = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    shop = orders_app.create_app(settings=no_broker)
    broker_checks = []

    def counted(*args, **kwargs):
        broker_checks.append(args)
        return broker_reachable(*args, **kwargs)

    monkeypatch.setattr(shared.health, "broker_reachable", counted)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: shop.test_client().get("/health"), range(4)))
    assert [answer.status_code for answer in answers] == [503] * 4
    assert {answer.get_json()["checks"]["broker"] for answer in answers} == {"unreachable"}
    assert len(broker_checks) == 1


def test_health_with_the_broker_down_says_so_in_its_answer_not_on_stderr(settings, capfd):
    """librdkafka's own lines for each refused connect (`%3|...|FAIL|...`), some forty a check,
    are not printed to the service's stderr: the answer says the broker is unreachable."""
    no_broker = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    answer = orders_app.create_app(settings=no_broker).test_client().get("/health")
    assert answer.status_code == 503
    assert answer.get_json()["checks"]["broker"] == "unreachable"
    assert "Connection refused" not in capfd.readouterr().err


def test_health_says_once_why_the_broker_is_unreachable(settings, caplog):
    """librdkafka's own lines are not logged (log_level 0): the check says why itself, once as the
    outage begins (shared.outage_log), not once a round of checks."""
    no_broker = dataclasses.replace(settings, kafka_bootstrap_servers=f"127.0.0.1:{free_port()}")
    shop = orders_app.create_app(settings=no_broker)
    caplog.set_level(logging.INFO, logger="shared.health")
    with shop.app_context():
        assert [shared.health._run_checks()["broker"] for _ in range(2)] == [False] * 2
    said = [record for record in caplog.records if "broker" in record.getMessage()]
    assert [(record.levelno, record.exc_info) for record in said] == [(logging.WARNING, None)]
    assert said[0].getMessage().startswith("the orders health check cannot reach the broker: ")
    assert "KafkaError" in said[0].getMessage()  # (librdkafka's reason, as the exception has it)


def test_health_says_a_database_away_once_not_a_traceback_a_round(settings, caplog):
    """A probe asks every few seconds: a database away (a restart, a failover) is one warning as
    it begins, without a traceback (shared.db.DatabaseOutageLog), not one with a traceback for
    every round of checks."""
    away = f"postgresql://postgres@127.0.0.1:{free_port()}/orders"
    shop = orders_app.create_app(settings=dataclasses.replace(settings, orders_database_url=away))
    caplog.set_level(logging.INFO)
    with shop.app_context():
        assert [shared.health._database_ok() for _ in range(3)] == [False] * 3
    said = [record for record in caplog.records if "database" in record.getMessage()]
    assert [(record.levelno, record.exc_info) for record in said] == [(logging.WARNING, None)]
    assert said[0].getMessage().startswith("the orders health check lost its database connection")


def test_each_service_serves_its_openapi_document_and_swagger_ui(orders_http, payments_http):
    orders_spec = orders_http.get("/docs/openapi.json").get_json()
    assert "/orders" in orders_spec["paths"] and "/orders/{order_id}" in orders_spec["paths"]
    payments_spec = payments_http.get("/docs/openapi.json").get_json()
    assert {"/accounts", "/accounts/deposit", "/accounts/balance"} <= set(payments_spec["paths"])
    # The routes that honour an Idempotency-Key say so, as the gateway's document does.
    for spec, path in ((orders_spec, "/orders"), (payments_spec, "/accounts/deposit")):
        assert "Idempotency-Key" in [
            parameter["name"] for parameter in spec["paths"][path]["post"]["parameters"]], path
    # An order's status and, for a CANCELLED one, the reason are each one of a few, as a client
    # generated from the document needs to know.
    order = orders_spec["components"]["schemas"]["Order"]["properties"]
    assert order["status"]["enum"] == ["NEW", "FINISHED", "CANCELLED"]
    assert order["reason"]["enum"] == [*FAILURE_REASONS, None] and order["reason"]["nullable"]
    for client in (orders_http, payments_http):
        page = client.get("/docs/swagger-ui")
        assert page.status_code == 200
        assert b"/docs/swagger-ui-assets/swagger-ui-bundle.js" in page.data
        script = client.get("/docs/swagger-ui-assets/swagger-ui-bundle.js")
        assert script.status_code == 200 and len(script.data) > 100_000


# Each operation of the services' APIs (by service, method and path as documented), with a body
# it takes, and the error statuses its document gives (every one a 400: INVALID_DEADLINE).
SERVICE_OPERATIONS = {
    ("orders", "post", "/orders"): ({"amount": "1.00"}, {400, 401, 413, 415, 422, 503, 504}),
    ("orders", "get", "/orders"): (None, {400, 401, 413, 422, 503}),
    ("orders", "get", "/orders/{order_id}"): (None, {400, 401, 404, 413, 422, 503}),
    ("payments", "post", "/accounts"): (None, {400, 401, 409, 413, 415, 422, 503, 504}),
    ("payments", "post", "/accounts/deposit"): ({"amount": "1.00"},
                                                {400, 401, 404, 413, 415, 422, 503, 504}),
    ("payments", "get", "/accounts/balance"): (None, {400, 401, 404, 413, 422, 503}),
}


def test_each_service_operation_documents_its_error_statuses_in_the_error_shape(orders_http,
                                                                                payments_http):
    specs = {"orders": orders_http.get("/docs/openapi.json").get_json(),
             "payments": payments_http.get("/docs/openapi.json").get_json()}
    for service, spec in specs.items():  # every operation of each document, in the table
        assert operations(spec) == {HEALTH, *((method, path) for (owner, method, path)
                                              in SERVICE_OPERATIONS if owner == service)}, service
        assert_default_error_described(spec)
    for (service, method, path), (_, statuses) in SERVICE_OPERATIONS.items():
        documented = documented_errors(specs[service], method, path)
        assert set(documented) == statuses, (method, path)
        for status, response in documented.items():
            assert response["content"]["application/json"]["schema"] == ERROR_SCHEMA
            assert codes_named(response), (method, path, status)  # the codes it carries
        assert set(documented[503]["headers"]) == {"Retry-After", "X-Request-ID"}, (method, path)
        if 415 in documented:  # (a body in a Content-Encoding is answered with Accept-Encoding)
            assert set(documented[415]["headers"]) == {"Accept-Encoding", "X-Request-ID"}, (
                method, path)
        unkeyed_write = (method, path) in {("post", "/orders"), ("post", "/accounts/deposit")}
        assert codes_named(documented[401]) == {
            "MISSING_USER_ID", "INVALID_USER_ID", "UNTRUSTED_IDENTITY",
            "SIGNATURE_VERSION_MISMATCH", *(["SIGNATURE_USED"] if unkeyed_write else [])}, (
            method, path)


def test_errors_declared_above_a_routes_decorator_are_refused_not_left_out():
    """A route's errors are documented as its decorator registers it: `errors` put above it
    would be left out of the document without a word, so it is refused."""
    from shared.documented_errors import DATABASE_BUSY
    from shared.http_api import Blueprint

    blueprint = Blueprint("misdeclared", __name__)
    with pytest.raises(TypeError, match="must come below the route's decorator"):
        @blueprint.errors(DATABASE_BUSY)
        @blueprint.get("/misdeclared")
        def misdeclared():
            return {}


def _refused_in_every_way_every_operation_can_be(client, method: str, path: str, body):
    """The answers of `method path` to requests every operation of a service refuses."""
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    answers = [asked(client, method, path, body, headers={}),
               asked(client, method, path, body, headers={"X-User-ID": "a b"}),
               asked(client, method, path, body, headers={"X-User-ID": user_id}),  # unsigned
               # signed as a gateway of the release before signed (SIGNATURE_VERSION_MISMATCH)
               asked(client, method, path, body, signed_as=user_id,
                     headers={"X-Gateway-Signature": "0" * 64}),
               with_a_body_in_chunks(client, method, path, signed_as=user_id),
               asked(client, method, f"{path}?unknown=1", body, signed_as=user_id),
               # a deadline the gateway signed, of no form (INVALID_DEADLINE)
               asked(client, method, path, body, signed_as=user_id,
                     headers={DEADLINE_HEADER: "soon"})]
    if method == "post":
        answers += [asked(client, method, path, signed_as=user_id, data="{",
                          content_type="application/json"),
                    asked(client, method, path, signed_as=user_id, data="{}",
                          content_type="text/plain")]
    return answers


def test_every_error_a_service_operation_answers_is_documented_for_it_and_none_other(
        orders_flask_app, payments_flask_app, settings):
    """Each operation asked in every way it can fail: every error it answers (status, code and
    Retry-After) is documented for it, and it documents none it was not seen to answer, so the
    document cannot drift from the behaviour either way."""
    apps = {"orders": orders_flask_app, "payments": payments_flask_app}
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    without_database = {
        "orders": orders_app.create_app(settings=dataclasses.replace(
            settings, orders_database_url=unreachable)),
        "payments": payments_app.create_app(settings=dataclasses.replace(
            settings, payments_database_url=unreachable))}
    specs = {service: app.test_client().get("/docs/openapi.json").get_json()
             for service, app in apps.items()}
    answers = {operation: [] for operation in SERVICE_OPERATIONS}
    for (service, method, path), (body, _) in SERVICE_OPERATIONS.items():
        client = apps[service].test_client()
        answers[service, method, path] += [
            *_refused_in_every_way_every_operation_can_be(client, method, path, body),
            asked(without_database[service].test_client(), method, path, body,
                   signed_as=f"user-{uuid.uuid4().hex[:12]}")]
    for service in ("orders", "payments"):
        busy = {"orders": orders_app, "payments": payments_app}[service].create_app(
            settings=settings)
        with no_connection_free(busy):
            for (owner, method, path), (body, _) in SERVICE_OPERATIONS.items():
                if owner == service:
                    answers[owner, method, path].append(asked(
                        busy.test_client(), method, path, body,
                        signed_as=f"user-{uuid.uuid4().hex[:12]}"))
    # What each operation refuses of its own.
    orders, payments = apps["orders"].test_client(), apps["payments"].test_client()
    user_id = f"user-{uuid.uuid4().hex[:12]}"
    keyed = {"Idempotency-Key": str(uuid.uuid4())}
    orders.post("/orders", json={"amount": "1.00"}, signed_as=user_id, headers=keyed)
    answers["orders", "post", "/orders"] += [
        orders.post("/orders", json={"amount": "2.00"}, signed_as=user_id, headers=keyed),
        orders.post("/orders", json={"amount": "1.00"},
                    signed_as=user_id, headers={"Idempotency-Key": ""})]
    answers["orders", "get", "/orders"].append(
        orders.get("/orders?cursor=abc", signed_as=user_id))
    answers["orders", "get", "/orders/{order_id}"].append(
        orders.get(f"/orders/{uuid.uuid4()}", signed_as=user_id))
    answers["payments", "get", "/accounts/balance"].append(
        payments.get("/accounts/balance", signed_as=user_id))
    answers["payments", "post", "/accounts/deposit"].append(
        payments.post("/accounts/deposit", json={"amount": "1.00"}, signed_as=user_id))
    payments.post("/accounts", signed_as=user_id)
    payments.post("/accounts/deposit", json={"amount": "1.00"}, signed_as=user_id, headers=keyed)
    answers["payments", "post", "/accounts"].append(
        payments.post("/accounts", signed_as=user_id))
    answers["payments", "post", "/accounts/deposit"] += [
        payments.post("/accounts/deposit", json={"amount": "2.00"}, signed_as=user_id,
                      headers=keyed),
        payments.post("/accounts/deposit", json={"amount": "1.00"},
                      signed_as=user_id, headers={"Idempotency-Key": ""})]
    with apps["payments"].app_context():
        db.session.get(Account, user_id).balance = MAX_BALANCE
        db.session.commit()
    answers["payments", "post", "/accounts/deposit"].append(
        payments.post("/accounts/deposit", json={"amount": "1.00"}, signed_as=user_id))
    # A key held by an earlier request under it, still under way, past lock_timeout.
    for client, path in ((orders, "/orders"), (payments, "/accounts/deposit")):
        held_key = str(uuid.uuid4())
        with key_row_held(settings.database_url(client.application.name), user_id,
                          f"POST {path}", held_key):
            answers[client.application.name, "post", path].append(client.post(
                path, json={"amount": "1.00"}, signed_as=user_id,
                headers={"Idempotency-Key": held_key}))
    # An unkeyed write's signature used before.
    body = b'{"amount": "1.00"}'
    for client, path in ((orders, "/orders"), (payments, "/accounts/deposit")):
        signed = _signed_for(user_id, "POST", path, body, sent_with=deadline_headers(30))
        answers[client.application.name, "post", path] += [
            client.post(path, data=body, headers=signed, content_type="application/json")
            for _ in range(2)][1:]
    # The caller gone by the time the work would commit.
    gone, opened = {DEADLINE_HEADER: "0"}, f"user-{uuid.uuid4().hex[:12]}"
    payments.post("/accounts", signed_as=opened)
    answers["orders", "post", "/orders"].append(
        orders.post("/orders", json={"amount": "1.00"}, signed_as=user_id, headers=gone))
    answers["payments", "post", "/accounts"].append(
        payments.post("/accounts", signed_as=f"user-{uuid.uuid4().hex[:12]}",
                      headers={DEADLINE_HEADER: "0"}))
    answers["payments", "post", "/accounts/deposit"].append(
        payments.post("/accounts/deposit", json={"amount": "1.00"},
                      signed_as=opened, headers={DEADLINE_HEADER: "0"}))

    for (service, method, path), given in answers.items():
        seen = {assert_documented(specs[service], method, path, answer) for answer in given}
        assert seen == documented_answers(specs[service], method, path), (method, path)


@pytest.mark.parametrize("seconds_from_now, placed", [
    (-0.001, False), (-86400, False), (60, True), (7200, True),
], ids=["just passed", "long passed", "a minute on", "hours on: none"])
def test_a_service_commits_nothing_once_the_moment_its_caller_gave_has_passed(
        orders_http, user_id, seconds_from_now, placed, caplog):
    """X-Gateway-Deadline, as the gateway sends it: once passed, 504 CALLER_GAVE_UP and no order,
    and a request that came after it is logged (a backlog, or clocks that disagree); one hours
    off is no deadline (one of no documented form is refused: below)."""
    given = deadline_headers(seconds_from_now)[DEADLINE_HEADER]
    answer = orders_http.post("/orders", json={"amount": "1.00"},
                              signed_as=user_id, headers={DEADLINE_HEADER: given})
    listed = orders_http.get("/orders", signed_as=user_id).get_json()["items"]
    if placed:
        assert answer.status_code == 202 and len(listed) == 1
    else:
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (504, "CALLER_GAVE_UP")
        assert listed == [] and "after its caller's deadline" in caplog.text


def _orders_listed(orders_http, user_id) -> int:
    return len(orders_http.get("/orders", signed_as=user_id).get_json()["items"])


@pytest.mark.parametrize("path, status", [("/orders", 202), ("/accounts/deposit", 200)])
def test_a_keyed_request_carried_out_and_repeated_past_its_deadline_is_answered_its_answer(
        orders_http, payments_http, user_id, path, status):
    """A keyed order or top-up carried out (its answer lost, say), repeated under its key with
    the gateway's deadline passed: the repeat commits nothing new, and is answered the first
    answer, Idempotent-Replayed, where it was rolled back for the deadline (504 CALLER_GAVE_UP,
    which the gateway tells its client as "nothing of it was done") with the order placed, the
    top-up made. New work past the deadline, under another key, is still rolled back."""
    client = orders_http if path == "/orders" else payments_http
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    body, key = {"amount": "1.00"}, f"late-{uuid.uuid4().hex}"
    first = client.post(path, json=body, signed_as=user_id, headers={"Idempotency-Key": key})
    assert first.status_code == status and REPLAYED_HEADER not in first.headers
    passed = deadline_headers(-0.001)
    again = client.post(path, json=body, signed_as=user_id,
                        headers={"Idempotency-Key": key, **passed})
    assert (again.status_code, again.headers.get(REPLAYED_HEADER), again.data) == \
        (status, REPLAYED, first.data), again.get_data(as_text=True)
    fresh = client.post(path, json=body, signed_as=user_id,
                        headers={"Idempotency-Key": f"{key}-2", **passed})
    assert _assert_error(fresh, 504)["code"] == "CALLER_GAVE_UP"
    balance = payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"]
    assert (_orders_listed(orders_http, user_id), balance) == \
        ((1, "0.00") if path == "/orders" else (0, "1.00"))


def test_a_refusal_made_past_the_deadline_is_not_kept_and_one_kept_is_answered_past_it(
        payments_http, payments_flask_app, user_id):
    """A top-up under a key refused 404 (no account) once the gateway's deadline has passed keeps
    nothing: keeping it is new work, which the deadline rolls back (504 CALLER_GAVE_UP, "nothing
    of it was done"), and its repeat is carried out afresh. A refusal kept before is answered
    again past the deadline, Idempotent-Replayed, as any answer kept."""
    passed = deadline_headers(-0.001)

    def deposit(key: str, **deadline):
        return payments_http.post("/accounts/deposit", json={"amount": "5"}, signed_as=user_id,
                                  headers={"Idempotency-Key": key, **deadline})

    late, kept = deposit("late", **passed), deposit("kept")
    assert _assert_error(late, 504)["code"] == "CALLER_GAVE_UP"
    assert _assert_error(kept, 404)["code"] == "ACCOUNT_NOT_FOUND"
    assert list(_keys_kept(payments_flask_app, user_id)) == ["kept"]
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    kept_again, late_again = deposit("kept", **passed), deposit("late")
    assert (kept_again.status_code, kept_again.headers.get(REPLAYED_HEADER), kept_again.data) == (
        404, REPLAYED, kept.data)
    assert (late_again.status_code, late_again.get_json()["balance"]) == (200, "5.00")


def test_a_keyed_order_repeated_as_its_first_send_commits_slowly_is_answered_its_answer(
        orders_http, orders_flask_app, settings, user_id):
    """A keyed order whose COMMIT is slow (1.5 s: its answer came too late for the gateway, a
    504 UPSTREAM_TIMEOUT), repeated under its key as it commits: the repeat waits on the first's
    unfinished key insert while its deadline passes, then finds the first's answer, and is
    answered it, Idempotent-Replayed, where it was rolled back for the deadline, 504
    CALLER_GAVE_UP ("nothing of it was done"), with the order placed."""
    body, key = {"amount": "1.00"}, {"Idempotency-Key": f"slow-{uuid.uuid4().hex}"}
    database_url = settings.database_url("orders")
    with commits_of_orders_taking(database_url, user_id, 1.5):
        first = OutcomeThread(lambda: orders_flask_app.test_client().post(
            "/orders", json=body, signed_as=user_id, headers=key), name="first send")
        again = OutcomeThread(lambda: orders_http.post(
            "/orders", json=body, signed_as=user_id, headers={**key, **deadline_headers(0.2)}),
            name="repeat")
        first.start()
        try:
            wait_for_other_sessions(database_url, "wait_event = 'PgSleep'", timeout=10,
                                    what="the first send's slow COMMIT")
            again.start()
            wait_for_sessions_waiting_on_a_lock(database_url, timeout=5,
                                                what="the repeat waiting on the first's key")
        finally:
            answers = all_joined([thread for thread in (first, again) if thread.ident is not None],
                                 15)
    first_answer, again_answer = answers
    assert first_answer.status_code == 202 and REPLAYED_HEADER not in first_answer.headers
    assert (again_answer.status_code, again_answer.headers.get(REPLAYED_HEADER),
            again_answer.data) == (202, REPLAYED, first_answer.data), \
        again_answer.get_data(as_text=True)
    assert _orders_listed(orders_http, user_id) == 1


@pytest.mark.parametrize("given", MALFORMED_DEADLINES.values(), ids=MALFORMED_DEADLINES)
def test_a_deadline_of_no_documented_form_is_refused_400_once_its_signature_holds(
        orders_http, payments_http, user_id, given):
    """Signed by the gateway, a deadline of no form the documents give is a 400 INVALID_DEADLINE
    on every operation, and nothing is done: it was taken as none, and the work committed
    however long after the gateway's 504. Asked after the signature (a 401 first when the
    deadline is not the one signed, as for any header tampered with): a deadline is the gateway's
    alone, and nothing of a caller that is not the gateway's is read."""
    malformed = {DEADLINE_HEADER: given}
    assert payments_http.post("/accounts", signed_as=user_id).status_code == 201
    for answer in (
            orders_http.post("/orders", json={"amount": "1.00"}, signed_as=user_id,
                             headers=malformed),
            orders_http.get("/orders", signed_as=user_id, headers=malformed),
            payments_http.post("/accounts/deposit", json={"amount": "1.00"}, signed_as=user_id,
                               headers={**malformed, "Idempotency-Key": str(uuid.uuid4())}),
            payments_http.get("/accounts/balance", signed_as=user_id, headers=malformed)):
        error = _assert_error(answer, 400)
        assert error["code"] == "INVALID_DEADLINE" and DEADLINE_HEADER in error["message"]
    signed_for_another = _signed_for(user_id, "POST", "/orders", b'{"amount": "1.00"}',
                                     sent_with=deadline_headers(30))
    for answer in (
            orders_http.post("/orders", data=b'{"amount": "1.00"}', content_type="application/json",
                             headers={**signed_for_another, **malformed}),
            orders_http.get("/orders", headers=malformed)):
        assert _assert_error(answer, 401)["code"] in ("UNTRUSTED_IDENTITY", "MISSING_USER_ID")
    assert orders_http.get("/orders", signed_as=user_id).get_json()["items"] == []
    assert payments_http.get("/accounts/balance", signed_as=user_id).get_json()["balance"] == \
        "0.00"


def test_an_empty_deadline_added_to_a_request_signed_without_one_holds_its_signature_a_400(
        orders_http, user_id):
    """As README says: the signature's line for the deadline is empty when a request has none,
    so a request signed without one (a direct caller's: the gateway signs a deadline into every
    request) sent again with an empty header added is a 400 INVALID_DEADLINE, not a 401; added
    to a request signed with one, the empty header is a 401. Nothing done either way."""
    body = b'{"amount": "1.00"}'
    for sent_with, status, code in ((None, 400, "INVALID_DEADLINE"),
                                    (deadline_headers(30), 401, "UNTRUSTED_IDENTITY")):
        signed = _signed_for(user_id, "POST", "/orders", body, sent_with=sent_with)
        answer = orders_http.post("/orders", data=body, content_type="application/json",
                                  headers={**signed, DEADLINE_HEADER: ""})
        assert _assert_error(answer, status)["code"] == code
    assert orders_http.get("/orders", signed_as=user_id).get_json()["items"] == []


def test_a_request_not_the_gateways_with_a_deadline_long_past_logs_nothing_of_it(orders_http,
                                                                                 caplog):
    """The deadline is read once the request's identity is verified, as over gRPC: anyone's
    request to the service with a moment long past, unsigned or signed by no gateway, had it log
    that a request came so long after its caller's deadline (the clocks disagreeing), a line of
    the caller's making."""
    past = {DEADLINE_HEADER: f"{time.time() - 3600:.3f}"}
    for signing in ({}, {"signed_as": f"user-{uuid.uuid4().hex[:8]}",
                         "signed_with": "not the secret"}):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            answer = orders_http.get("/orders", headers=past, **signing)
        assert answer.status_code == 401, answer.get_json()
        assert "caller's deadline" not in caplog.text


def _as_swagger_ui_fills_it_in(spec: dict, method: str, path: str) -> tuple[dict, dict | None]:
    """The headers and the body that Swagger UI's "Try it out" fills in for the operation: each
    header parameter's example, and in the body each field's example or default."""
    operation = spec["paths"][path][method]
    headers = _given({parameter["name"]: parameter.get("example", _example(parameter["schema"]))
                      for parameter in operation.get("parameters", [])
                      if parameter.get("in") == "header"})
    if "requestBody" not in operation:
        return headers, None
    body = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    fields = spec["components"]["schemas"][body.rpartition("/")[2]]["properties"]
    return headers, _given({name: _example(field) for name, field in fields.items()})


def _example(schema: dict):
    """A value's example as Swagger UI takes it: its own, else its first form's (of a oneOf),
    else its default; None for none."""
    for described in (schema, *schema.get("oneOf", [])[:1]):
        if "example" in described:
            return described["example"]
    return schema.get("default")


def _given(values: dict) -> dict:
    return {name: value for name, value in values.items() if value is not None}


def test_what_swagger_ui_fills_in_on_try_it_out_is_carried_out(orders_http, payments_http,
                                                                 user_id):
    """Each operation that commits work, asked with what "Try it out" fills in from the services'
    documents, in the order a person tries them: the account opened, topped up, an order placed.
    (The gateway's deadline had an example, a moment long past, which Swagger UI sent with each:
    every one was refused 504 CALLER_GAVE_UP.)"""
    clients = {"orders": orders_http, "payments": payments_http}
    for service, path, status in (("payments", "/accounts", 201),
                                  ("payments", "/accounts/deposit", 200),
                                  ("orders", "/orders", 202)):
        spec = clients[service].get("/docs/openapi.json").get_json()
        headers, body = _as_swagger_ui_fills_it_in(spec, "post", path)
        answer = clients[service].post(path, json=body, signed_as=user_id, headers=headers)
        assert answer.status_code == status, (path, headers, body, answer.get_json())


def test_the_gateway_takes_no_deadline_from_its_clients(settings):
    """The public door: a client's X-Gateway-Deadline changes nothing there."""
    gateway = gateway_app.create_app(settings=settings).test_client()
    signed_up = gateway.post("/api/auth/register", headers={DEADLINE_HEADER: "0"}, json={
        "username": f"user-{uuid.uuid4().hex[:10]}", "password": "correct horse"})
    assert signed_up.status_code == 201


def test_with_its_database_unreachable_a_service_answers_503_not_500(settings, user_id):
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"
    shop = orders_app.create_app(settings=dataclasses.replace(settings,
                                                              orders_database_url=unreachable))
    response = shop.test_client().post("/orders", json={"amount": "1.00"}, signed_as=user_id)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    assert response.get_json()["error"]["code"] == "DATABASE_UNAVAILABLE"


def _one_pooled_connection(app) -> None:
    """Empty `app`'s pool, so that the requests after (one at a time) all use one connection: with
    more kept idle (earlier tests' threads), the next request might not get the dropped one."""
    with app.app_context():
        db.engine.dispose()


def _drop_pooled_connection(app) -> None:
    """Have the database end the connection `app`'s requests use (pooled, one at a time here),
    leaving every other connection to the database alone."""
    with app.app_context():
        pid = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        db.session.rollback()
    terminate_backend(app.config["SQLALCHEMY_DATABASE_URI"], pid)


def _placed(orders_http, user_id, amount: str) -> int:
    """The status POST /orders answers with."""
    return orders_http.post("/orders", json={"amount": amount}, signed_as=user_id).status_code


def test_after_the_database_drops_an_idle_connection_the_next_request_still_succeeds(
        orders_http, orders_flask_app, user_id, monkeypatch):
    """A pooled connection that sat idle is pinged before use and replaced if it is gone (as
    after a database restart), so no request fails for it."""
    _one_pooled_connection(orders_flask_app)
    assert _placed(orders_http, user_id, "1.00") == 202
    _drop_pooled_connection(orders_flask_app)
    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 0.0)  # every pooled one has sat idle
    assert _placed(orders_http, user_id, "2.00") == 202


def test_a_connection_in_steady_use_is_not_pinged(orders_http, orders_flask_app, user_id,
                                                  monkeypatch):
    with orders_flask_app.app_context():
        dialect = db.engine.dialect
    pings = []
    real_ping = dialect.do_ping
    monkeypatch.setattr(dialect, "do_ping", lambda connection: pings.append(1) or
                        real_ping(connection))
    assert _placed(orders_http, user_id, "1.00") == 202  # (pinged if it had sat idle)
    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 3600.0)  # steady: never idle this long
    before = len(pings)
    for amount in ("2.00", "3.00", "4.00"):
        assert _placed(orders_http, user_id, amount) == 202
    assert len(pings) == before
    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 0.0)  # every checkout has sat idle
    assert _placed(orders_http, user_id, "5.00") == 202
    assert len(pings) > before


def test_a_connection_that_breaks_in_use_is_a_503_and_is_not_used_again(
        orders_http, orders_flask_app, user_id, monkeypatch):
    monkeypatch.setattr(shared.db, "IDLE_PING_SECONDS", 3600.0)  # as if handed back just now
    _one_pooled_connection(orders_flask_app)
    assert _placed(orders_http, user_id, "1.00") == 202
    _drop_pooled_connection(orders_flask_app)
    failed = orders_http.post("/orders", json={"amount": "2.00"}, signed_as=user_id)
    assert _assert_error(failed, 503)["code"] == "DATABASE_UNAVAILABLE"
    assert failed.headers["Retry-After"] == "1"
    assert _placed(orders_http, user_id, "3.00") == 202
