"""A `Range` of a file the shop serves (its web page's, its Swagger UI's) read as RFC 9110 has it,
before Werkzeug answers it: Werkzeug answered 416 where the RFC asks for the whole file."""

from __future__ import annotations

from werkzeug.http import parse_range_header


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


def answer_range_as_rfc_9110(environ: dict, length: int) -> None:
    """Have a request's environ ask for the range range_answered gives, or none (a 200)."""
    if "HTTP_RANGE" not in environ:
        return
    answered = range_answered(environ["HTTP_RANGE"], length)
    if answered is None:
        del environ["HTTP_RANGE"]
        environ.pop("HTTP_IF_RANGE", None)
    else:
        environ["HTTP_RANGE"] = answered
