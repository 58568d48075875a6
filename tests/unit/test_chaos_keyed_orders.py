"""The chaos load's keyed orders (bench/chaos/load.py): asked again under their key only after a
transient answer (load.transient, the deposits' own), and a refusal (any other 4xx: a 422, a 401)
taken at once as the request's outcome, in the ledger the invariants read."""

from __future__ import annotations

import random

import pytest

from bench.chaos import load
from bench.chaos.invariants import requests_placed
from bench.chaos.load import Ledger, Load, Shopper, transient

SHOPPER = Shopper("u1", "token", "shopper-u1", "a long password")


class _KeyedThroughTheGateway(random.Random):
    """The load's draws made so that its order is a small one, keyed, through the gateway."""

    def random(self):
        return 0.0


class _Answer:
    def __init__(self, status: int | str, order_id: str):
        self.status, self.order_id, self.text = status, order_id, f"answered {status}"

    def json(self):
        return {"id": self.order_id}


def _load_answering(statuses: list[int | str], monkeypatch) -> tuple[Load, list]:
    """A Load without a stack, each try of its order answered by the next of `statuses` (the
    last again once they run out); and the list of its tries."""
    monkeypatch.setattr(load, "RETRY_PAUSE", 0.01)
    monkeypatch.setattr(load, "RETRY_SECONDS", 5)
    shop = Load.__new__(Load)
    shop.rng, shop.ledger, shop.shoppers = _KeyedThroughTheGateway(1), Ledger(), [SHOPPER]
    shop._keys_to_repeat, shop.said = [], []
    shop.say = shop.said.append
    tries = []

    def post(shopper, via, path, body, key, deadline):
        tries.append((via, path, body, key))
        status = statuses[min(len(tries), len(statuses)) - 1]
        return status, (None if isinstance(status, str) else _Answer(status, "A"))
    shop._post = post
    return shop, tries


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 408, "ConnectionError", "ReadTimeout",
                                    400, 401, 404, 409, 422])
def test_a_keyed_order_is_asked_again_only_after_a_transient_answer(status, monkeypatch):
    shop, tries = _load_answering([status, 202], monkeypatch)
    shop._order()
    assert len(tries) == (2 if transient(status) else 1)
    assert len({key for _via, _path, _body, key in tries}) == 1  # (asked again under its key)


@pytest.mark.parametrize("status", [401, 409, 422])
def test_a_keyed_order_refused_is_not_asked_again_and_the_refusal_is_its_outcome(status,
                                                                                   monkeypatch):
    shop, tries = _load_answering([status], monkeypatch)
    shop._order()
    assert len(tries) == 1
    (tag, request), = shop.ledger.requests.items()
    assert (request.user, request.answers, request.acknowledged) == ("u1", [status], set())
    assert shop.ledger.answers == {f"order gateway keyed {status}": 1}
    assert shop.ledger.accepted == {} and shop._keys_to_repeat == []
    assert shop.said == [f"order refused {status}: answered {status}"]
    # Refused, it placed no order, and one stored for it would be a violation.
    amount = request.amount
    assert requests_placed(shop.ledger, {}) == []
    assert requests_placed(shop.ledger, {"B": ("u1", amount, tag)}) == [
        f"order B placed by request {tag}, never acknowledged and no try of it unanswered:"
        f" [{status}]"]


def test_a_keyed_order_answered_after_transient_answers_is_accepted_once(monkeypatch):
    shop, tries = _load_answering(["ConnectionError", 503, 429, 202], monkeypatch)
    shop._order()
    assert len(tries) == 4
    (_tag, request), = shop.ledger.requests.items()
    assert request.answers == ["ConnectionError", 503, 429, 202] and request.acknowledged == {"A"}
    assert shop.ledger.accepted == {"A": ("u1", request.amount)}
