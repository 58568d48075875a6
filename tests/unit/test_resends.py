"""The one rule of which requests the gateway sends to a service again, dropped unanswered once
sent, over either transport (gateway_app/resends.py)."""

from __future__ import annotations

import types

import grpc
import pytest
from flask import Flask

from gateway_app import upstream_grpc
from gateway_app.resends import safe_to_send_again, sent_again_under_its_key
from shared.errors import ApiError
from shared.grpc_server import (ERROR_CODE_KEY, ERROR_DETAILS_KEY, HTTP_STATUS_KEY,
                                RETRY_AFTER_KEY, channel_options)


@pytest.mark.parametrize("method, key_passed_on, safe", [
    ("GET", None, True),
    ("HEAD", None, True),
    ("POST", "retry-me", True),
    ("POST", None, False),
    ("GET", "retry-me", True),
    # A key makes a POST safe alone: no other method honours one.
    ("PUT", "retry-me", False),
    ("PATCH", "retry-me", False),
    ("DELETE", "retry-me", False),
    ("OPTIONS", "retry-me", False),
])
def test_a_read_or_a_keyed_post_is_safe_to_send_again_and_any_other_request_is_not(
        method, key_passed_on, safe):
    assert safe_to_send_again(method, key_passed_on) is safe


@pytest.mark.parametrize("method, key_passed_on, under_its_key", [
    ("POST", "retry-me", True),
    # A read's second try is answered as a first answer would be, key or none.
    ("GET", None, False),
    ("HEAD", None, False),
    ("GET", "retry-me", False),
    # Never sent again.
    ("POST", None, False),
    ("PUT", "retry-me", False),
])
def test_only_a_keyed_post_is_sent_again_under_its_key(method, key_passed_on, under_its_key):
    """A keyed POST's second try vouches for the first only through its key (its 5xx is the
    first try's 502); a read's does not need to."""
    assert sent_again_under_its_key(method, key_passed_on) is under_its_key


def test_a_grpc_call_sent_again_goes_on_a_channel_of_its_own_closed_once_used(monkeypatch):
    """The second try's channel takes a subchannel pool of its own, so that grpc-core makes it a
    connection of its own rather than give it one of the process's channel's (upstream_grpc.py's
    _channel_of_its_own says why, and what the evidence for it is), with the channel's other
    options; used in a `with`, it is closed after."""
    made = []
    insecure_channel = grpc.insecure_channel

    def recorded(target, options=None, **kwargs):
        made.append((target, dict(options or ())))
        return insecure_channel(target, options=options, **kwargs)

    monkeypatch.setattr(grpc, "insecure_channel", recorded)
    app = Flask(__name__)
    app.extensions["hseshop.settings"] = types.SimpleNamespace(orders_grpc_target="127.0.0.1:9")
    with app.app_context(), upstream_grpc._channel_of_its_own("orders") as channel:
        pass
    assert made == [("127.0.0.1:9", {**dict(channel_options()),
                                     "grpc.use_local_subchannel_pool": 1})]
    with pytest.raises(ValueError, match="closed channel"):
        channel.unary_unary("/hseshop.orders.Orders/ListOrders")(b"", timeout=1)


class _Failed(grpc.RpcError):
    """A failed call as grpcio raises it, none of the service's trailers in it unless given."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailers: tuple[tuple[str, str], ...] = ()):
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("second_try_failure", [
    _Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ..."),
    _Failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"),
    # (as shared.grpc_server aborts a call its service rolled back for the deadline)
    _Failed(grpc.StatusCode.DEADLINE_EXCEEDED, "The caller's deadline passed ...", (
        (HTTP_STATUS_KEY, "504"), (ERROR_CODE_KEY, "CALLER_GAVE_UP"),
        (ERROR_DETAILS_KEY, "{}"))),
    # (as shared.grpc_server aborts a call whose statement waited out lock_timeout: on the first
    # try's key, uncommitted, it may be)
    _Failed(grpc.StatusCode.UNAVAILABLE, "The service's database was too busy ...", (
        (HTTP_STATUS_KEY, "503"), (ERROR_CODE_KEY, "DATABASE_BUSY"), (ERROR_DETAILS_KEY, "{}"),
        (RETRY_AFTER_KEY, "1"))),
    _Failed(grpc.StatusCode.UNAVAILABLE, "An earlier request under this Idempotency-Key ...", (
        (HTTP_STATUS_KEY, "503"), (ERROR_CODE_KEY, "IDEMPOTENCY_KEY_IN_USE"),
        (ERROR_DETAILS_KEY, "{}"), (RETRY_AFTER_KEY, "1"))),
    _Failed(grpc.StatusCode.UNAVAILABLE, "Socket closed"),
], ids=["never sent", "refused unrun, too busy", "rolled back for the deadline",
        "held up by a lock", "held up by the first try's key", "broken off in turn"])
def test_a_second_try_that_did_nothing_leaves_the_first_trys_502(monkeypatch, second_try_failure):
    """A keyed POST's first try's connection broke once it was sent (it may have been carried
    out); its second try did nothing, or failed: not sent, refused by a server too busy to take
    it, rolled back as the deadline (the first try's) passed, having found no answer stored under
    its key while the first may be under way still, short of it, or held up by a lock past
    lock_timeout (503 DATABASE_BUSY, "nothing was changed": the likely answer while the first try
    still holds its key uncommitted, which the second's waits on), or broken off in turn. The
    answer is the first try's 502 BAD_GATEWAY ("may have been carried out"), not the second's 503
    or 504 CALLER_GAVE_UP, which would say nothing was done."""
    failures = _failing_twice(monkeypatch, second_try_failure)
    with _a_request_of(Flask(__name__), "POST"), pytest.raises(ApiError) as refused:
        upstream_grpc.call("orders", "PlaceOrder", {}, safe_to_send_again=True,
                           under_its_key=True)
    assert (refused.value.status, refused.value.code) == (502, "BAD_GATEWAY")
    assert next(failures, None) is None  # (sent twice)


@pytest.mark.parametrize("code", ["DATABASE_BUSY", "DATABASE_UNAVAILABLE"])
def test_a_reads_second_try_failed_by_the_service_is_answered_as_a_first_answer_would_be(
        monkeypatch, code):
    """A GET's first try's connection broke once it was sent, and the service fails its second
    try 503 with Retry-After: 7. A read changes nothing: the 503 is answered as a first answer
    would be, its code and Retry-After passed on, not the first try's 502 (a keyed POST's rule,
    above)."""
    failures = _failing_twice(monkeypatch, _Failed(
        grpc.StatusCode.UNAVAILABLE, "Try again shortly.", (
            (HTTP_STATUS_KEY, "503"), (ERROR_CODE_KEY, code), (ERROR_DETAILS_KEY, "{}"),
            (RETRY_AFTER_KEY, "7"))))
    with _a_request_of(Flask(__name__), "GET"), pytest.raises(ApiError) as refused:
        upstream_grpc.call("orders", "ListOrders", {}, safe_to_send_again=True,
                           under_its_key=False)
    assert (refused.value.status, refused.value.code) == (503, code)
    assert refused.value.headers.get("Retry-After") == "7"
    assert next(failures, None) is None  # (sent twice)


def _failing_twice(monkeypatch, second_try_failure: grpc.RpcError):
    """upstream_grpc made to fail a call's first try as a connection broken once it was sent,
    and its second with `second_try_failure`: the failures yet to come (none, once both came)."""
    failures = iter([_Failed(grpc.StatusCode.UNAVAILABLE, "Socket closed"), second_try_failure])

    def sent(*args):
        raise next(failures)

    monkeypatch.setattr(upstream_grpc, "_sent", sent)
    monkeypatch.setattr(upstream_grpc, "_process_channel",
                        lambda service: _NoChannel(types.SimpleNamespace(stub=None)))
    monkeypatch.setattr(upstream_grpc, "STUBS", {"orders": lambda channel: None})
    monkeypatch.setattr(upstream_grpc, "_channel_of_its_own", lambda service: _NoChannel())
    return failures


def _a_request_of(app: Flask, method: str):
    """A request context of `app` (settings giving the gateway's 5 s) for `method` of
    /api/orders, a route that documents no error of its own."""
    def orders():
        pass

    orders._documented_error_codes = {}
    app.add_url_rule("/api/orders", view_func=orders, methods=[method])
    app.extensions["hseshop.settings"] = types.SimpleNamespace(upstream_timeout_seconds=5.0)
    return app.test_request_context("/api/orders", method=method)


class _NoChannel:
    def __init__(self, given=None):
        self.given = given

    def __enter__(self):
        return self.given

    def __exit__(self, *exc):
        return False
