"""What the gateway makes of a service's answer over either transport
(gateway_app.upstream_answers): an error of the API's, the statuses it answers for itself, the
Retry-After it passes on."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
import werkzeug.exceptions

import gateway_app.upstream_answers
import orders_app.schemas
import payments_app.schemas
import shared.caller_deadline
import shared.documented_errors
from gateway_app.upstream_answers import (LONGEST_RETRY_AFTER_SECONDS, Route,
                                          an_error_of_the_api, failure_for_status,
                                          retry_after_passed_on, rolled_back_for_the_deadline)
from shared.documented_errors import DocumentedError
from shared.errors import INTERNAL_ERROR, ApiError, code_for
from shared.internal_auth import InvalidIdentity


# A route documenting the 4xx errors the services' own errors relayed here are: SOME_CODE under
# each status they come with (and INVALID_IDEMPOTENCY_KEY under 400).
_ROUTE = Route("GET /api/orders/<order_id>", {
    **{status: frozenset({"SOME_CODE"}) for status in (401, 404, 413, 422, 429)},
    400: frozenset({"SOME_CODE", "INVALID_IDEMPOTENCY_KEY"})})


def _subclasses(cls):
    yield cls
    for subclass in cls.__subclasses__():
        yield from _subclasses(subclass)


def test_every_error_code_the_services_give_is_one_of_the_api():
    """The codes of their ApiError classes, of the identities they refuse, of every error their
    OpenAPI documents name, their unforeseen error's, and every HTTP status's name as Flask's
    own errors (a 404 or 405 of no route) and gunicorn's are answered with."""
    documented = {error.code for module in (orders_app.schemas, payments_app.schemas,
                                            shared.documented_errors, shared.caller_deadline)
                  for error in vars(module).values() if isinstance(error, DocumentedError)}
    assert {"ORDER_NOT_FOUND", "BALANCE_LIMIT_EXCEEDED", "VALIDATION_ERROR"} <= documented
    codes = documented | {INTERNAL_ERROR[0]} | {
        cls.code for base in (ApiError, InvalidIdentity) for cls in _subclasses(base)} | {
        code_for(cls().name) for cls in vars(werkzeug.exceptions).values()
        if isinstance(cls, type) and issubclass(cls, werkzeug.exceptions.HTTPException)
        and cls.code}
    assert {"METHOD_NOT_ALLOWED", "IM_A_TEAPOT", "SIGNATURE_VERSION_MISMATCH"} <= codes
    for code in codes:
        assert an_error_of_the_api(code, "a message", {}), code
    assert an_error_of_the_api("VALIDATION_ERROR", "The request is not valid.",
                               {"json": {"amount": ["Not a valid number."]}})


# The same cases test_grpc.py puts to both transports, with more.
@pytest.mark.parametrize("code, message, details", [
    (None, "m", {}),
    ("", "m", {}),
    ("<b>no code</b>", "m", {}),
    ("not_found", "m", {}),
    ("1_NOT_FOUND", "m", {}),
    ("NOT FOUND", "m", {}),
    ("NOT_FOUND\n", "m", {}),
    (404, "m", {}),
    ("NOT_FOUND", None, {}),
    ("NOT_FOUND", 5, {}),
    ("NOT_FOUND", "m", None),
    ("NOT_FOUND", "m", [1]),
    ("NOT_FOUND", "m", "x"),
])
def test_what_is_no_error_of_the_api_is_told_apart(code, message, details):
    assert not an_error_of_the_api(code, message, details)


@pytest.mark.parametrize("value, passed_on", [
    (None, None),
    ("1", "1"),
    ("0", "1"),  # (at least 1, as documented)
    ("120", "120"),
    (" 120\t", "120"),  # (a field value's optional whitespace)
    ("86400", "86400"),
    ("86401", "86400"),  # at most a day
    ("2147484", "86400"),  # (past what a browser's timer holds, in ms)
    ("9" * 40, "86400"),
    ("9" * 4301, "86400"),  # (past the 4300 digits Python's int() reads)
    ("0" * 5000 + "1", "1"),
    ("Sun, 06 Nov 1994 08:49:37 GMT", "1"),  # a date passed: now (at least 1)
    ("Wed, 31 Dec 2036 23:59:60 GMT", "86400"),  # a leap second (and at most a day)
    ("Wed, 31 Dec 2036 12:00:60 GMT", "86400"),  # (one at any minute: read as the next's first)
    ("Fri, 31 Dec 9999 23:59:60 GMT", "86400"),  # past the last moment Python reads
    ("", None),
    ("-1", None),
    ("+1", None),
    ("1.5", None),
    ("1e3", None),
    ("١", None),  # a digit, but no DIGIT (Arabic-Indic one)
    ("soon", None),
    ("1, 2", None),  # two values
    ("Sunday, 06-Nov-94 08:49:37 GMT", None),  # rfc850-date: read, but no sender's to write
    ("Sun Nov  6 08:49:37 1994", None),  # asctime-date: the same
    ("Sun, 6 Nov 1994 08:49:37 GMT", None),
    ("Sun,  06 Nov 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 UTC", None),
    ("sun, 06 nov 1994 08:49:37 GMT", None),
    ("Mon, 06 Nov 1994 08:49:37 GMT", None),  # a Sunday
    ("Fri, 30 Feb 2024 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 24:00:00 GMT", None),
    ("Sun, 06 Nov 1994 08:60:00 GMT", None),
    ("Sun, 06 Nov 1994 08:49:61 GMT", None),
])
def test_a_retry_after_is_passed_on_only_if_it_is_delay_seconds_or_an_imf_fixdate(value,
                                                                                  passed_on):
    assert retry_after_passed_on("orders", value) == passed_on


class _ClockAt(datetime):
    """The gateway's clock, stopped half a second before 11:59:51 on Wed, 31 Dec 2036."""

    @classmethod
    def now(cls, tz=None):
        return cls(2036, 12, 31, 11, 59, 50, 500_000, tzinfo=timezone.utc).astimezone(tz)


@pytest.mark.parametrize("value, passed_on", [
    ("Wed, 31 Dec 2036 12:00:00 GMT", "10"),  # 9.5 s from now: the whole seconds, rounded up
    ("Wed, 31 Dec 2036 12:00:60 GMT", "70"),  # a leap second: 12:01:00, 69.5 s from now
    ("Wed, 31 Dec 2036 11:59:50 GMT", "1"),  # half a second ago: now (at least 1)
    ("Thu, 01 Jan 2037 11:59:51 GMT", "86400"),  # a day and half a second from now
])
def test_a_retry_after_date_is_passed_on_as_the_seconds_until_it(monkeypatch, value,
                                                                 passed_on):
    """One form for every client to read (the web page reads a number of seconds)."""
    monkeypatch.setattr(gateway_app.upstream_answers, "datetime", _ClockAt)
    assert retry_after_passed_on("orders", value) == passed_on
    assert LONGEST_RETRY_AFTER_SECONDS == 86400


def test_a_retry_after_left_out_is_logged(caplog):
    retry_after_passed_on("orders", "in a bit")
    assert "orders answered a Retry-After that is none ('in a bit')" in caplog.text


@pytest.mark.parametrize("status, unavailable_for_now, answered", [
    (200, False, None),
    (404, False, None),
    (422, False, None),
    (503, True, None),  # the service's own, in the usual error shape
    (401, False, (502, "BAD_GATEWAY")),
    (500, False, (502, "BAD_GATEWAY")),
    (502, False, (502, "BAD_GATEWAY")),
    (503, False, (502, "BAD_GATEWAY")),
    (599, False, (502, "BAD_GATEWAY")),
    (504, False, (504, "UPSTREAM_TIMEOUT")),
])
def test_a_failure_of_the_services_is_answered_for_and_its_own_errors_relayed(
        status, unavailable_for_now, answered):
    failure = failure_for_status("orders", status, route=_ROUTE,
                                 unavailable_for_now=unavailable_for_now,
                                 said=lambda: "what it said", error_code=lambda: "SOME_CODE")
    assert (failure and (failure.status, failure.code)) == answered


@pytest.mark.parametrize("code, answered", [
    ("CALLER_GAVE_UP", "CALLER_GAVE_UP"),  # the service's own rollback for the deadline
    (None, "UPSTREAM_TIMEOUT"),  # no error of the API's: a proxy in front of it timing out
    ("GATEWAY_TIMEOUT", "UPSTREAM_TIMEOUT"),
])
def test_a_504_says_nothing_was_done_only_when_the_service_said_it_rolled_back(code, answered):
    """The service's CALLER_GAVE_UP is the gateway's 504 under that code, in its own words (the
    service named: "caller" would be the client's gateway to it), saying the request was not
    carried out; any other 504 "may still have taken effect". Either says to retry with the same
    Idempotency-Key only if the request had one: the message is every route's, a read's, an
    unkeyed write's and POST /api/accounts' (which honours none) too."""
    failure = failure_for_status("orders", 504, route=_ROUTE, unavailable_for_now=False,
                                 said=lambda: "what it said", error_code=lambda: code)
    assert (failure.status, failure.code, failure.details) == (
        504, answered, {"service": "orders"})
    assert "orders service" in failure.message
    if answered == "CALLER_GAVE_UP":
        assert "nothing of it was done" in failure.message
    else:
        assert "may still have taken effect" in failure.message
    assert "(with the same Idempotency-Key, if it had one)" in failure.message


@pytest.mark.parametrize("status, code, rolled_back", [
    (504, "CALLER_GAVE_UP", True),
    (504, None, False),
    (504, "UPSTREAM_TIMEOUT", False),
    (503, "CALLER_GAVE_UP", False),
    (502, "CALLER_GAVE_UP", False),
])
def test_only_a_504_caller_gave_up_says_the_service_rolled_back_for_the_deadline(
        status, code, rolled_back):
    assert rolled_back_for_the_deadline(status, code) is rolled_back


def test_a_signature_used_twice_is_logged_as_that_not_as_a_release_secret_or_clock_apart(caplog):
    """Both 401s are a 502 to the client; the log tells the operator what to look at: for a
    SIGNATURE_USED, a replay (each request the gateway signs has a nonce of its own), not the
    release, INTERNAL_AUTH_SECRET or the clocks, which it had suggested."""
    for code, said, not_said in (
            ("UNTRUSTED_IDENTITY", "INTERNAL_AUTH_SECRET", "used twice"),
            ("SIGNATURE_USED", "an unkeyed write's signature was used twice (a replay: each "
                               "request the gateway signs has a nonce of its own)",
             "INTERNAL_AUTH_SECRET")):
        caplog.clear()
        failure = failure_for_status("orders", 401, route=_ROUTE, unavailable_for_now=False,
                                     said=lambda: "what it said", error_code=lambda: code)
        assert (failure.status, failure.code) == (502, "BAD_GATEWAY")
        assert said in caplog.text and not_said not in caplog.text, code


def test_a_deadline_the_service_refuses_for_its_form_is_a_502_logged_not_relayed(caplog):
    """The gateway's client never sent an X-Gateway-Deadline: a 400 INVALID_DEADLINE relayed told
    it of a header it knows nothing of. The gateway's fault, as a refused identity is: a 502, and
    the operator told. Any other 400 is relayed."""
    failure = failure_for_status("orders", 400, route=_ROUTE, unavailable_for_now=False,
                                 said=lambda: "what it said",
                                 error_code=lambda: "INVALID_DEADLINE")
    assert (failure.status, failure.code) == (502, "BAD_GATEWAY")
    assert "refused the deadline the gateway signed" in caplog.text
    assert failure_for_status("orders", 400, route=_ROUTE, unavailable_for_now=False,
                              said=lambda: "", error_code=lambda: "INVALID_IDEMPOTENCY_KEY") is None


# A route as the gateway's GET /api/accounts/balance documents its 4xx but its own (a 401, a 429).
_BALANCE = Route("GET /api/accounts/balance", {
    404: frozenset({"ACCOUNT_NOT_FOUND"}), 413: frozenset({"REQUEST_ENTITY_TOO_LARGE"}),
    422: frozenset({"VALIDATION_ERROR"})})


@pytest.mark.parametrize("status, code", [
    (404, "NOT_FOUND"),  # a path the service does not know (its URL wrong): Flask's own 404
    (404, "ORDER_NOT_FOUND"),  # (the other service's)
    (422, "BALANCE_LIMIT_EXCEEDED"),  # (another operation's)
    (404, None),  # (no error of the API's)
    (405, "METHOD_NOT_ALLOWED"),
    (409, "ACCOUNT_EXISTS"),
    (400, "MALFORMED_REQUEST"),
])
def test_a_4xx_the_route_does_not_document_is_a_502_logged_not_relayed(caplog, status, code):
    """Any 4xx whose status and code together the route's document does not give: no answer of
    the route's, a 502 over either transport, the route, the status, the code and what the
    service said logged. A 404 NOT_FOUND for a path the service does not know was relayed by a
    route whose 404 is ACCOUNT_NOT_FOUND, its status documented."""
    failure = failure_for_status("payments", status, route=_BALANCE, unavailable_for_now=False,
                                 said=lambda: "what it said", error_code=lambda: code)
    assert (failure.status, failure.code, failure.details) == (
        502, "BAD_GATEWAY", {"service": "payments"})
    logged_code = code or "(no error of the API's)"
    assert (f"GET /api/accounts/balance: payments answered {status} {logged_code}, an error the"
            " route does not document: what it said") in caplog.text


@pytest.mark.parametrize("status, code", [(404, "ACCOUNT_NOT_FOUND"), (422, "VALIDATION_ERROR")])
def test_a_4xx_the_route_documents_is_relayed(status, code):
    assert failure_for_status("payments", status, route=_BALANCE, unavailable_for_now=False,
                              said=lambda: "", error_code=lambda: code) is None
