"""The gateway's process channels to the services (gateway_app/upstream_grpc.py): shared by the
calls, made afresh once their calls have failed unsent for a while, and the one replaced closed
only once no call is under way on it."""

from __future__ import annotations

import types
import uuid

import grpc
import pytest
from flask import Flask

from gateway_app import upstream_grpc


class _Failed(grpc.RpcError):
    """A failed call as grpcio raises it, with none of the service's trailers."""

    def __init__(self, details: str):
        self._details = details

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return self._details

    def initial_metadata(self):
        return ()

    def trailing_metadata(self):
        return ()


_UNSENT = _Failed("errors resolving orders-grpc:50051: [... Domain name not found]")
_DROPPED_ONCE_SENT = _Failed("Socket closed")


@pytest.fixture
def app_context():
    """An app whose orders target is its own (the channels are the module's), never dialled:
    grpcio connects a channel only for a call."""
    target = f"dns:///orders-{uuid.uuid4().hex[:8]}.invalid:50051"
    app = Flask(__name__)
    app.extensions["hseshop.settings"] = types.SimpleNamespace(orders_grpc_target=target)
    with app.app_context():
        yield
    upstream_grpc._channels.pop(("orders", target)).channel.close()


def _failed_on(channel_held, failure: grpc.RpcError) -> None:
    with pytest.raises(type(failure)), upstream_grpc._process_channel("orders") as held:
        channel_held.append(held)
        raise failure


def _closed(held: upstream_grpc._ProcessChannel) -> bool:
    try:
        held.channel.unary_unary("/hseshop.orders.v1.Orders/ListOrders").future(b"").cancel()
    except ValueError:  # ("Cannot invoke RPC on closed channel!")
        return True
    return False


def test_calls_share_the_process_channel_while_they_are_sent(app_context):
    held = []
    _failed_on(held, _DROPPED_ONCE_SENT)
    with upstream_grpc._process_channel("orders") as again:
        held.append(again)
    assert held[0] is held[1] and not _closed(held[0])


def test_a_channel_whose_calls_failed_unsent_too_long_is_replaced_and_closed_once_unused(
        app_context, monkeypatch):
    """A call under way on it when it is replaced (sent before it failed so, say) keeps it open
    till that call ends: grpcio's close would cancel the call."""
    monkeypatch.setattr(upstream_grpc, "CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS", 0.0)
    held = []
    with upstream_grpc._process_channel("orders") as under_way:
        _failed_on(held, _UNSENT)
        assert held[0] is under_way
        with upstream_grpc._process_channel("orders") as afresh:
            assert afresh is not under_way and not _closed(afresh)
        assert not _closed(under_way)  # (its call still under way)
    assert _closed(under_way) and not _closed(afresh)


def test_a_call_sent_between_unsent_ones_keeps_the_channel(app_context, monkeypatch):
    """Only calls ALL failing unsent for the while make a channel afresh: one sent (its service
    reached) starts the count again."""
    monkeypatch.setattr(upstream_grpc, "CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS", 60.0)
    held = []
    _failed_on(held, _UNSENT)
    since = held[0].unsent_since
    _failed_on(held, _UNSENT)
    assert held[1] is held[0] and held[0].unsent_since == since  # (from the first)
    with upstream_grpc._process_channel("orders"):
        pass
    assert held[0].unsent_since is None
    monkeypatch.setattr(upstream_grpc, "CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS", 0.0)
    with upstream_grpc._process_channel("orders") as kept:
        assert kept is held[0]


def test_an_outage_is_said_once_however_often_its_channel_is_made_afresh(app_context,
                                                                          monkeypatch, caplog):
    """Made afresh every few seconds while the service stays away, the channel is said so at
    INFO the first time only (then at DEBUG), and again once a call was sent in between."""
    monkeypatch.setattr(upstream_grpc, "CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS", 0.0)
    caplog.set_level("INFO", logger=upstream_grpc.log.name)
    held = []
    for _ in range(5):
        _failed_on(held, _UNSENT)
    said = [record for record in caplog.records if "made afresh" in record.getMessage()]
    assert len(said) == 1
    with upstream_grpc._process_channel("orders") as sent:  # (a call sent: the outage over)
        held.append(sent)
    _failed_on(held, _UNSENT)
    _failed_on(held, _UNSENT)
    said = [record for record in caplog.records if "made afresh" in record.getMessage()]
    assert len(said) == 2
