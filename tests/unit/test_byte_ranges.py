"""The conditions of a request for a file the shop serves, answered in RFC 9110's order
(shared.byte_ranges.precondition_answer), and the HTTP-dates they are read with."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.byte_ranges import entity_tags, http_date, precondition_answer

MODIFIED = datetime(2026, 12, 6, 11, 0, 0, tzinfo=UTC)
AT, BEFORE, AFTER = ("Sun, 06 Dec 2026 11:00:00 GMT", "Sun, 06 Dec 2026 10:59:59 GMT",
                     "Sun, 06 Dec 2026 11:00:01 GMT")
ETAG = ("abc", False)


def _answer(method: str = "GET", etag=ETAG, **headers: str) -> int | None:
    environ = {"REQUEST_METHOD": method} | {
        f"HTTP_{name.upper()}": value for name, value in headers.items()}
    return precondition_answer(environ, etag, MODIFIED)


def test_an_http_date_is_one_of_its_three_forms_alone_in_gmt():
    now = datetime(2026, 12, 6, tzinfo=UTC)
    assert http_date(AT) == MODIFIED
    assert http_date("Sunday, 06-Dec-26 11:00:00 GMT", now) == MODIFIED
    assert http_date("Sun Dec  6 11:00:00 2026") == MODIFIED
    # (an rfc850-date's two-digit year makes the latest date not more than 50 years ahead: the
    # date weighed, not its year alone)
    assert http_date("Sunday, 06-Dec-76 00:00:00 GMT", now).year == 2076
    assert http_date("Sunday, 06-Dec-76 00:00:01 GMT", now).year == 1976
    assert http_date("Monday, 06-Dec-76 11:00:00 GMT", now).year == 1976
    assert http_date("Saturday, 05-Dec-76 23:59:59 GMT", now).year == 2076
    assert http_date("Monday, 06-Dec-77 11:00:00 GMT", now).year == 1977
    assert http_date("Monday, 01-Jan-10 00:00:00 GMT", now).year == 2010
    later = datetime(2090, 1, 1, tzinfo=UTC)
    assert http_date("Monday, 01-Jan-10 00:00:00 GMT", later).year == 2110
    assert http_date("Monday, 02-Jan-40 00:00:00 GMT", later).year == 2040
    assert http_date("Tuesday, 29-Feb-00 00:00:00 GMT", now) == datetime(2000, 2, 29, tzinfo=UTC)
    leap_day = datetime(2024, 2, 29, tzinfo=UTC)
    assert http_date("Sunday, 06-Dec-76 00:00:00 GMT", leap_day).year == 1976
    assert http_date("Sun, 06 Dec 2026 23:59:60 GMT") == datetime(2026, 12, 6, 23, 59, 59,
                                                                   tzinfo=UTC)
    for none in (AT.lower(), AT.replace("GMT", "+0000"), f"{AT}, {BEFORE}", "yesterday", "",
                 "Mon, 30 Feb 2026 11:00:00 GMT", "2026-12-06T11:00:00Z"):
        assert http_date(none) is None, none


def test_an_entity_tag_list_is_read_up_to_its_first_element_that_is_none():
    assert entity_tags('"a", W/"b" ,, "c,d"') == [(False, '"a"'), (True, '"b"'), (False, '"c,d"')]
    assert entity_tags('"a", w/"b", "c"') == [(False, '"a"')]
    assert entity_tags("abc") == [] == entity_tags("")


def test_conditions_are_answered_in_rfc_9110s_order():
    # If-Match first: strong, `*` for a file that is; then If-None-Match, weak.
    assert _answer(if_match='"abc"', if_none_match='"abc"') == 304
    assert _answer(if_match='"abc"', if_modified_since=AT) == 304
    assert _answer(if_match='"x"', if_none_match='"x"') == 412
    assert _answer(if_match='W/"abc"') == 412
    assert _answer(if_match='"abc"', etag=("abc", True)) == 412
    assert _answer(if_match="*", etag=None) is None
    assert _answer(if_match='"abc"', etag=None) == 412
    assert _answer(if_match="") == 412 == _answer(if_match=" , ")  # (a list of no tag)
    assert _answer(if_none_match='W/"abc"') == 304
    assert _answer(if_none_match='"abc"', etag=("abc", True)) == 304
    assert _answer(if_none_match="*") == 304
    # If-Unmodified-Since: ignored with an If-Match, or if it is no HTTP-date.
    assert _answer(if_unmodified_since=BEFORE) == 412
    assert _answer(if_unmodified_since=AT) is None
    assert _answer(if_unmodified_since=BEFORE, if_match='"abc"') is None
    assert _answer(if_unmodified_since=BEFORE.lower()) is None
    assert _answer(if_unmodified_since=AFTER, if_none_match='"abc"') == 304
    # If-Modified-Since: ignored with an If-None-Match, or for a method but GET and HEAD.
    assert _answer(if_modified_since=AT) == 304 == _answer("HEAD", if_modified_since=AFTER)
    assert _answer(if_modified_since=BEFORE) is None
    assert _answer(if_modified_since=AT, if_none_match='"x"') is None
    assert _answer("POST", if_modified_since=AT) is None
    assert _answer("POST", if_none_match='"abc"') == 412
    assert precondition_answer({"REQUEST_METHOD": "GET", "HTTP_IF_MODIFIED_SINCE": AT,
                                "HTTP_IF_UNMODIFIED_SINCE": BEFORE}, ETAG, None) is None
