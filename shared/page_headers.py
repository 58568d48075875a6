"""The headers every page the shop serves is answered with, and the files it loads: the gateway's
web page (gateway_app/web.py) and each app's Swagger UI (shared/swagger_ui.py)."""

from __future__ import annotations

from flask import Response

# A page runs only its own origin's files and talks only to its own origin (the API and the
# socket): markup that ever slipped into it could run no script, load nothing from elsewhere,
# send nothing elsewhere. No site may frame it, and it names no address to the sites it links to.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def with_page_headers(response: Response) -> Response:
    response.headers.update(PAGE_HEADERS)
    return response
