"""What make run says where the databases it names are another run's (devstack.database_claim), as
the tests of its claim expect it: the run holding them (this process, in a checkout) named, and how
to run beside it."""

from __future__ import annotations

import os

_NAMES_OF_ITS_OWN = "names of its own: HSESHOP_PREFIX=<name> (README: The two commands)"


def a_stacks_databases(prefix: str, postgres_base: str) -> str:
    """How a claim names the databases of a stack whose names are `prefix`'s."""
    return (f"the databases {prefix}_orders, {prefix}_payments, {prefix}_gateway at"
            f" {postgres_base}")


def _another_run(checkout: str) -> str:
    return f"another `make run` (make run pid {os.getpid()} in {checkout})"


def in_use_by_another_run(what: str, checkout: str) -> str:
    """The refusal of a run starting on `what`, which the run of `checkout` holds."""
    return (f"{what} are in use by {_another_run(checkout)}: stop it, or give this checkout"
            f" {_NAMES_OF_ITS_OWN}")


def claimed_meanwhile_by_another_run(what: str, checkout: str) -> str:
    """Why a run stops whose claim on `what`, gone with its connection, the run of `checkout`
    took meanwhile."""
    return (f"{what} were claimed by {_another_run(checkout)} while this run's claim was gone"
            f" with its connection (PostgreSQL restarted): stopping this run, not to share them;"
            f" stop the other and start this again, or give one of them {_NAMES_OF_ITS_OWN}")
