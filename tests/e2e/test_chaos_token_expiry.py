"""The chaos load (bench/chaos/load.py) outliving its shoppers' tokens, as a soak longer than
AUTH_TOKEN_TTL_SECONDS does: on a gateway whose tokens live a few seconds, the load's shoppers
sign in again as theirs expire (bench/chaos/sign_in.py), and its orders and deposits through the
gateway go on being accepted, none refused 401 and no deposit left unconfirmed (each was refused
401 from the expiry on, and its deposits reported by the invariants as never answered)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import requests

from bench.chaos.load import Load
from bench.chaos.plan import ChaosPlan
from tests.polling import wait_for

# Long enough for a shopper's seeding (register, account, deposit) within one token's life, and
# for the gateway's sign-in limit (10 a username a minute) to leave room.
TOKEN_SECONDS = 8
# (A late shopper too: their account is opened through the gateway, most often after their token
# expired.)
PLAN = ChaosPlan(seed=11, rate=20, users=4, late_users=1)


@pytest.fixture(scope="module")
def short_token_gateway(stack):
    """A gateway instance of the stack whose tokens expire TOKEN_SECONDS after they are issued."""
    process, url = stack.start_gateway_instance(
        "gateway-short-tokens", {"AUTH_TOKEN_TTL_SECONDS": str(TOKEN_SECONDS)})
    yield url
    process.stop()


def _gateway_answers(load: Load, kind: str, answer: str | None = None) -> int:
    """How many of the load's `kind` requests ("order", "deposit") through the gateway got
    `answer` (any, None)."""
    with load.ledger.lock:
        return sum(n for counted, n in load.ledger.answers.items()
                   if counted.startswith(f"{kind} gateway ")
                   and (answer is None or counted.endswith(f" {answer}")))


def test_the_loads_shoppers_sign_in_again_as_their_tokens_expire_and_are_answered(
        stack, short_token_gateway):
    shop = SimpleNamespace(gateway_url=short_token_gateway, orders_url=stack.orders_url,
                           payments_url=stack.payments_url, env=stack.env)
    said: list[str] = []
    load = Load(PLAN, shop, said.append)
    load.seed_shoppers()
    last_registered = load.shoppers[-1].token
    load.start()
    try:
        # Every token the shoppers registered with expired (the last registered's is refused).
        wait_for(lambda: requests.get(
            f"{short_token_gateway}/api/accounts/balance", timeout=10,
            headers={"Authorization": f"Bearer {last_registered}"}).status_code == 401,
            timeout=TOKEN_SECONDS + 30, what="the tokens the shoppers registered with to expire")
        accepted = _gateway_answers(load, "order", "202")
        orders, deposits = _gateway_answers(load, "order"), _gateway_answers(load, "deposit")
        wait_for(lambda: _gateway_answers(load, "order") >= orders + 30
                 and _gateway_answers(load, "deposit") >= deposits + 3, timeout=60,
                 what="orders and deposits through the gateway answered after the expiry")
        assert (_gateway_answers(load, "order", "401"), _gateway_answers(load, "deposit", "401")
                ) == (0, 0), load.ledger.answers
        assert _gateway_answers(load, "order", "202") >= accepted + 20, load.ledger.answers
        wait_for(lambda: any(line.startswith("late account opened") for line in said),
                 timeout=30, what="the late shopper's account opened through the gateway")
    finally:
        load.stop()
    assert not [line for line in said if "refused 401" in line or "unconfirmed: 401" in line], said
    assert load.ledger.unconfirmed_deposits == []
    assert load.ledger.answers["sign-in again: made"] >= PLAN.users, load.ledger.answers
