"""The services' check of the identity the gateway signs (pure logic, no I/O)."""

from __future__ import annotations

import hashlib
import hmac
import re
import time

import pytest
import requests

from shared.caller_deadline import DEADLINE_HEADER
from shared.idempotency import IDEMPOTENCY_HEADER
from shared.internal_auth import (MAX_AGE_SECONDS, MAX_AHEAD_SECONDS, SIGNED_HEADERS,
                                  InvalidIdentity, SignedAs, SignatureVersionMismatch,
                                  grpc_identity_metadata, identity_headers, verified_user_id)

SECRET = "a secret only the gateway and the services know"
DEPOSIT = ("POST", "/accounts/deposit", b'{"amount": "10.00"}')


def test_the_gateways_signature_vouches_for_its_user_on_the_request_it_signed():
    assert verified_user_id(identity_headers("usr_1", SECRET, *DEPOSIT), SECRET,
                            *DEPOSIT) == "usr_1"


@pytest.mark.parametrize("sent", [
    ("GET", "/accounts/deposit", DEPOSIT[2]),  # another method
    ("POST", "/accounts", DEPOSIT[2]),  # another path
    ("POST", "/accounts/deposit?x=1", DEPOSIT[2]),  # another query
    ("POST", "/accounts/deposit", b'{"amount": "99999.00"}'),  # another body
    ("POST", "/accounts/deposit", b""),  # no body
])
def test_a_signature_for_one_request_vouches_for_no_other(sent):
    with pytest.raises(InvalidIdentity, match="not the gateway's for this request"):
        verified_user_id(identity_headers("usr_1", SECRET, *DEPOSIT), SECRET, *sent)


KEYED = {"Idempotency-Key": "deposit-1", "X-Gateway-Deadline": "1900000000.250"}


def test_the_signed_headers_are_the_ones_the_services_read():
    assert SIGNED_HEADERS == (IDEMPOTENCY_HEADER, DEADLINE_HEADER)


@pytest.mark.parametrize("sent_with", [
    {**KEYED, "Idempotency-Key": "deposit-2"},  # another key: another deposit
    {"X-Gateway-Deadline": KEYED["X-Gateway-Deadline"]},  # no key: a deposit each time
    {**KEYED, "X-Gateway-Deadline": "1900000060.250"},  # another deadline
    {"Idempotency-Key": KEYED["Idempotency-Key"]},  # no deadline
    {},
])
def test_a_signature_is_for_its_requests_idempotency_key_and_deadline_alone(sent_with):
    signed = identity_headers("usr_1", SECRET, *DEPOSIT, sent_with=KEYED)
    assert verified_user_id({**signed, **KEYED}, SECRET, *DEPOSIT) == "usr_1"
    with pytest.raises(InvalidIdentity, match="not the gateway's for this request"):
        verified_user_id({**signed, **sent_with}, SECRET, *DEPOSIT)


def test_a_request_sent_without_a_key_or_deadline_is_signed_for_none():
    signed = identity_headers("usr_1", SECRET, *DEPOSIT)
    assert verified_user_id(signed, SECRET, *DEPOSIT) == "usr_1"
    for added in ({"Idempotency-Key": "deposit-9"}, {"X-Gateway-Deadline": "1900000000.250"}):
        with pytest.raises(InvalidIdentity, match="not the gateway's for this request"):
            verified_user_id({**signed, **added}, SECRET, *DEPOSIT)


GRPC_DEADLINE = "1900000000.250"


def test_a_grpc_calls_signature_is_for_its_method_and_message_alone():
    method, message = "/hseshop.payments.v1.Payments/Deposit", b"\x0a\x0510.00"
    metadata = dict(grpc_identity_metadata("usr_1", SECRET, method, message, GRPC_DEADLINE))
    assert verified_user_id(metadata, SECRET, "GRPC", method, message) == "usr_1"
    for sent in (("GRPC", "/hseshop.payments.v1.Payments/GetBalance", message),
                 ("GRPC", method, b"\x0a\x0599.00"),
                 ("POST", method, message)):  # (no HTTP request's either)
        with pytest.raises(InvalidIdentity):
            verified_user_id(metadata, SECRET, *sent)


def test_a_grpc_call_carries_its_signed_deadline_and_is_refused_without_it_or_with_another():
    """Over gRPC the deadline is the gateway's moment, signed (the call's own timeout is whoever
    sends it's to set): a captured call sent again with a later one would commit after the
    gateway's 504, and one with none at all would be held to nothing but its timeout."""
    method, message = "/hseshop.orders.v1.Orders/PlaceOrder", b"\x0a\x011"
    metadata = dict(grpc_identity_metadata("usr_1", SECRET, method, message, GRPC_DEADLINE))
    assert metadata["x-gateway-deadline"] == GRPC_DEADLINE
    assert verified_user_id(metadata, SECRET, "GRPC", method, message) == "usr_1"
    for later in ("1900000060.250", "1900000000.251", ""):
        with pytest.raises(InvalidIdentity) as refused:
            verified_user_id({**metadata, "x-gateway-deadline": later}, SECRET, "GRPC", method,
                             message)
        assert refused.value.code == "UNTRUSTED_IDENTITY"
    without = {name: value for name, value in metadata.items() if name != "x-gateway-deadline"}
    with pytest.raises(InvalidIdentity, match="no gateway-signed deadline"):
        verified_user_id(without, SECRET, "GRPC", method, message)


def test_a_grpc_calls_idempotency_key_line_is_empty_whatever_its_metadata_holds():
    """The key is a field of the message, signed with it: metadata named like the HTTP header
    neither counts nor is needed."""
    method, message = "/hseshop.payments.v1.Payments/Deposit", b"\x0a\x0510.00"
    metadata = dict(grpc_identity_metadata("usr_1", SECRET, method, message, GRPC_DEADLINE))
    assert verified_user_id({**metadata, "idempotency-key": "deposit-1"}, SECRET, "GRPC", method,
                            message) == "usr_1"


@pytest.mark.parametrize("timestamp", ["soon", "9" * 400, "-5", " 12", "1_700_000_000", "١٢"])
def test_a_timestamp_that_is_no_time_is_refused(timestamp):
    headers = {**identity_headers("usr_1", SECRET, *DEPOSIT), "X-Gateway-Timestamp": timestamp}
    with pytest.raises(InvalidIdentity, match="not a number"):
        verified_user_id(headers, SECRET, *DEPOSIT)


def test_a_signature_is_taken_a_minute_after_its_time_and_a_few_seconds_before_it():
    now = time.time()
    for signed_at in (now - MAX_AGE_SECONDS + 1, now + MAX_AHEAD_SECONDS - 1):
        headers = identity_headers("usr_1", SECRET, *DEPOSIT, now=signed_at)
        assert verified_user_id(headers, SECRET, *DEPOSIT, now=now) == "usr_1"
    with pytest.raises(InvalidIdentity, match="expired"):
        verified_user_id(identity_headers("usr_1", SECRET, *DEPOSIT, now=now - MAX_AGE_SECONDS - 2),
                         SECRET, *DEPOSIT, now=now)


@pytest.mark.parametrize("ahead", [MAX_AHEAD_SECONDS + 2, 30, 59])
def test_a_signature_dated_more_than_a_few_seconds_ahead_is_refused(ahead):
    now = time.time()
    headers = identity_headers("usr_1", SECRET, *DEPOSIT, now=now + ahead)
    with pytest.raises(InvalidIdentity, match="dated in the future"):
        verified_user_id(headers, SECRET, *DEPOSIT, now=now)


GRPC_DEPOSIT = ("GRPC", "/hseshop.payments.v1.Payments/Deposit", b"\x0a\x0510.00")


def _signed_as_the_release_before(sent, timestamp: str) -> dict[str, str]:
    """The headers a gateway of the release before (v2: the lines of this one's but the nonce,
    which it did not send) signed `sent` (a method, target and body) with, and a deadline."""
    method, target, body = sent
    deadline = "1900000000.250"
    lines = ("hseshop-identity-v2", "usr_1", timestamp, method, target,
             hashlib.sha256(body).hexdigest(), "", deadline)
    mac = hmac.new(SECRET.encode(), "\n".join(lines).encode(), hashlib.sha256).hexdigest()
    return {"x-user-id": "usr_1", "x-gateway-timestamp": timestamp,
            "x-gateway-deadline": deadline, "x-gateway-signature": f"v2={mac}"}


def _signed_unversioned(sent, timestamp: str) -> dict[str, str]:
    """The headers of a gateway of the release before that (over "<user_id>|<timestamp>" alone,
    unprefixed: no deadline, no nonce)."""
    old = hmac.new(SECRET.encode(), f"usr_1|{timestamp}".encode(), hashlib.sha256).hexdigest()
    return {"x-user-id": "usr_1", "x-gateway-timestamp": timestamp, "x-gateway-signature": old}


@pytest.mark.parametrize("signed", [_signed_as_the_release_before, _signed_unversioned],
                         ids=["v2", "unversioned"])
@pytest.mark.parametrize("sent", [DEPOSIT, GRPC_DEPOSIT], ids=["http", "grpc"])
def test_the_signature_of_a_gateway_of_an_earlier_release_is_refused_as_of_another_version(
        sent, signed):
    """Gateway and service deployed apart: the release before's v2 (signed without a nonce, which
    it does not send) and the one before that's, unprefixed. Over gRPC too, where the oldest
    gateway sent no signed deadline: it is the signature that tells, before the missing nonce or
    deadline would."""
    headers = signed(sent, str(int(time.time())))
    with pytest.raises(SignatureVersionMismatch, match="different releases") as refused:
        verified_user_id(headers, SECRET, *sent)
    assert refused.value.code == "SIGNATURE_VERSION_MISMATCH"


@pytest.mark.parametrize("signature", ["garbage", "v4=" + "0" * 64, "V3=" + "0" * 64,
                                       "V2=" + "0" * 64, "v2=" + "0" * 63, "v2=" + "A" * 64,
                                       "0" * 63, "0" * 65, "A" * 64, "=" + "0" * 64])
def test_a_signature_of_no_known_format_is_untrusted_not_of_another_version(signature):
    headers = {**identity_headers("usr_1", SECRET, *DEPOSIT), "X-Gateway-Signature": signature}
    with pytest.raises(InvalidIdentity, match="no format") as refused:
        verified_user_id(headers, SECRET, *DEPOSIT)
    assert refused.value.code == "UNTRUSTED_IDENTITY"


# What an unkeyed request is sent with (an order, a deposit as the gateway sends it without a key).
UNKEYED = {"X-Gateway-Deadline": "1900000000.250"}


@pytest.mark.parametrize("sent", [DEPOSIT, GRPC_DEPOSIT], ids=["http", "grpc"])
def test_two_signatures_of_one_request_at_one_moment_differ_and_both_hold(sent):
    """A user's two orders alike (no Idempotency-Key) signed in one second with one deadline, by
    two gateway processes or threads: one signature before, the second order refused as a repeat
    of the first (SIGNATURE_USED). Each carries a nonce of its own now, signed."""
    now = time.time()
    if sent[0] == "GRPC":
        signed = [dict(grpc_identity_metadata("usr_1", SECRET, sent[1], sent[2], GRPC_DEADLINE,
                                              now=now)) for _ in range(2)]
        nonce, signature = "x-gateway-nonce", "x-gateway-signature"
    else:
        signed = [{**UNKEYED, **identity_headers("usr_1", SECRET, *sent, now=now,
                                                   sent_with=UNKEYED)} for _ in range(2)]
        nonce, signature = "X-Gateway-Nonce", "X-Gateway-Signature"
    assert signed[0][nonce] != signed[1][nonce]
    assert signed[0][signature] != signed[1][signature]
    for headers in signed:
        assert re.fullmatch("[0-9a-f]{32}", headers[nonce])
        assert verified_user_id(headers, SECRET, *sent, now=now) == "usr_1"


@pytest.mark.parametrize("sent", [DEPOSIT, GRPC_DEPOSIT], ids=["http", "grpc"])
def test_a_signature_without_its_nonce_or_with_another_is_refused(sent):
    """Left out, a signature would be checked as one signed without it (one for requests alike
    again); another of its form is not the one signed; one of no form the gateway writes (a
    header given twice arrives joined by a comma) is refused for it. Each a 401
    UNTRUSTED_IDENTITY; the first and last before the body is read."""
    if sent[0] == "GRPC":
        signed = dict(grpc_identity_metadata("usr_1", SECRET, sent[1], sent[2], GRPC_DEADLINE))
        name = "x-gateway-nonce"
    else:
        signed = {**UNKEYED, **identity_headers("usr_1", SECRET, *sent, sent_with=UNKEYED)}
        name = "X-Gateway-Nonce"
    method, target, body = sent
    nonce = signed[name]
    assert verified_user_id(signed, SECRET, *sent) == "usr_1"

    def unread():
        raise AssertionError("the body was read")

    without = {key: value for key, value in signed.items() if key != name}
    with pytest.raises(InvalidIdentity, match="no gateway nonce") as refused:
        verified_user_id(without, SECRET, method, target, unread)
    assert refused.value.code == "UNTRUSTED_IDENTITY"
    another = f"{(int(nonce, 16) ^ 1):032x}"
    with pytest.raises(InvalidIdentity, match="not the gateway's for this request") as refused:
        verified_user_id({**signed, name: another}, SECRET, *sent)
    assert refused.value.code == "UNTRUSTED_IDENTITY"
    for malformed in ("", nonce.upper(), nonce[:-1], nonce + "0", f"{nonce},{nonce}",
                      f" {nonce}", "g" * 32, "٠" * 32):
        with pytest.raises(InvalidIdentity, match="nonce is not 32 hex digits") as refused:
            verified_user_id({**signed, name: malformed}, SECRET, method, target, unread)
        assert refused.value.code == "UNTRUSTED_IDENTITY", malformed


def test_a_body_is_read_only_for_headers_that_pass_every_other_check():
    def unread():
        raise AssertionError("the body was read")

    with pytest.raises(InvalidIdentity, match="expired"):
        verified_user_id(identity_headers("usr_1", SECRET, *DEPOSIT, now=0), SECRET, "POST",
                         "/accounts/deposit", unread)
    method, target, body = DEPOSIT
    assert verified_user_id(identity_headers("usr_1", SECRET, *DEPOSIT), SECRET, method, target,
                            lambda: body) == "usr_1"


def test_requests_signed_as_a_user_are_signed_for_what_requests_sends():
    prepared = requests.Request(
        "POST", "http://payments:8002/accounts/deposit", params={"note": "a b/ü"},
        json={"amount": "10.00"}, auth=SignedAs("usr_1", SECRET)).prepare()
    assert prepared.path_url == "/accounts/deposit?note=a+b%2F%C3%BC"
    assert verified_user_id(prepared.headers, SECRET, "POST", prepared.path_url,
                            prepared.body) == "usr_1"


def test_requests_signed_as_a_user_are_signed_with_their_key_and_deadline():
    prepared = requests.Request("POST", "http://payments:8002/accounts/deposit", headers=KEYED,
                                data=DEPOSIT[2], auth=SignedAs("usr_1", SECRET)).prepare()
    assert verified_user_id(prepared.headers, SECRET, *DEPOSIT) == "usr_1"
    with pytest.raises(InvalidIdentity):
        verified_user_id({**prepared.headers, "Idempotency-Key": "deposit-2"}, SECRET, *DEPOSIT)


def test_a_body_given_as_a_str_is_signed_as_http_client_sends_it():
    prepared = requests.Request("POST", "http://orders:8001/orders", data="{é",
                                auth=SignedAs("usr_1", SECRET)).prepare()
    assert verified_user_id(prepared.headers, SECRET, "POST", "/orders",
                            "{é".encode("iso-8859-1")) == "usr_1"
