"""The address a client's limits are counted under (gateway_app.ratelimit.address_subject)."""

from __future__ import annotations

import pytest

from gateway_app.ratelimit import address_subject


@pytest.mark.parametrize("address, subject", [
    ("203.0.113.7", "203.0.113.7"),
    ("203.0.113.7:5678", "203.0.113.7"),  # a port a proxy wrote after it
    ("::ffff:203.0.113.7", "203.0.113.7"),  # mapped by a dual-stack socket
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::1]:5678", "2001:db8:1:2::/64"),
    ("[2001:db8:1:2::1]", "2001:db8:1:2::/64"),  # bracketed without a port (RFC 7239)
    ("[::ffff:203.0.113.7]", "203.0.113.7"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::1", "::/64"),
    ("unknown", "unknown"),
    (None, ""),
])
def test_an_address_is_counted_as_its_client_whole_or_its_ipv6_64(address, subject):
    assert address_subject(address) == subject
