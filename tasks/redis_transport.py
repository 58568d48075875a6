"""Kombu's Redis transport, with one Redis client per channel for the commands it sends.

Kombu's Redis channel builds a new `redis.Redis` client for every message it publishes (and for each
of its other synchronous commands), over the channel's connection pool. Building one fills a table
of about 170 reply parsers: half of `apply_async`'s time under cProfile, and measured without it a
dispatch of an inbox batch took 0.45 ms of CPU with a client per message, 0.35 ms with one per
channel. A client is only the pool and that table (redis-py clients may be shared between threads),
so a channel keeps the one it built, and builds another only when kombu has given the channel a new
pool (after a disconnect). The clients kombu keeps for consuming (BRPOP, pub/sub) are untouched.

Celery uses it through `broker_transport` in celeryconfig.py (by its path,
shared/celery_settings.py's REDIS_TRANSPORT_PATH); the broker URL is unchanged, and the
app's connections (`Connection`, below) still give it as a `redis://` URL.
"""

from __future__ import annotations

import kombu
from kombu import connection as kombu_connection
from kombu.transport import redis as kombu_redis

from shared.celery_settings import REDIS_TRANSPORT_PATH


class Channel(kombu_redis.Channel):
    _command_client = None

    def _create_client(self, asynchronous: bool = False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._command_client
        if client is None or client.connection_pool is not pool:
            client = self._command_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel


class Connection(kombu.Connection):
    """A kombu connection that gives its URL (`as_uri`, `info`) with this transport as `redis`.

    By default the transport's path would be the URL's scheme, `tasks.redis_transport:Transport://`,
    which no URL parser reads: Flower, which picks its broker client (the queue lengths of its
    Broker page) from that scheme, answered 404, "'redis' broker is not supported". Kombu names
    py-amqp's transport `amqp` in the same way. The transport in use is not changed: a clone of the
    connection keeps this one.
    """

    resolve_aliases = {**kombu_connection.resolve_aliases, REDIS_TRANSPORT_PATH: "redis"}

    def __reduce__(self):
        # A copy pickled or deep-copied is rebuilt from the connection's info(), which now names
        # the stock `redis` transport: from the info with this transport kept instead.
        return self.__class__, tuple(dict(self._info(resolve=False)).values()), None
