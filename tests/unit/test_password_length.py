"""A password's length as signing up and in count it (gateway_app.auth.PasswordLength): one too
long as sent is refused before it is normalised, and none whose NFKC form is short enough is."""

from __future__ import annotations

import sys
import unicodedata

import pytest
from marshmallow import ValidationError

from gateway_app import auth, passwords
from gateway_app.auth import CredentialsSchema, PasswordLength, SignInCredentialsSchema

SCHEMAS = ((CredentialsSchema, PasswordLength.error),
           (SignInCredentialsSchema, PasswordLength.error_as_sent_too))
# U+1F82 decomposed: an alpha and three combining marks, which NFKC composes into one.
ALPHA_AND_THREE_MARKS = "\u03b1\u0313\u0300\u0345"


@pytest.fixture
def normalised_lengths(monkeypatch) -> list[int]:
    """The length of each password gateway_app.auth normalises."""
    lengths = []

    def counted(password: str) -> str:
        lengths.append(len(password))
        return passwords.normalised(password)

    monkeypatch.setattr(auth, "normalised", counted)
    return lengths


@pytest.mark.parametrize("schema, said", SCHEMAS)
def test_a_long_run_of_combining_marks_is_refused_as_too_long_unnormalised(
        schema, said, normalised_lengths):
    """CPython's NFKC takes time growing with the square of a run of combining marks: this one,
    a 64 KiB body, took over a second of CPU to normalise before its length was counted."""
    body = {"username": "x", "password": "a" + "\u0316\u0301" * 16000}
    with pytest.raises(ValidationError) as refused:
        schema().load(body)
    assert refused.value.messages == {"password": [said]}
    assert normalised_lengths == []


@pytest.mark.parametrize("schema, said", SCHEMAS)
def test_the_longest_password_as_sent_whose_nfkc_form_is_128_is_taken(schema, said,
                                                                      normalised_lengths):
    """512 code points as sent, 128 in NFKC: taken, as before, normalised; one more code point
    is 129 in NFKC, and refused, as before, but unnormalised."""
    longest = ALPHA_AND_THREE_MARKS * 128
    assert len(longest) == PasswordLength.LONGEST_AS_SENT
    assert len(unicodedata.normalize("NFKC", longest)) == 128
    assert schema().load({"username": "x", "password": longest})["password"] == longest
    with pytest.raises(ValidationError) as refused:
        schema().load({"username": "x", "password": "a" + longest})
    assert refused.value.messages == {"password": [said]}
    assert normalised_lengths == [512]


def test_no_code_point_composes_from_more_than_the_longest_as_sent_allows():
    """LONGEST_AS_SENT is 128 times the longest canonical decomposition of any code point (what
    one code point of a password's NFKC form can stand for as sent), by this Python's Unicode
    data: were it longer, a password taken today could be refused unnormalised."""
    longest = max(len(unicodedata.normalize("NFD", chr(code_point)))
                  for code_point in range(sys.maxunicode + 1))
    assert PasswordLength.LONGEST_AS_SENT == 128 * longest
