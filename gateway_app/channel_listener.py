"""One Redis subscriber per gateway process, shared by all its notification sockets: one pub/sub
connection and one daemon thread reading it, which wakes the sockets waiting on a channel when
something is published there, and tells them all when Redis is lost.

A connection (and a thread) per socket held one of the app's pooled Redis connections for as long
as each socket stayed open, and had each socket ask Redis four times a second: a process could hold
a few dozen. Here a socket costs a registration and a threading.Event."""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

# The thread PINGs Redis once the connection has been quiet this long, and takes it as lost when
# nothing has come within as long again: a Redis host gone silent (no close, no reset) is found
# within twice this, and every socket is told. (redis-py's own health check, sent from whichever
# thread reads or writes next, would cross the subscriptions the sockets send.)
PING_WHEN_QUIET_SECONDS = 10.0


def subscriber_client(redis_url: str) -> redis.Redis:
    """The Redis client a ChannelListener subscribes with: it gives up on a connection after 1 s
    and on a read after 2 s, and retries nothing, so that a failure reaches the sockets (redis-py
    would reconnect and resubscribe behind their backs, and what was published meanwhile would
    wake no one until a recheck). Its health check is the listener's own PING."""
    return redis.Redis.from_url(redis_url, socket_connect_timeout=1, socket_timeout=2,
                                socket_keepalive=True, retry=Retry(NoBackoff(), 0))


class SubscriberLost(redis.ConnectionError):
    """The listener's connection failed: a socket waiting on it reconnects (its page catches up
    with `after`), and the next one to register gets a fresh connection."""


class _Subscription:
    """A channel's sockets on the connection, and whether Redis has confirmed its SUBSCRIBE."""

    def __init__(self) -> None:
        self.waiters: set[Waiter] = set()
        self.confirmed = threading.Event()


class Waiter:
    """One socket's registration on its channel: woken by each message published there."""

    def __init__(self, name: str, subscription: _Subscription):
        self.channel = name
        self._subscription = subscription
        self._woken = threading.Event()
        self._lost: SubscriberLost | None = None

    def wait_until_subscribed(self, timeout: float) -> None:
        """Return once Redis has confirmed the channel's subscription: from then on what is
        published there wakes this waiter."""
        if not self._subscription.confirmed.wait(timeout):
            raise redis.TimeoutError(
                f"Redis did not confirm the subscription to {self.channel} in time")
        self._raise_if_lost()

    def wait(self, timeout: float) -> bool:
        """Whether something was published on the channel since the last wait (waiting up to
        `timeout` seconds for it); raises SubscriberLost once the connection has failed."""
        woken = self._woken.wait(timeout)
        # Cleared only once it has woken this wait, and before the caller reads what is true: a
        # publish after the clear wakes the next wait, one before it is read by this one's
        # caller. Cleared after a wait that timed out, it wiped a publish that came as the wait
        # returned, which then woke no one (the socket waited for its recheck).
        if woken:
            self._woken.clear()
        self._raise_if_lost()
        return woken

    def _wake(self) -> None:
        self._woken.set()

    def _lose(self, lost: SubscriberLost) -> None:
        self._lost = lost
        self._woken.set()

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            raise self._lost


class ChannelListener:
    """The process's subscriber. The first socket to register on a channel SUBSCRIBEs it, the
    last to leave UNSUBSCRIBEs it; the connection and its thread start with the first socket and
    end once none has been registered for PING_WHEN_QUIET_SECONDS, or when Redis is lost."""

    def __init__(self, client: redis.Redis):
        # A client of the listener's own (subscriber_client), so the subscriber is never one of
        # the app's pooled connections.
        self._client = client
        self._lock = threading.Lock()
        self._pubsub: redis.client.PubSub | None = None
        self._subscriptions: dict[str, _Subscription] = {}
        # The SUBSCRIBEs sent and not yet confirmed, per channel, in the order they were sent (a
        # channel left and taken again before Redis answered has two).
        self._unconfirmed: dict[str, collections.deque[_Subscription]] = {}

    @contextlib.contextmanager
    def listening(self, name: str, subscribe_timeout: float) -> Iterator[Waiter]:
        """A Waiter on the channel `name`, once Redis has confirmed its subscription (within
        `subscribe_timeout` seconds, or redis.TimeoutError); unregistered on the way out."""
        waiter = self._register(name, subscribe_timeout)
        try:
            waiter.wait_until_subscribed(subscribe_timeout)
            yield waiter
        finally:
            self._unregister(waiter)

    def _register(self, name: str, timeout: float) -> Waiter:
        # The lock is held while a fresh connection is made and a SUBSCRIBE sent: against a Redis
        # that takes connections and answers nothing, the sockets arriving meanwhile would each
        # wait their turn to fail, 2 s apart (socket_timeout), the last of 192 for minutes; each
        # gives up once its subscription's time is up instead, as it would unconfirmed.
        if not self._lock.acquire(timeout=timeout):
            raise redis.TimeoutError(f"the subscription to {name} could not be sent in time")
        try:
            return self._register_locked(name)
        finally:
            self._lock.release()

    def _register_locked(self, name: str) -> Waiter:
        pubsub, fresh = self._pubsub, self._pubsub is None
        if fresh:
            pubsub = self._pubsub = self._client.pubsub()
        subscription = self._subscriptions.get(name)
        if subscription is None:
            subscription = self._subscriptions[name] = _Subscription()
            self._unconfirmed.setdefault(name, collections.deque()).append(subscription)
            try:
                pubsub.subscribe(name)
            except redis.RedisError as exc:
                self._lose_locked(pubsub, exc)
                raise SubscriberLost(f"could not subscribe to {name}: {exc}") from exc
        if fresh:  # (its connection made by the SUBSCRIBE: the thread has something to read)
            threading.Thread(target=self._read, args=(pubsub,), daemon=True,
                             name="notification-listener").start()
        waiter = Waiter(name, subscription)
        subscription.waiters.add(waiter)
        return waiter

    def _unregister(self, waiter: Waiter) -> None:
        with self._lock:
            subscription = self._subscriptions.get(waiter.channel)
            if subscription is None or waiter not in subscription.waiters:
                return  # (the connection was lost, and the registration with it)
            subscription.waiters.discard(waiter)
            if not subscription.waiters:
                del self._subscriptions[waiter.channel]
                try:
                    self._pubsub.unsubscribe(waiter.channel)
                except redis.RedisError as exc:
                    self._lose_locked(self._pubsub, exc)

    def close(self) -> None:
        """End the connection and its thread with the app (shared.app_closing): forgotten first,
        under the lock, so the thread, its read failing as the connection closes, returns
        without a word, where the client closed under it had it log a lost Redis and tell every
        socket so (SubscriberLost)."""
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
            self._subscriptions, self._unconfirmed = {}, {}
        if pubsub is not None:
            pubsub.close()

    def _read(self, pubsub: redis.client.PubSub) -> None:
        """The thread: read the connection until it fails, or until no socket is registered."""
        pinged = False
        try:
            while True:
                # (Not get_message: it reads nothing while redis-py counts no subscription, which
                # it may do for a moment as one channel is left and another taken.)
                response = pubsub.parse_response(block=False, timeout=PING_WHEN_QUIET_SECONDS)
                message = pubsub.handle_message(response) if response is not None else None
                with self._lock:
                    if self._pubsub is not pubsub:
                        return  # lost as a socket sent on it: every socket has been told
                    if message is not None:
                        pinged = False
                        self._take(message)
                        continue
                    if not self._subscriptions:
                        # (A SUBSCRIBE Redis never confirmed, its socket gone, is forgotten with
                        # the connection: left queued, it would take the confirmation of the
                        # channel's next subscription on the next connection, and every socket
                        # of that user after it would wait for the one before.)
                        self._pubsub, self._unconfirmed = None, {}
                        pubsub.close()
                        return
                if pinged:
                    raise redis.TimeoutError(
                        f"Redis answered no PING in {PING_WHEN_QUIET_SECONDS} s")
                pubsub.ping()
                pinged = True
        except Exception as exc:  # whatever it is, the sockets must be told
            with self._lock:
                self._lose_locked(pubsub, exc)

    def _take(self, message: dict) -> None:
        name = message["channel"]
        name = name.decode() if isinstance(name, bytes) else name
        if message["type"] == "subscribe":
            unconfirmed = self._unconfirmed[name]
            unconfirmed.popleft().confirmed.set()
            if not unconfirmed:
                del self._unconfirmed[name]
        elif message["type"] == "message" and name in self._subscriptions:
            for waiter in self._subscriptions[name].waiters:
                waiter._wake()

    def _lose_locked(self, pubsub: redis.client.PubSub, exc: Exception) -> None:
        """Tell every socket registered on `pubsub` that it is lost, and forget it: the next
        registration opens a fresh connection."""
        if self._pubsub is not pubsub:
            return
        log.warning("the notification listener lost Redis: %s", exc)
        lost = SubscriberLost(f"the notification listener lost Redis: {exc}")
        for subscription in self._subscriptions.values():
            for waiter in subscription.waiters:
                waiter._lose(lost)
            subscription.confirmed.set()  # (a socket waiting for it learns it is lost at once)
        self._pubsub, self._subscriptions, self._unconfirmed = None, {}, {}
        try:
            pubsub.close()
        except Exception:  # (closing a connection already broken)
            pass
