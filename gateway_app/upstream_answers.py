"""What the gateway makes of a service's answer, whichever transport carried it: an error of the
API's and what is none, the error statuses it answers for itself rather than relay (a 4xx whose
status and code its route does not document among them: a 502, logged), and a Retry-After passed
on only if it is one, as a number of seconds.

A 504 is the gateway's own, of two kinds. The service's own 504 CALLER_GAVE_UP, its work rolled
back as the deadline the gateway signed passed before it could commit (shared/caller_deadline.py),
is UpstreamRolledBack: a 504 under that code that says nothing of the request was done. That is
known only from the service's own error, in the API's shape (its body over HTTP, its trailers
over gRPC). Any other 504 (something in front of the service timing out, in no shape of the
API's) and the gateway's own timer (no answer within the deadline and its grace: over gRPC a
DEADLINE_EXCEEDED with none of the service's trailers) are UpstreamTimeout: the request may still
have taken effect. A second try's rollback says nothing of the first try (gateway_app/resends.py):
rolled_back_for_the_deadline tells the transports so."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from flask import current_app, request

from shared.documented_errors import INVALID_DEADLINE
from shared.errors import ApiError, BadGateway, UpstreamRolledBack, UpstreamTimeout
from shared.http_api import documented_error_codes

log = logging.getLogger(__name__)

# What json.loads raises for an answer that is no JSON Python can read: not JSON at all, or JSON
# nested deeper than its recursion limit (a RecursionError, which is no ValueError).
UNREADABLE_JSON = (ValueError, RecursionError)

# An error code as the services write one: shared/errors.py's (and code_for's, an HTTP status's
# name as a code: METHOD_NOT_ALLOWED, IM_A_TEAPOT).
_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]*")


def an_error_of_the_api(code: Any, message: Any, details: Any) -> bool:
    """True if `code`, `message` and `details` (as read from the JSON body over HTTP, from the
    trailers over gRPC) are an error as the services write one (shared/errors.py: error_body,
    and shared/grpc_server.py its trailers): a code of capital letters, digits and underscores,
    a message that is a string, and details that are a JSON object (for a 422, the messages by
    location; {} when there are none). Anything else is no answer of the API: a 502."""
    return (isinstance(code, str) and _ERROR_CODE.fullmatch(code) is not None
            and isinstance(message, str) and isinstance(details, dict))


def rolled_back_for_the_deadline(status: int, error_code: str | None) -> bool:
    """True if a service's answer of `status`, its error's code `error_code` (None: it gave none,
    or no error of the API's), says it rolled the request's work back for the deadline the
    gateway signed: its 504 CALLER_GAVE_UP, nothing committed."""
    return status == UpstreamRolledBack.status and error_code == UpstreamRolledBack.code


@dataclass(frozen=True)
class Route:
    """The gateway's route a service answers for: its `name` (method and rule), for the log, and
    the `error_codes` its OpenAPI document gives, by status
    (shared.http_api.documented_error_codes)."""

    name: str
    error_codes: dict[int, frozenset[str]]

    @classmethod
    def of_the_request(cls) -> Route:
        """The route of the request under way."""
        view = current_app.view_functions[request.endpoint]
        return cls(f"{request.method} {request.url_rule.rule}", documented_error_codes(view))

    def documents(self, status: int, code: str | None) -> bool:
        """Whether the route's document gives an error of `status` under `code` (None: no error
        of the API's, which none is)."""
        return code in self.error_codes.get(status, ())


def failure_for_status(service: str, status: int, *, route: Route, unavailable_for_now: bool,
                       said: Callable[[], str | None],
                       error_code: Callable[[], str | None]) -> ApiError | None:
    """What the gateway answers for a service's answer of `status` to `route` instead of relaying
    it (None: relayed, as far as its status goes): a 504, for an answer that came too late to
    count: the service's own CALLER_GAVE_UP, its work rolled back, is UpstreamRolledBack (nothing
    was done), any other (whatever stands in front of it timing out) UpstreamTimeout (it may have
    been); a 502 for any other 5xx but a 503 that is `unavailable_for_now` (the service's own, in
    the usual error shape: it can say when to retry), for a 401 (the gateway's signed identity
    refused), for a 400 INVALID_DEADLINE (the deadline the gateway signed refused for its form:
    the gateway's fault, about a header its client never sent) and for any other 4xx whose status
    and code together the route does not document (a 404 NOT_FOUND for a path the service does
    not know, its URL wrong, where the route's 404 is ACCOUNT_NOT_FOUND; a 405): no answer the
    route gives, as over gRPC a method the service does not know is none. `said` gives the
    service's body or message, read only for the log, and `error_code` its error's code (None:
    it gave none, or no error of the API's), read only for a 504, a 401's log line and a 4xx."""
    if status == 504:
        if rolled_back_for_the_deadline(status, error_code()):
            log.warning("%s rolled the request back, the gateway's deadline passed before its"
                        " work could commit", service)
            return UpstreamRolledBack.of(service)
        log.warning("%s answered too late: %s", service, (said() or "")[:500])
        return UpstreamTimeout.of(service)
    if status >= 500 and not (status == 503 and unavailable_for_now):
        log.error("%s answered %s: %s", service, status, (said() or "")[:500])
        return BadGateway.of(service)
    if status == 401:
        return BadGateway.identity_refused(service, (said() or "")[:500], error_code())
    if status == 400 and error_code() == INVALID_DEADLINE.code:
        log.error("%s refused the deadline the gateway signed for its form (%s): are the two of"
                  " one release (deployed together)?", service, (said() or "")[:500])
        return BadGateway.of(service)
    if 400 <= status < 500 and not route.documents(status, code := error_code()):
        log.error("%s: %s answered %s %s, an error the route does not document: %s", route.name,
                  service, status, code or "(no error of the API's)", (said() or "")[:500])
        return BadGateway.of(service)
    return None


# RFC 9110 10.2.3: a Retry-After is delay-seconds (1*DIGIT) or an HTTP-date, and a sender (the
# gateway, passing one on) generates an HTTP-date only as an IMF-fixdate (5.6.7), with the one
# space the grammar has between its parts: "Sun, 06 Nov 1994 08:49:37 GMT".
_DELAY_SECONDS = re.compile(r"[0-9]+")
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_IMF_FIXDATE = re.compile(
    rf"({'|'.join(_DAY_NAMES)}), ([0-9]{{2}}) ({'|'.join(_MONTHS)}) ([0-9]{{4}})"
    r" ([0-9]{2}):([0-9]{2}):([0-9]{2}) GMT")

# The longest wait the gateway passes on: a day. No service asks for longer, and a client's timer
# may not hold much more (a browser's setTimeout fires at once past 2**31 - 1 ms, 24.8 days).
LONGEST_RETRY_AFTER_SECONDS = 86400


def retry_after_passed_on(service: str, value: str | None) -> str | None:
    """A service's Retry-After (`value`; None: it gave none) as the gateway passes it on: as the
    number of seconds it says, at least 1 (as the API documents it: 0, or a date passed, says
    to try again now) and at most LONGEST_RETRY_AFTER_SECONDS (a date, as the whole seconds from
    now until it: one form for every client to read); None, and a
    warning logged, for one that is no Retry-After a sender may write. The answer is relayed
    without it, as one that says nothing of when to retry: its client was never told to wait a
    nonsense while."""
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value):
        seconds = _delay_seconds(value)
    elif (moment := _imf_fixdate(value)) is not None:
        seconds = math.ceil((moment - datetime.now(timezone.utc)).total_seconds())
    else:
        log.warning("%s answered a Retry-After that is none (%r): not passed on", service,
                    value[:100])
        return None
    return str(min(max(seconds, 1), LONGEST_RETRY_AFTER_SECONDS))


def _delay_seconds(digits: str) -> int:
    """The number of seconds `digits` (delay-seconds) says, or more than
    LONGEST_RETRY_AFTER_SECONDS if it says more: int() is never given more digits than that
    takes (it raises a ValueError past 4300 of them, Python's limit on reading an int)."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(LONGEST_RETRY_AFTER_SECONDS)):
        return LONGEST_RETRY_AFTER_SECONDS + 1
    return int(significant)


def _imf_fixdate(value: str) -> datetime | None:
    """The moment `value` names if it is an IMF-fixdate of a day that is, on the day of the week
    it names (its second may be 60, a leap second's, at any minute: read as the next minute's
    first; the one that would end the year 9999, past the last moment Python reads, as that last
    moment, later than the gateway waits); None if it is none."""
    parts = _IMF_FIXDATE.fullmatch(value)
    if parts is None:
        return None
    day_name, day, month, year, hour, minute, second = parts.groups()
    if int(second) > 60:
        return None
    try:
        moment = datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute),
                          min(int(second), 59), tzinfo=timezone.utc)
    except ValueError:  # (the 30th of February, an hour 24, a year 0000)
        return None
    if _DAY_NAMES[moment.weekday()] != day_name:
        return None
    try:
        return moment + timedelta(seconds=int(second) - moment.second)
    except OverflowError:  # (the leap second that would end the year 9999)
        return datetime.max.replace(tzinfo=timezone.utc)
