"""An index's expression as shared.schema_drift compares the database's with the declared one:
without what PostgreSQL adds writing it out, its letters' case and quoted text kept."""

from __future__ import annotations

from shared.schema_drift import _as_compared


def test_what_postgresql_adds_writing_an_expression_out_is_not_compared():
    assert _as_compared("translate((username)::text, 'ABC'::text, 'abc'::text)") == (
        _as_compared("translate(username, 'ABC', 'abc')"))
    assert _as_compared("(name)::character varying(64)") == _as_compared("name")
    assert _as_compared("lower((a)::text) || (b)::text") == _as_compared("lower(a) || b")


def test_an_expressions_letters_case_and_quoted_text_are_compared():
    assert _as_compared("translate(username, 'abc', 'ABC')") != (
        _as_compared("translate(username, 'ABC', 'abc')"))
    assert _as_compared("coalesce(name, 'a b')") != _as_compared("coalesce(name, 'ab')")
    assert _as_compared("Lower(name)") != _as_compared("lower(name)")
