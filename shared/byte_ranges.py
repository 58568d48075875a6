"""A `Range` of a file the shop serves (its web page's, its Swagger UI's) read as RFC 9110 has it,
before Werkzeug answers it: Werkzeug answered 416 where the RFC asks for the whole file, and sent
a range with an If-Range the RFC does not let it be sent with."""

from __future__ import annotations

from werkzeug.exceptions import PreconditionFailed, RequestedRangeNotSatisfiable
from werkzeug.http import is_resource_modified, parse_range_header
from werkzeug.wrappers import Response


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
    """`response`, a whole file with its (strong) ETag and Content-Length, made conditional for
    the request of `environ` as Werkzeug makes it (a 304, a 412, a 206 ...), but for its Range:
    sent only as range_may_be_sent allows (a 200 otherwise), and read as range_answered reads it;
    and never where If-None-Match or If-Match answer first (RFC 9110 13.2.2: a 304, a 412, which
    Werkzeug passed over for a 206). A 412 is raised, to be answered as the app's errors are (it
    carried the whole file). The request's environ is left as it is."""
    length = response.content_length
    if environ.get("HTTP_IF_MATCH", "").strip() == "*":
        # (The file is: that holds, RFC 9110 13.1.1; Werkzeug's ETags took "*" for no match.)
        environ = {key: value for key, value in environ.items() if key != "HTTP_IF_MATCH"}
    if "HTTP_RANGE" in environ:
        answered = (range_answered(environ["HTTP_RANGE"], length)
                    if range_may_be_sent(environ.get("HTTP_IF_RANGE"), response.get_etag()[0])
                    and is_resource_modified(environ, response.headers.get("ETag"),
                                             last_modified=response.headers.get("Last-Modified"))
                    else None)
        environ = {key: value for key, value in environ.items()
                   if key not in ("HTTP_RANGE", "HTTP_IF_RANGE")}  # None: the whole file, a 200
        if answered is not None:
            environ["HTTP_RANGE"] = answered
    try:
        response = response.make_conditional(environ, accept_ranges=True,
                                              complete_length=length)
        if response.status_code == PreconditionFailed.code:
            raise PreconditionFailed()
        return response
    except (RequestedRangeNotSatisfiable, PreconditionFailed):
        response.close()  # (a file send_file opened, as send_file closes it)
        raise
