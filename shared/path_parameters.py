"""A path parameter as a client sends it: any text, the rest of the path, taken by the operation
whose path it is under (`<any_text:order_id>`), which answers it as any value it does not know.

The web server decodes a request's path before any route sees it (WSGI's PATH_INFO: gunicorn's,
Werkzeug's own server's and its test client's alike; Werkzeug routes on it, and cannot tell `%2F`
from `/`). So an id a client built from user text, sent as `a%2Fb` as a client generated from the
OpenAPI document encodes it, reaches the routes as `a/b`, and an id left empty makes
`/api/orders/`. In Werkzeug's default converter, one segment of one character or more, neither
was any route's: a 404 `NOT_FOUND`, where the operation the client called documents its own 404
(`ORDER_NOT_FOUND`), an error no client generated from the document knows."""

from __future__ import annotations

from flask import Flask
from werkzeug.routing import BaseConverter

ANY_TEXT = "any_text"


class AnyTextConverter(BaseConverter):
    """Any text, empty too, slashes (and a line break, `%0A` decoded) and all: documented as any
    string (flask-smorest reads it as its base class's), where the default converter's was one
    of a character or more."""

    regex = "(?s:.*)"
    part_isolating = False  # (it takes slashes: the rest of the path)
    weight = 200  # (as Werkzeug's `path`: a rule's fixed parts are matched before it)


def take_any_text_in_paths(app: Flask) -> None:
    """Let `app`'s rules name ANY_TEXT (before any rule that names it is added)."""
    app.url_map.converters[ANY_TEXT] = AnyTextConverter
