"""What a notification socket's handshake is answered with once its ticket or token is read
(gateway_app.notifications._socket_opening): a refusal of the page's closes it 1008 with its
reason, a fault of the gateway's 1011, logged, its message kept from the page."""

from __future__ import annotations

import logging

import pytest
from werkzeug.datastructures import MultiDict

from gateway_app import notifications
from gateway_app.auth import BearerRefused
from gateway_app.socket_tickets import UnknownTicket
from gateway_app.tokens import VerifiedToken

TOKEN = VerifiedToken("usr_1", 2_000_000_000.0, b"digest")


def _taken(token_or_ticket: str) -> VerifiedToken:
    return TOKEN


def _refused(token_or_ticket: str) -> VerifiedToken:
    raise BearerRefused("The token is not valid.", "INVALID_TOKEN")


def _unknown(ticket: str) -> VerifiedToken:
    raise UnknownTicket()


def _faulty(token_or_ticket: str) -> VerifiedToken:
    raise KeyError("hseshop:socket-ticket:internal detail")


# The reason an `after` that is no notification id is closed with: the range of the ids (a
# PostgreSQL bigint's), which the reason said nothing of once `after` was bounded to it.
_NO_ID = "`after` must be a notification id: a whole number from 0 to 9223372036854775807"


@pytest.mark.parametrize("authenticate, redeem, asked, reason", [
    (_refused, _taken, {"access_token": "t"}, "The token is not valid."),
    (_taken, _refused, {"ticket": "t"}, "The token is not valid."),
    (_taken, _unknown, {"ticket": "t"}, str(UnknownTicket())),
    (_taken, _taken, {"access_token": "t", "after": "x"}, _NO_ID),
    (_taken, _taken, {"access_token": "t", "after": "-1"}, _NO_ID),
    (_taken, _taken, {"access_token": "t", "after": str(2**63)}, _NO_ID),
], ids=["token refused", "ticket's token refused", "ticket unknown", "after no id",
        "after negative", "after past a 64-bit id"])
def test_a_refused_socket_is_closed_1008_with_its_reason(authenticate, redeem, asked, reason,
                                                          caplog):
    opening = notifications._socket_opening(authenticate, redeem, MultiDict(asked))
    assert opening.refusal == (1008, reason)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("asked", [{"access_token": "t"}, {"ticket": "t"}])
def test_a_fault_opening_a_socket_closes_it_1011_logged_and_unsaid(asked, caplog):
    """A bug of the gateway's was closed 1008, as a refusal, the page sent its message (a Redis
    key, say) and nothing logged."""
    with caplog.at_level(logging.ERROR, logger=notifications.__name__):
        opening = notifications._socket_opening(_faulty, _faulty, MultiDict(asked))
    assert opening.refusal == (1011, "internal error; reconnect")
    [logged] = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert isinstance(logged.exc_info[1], KeyError)


def test_a_whole_after_opens_the_socket_after_it():
    opening = notifications._socket_opening(_taken, _taken,
                                            MultiDict({"access_token": "t", "after": "7"}))
    assert (opening.token, opening.after, opening.refusal) == (TOKEN, 7, None)
