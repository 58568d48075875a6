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
app's connections (`Connection`, below) still give it as a `redis://` URL. Those connections also
stop a publish's tries again at the second wait for Redis that times out (`Connection.ensure`).
"""

from __future__ import annotations

import kombu
import redis
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

    def ensure(self, obj, fun, errback=None, *args, **kwargs):
        """Kombu's `ensure` (how a publish tries again: celeryconfig's task_publish_retry_policy),
        but each call of what it returns gives up at the second of its waits for Redis that
        times out.

        The policy's tries again are for a Redis refusing connections, each refusal costing
        milliseconds. A Redis that takes connections and never answers (hung, or a host gone
        behind a proxy that still accepts) costs a socket timeout (5 s, celeryconfig) a try:
        kombu waited for the reply on the pooled connection, then connected afresh 4 times
        (max_retries 3, as a refusal is retried), each waiting as long for its PING, 25.6 s
        measured in all, where the inbox consumer's dispatch was said to wait 5 s. The first
        timeout is still followed by one new connection (a NAT or failover that forgot the
        pooled one: the task is sent on it), but a new one that times out too ends the publish:
        the next would wait as long. So a publish gives up within two socket timeouts."""
        ensured_by_kombu = super().ensure

        def ensured(*call_args, **call_kwargs):
            return ensured_by_kombu(obj, fun, _GivingUpAtTheSecondTimeout(errback), *args,
                                    **kwargs)(*call_args, **call_kwargs)

        ensured.__name__, ensured.__doc__ = f"{fun.__name__}(ensured)", fun.__doc__
        return ensured

    def Pool(self, limit=None, **kwargs):  # (kombu's name)
        """A pool of connections of this class: the app's (`app.pool`), which its producers take
        theirs from (the inbox consumer's dispatch, a worker's sends). Kombu's pool makes kombu's
        own connections."""
        return ConnectionPool(self, limit, **kwargs)


class PooledConnection(kombu_connection.PooledConnection, Connection):
    """A connection of a pool, as kombu's, and this module's."""


class ConnectionPool(kombu_connection.ConnectionPool):
    def new(self):
        return PooledConnection(self, **dict(self.connection._info(resolve=False)))


class _GivingUpAtTheSecondTimeout:
    """Kombu's `errback` for one call of an ensured publish, called with each failure it means to
    try again after (the publish's own, then each new connection's): it calls the policy's own
    errback, if any, then raises the failure, ending the tries, if it is the second that timed
    out."""

    def __init__(self, errback=None):
        self._errback = errback
        self._timeouts = 0

    def __call__(self, exc: BaseException, interval: float):
        if self._errback is not None:
            self._errback(exc, interval)
        if isinstance(exc, (redis.exceptions.TimeoutError, TimeoutError)):
            self._timeouts += 1
            if self._timeouts >= 2:
                raise exc
