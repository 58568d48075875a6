"""The services' check of the identity the gateway signs (pure logic, no I/O)."""

from __future__ import annotations

import pytest

from shared.internal_auth import InvalidIdentity, identity_headers, verified_user_id

SECRET = "a secret only the gateway and the services know"


def test_the_gateways_signature_vouches_for_its_user():
    assert verified_user_id(identity_headers("usr_1", SECRET), SECRET) == "usr_1"


@pytest.mark.parametrize("timestamp", ["soon", "9" * 400])  # the second overflowed a float: a 500
def test_a_timestamp_that_is_no_time_is_refused(timestamp):
    headers = {**identity_headers("usr_1", SECRET), "X-Gateway-Timestamp": timestamp}
    with pytest.raises(InvalidIdentity, match="not a number"):
        verified_user_id(headers, SECRET)
