"""The name a run's claim on its databases shows the run that meets it (devstack.database_claim)."""

from __future__ import annotations

import os

from devstack.database_claim import APPLICATION_NAME_BYTES, holder_name


def test_the_claims_holder_is_named_by_its_pid_and_checkout():
    assert holder_name("/home/me/hseshop") == f"make run pid {os.getpid()} in /home/me/hseshop"


def test_a_checkout_too_long_for_postgresql_to_keep_is_named_by_its_end():
    """PostgreSQL keeps 63 bytes of an application_name: a deep checkout's path lost its end,
    the part that tells two checkouts apart."""
    checkout = "/home/me/" + "projects/" * 10 + "hseshop-second"

    name = holder_name(checkout)

    assert len(name.encode()) <= APPLICATION_NAME_BYTES
    assert name.startswith(f"make run pid {os.getpid()} in ...")
    assert name.endswith("/hseshop-second")
