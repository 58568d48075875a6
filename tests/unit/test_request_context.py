"""Request ids and the request log line (a Flask app with no database)."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from shared.request_context import (RequestIdLogFilter, current_request_id, escaped_in_logs,
                                    install_request_ids, request_id_bound, request_ids_bound,
                                    sane_request_id)


@pytest.mark.parametrize("candidate", ["click-123456", "a.b:c_d-e" * 3])
def test_a_sane_request_id_is_kept(candidate):
    assert sane_request_id(candidate) == candidate


@pytest.mark.parametrize("candidate", [None, "", "short", "x" * 129, "abcdefgh\n", "abc defgh"])
def test_any_other_is_replaced_by_a_new_one(candidate):
    made_up = sane_request_id(candidate)
    assert made_up != candidate and sane_request_id(made_up) == made_up


@pytest.mark.parametrize("path, logged", [
    ("/x%0A2026-12-04 12:00:00 INFO forged%0D%7F",
     r"GET /x\x0a2026-12-04 12:00:00 INFO forged\x0d\x7f -> 404"),
    ("/x%C2%852026-12-04 INFO forged%E2%80%A8%E2%80%A9",
     r"GET /x\x852026-12-04 INFO forged\u2028\u2029 -> 404"),
], ids=["C0 controls and DEL", "NEL and the line separators"])
def test_a_request_is_logged_on_one_line_whatever_its_path_holds(caplog, path, logged):
    app = Flask("logged")
    install_request_ids(app)
    with caplog.at_level(logging.INFO, logger="hseshop.logged.http"):
        app.test_client().get(path)
    [line] = [record.getMessage() for record in caplog.records]
    assert line.splitlines() == [line]
    assert line == logged


def test_c1_controls_and_the_unicode_line_separators_are_escaped_in_a_logged_line():
    """C1 controls (NEL, U+0085, among them) and U+2028/U+2029 break a line for str.splitlines
    and for log viewers as C0's do: each is written escaped, and the text around them (a
    no-break space too) is kept."""
    breaking = "".join(map(chr, (*range(0x80, 0xA0), 0x2028, 0x2029)))
    escaped = escaped_in_logs(f"/a{breaking}é\u00a0b")
    assert escaped.splitlines() == [escaped]
    assert escaped == ("/a" + "".join(f"\\x{code:02x}" for code in range(0x80, 0xA0))
                       + "\\u2028\\u2029é\u00a0b")


@pytest.mark.parametrize("request_ids, logged, answered", [
    (["click-1111", "click-1111"], "click-1111", "click-1111"),
    (["click-2222", None, "click-1111", "click-2222"], "click-2222,click-1111,+1-none", None),
    (["click-1111", None, "click-1111", None], "click-1111,+2-none", None),
    ([None, None], "-", None),
    ([f"click-{n:04d}" for n in range(10)], ",".join(f"click-{n:04d}" for n in range(10)), None),
    ([f"click-{n:04d}" for n in range(13)],
     ",".join(f"click-{n:04d}" for n in range(10)) + ",+3-more", None),
    ([None, *(f"click-{n:04d}" for n in range(13))],
     ",".join(f"click-{n:04d}" for n in range(10)) + ",+3-more,+1-none", None),
], ids=["one shared", "several, one with none", "one and none", "none", "ten",
        "thirteen: ten named", "thirteen and none"])
def test_messages_handled_together_log_each_of_their_request_ids_and_answer_one_they_share(
        request_ids, logged, answered):
    """A line said of them carries each id once (a grep for any finds it), ten at most and how
    many more, so it stays short, and how many came with none, so that a run of one click's
    messages and others of none is not taken for that click's alone; a message written meanwhile
    answers their request only if it is the one of them all."""
    record = logging.makeLogRecord({})
    with request_ids_bound(request_ids):
        RequestIdLogFilter().filter(record)
        assert current_request_id() == answered
    assert (record.request_id, current_request_id()) == (logged, None)


@pytest.mark.parametrize("breaking", ["\n", "\x85", "\u2028"], ids=["LF", "NEL", "U+2028"])
def test_a_bound_request_id_that_would_break_the_line_is_logged_escaped(breaking):
    """Ids are checked where they come in; one that was not (an inbox row stored before the
    check) is escaped as a logged path is, alone or among others, so it cannot forge a line."""
    forged = f"click-1111] forged{breaking}2026-01-01 INFO x [request_id=click-2222"
    for bound in (request_id_bound(forged), request_ids_bound([forged, "click-3333"])):
        record = logging.makeLogRecord({})
        with bound:
            RequestIdLogFilter().filter(record)
        assert record.request_id.splitlines() == [record.request_id]
        assert record.request_id.startswith(escaped_in_logs(forged))
