"""Each user's Redis pub/sub channel, which wakes that user's open notification sockets on every
gateway instance: when a notification has been kept for them (gateway_app/notifications.py), and
when one of their tokens is signed out (gateway_app/sign_out.py). A socket takes whatever comes as
a wake-up, then reads what is true (the notifications table, whether its token is signed out):
nothing is lost with a message that never arrives but time, until its next look."""

from __future__ import annotations

import logging

import redis
from flask import current_app

from gateway_app.channel_listener import ChannelListener
from shared.config import REDIS_KEY_SEPARATOR

log = logging.getLogger(__name__)

REDIS_EXTENSION = "hseshop.gateway_redis"
# The process's one subscriber, which the sockets wait on (gateway_app/channel_listener.py).
LISTENER_EXTENSION = "hseshop.gateway_channel_listener"
# What a wake-up that carries no notification says.
WAKE_UP = "wake-up"


def redis_client() -> redis.Redis:
    return current_app.extensions[REDIS_EXTENSION]


def channel_listener() -> ChannelListener:
    return current_app.extensions[LISTENER_EXTENSION]


def channel(user_id: str) -> str:
    prefix = current_app.extensions["hseshop.settings"].redis_key_prefix
    return f"{prefix}{REDIS_KEY_SEPARATOR}notifications:{user_id}"


def wake_sockets(user_id: str) -> None:
    """Wake the user's open sockets, on every gateway instance (with Redis down: at their next
    look, a few seconds on)."""
    publish([(user_id, WAKE_UP)], what=f"a wake-up of the sockets of {user_id}")


def publish(messages: list[tuple[str, str]], what: str) -> None:
    """Publish each (user id, message) to its user's channel, in order, in one round trip. With
    Redis down, `what` was not published is logged: the sockets catch up at their next look."""
    try:
        pipeline = redis_client().pipeline(transaction=False)
        for user_id, message in messages:
            pipeline.publish(channel(user_id), message)
        pipeline.execute()
    except redis.RedisError as exc:
        log.warning("could not publish %s: %s", what, exc)
