"""The web shop page, served at `/` with its scripts and styles: plain HTML and JavaScript, no
build step."""

from __future__ import annotations

import posixpath
from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory
from werkzeug.exceptions import NotFound

from shared.byte_ranges import answer_range_as_rfc_9110
from shared.page_headers import with_page_headers

PAGE_DIR = Path(__file__).resolve().parent / "web"


class _PageBlueprint(Blueprint):
    def send_static_file(self, filename: str) -> Response:
        # A file at its own name alone: send_from_directory (Werkzeug's safe_join) normalises
        # the name it is given, and sent app.js for "app.js/", "./app.js" or "x/../app.js" too
        # (index.html at "index.html/" a page whose relative links resolved below it). A 404
        # for them, in the usual error body, as for a file that is not there.
        if posixpath.normpath(filename) != filename:
            raise NotFound()
        return _page_file(filename, max_age=self.get_send_file_max_age(filename))


def _page_file(name: str, max_age: int | None = None) -> Response:
    """The page's file `name` as send_file sends it, but for its conditions and Range, answered
    as RFC 9110 orders and reads them (shared.byte_ranges): `bytes=-99999` is the whole file, not
    a 416, a range is sent only with no If-Range or the file's strong ETag, and If-Match,
    If-Unmodified-Since, If-None-Match and If-Modified-Since are answered in 13.2.2's order."""
    response = send_from_directory(PAGE_DIR, name, max_age=max_age, conditional=False)
    return answer_range_as_rfc_9110(response, request.environ)


blueprint = _PageBlueprint("web", __name__, static_folder=str(PAGE_DIR),
                           static_url_path="/static")


@blueprint.get("/")
def shop_page():
    return _page_file("index.html")


blueprint.after_request(with_page_headers)
