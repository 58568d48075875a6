"""Calling the services over gRPC: one channel per service per process (a connection gone silent
found out by keepalive pings; made afresh once its calls have all failed unsent for a few
seconds, its service's name looked up at once), the caller's identity, the gateway's deadline
(both signed) and the request id in the call metadata, every call waited for
COMMIT_GRACE_SECONDS past that deadline (a COMMIT begun before it answered as it ended:
shared/caller_deadline.py), a call whose connection broke once it was sent, before its reply,
sent once more where that is safe (gateway_app/resends.py), and gRPC failures mapped back to the
HTTP errors the services' HTTP APIs would have given (a replayed answer's mark too:
Idempotent-Replayed)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from flask import current_app, g

from gateway_app.resends import SECOND_TRY_NEEDS_SECONDS
from gateway_app.upstream_answers import (UNREADABLE_JSON, Route, an_error_of_the_api,
                                          failure_for_status, retry_after_passed_on)
from shared.caller_deadline import COMMIT_GRACE_SECONDS, deadline_moment
from shared.errors import ApiError, BadGateway, ServiceUnavailable, UpstreamTimeout
from shared.grpc_messages import to_body, to_message
from shared.grpc_server import (ERROR_CODE_KEY, ERROR_DETAILS_KEY, HTTP_STATUS_KEY,
                                REPLAYED_KEY, RETRY_AFTER_KEY, channel_options)
from shared.idempotency import REPLAYED, REPLAYED_HEADER
from shared.internal_auth import grpc_identity_metadata
from shared.protos import orders_pb2, orders_pb2_grpc, payments_pb2, payments_pb2_grpc
from shared.request_context import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger(__name__)

STUBS = {"orders": orders_pb2_grpc.OrdersStub, "payments": payments_pb2_grpc.PaymentsStub}
SERVICE_NAMES = {"orders": orders_pb2.DESCRIPTOR.services_by_name["Orders"].full_name,
                 "payments": payments_pb2.DESCRIPTOR.services_by_name["Payments"].full_name}
REQUEST_TYPES = {
    ("orders", "PlaceOrder"): orders_pb2.PlaceOrderRequest,
    ("orders", "ListOrders"): orders_pb2.ListOrdersRequest,
    ("orders", "GetOrder"): orders_pb2.GetOrderRequest,
    ("payments", "OpenAccount"): payments_pb2.OpenAccountRequest,
    ("payments", "Deposit"): payments_pb2.DepositRequest,
    ("payments", "GetBalance"): payments_pb2.GetBalanceRequest,
}

# How long the calls on the process's channel to a service may all fail unsent (_never_sent), no
# call sent in between, before the next call is given a channel made afresh: its name looked up
# at once. A channel looks a name up again within a second of losing its service
# (shared/grpc_server.py: DNS_LOOKUPS_AT_MOST_EVERY_MS), but after a lookup that failed gRPC's
# resolver waits 1 s, growing by 1.6 times a failure to two minutes, before the next, whatever
# is asked of it; a service whose name stopped resolving for a while (its container gone, as
# compose's DNS drops a stopped container's name) was unreachable, every call a 503, for up to two
# minutes after it was back. A new channel's resolver starts from nothing: with one every 3 s
# while they fail, a name back is looked up within about 3 s, however long it was gone.
CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS = 3.0


class _ProcessChannel:
    """The process's channel to one service's target, which its threads share: a stub on it, the
    calls under way on it, and since when the calls on it have all failed unsent (None: the last
    one did not). Once `retired` (a channel made afresh in its place) it takes no new call, and
    is closed as the last under way on it ends."""

    def __init__(self, service: str, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=channel_options())
        self.stub = STUBS[service](self.channel)
        self.calls_under_way = 0
        self.unsent_since: float | None = None
        self.retired = False
        self.made_afresh = False  # (in place of one failing unsent, no call sent since)

    def unsent_too_long(self) -> bool:
        return (self.unsent_since is not None and time.monotonic() - self.unsent_since
                >= CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS)

    def called(self, unsent: bool) -> None:
        """Note how a call on it ended: unsent (_never_sent), or otherwise."""
        if not unsent:
            self.unsent_since = None
            self.made_afresh = False
        elif self.unsent_since is None:
            self.unsent_since = time.monotonic()


_channels: dict[tuple[str, str], _ProcessChannel] = {}
_channels_lock = threading.Lock()  # (over _channels and each _ProcessChannel's counts)


def _target(service: str) -> str:
    return getattr(current_app.extensions["hseshop.settings"], f"{service}_grpc_target")


@contextmanager
def _process_channel(service: str) -> Iterator[_ProcessChannel]:
    """The process's channel to `service`, held for one call, which is noted as it ends (sent, or
    a grpc.RpcError of a call never sent): made afresh in place of one whose calls have failed
    unsent for CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS, which is closed once no call is under
    way on it (closed with calls on it, grpcio would cancel them)."""
    key = (service, _target(service))
    with _channels_lock:
        held = _channels.get(key)
        if held is None or held.unsent_too_long():
            made_afresh = held is not None
            if made_afresh:
                # (Said once an outage: its channels are made afresh every few seconds while it
                # lasts, and the calls' 503s say the rest.)
                log.log(logging.DEBUG if held.made_afresh else logging.INFO,
                        "%s calls have failed unsent for %.0f s: its channel made afresh, its"
                        " name looked up again", service, CHANNEL_MADE_AFRESH_AFTER_UNSENT_SECONDS)
                held.retired = True
                _close_if_unused(held)
            held = _channels[key] = _ProcessChannel(*key)
            held.made_afresh = made_afresh
        held.calls_under_way += 1
    try:
        yield held
    except grpc.RpcError as exc:
        with _channels_lock:
            held.called(unsent=_never_sent(exc))
        raise
    else:
        with _channels_lock:
            held.called(unsent=False)
    finally:
        with _channels_lock:
            held.calls_under_way -= 1
            _close_if_unused(held)


def _close_if_unused(held: _ProcessChannel) -> None:
    """Close `held` if it is retired and no call is under way on it (with _channels_lock held:
    no call takes it once it is retired). grpcio's close cancels the calls on it (none here) and
    lets the channel go, waiting on nothing."""
    if held.retired and held.calls_under_way == 0:
        held.channel.close()


def call(service: str, method: str, body: dict[str, Any], *, safe_to_send_again: bool,
         under_its_key: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Call `method` of `service` with a request built from `body`: the reply as a JSON body, and
    the headers the HTTP API would have answered it with beside its Content-Type (what the
    reply's trailers say: Idempotent-Replayed). Sent once more, on a new connection, within what
    is left of the deadline (more than SECOND_TRY_NEEDS_SECONDS of it) and the grace, when the
    connection it went on broke before a byte of a reply came, if it is `safe_to_send_again`
    (gateway_app/resends.py); if it is sent again `under_its_key` (a keyed POST), the second
    try's 5xx of the service's own is the first try's failure. Answered only if another process
    serves the same target (one process per service, as the stacks run, leaves nothing
    listening: the first try's 502)."""
    settings = current_app.extensions["hseshop.settings"]
    request = to_message(REQUEST_TYPES[(service, method)], body)
    seconds = settings.upstream_timeout_seconds
    ends = time.monotonic() + seconds
    # The moment past which the service commits nothing, one for the call, its second try's too
    # (as over HTTP: shared/caller_deadline.py); the call waits COMMIT_GRACE_SECONDS longer, for
    # a COMMIT begun before it.
    deadline = deadline_moment(seconds)
    try:
        with _process_channel(service) as held:
            reply, answered = _sent(held.stub, service, method, request, deadline,
                                    seconds + COMMIT_GRACE_SECONDS)
    except grpc.RpcError as exc:
        left = ends - time.monotonic()
        if not (safe_to_send_again and _dropped_once_sent(exc)
                and left > SECOND_TRY_NEEDS_SECONDS):
            raise _http_error(service, exc) from None
        log.info("%s closed the connection without answering (%s): sending the call again on a"
                 " new one", service, exc.details())
        try:
            with _channel_of_its_own(service) as channel:
                reply, answered = _sent(STUBS[service](channel), service, method, request,
                                        deadline, left + COMMIT_GRACE_SECONDS)
        except grpc.RpcError as again:
            if _never_sent(again) or _too_busy(again):
                # Never sent (no connection made: no service in the dead one's place), or refused
                # unrun (the server too busy), the first try may have been carried out: its
                # failure is the one to answer for (a 502, "may have been carried out"), not this
                # one's "unavailable", which would deny it. Said first, or the log would hold the
                # first failure alone.
                log.warning("%s could not be reached to send the call again (%s: %s)", service,
                            again.code().name, again.details())
                raise _http_error(service, exc) from None
            if under_its_key and _failed_by_the_service(again):
                # A keyed POST's 5xx, the service's own: rolled back for the deadline, the first
                # try's moment (504 CALLER_GAVE_UP), or held up by a lock (503
                # IDEMPOTENCY_KEY_IN_USE: its key's INSERT waited out lock_timeout on the first
                # try's, uncommitted, the likely answer while the first is under way; or
                # DATABASE_BUSY). Either says nothing was done by this try alone, and nothing of
                # the first, which may commit after it (gateway_app/resends.py): the first's
                # failure is answered, as above, not this one's "nothing was done". A read's is
                # answered as a first answer would be, below.
                trailers = _trailers(again)
                log.warning("%s failed the call sent again (%s %s: %s): the first try's failure"
                            " is answered", service, trailers[HTTP_STATUS_KEY],
                            trailers.get(ERROR_CODE_KEY), again.details())
                raise _http_error(service, exc) from None
            raise _http_error(service, again) from None
    return to_body(reply), ({REPLAYED_HEADER: REPLAYED}
                            if _trailers(answered).get(REPLAYED_KEY) == REPLAYED else {})


def _channel_of_its_own(service: str) -> grpc.Channel:
    """A channel to `service` that makes a connection of its own (a subchannel pool of its own:
    grpc-core's channels to one target share their connections otherwise), for a call sent
    again; the caller closes it. A defensive choice, the evidence for it thin: on the process's
    channel the second try was seen put on the broken connection, which grpc-core had not yet
    closed as the first call's failure came (its close held back by a write under way: "Delayed
    close due to in-progress write"), and failing with it, in 2 runs of about 20 of
    test_grpc.py's died_holding test as it was written, and in none of 24 a reviewer ran. With
    this channel that test's GET still failed about 2 runs in 30 (run with others), for another
    cause its log said: the second try's connection reset as it was made ("recvmsg:Connection
    reset by peer"), the kernel having given it to the dying process's listener (its two
    processes then shared a port with SO_REUSEPORT) as that closed; the test now reaches them
    through a proxy that carries no connection made after the kill to the dying one. A
    connection made for the second try costs its handshake alone, on a path taken only once a
    process has died; the test that pins it (test_resends.py) checks the option, not the
    failure."""
    return grpc.insecure_channel(_target(service), options=[
        *channel_options(), ("grpc.use_local_subchannel_pool", 1)])


def _sent(stub: Any, service: str, method: str, request: Any, deadline: str,
          timeout: float) -> tuple[Any, Any]:
    """`request` sent through `stub` to `method` of `service`, waiting `timeout` seconds at most:
    its reply and its grpc.Call."""
    settings = current_app.extensions["hseshop.settings"]
    # Signed for this method and this message's bytes, which the stub sends as serialized here
    # (a message serializes to the same bytes each time: its fields in their numbers' order), and
    # for the moment past which the service commits nothing, which it keeps to if the call's own
    # timeout (unsigned: a captured call could be sent again with a longer one; the gateway's own
    # is COMMIT_GRACE_SECONDS later) is later; with a nonce of its own (x-gateway-nonce), so that
    # two calls alike are two signatures, and each try is signed afresh, as over HTTP.
    metadata = grpc_identity_metadata(g.user_id, settings.internal_auth_secret,
                                      f"/{SERVICE_NAMES[service]}/{method}",
                                      request.SerializeToString(), deadline)
    metadata.append((REQUEST_ID_HEADER.lower(), current_request_id() or ""))
    return getattr(stub, method).with_call(request, metadata=metadata, timeout=timeout)


def _trailers(rpc) -> dict[str, str]:
    """The trailing metadata of a call replied to or failed (its grpc.Call, or its RpcError), by
    key: what the service said beside its reply or of its failure (nothing: empty)."""
    return dict(rpc.trailing_metadata() or ())


# What grpcio's server says of a call it refused unrun, having as many in hand as it takes (its
# maximum_concurrent_rpcs).
_TOO_BUSY_DETAILS = "Concurrent RPC limit exceeded!"


def _too_busy(exc: grpc.RpcError) -> bool:
    """True if the failed call was refused unrun by grpcio's server, too busy to take it."""
    return (exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and HTTP_STATUS_KEY not in _trailers(exc) and exc.details() == _TOO_BUSY_DETAILS)


def _failed_by_the_service(exc: grpc.RpcError) -> bool:
    """True if the failed call is the service's own failure (a 5xx in its trailers:
    shared/grpc_server.py's _abort), which says nothing of another try of a keyed call: its rollback
    for the deadline (504 CALLER_GAVE_UP), its database busy or unreachable (503). (The gateway's
    own timer's DEADLINE_EXCEEDED comes with no trailers.)"""
    status = _trailers(exc).get(HTTP_STATUS_KEY, "")
    return _ERROR_STATUS.fullmatch(status) is not None and status.startswith("5")


def _http_error(service: str, exc: grpc.RpcError) -> ApiError:
    """The service's own answer, as its HTTP API would have given it (in the trailers: a 503
    DATABASE_BUSY with its Retry-After comes as UNAVAILABLE too), or what the call's failure
    says of the service as the HTTP transport says it (unreachable, broken off once the call was
    sent, too slow, refusing the gateway's identity), or that the server was too busy to take
    it. Marked Idempotent-Replayed as the service marked it: a refusal its operation made, kept
    under the call's key and answered again (shared/idempotency.py); no other error is a replay
    (a request that fails otherwise leaves no key behind, so its repeat runs afresh; a key reused
    with another body is a fresh 422)."""
    trailers = _trailers(exc)
    if HTTP_STATUS_KEY in trailers:
        return _the_services_error(service, exc, trailers)
    # Said in the log as the HTTP transport says it (gateway_app/proxy.py): the call may never
    # have reached the service, whose log then holds nothing of it.
    code = exc.code()
    if _never_sent(exc):
        log.warning("%s unreachable: %s", service, exc.details())
        return ServiceUnavailable.of(service)
    if _too_busy(exc):
        # grpcio's own refusal, the call never run: the server had as many calls in hand as it
        # takes (shared/grpc_server.py: CALLS_IN_HAND_PER_THREAD). (A service's 429 comes with
        # its trailers; grpc-core's other RESOURCE_EXHAUSTED, a reply over the size a channel
        # takes, is of a call that ran: a 502 below.)
        log.warning("%s too busy: %s", service, exc.details())
        return ServiceUnavailable.too_busy(service)
    if code == grpc.StatusCode.UNAVAILABLE:
        # Sent, and the connection it went on broke before the reply ("Socket closed", a reset,
        # a GOAWAY's "Cancelling all calls": the service's process killed or stopped, say): the
        # request may have been carried out, which "unavailable" would deny.
        log.warning("%s closed the connection without answering: %s", service, exc.details())
        return BadGateway.of(service)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        # The gateway's own timer (its deadline and the grace past it), with none of the
        # service's trailers: the call may have been carried out. (The service's own rollback
        # for the deadline comes with its trailers, 504 CALLER_GAVE_UP: above.)
        log.warning("%s timed out: %s", service, exc.details())
        return UpstreamTimeout.of(service)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return BadGateway.identity_refused(service, exc.details())
    log.error("%s call failed: %s %s", service, code, exc.details())
    return BadGateway.of(service)


# What the services write in a failed call's trailers (shared/grpc_server.py: _abort): an error
# status of HTTP's, in its three digits, beside the error's code and details.
_ERROR_STATUS = re.compile(r"[45][0-9]{2}")


def _the_services_error(service: str, exc: grpc.RpcError, trailers: dict[str, str]) -> ApiError:
    """The error the service said in a failed call's `trailers`, as its HTTP API would have
    answered it, and as the HTTP transport relays it (gateway_app/upstream_answers.py: a 5xx but
    its own 503 a 502, a 504 a 504, its CALLER_GAVE_UP saying nothing was done, a 4xx whose status
    and code the route does not document a 502, a Retry-After that is none left out, a replay's
    mark answered Idempotent-Replayed as the HTTP transport passes the header on). Trailers
    that are none the service writes (a status that is no error status, or no error of the API's:
    its code not of shared/errors.py's form, details missing or no JSON object) are a 502, as an
    answer over HTTP that is no answer of the API is."""
    status, code = trailers[HTTP_STATUS_KEY], trailers.get(ERROR_CODE_KEY)
    message = exc.details() or ""
    try:
        details = json.loads(trailers[ERROR_DETAILS_KEY])
    except (*UNREADABLE_JSON, KeyError):
        details = None
    if not (_ERROR_STATUS.fullmatch(status) and an_error_of_the_api(code, message, details)):
        log.error("%s failed a call (%s %r) with trailers that are none of its API's: %r",
                  service, exc.code(), message[:200],
                  {key: value[:200] for key, value in trailers.items()})
        return BadGateway.of(service)
    # (A 503 in these trailers is the service's own: they say an error of its API.)
    failure = failure_for_status(service, int(status), route=Route.of_the_request(),
                                 unavailable_for_now=True,
                                 said=exc.details, error_code=lambda: code)
    if failure is not None:
        return failure
    headers = {}
    retry_after = retry_after_passed_on(service, trailers.get(RETRY_AFTER_KEY))
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    if trailers.get(REPLAYED_KEY) == REPLAYED:  # (a refusal kept under the call's key, again)
        headers[REPLAYED_HEADER] = REPLAYED
    return ApiError(message, status=int(status), code=code, details=details, headers=headers)


# How grpc-core's details begin for a call it never sent: no connection to the service could be
# made (refused, or closed before its HTTP/2 handshake ended) or its name resolved. A call that
# fails so has had no attempt sent: grpc-core retries on its own (transparently, gRFC A6) only
# what the service never processed, and reports an attempt that went out as the connection's own
# failure. Anything else is taken as sent: a wrong 502 says "may have been carried out" of a
# request that was not, a wrong 503 would deny one that was.
_NEVER_SENT_DETAILS = ("failed to connect to all addresses", "errors resolving",
                       # (pick_first's, the name resolved to no address at all)
                       "empty address list", "address list must not be empty")


def _never_sent(exc: grpc.RpcError) -> bool:
    """True if the failed call never left the gateway (an UNAVAILABLE of grpc's own)."""
    return (exc.code() == grpc.StatusCode.UNAVAILABLE and HTTP_STATUS_KEY not in _trailers(exc)
            and (exc.details() or "").startswith(_NEVER_SENT_DETAILS))


def _dropped_once_sent(exc: grpc.RpcError) -> bool:
    """True if the failed call was sent, and the connection it went on broke before a byte of a
    reply came (its initial metadata, which the services send with the reply): an UNAVAILABLE
    of grpc's own, not the service's (its trailers say none of its errors), not _never_sent. As
    the HTTP transport's kept-alive connection closed before an answer, but for a connection
    made for the call: a gRPC service refuses a call with a status, never by closing the
    connection."""
    return (exc.code() == grpc.StatusCode.UNAVAILABLE and HTTP_STATUS_KEY not in _trailers(exc)
            and not exc.initial_metadata() and not _never_sent(exc))
