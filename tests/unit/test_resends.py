"""The one rule of which requests the gateway sends to a service again, dropped unanswered once
sent, over either transport (gateway_app/resends.py)."""

from __future__ import annotations

import pytest

from gateway_app.resends import safe_to_send_again


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
