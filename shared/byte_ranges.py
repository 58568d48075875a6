"""The conditions and `Range` of a file the shop serves (its web page's, its Swagger UI's) read
and answered in the order RFC 9110 (13.2.2) gives them, before Werkzeug sends the file or its
range: Werkzeug answered 416 where the RFC asks for the whole file, sent a range with an If-Range
the RFC does not let it be sent with, let If-Match overrule If-None-Match and If-Modified-Since
(a 200 where the RFC asks for a 304) and never read If-Unmodified-Since."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from werkzeug.exceptions import PreconditionFailed, RequestedRangeNotSatisfiable
from werkzeug.http import parse_range_header
from werkzeug.wrappers import Response

# The headers of a request's conditions; answered here, none is left for Werkzeug to answer again.
CONDITIONS = ("HTTP_IF_MATCH", "HTTP_IF_NONE_MATCH", "HTTP_IF_MODIFIED_SINCE",
              "HTTP_IF_UNMODIFIED_SINCE", "HTTP_IF_RANGE", "HTTP_RANGE")

# An entity-tag of a list (RFC 9110 8.8.3: `W/` is case-sensitive, etagc is any visible
# character but DQUOTE, or obs-text), and the comma or end after it.
_ENTITY_TAG = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|\Z)')
_EMPTY_ELEMENTS = re.compile(r"[ \t,]*")

# The three forms of an HTTP-date (RFC 9110 5.6.7), case-sensitive, in GMT.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(?P<month>" + "|".join(_MONTHS) + ")"
_TIME = r"(?P<hour>\d\d):(?P<minute>\d\d):(?P<second>\d\d)"
_HTTP_DATES = (
    re.compile(rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (?P<day>\d\d) {_MONTH} (?P<year>\d{{4}}) "
               rf"{_TIME} GMT"),  # IMF-fixdate
    re.compile(rf"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday), (?P<day>\d\d)-"
               rf"{_MONTH}-(?P<year>\d\d) {_TIME} GMT"),  # rfc850-date
    re.compile(rf"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) {_MONTH} (?P<day>[ \d]\d) {_TIME} "
               r"(?P<year>\d{4})"),  # asctime-date
)


def http_date(value: str, now: datetime | None = None) -> datetime | None:
    """The time `value` is as an HTTP-date (RFC 9110 5.6.7), None if it is none (a list of
    dates, another form, a day that is not): If-Modified-Since and If-Unmodified-Since are
    ignored then (13.1.3, 13.1.4), where Werkzeug read the first of a list, a date of any case or
    time zone. An rfc850-date's two-digit year makes the latest date not more than 50 years after
    `now` (the present): the whole date is weighed, not its year alone."""
    value = value.strip(" \t")
    for form in _HTTP_DATES:
        if (found := form.fullmatch(value)) is None:
            continue
        year = int(found["year"])
        rest = (_MONTHS.index(found["month"]) + 1, int(found["day"]), int(found["hour"]),
                int(found["minute"]), min(int(found["second"]), 59))  # (60: a leap second)
        if len(found["year"]) == 2:
            now = now or datetime.now(UTC)
            # (Compared as numbers: now + 50 years is no date on a 29th of February.)
            latest = (now.year + 50, now.month, now.day, now.hour, now.minute, now.second,
                      now.microsecond)
            year = latest[0] - (latest[0] - year) % 100
            if (year, *rest) > latest:
                year -= 100
        try:
            return datetime(year, *rest, tzinfo=UTC)
        except ValueError:  # (the 30th of February, hour 25)
            return None
    return None


def entity_tags(value: str) -> list[tuple[bool, str]]:
    """The entity-tags of an If-Match or If-None-Match list, each (weak, its opaque-tag with its
    quotes), up to the first element that is none (an unquoted tag, `w/"x"`: none matches)."""
    tags, at = [], 0
    while (at := _EMPTY_ELEMENTS.match(value, at).end()) < len(value):
        if (found := _ENTITY_TAG.match(value, at)) is None:
            break
        tags.append((found[1] is not None, found[2]))
        at = found.end()
    return tags


def _if_match_holds(value: str, etag: tuple[str, bool] | None) -> bool:
    """RFC 9110 13.1.1: `*` holds for a file that is (Werkzeug's ETags took it for no match),
    a list if one of its tags is the file's by the strong comparison (neither weak)."""
    if value.strip(" \t") == "*":
        return True
    return etag is not None and not etag[1] and any(
        not weak and tag == f'"{etag[0]}"' for weak, tag in entity_tags(value))


def _if_none_match_holds(value: str, etag: tuple[str, bool] | None) -> bool:
    """RFC 9110 13.1.2: `*` fails for a file that is, a list if one of its tags is the file's by
    the weak comparison (either or both weak)."""
    if value.strip(" \t") == "*":
        return False
    return etag is None or all(tag != f'"{etag[0]}"' for _weak, tag in entity_tags(value))


def precondition_answer(environ: dict, etag: tuple[str, bool] | None,
                        last_modified: datetime | None) -> int | None:
    """The status a request's preconditions answer it with before its method is applied to a
    file of this `etag` (and whether it is weak) and `last_modified` time: 412, 304 or None (the
    file, or a range of it), in the order of RFC 9110 13.2.2. If-Match first, or else
    If-Unmodified-Since (ignored with an If-Match, 13.1.4); then If-None-Match, or else, for a GET
    or HEAD, If-Modified-Since (ignored with an If-None-Match, 13.1.3); a date that is no
    HTTP-date ignored, and so is either date for a file that has none."""
    method = environ.get("REQUEST_METHOD", "GET")
    if "HTTP_IF_MATCH" in environ:
        if not _if_match_holds(environ["HTTP_IF_MATCH"], etag):
            return PreconditionFailed.code
    elif "HTTP_IF_UNMODIFIED_SINCE" in environ and last_modified is not None:
        since = http_date(environ["HTTP_IF_UNMODIFIED_SINCE"])
        if since is not None and last_modified > since:
            return PreconditionFailed.code
    if "HTTP_IF_NONE_MATCH" in environ:
        if not _if_none_match_holds(environ["HTTP_IF_NONE_MATCH"], etag):
            return 304 if method in ("GET", "HEAD") else PreconditionFailed.code
    elif ("HTTP_IF_MODIFIED_SINCE" in environ and method in ("GET", "HEAD")
          and last_modified is not None):
        since = http_date(environ["HTTP_IF_MODIFIED_SINCE"])
        if since is not None and last_modified <= since:
            return 304
    return None


def range_answered(asked: str, length: int) -> str | None:
    """The Range a file `length` bytes long is answered for when `asked` is asked (None: the whole
    file, a 200), as RFC 9110 (14.1.3, 14.2) has it where Werkzeug answered 416: a range unit
    other than bytes is ignored (`items=0-9`: MUST), as are several ranges (a server MAY, and
    Werkzeug sends none of them), and a suffix longer than the file is the whole file
    (`bytes=-5000` of 765 bytes: 206, bytes 0-764/765). What Werkzeug cannot read (`bytes=5-1`)
    it answers 416, as a server MAY, and so does a range that starts past the end."""
    unit, _, range_set = asked.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    # Several ranges are ignored whatever they are: Werkzeug reads only those in order, apart
    # (`bytes=-5,0-9`, `bytes=0-9, 5-7` were a 416). An empty element is no range (RFC 9110 5.6.1:
    # `bytes=0-0,` asks for one).
    ranges = [element.strip() for element in range_set.split(",") if element.strip()]
    if len(ranges) > 1:
        return None
    asked = f"bytes={ranges[0]}" if ranges else asked
    parsed = parse_range_header(asked)
    if parsed is None:
        return asked
    ((start, end),) = parsed.ranges
    if end is None and start < 0 and -start > length:
        return "bytes=0-"
    return asked


def range_may_be_sent(if_range: str | None, etag: str | None) -> bool:
    """Whether a Range request with this If-Range (if any) may be answered with a part of a file
    whose ETag is `etag`: only if If-Range is that ETag, strong (RFC 9110, 13.1.5). Werkzeug also
    honours a weak ETag and a date, and a date is the file's, the same for each form of it (the
    Swagger UI files' plain and gzipped): a client holding the plain bytes 0-99 that resumed
    taking gzip was sent the gzipped bytes from 100 on."""
    return if_range is None or (etag is not None and if_range.strip() == f'"{etag}"')


def answer_range_as_rfc_9110(response: Response, environ: dict) -> Response:
    """`response`, a whole file with its ETag, Last-Modified and Content-Length, answered for the
    request of `environ` as RFC 9110 13.2.2 orders its conditions (precondition_answer): a 412,
    raised to be answered as the app's errors are (it carried the whole file); a 304 with the
    headers a 200 would have had but the file's own (ETag, Vary, Cache-Control stay); or else,
    for a GET, its Range (a HEAD's is ignored, 14.2) sent only as range_may_be_sent allows (the
    whole file otherwise), read as range_answered reads it, and a part of it sent (206) or a 416
    raised by Werkzeug. The request's environ is left as it is."""
    length = response.content_length
    etag = response.get_etag()
    answer = precondition_answer(environ, None if etag[0] is None else etag,
                                 response.last_modified)
    if answer == PreconditionFailed.code:
        response.close()  # (a file send_file opened, as send_file closes it)
        raise PreconditionFailed()
    method = environ.get("REQUEST_METHOD", "GET")
    # Werkzeug answers what is left of it: a Range, if any may be sent, and no condition.
    unconditional = {key: value for key, value in environ.items() if key not in CONDITIONS}
    if answer is None and method == "GET" and "HTTP_RANGE" in environ and range_may_be_sent(
            environ.get("HTTP_IF_RANGE"), None if etag[1] else etag[0]):
        answered = range_answered(environ["HTTP_RANGE"], length)
        if answered is not None:
            unconditional["HTTP_RANGE"] = answered
    try:
        response = response.make_conditional(unconditional, accept_ranges=True,
                                              complete_length=length)
    except RequestedRangeNotSatisfiable:
        response.close()
        raise
    if answer == 304:
        # (Werkzeug leaves out the file's own headers, Content-Type, -Length, -Encoding and
        # Last-Modified, and the body; the file it no longer sends is closed as the answer is.)
        response.status_code = 304
    return response
