"""What the gateway makes of a service's answer over either transport
(gateway_app.upstream_answers): the statuses it answers for itself, the Retry-After it passes on."""

from __future__ import annotations

import pytest

from gateway_app.upstream_answers import failure_for_status, retry_after_passed_on


@pytest.mark.parametrize("value, passed_on", [
    (None, None),
    ("1", "1"),
    ("0", "0"),
    ("120", "120"),
    (" 120\t", "120"),  # (a field value's optional whitespace)
    ("Sun, 06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 GMT"),
    ("Wed, 31 Dec 2036 23:59:60 GMT", "Wed, 31 Dec 2036 23:59:60 GMT"),  # a leap second
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
    failure = failure_for_status("orders", status, unavailable_for_now=unavailable_for_now,
                                 said=lambda: "what it said")
    assert (failure and (failure.status, failure.code)) == answered
