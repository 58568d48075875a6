"""What the gateway makes of a service's answer, whichever transport carried it: the error
statuses it answers for itself rather than relay, and a Retry-After passed on only if it is one."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime

from shared.errors import ApiError, BadGateway, UpstreamTimeout

log = logging.getLogger(__name__)

# What json.loads raises for an answer that is no JSON Python can read: not JSON at all, or JSON
# nested deeper than its recursion limit (a RecursionError, which is no ValueError).
UNREADABLE_JSON = (ValueError, RecursionError)


def failure_for_status(service: str, status: int, *, unavailable_for_now: bool,
                       said: Callable[[], str | None]) -> ApiError | None:
    """What the gateway answers for a service's answer of `status` instead of relaying it (None:
    relayed, as far as its status goes): a 504, for an answer that came too late to count (the
    service's CALLER_GAVE_UP, or whatever stands in front of it timing out); a 502 for any other
    5xx but a 503 that is `unavailable_for_now` (the service's own, in the usual error shape: it
    can say when to retry), and for a 401 (the gateway's signed identity refused). `said` gives
    the service's body or message, read only for the log."""
    if status == 504:
        log.warning("%s answered too late: %s", service, (said() or "")[:500])
        return UpstreamTimeout.of(service)
    if status >= 500 and not (status == 503 and unavailable_for_now):
        log.error("%s answered %s: %s", service, status, (said() or "")[:500])
        return BadGateway.of(service)
    if status == 401:
        return BadGateway.identity_refused(service, (said() or "")[:500])
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


def retry_after_passed_on(service: str, value: str | None) -> str | None:
    """A service's Retry-After (`value`; None: it gave none) as the gateway passes it on, its
    optional whitespace around it dropped; None, and a warning logged, for one that is no
    Retry-After a sender may write. The answer is relayed without it, as one that says nothing
    of when to retry: its client was never told to wait a nonsense while."""
    if value is None:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value) or _an_imf_fixdate(value):
        return value
    log.warning("%s answered a Retry-After that is none (%r): not passed on", service, value[:100])
    return None


def _an_imf_fixdate(value: str) -> bool:
    """True if `value` is an IMF-fixdate of a day that is, on the day of the week it names (its
    second may be 60, a leap second's)."""
    parts = _IMF_FIXDATE.fullmatch(value)
    if parts is None:
        return False
    day_name, day, month, year, hour, minute, second = parts.groups()
    try:
        moment = datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hour), int(minute),
                          min(int(second), 59))
    except ValueError:  # (the 30th of February, an hour 24, a year 0000)
        return False
    return int(second) <= 60 and _DAY_NAMES[moment.weekday()] == day_name
