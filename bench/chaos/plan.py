"""What one chaos run does: how long, how hard, and which disruptions it deals."""

from __future__ import annotations

from dataclasses import dataclass

# Each kind of disruption by name: a SIGKILL of a process's whole group and every descendant
# (restarted after), of one gunicorn child of an API (its master forks another), a SIGSTOP of a
# process's group (SIGCONT'd after a while), or of the Kafka broker; payment requests published
# again under new ids; or the stack's own Redis restarted empty, or its own PostgreSQL crashed and
# restarted.
KILLS = ("orders-worker", "payments-worker", "gateway-worker", "beat", "orders-grpc",
         "payments-grpc")
CHILD_KILLS = ("orders-api-child", "payments-api-child", "gateway-api-child")
PAUSES = ("pause:orders-worker", "pause:payments-worker", "pause:gateway-worker", "pause:beat")
BROKER_PAUSE = "broker-pause"
# Payment requests already published sent again under fresh message ids (resent_requests.py).
PAYMENT_REQUESTS_RESENT = "payment-requests-resent"
# The stack's own Redis (Celery's broker, the cache, rate limits, signature notes) SIGKILLed and
# started again on its port: it keeps nothing on disk, so every queued task and key is lost.
REDIS_RESTART = "redis-restart"
# The stack's own PostgreSQL (every service's databases) crashed, its postmaster and every backend
# SIGKILLed (each backend in a session of its own: the postmaster's group alone would leave a busy
# one running), and started again on its port and data directory once all are gone: its crash
# recovery keeps what was committed, and every client's connection is broken, a commit's answer
# lost with it.
POSTGRES_RESTART = "postgres-restart"
# The second Celery worker of each service a scaled-out run adds, so that two take the same
# queues (and the same Kafka consumer group) and a kill leaves the other at work.
SCALED_OUT = ("orders-worker", "payments-worker")


@dataclass(frozen=True)
class ChaosPlan:
    seed: int = 1
    seconds: float = 150
    rate: float = 40  # orders and deposits offered per second
    users: int = 30
    # The last `late_users` open their accounts during the run, so that orders meet a missing
    # account (CANCELLED) and then a funded one.
    late_users: int = 6
    scale_out: bool = True
    kill_every: tuple[float, float] = (0.5, 2)  # seconds between disruptions, drawn uniformly
    restart_after: tuple[float, float] = (0, 2)  # seconds a killed process stays down
    pause_seconds: tuple[float, float] = (3, 40)
    broker_pause_seconds: tuple[float, float] = (1, 6)
    redis_down_seconds: tuple[float, float] = (0.5, 3)  # before it is started again
    postgres_down_seconds: tuple[float, float] = (0.5, 3)  # the same
    # How long the shop gets, once the load stops, to make every order final and owe nothing.
    settle_seconds: float = 300
    # The first shoppers who hold a notification socket through the gateway for the run (reopened
    # as the page reopens it: followers.py), and how long, once the shop has settled, their
    # sockets get to send every notification kept for them (an open one reads the table every
    # 5 s; one closed reconnects within 10 s, 30 s if turned away, or a Retry-After, and catches
    # up).
    socket_users: int = 6
    socket_catch_up_seconds: float = 60

    def every_kind_within(self) -> float:
        """How long dealing each kind once more may take, at most: three passes of the deck at
        the longest gap, restart and pause of the broker (a kind not dealt when its turn comes,
        a gunicorn master still forking, goes back under the deck; down the longest of a
        process's restart, Redis's and PostgreSQL's)."""
        slowest = (self.kill_every[1] + max(self.restart_after[1], self.redis_down_seconds[1],
                                            self.postgres_down_seconds[1])
                   + self.broker_pause_seconds[1])
        return 3 * len(self.disruptions()) * slowest

    def disruptions(self) -> tuple[str, ...]:
        scaled = tuple(f"{name}-2" for name in SCALED_OUT) if self.scale_out else ()
        return (KILLS + scaled + CHILD_KILLS + PAUSES
                + tuple(f"pause:{name}" for name in scaled)
                + (BROKER_PAUSE, PAYMENT_REQUESTS_RESENT, REDIS_RESTART, POSTGRES_RESTART))
