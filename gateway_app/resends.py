"""Which requests the gateway sends to a service once more, over either transport, when the service
dropped them unanswered once they were sent: the one rule of what is safe to send again
(gateway_app/upstream_http.py and upstream_grpc.py say when a failure is such a drop).

Safe is a GET (or a HEAD, asked as its GET), which reads again, or a POST with an Idempotency-Key
passed on, which only the routes that honour one pass on (POST /api/orders,
/api/accounts/deposit: gateway_app/proxy.py, gateway_app/routes.py): the service answers a repeat
with the first answer (Idempotent-Replayed: true, when the first send did the work), or carries it
out once if the first was not. A POST without one is never sent again: it would be a second order,
a second top-up.

How soon after its send the failure came does not count. A request the service read, held and
then dropped unanswered (its worker killed, say) may have been carried out, but repeating a safe
one does nothing its safety does not allow: a read reads again, a keyed POST is answered its
first answer. Go's net/http Transport retries so (a reused connection, no byte of an answer read;
a GET, HEAD, OPTIONS or TRACE, or a request with an Idempotency-Key), with no timing condition;
urllib3's Retry, given reads to retry, repeats an idempotent method whatever failed after the
send; nginx passes a request it sent on to the next server only if it is idempotent
(proxy_next_upstream's non_idempotent). A request that itself kills the service's worker (a
"poison" request) is thus sent twice, no more, for each call (the second try is never tried
again): a timing rule would not spare the likelier kind, one that kills it at once, and that
bounded cost is taken so that a safe request does not fail at random under load or as a worker
dies.

A second try that did nothing says nothing of the first, which may have been carried out: one never
sent (no connection made) or refused unrun (a gRPC server too busy to take it) leaves the first
try's failure, a 502 "may have been carried out", not its own "unavailable". A keyed POST's second
try that failed says nothing of the first either: rolled back for the deadline (the service's 504
CALLER_GAVE_UP: the second try found no answer stored under its key, a first try carried out being
answered its replay even past the deadline, but the first may be under way still, short of its key,
to commit once the second is rolled back: on a replica whose clock runs behind the second's, say),
held up by a lock (503 IDEMPOTENCY_KEY_IN_USE, the likely answer while the first still runs: its
key's row, uncommitted, holds up the second's INSERT of it past lock_timeout, and the first commits
after; or DATABASE_BUSY, for another lock, or from a service of the release before, which answered
that for the key's too), or any other 5xx of the service's own, leaves the first try's 502 too, not
its own "nothing was changed" (sent_again_under_its_key). Only an answer that went through the key
vouches for the first: a success (a replay, or this try's own work, the first's having come to
nothing) or the service's 4xx refusal. A read's second try is answered as a first answer would be,
its 5xx too (a 503 DATABASE_BUSY with its Retry-After, a DATABASE_UNAVAILABLE): a read changes
nothing, so nothing the first did is denied. (A second try that times out, or breaks off in turn,
is answered as it failed: its 504 or 502 says as much, "may have been carried out".)

The rule says only what may be sent again; what answers it is the deployment's. Over HTTP the
service's other gunicorn workers take the second try on the same port. Over gRPC only another
process serving the same target can (replicas behind one address; never processes sharing its
port, which shared/grpc_server.py's servers refuse, SO_REUSEPORT off: the kernel could give a
connection made as one dies to its listener as that closes, and the connection was reset):
docker-compose, the devstack and the chaos soak run one shared.grpc_server process per service, so
there the second try finds nothing listening: the call is the first try's 502, and those after it
503s (the service unreachable), until that process is started again.
"""

from __future__ import annotations

# The least of the call's deadline left that is worth a second try.
SECOND_TRY_NEEDS_SECONDS = 0.05

_READS = frozenset({"GET", "HEAD"})


def safe_to_send_again(method: str, key_passed_on: str | None) -> bool:
    """True if a request of `method` (the client's: HEAD or GET, POST), with `key_passed_on` the
    Idempotency-Key the gateway passes on to the service (None where it passes none: no key
    given, or a route that honours none), may be sent to the service once more after it was
    dropped unanswered: a read, or a POST with a key. A key makes no other method safe (none
    honours one)."""
    return method in _READS or (method == "POST" and key_passed_on is not None)


def sent_again_under_its_key(method: str, key_passed_on: str | None) -> bool:
    """True if a request of `method`, with `key_passed_on` (as safe_to_send_again takes them), is
    sent again as a keyed POST: its second try's answer vouches for the first only if it went
    through the key (a success, the service's 4xx), and a 5xx of the service's own leaves the first
    try's failure. False for a read, whose second try is answered as a first answer would be (a
    503 DATABASE_BUSY with its Retry-After: a read changes nothing), and for a request never sent
    again."""
    return method not in _READS and safe_to_send_again(method, key_passed_on)
