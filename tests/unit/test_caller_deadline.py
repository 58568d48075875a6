"""How far off a service takes the deadline the gateway signs (shared.caller_deadline; no I/O: the
clocks are the gateway's and the service's, told apart)."""

from __future__ import annotations

import math
import time
import types

import pytest

from shared import caller_deadline
from shared.config import load_settings
from shared.internal_auth import (GRPC_METHOD, MAX_AHEAD_SECONDS, grpc_identity_metadata,
                                  verified_user_id)

SECRET = "a secret only the gateway and the services know"
PLACE_ORDER = "/hseshop.orders.v1.Orders/PlaceOrder"


def _on_the_clock(monkeypatch, now: float) -> None:
    """shared.caller_deadline reading the time of a clock that says `now`."""
    monkeypatch.setattr(caller_deadline, "time",
                        types.SimpleNamespace(time=lambda: now, monotonic=time.monotonic))


@pytest.mark.parametrize("behind", [0.002, MAX_AHEAD_SECONDS + 0.9],
                         ids=["2 ms", "as far as a signature is taken"])
def test_the_longest_deadline_the_gateway_writes_is_taken_by_a_service_whose_clock_is_behind(
        monkeypatch, behind):
    """UPSTREAM_TIMEOUT_SECONDS at its greatest, and the service's clock behind the gateway's,
    by 2 ms or as far as the signature still takes (its timestamp, in whole seconds, written late
    in a second): the signature holds, and so must the deadline. It was taken as none (more than
    FURTHEST_DEADLINE_SECONDS off on the service's clock), the work held to no moment at all."""
    longest = load_settings({"UPSTREAM_TIMEOUT_SECONDS": "3600"}).upstream_timeout_seconds
    gateways_now = math.floor(time.time()) + 0.95
    _on_the_clock(monkeypatch, gateways_now)
    deadline = caller_deadline.deadline_moment(longest)
    metadata = dict(grpc_identity_metadata("usr_1", SECRET, PLACE_ORDER, b"", deadline,
                                           now=gateways_now))
    services_now = gateways_now - behind
    assert verified_user_id(metadata, SECRET, GRPC_METHOD, PLACE_ORDER, b"",
                            now=services_now) == "usr_1"
    _on_the_clock(monkeypatch, services_now)
    taken = caller_deadline.deadline_given(deadline)
    assert taken is not None and taken - time.monotonic() == pytest.approx(longest + behind,
                                                                           abs=1)


def test_a_deadline_further_off_than_the_gateway_writes_on_any_clock_it_signs_with_is_none(
        monkeypatch):
    """Further off than the longest timeout on a gateway clock as far ahead as a signature is
    taken (under MAX_AHEAD_SECONDS + 1 s: its timestamp is in whole seconds): a clock far off, or
    none meant (a caller of the service's own), as before."""
    now = 1_800_000_000.0
    _on_the_clock(monkeypatch, now)
    assert caller_deadline.deadline_given(f"{now + 3600 + MAX_AHEAD_SECONDS + 1.001:.6f}") is None
    assert caller_deadline.deadline_given(f"{now + 7200:.6f}") is None
