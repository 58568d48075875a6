"""Request ids and the request log line (a Flask app with no database)."""

from __future__ import annotations

import logging

import pytest
from flask import Flask

from shared.request_context import install_request_ids, sane_request_id


@pytest.mark.parametrize("candidate", ["click-123456", "a.b:c_d-e" * 3])
def test_a_sane_request_id_is_kept(candidate):
    assert sane_request_id(candidate) == candidate


@pytest.mark.parametrize("candidate", [None, "", "short", "x" * 129, "abcdefgh\n", "abc defgh"])
def test_any_other_is_replaced_by_a_new_one(candidate):
    made_up = sane_request_id(candidate)
    assert made_up != candidate and sane_request_id(made_up) == made_up


def test_a_request_is_logged_on_one_line_whatever_its_path_holds(caplog):
    app = Flask("logged")
    install_request_ids(app)
    with caplog.at_level(logging.INFO, logger="hseshop.logged.http"):
        app.test_client().get("/x%0A2026-12-04 12:00:00 INFO forged%0D%7F")
    [line] = [record.getMessage() for record in caplog.records]
    assert line == r"GET /x\x0a2026-12-04 12:00:00 INFO forged\x0d\x7f -> 404"
