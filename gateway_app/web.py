"""The web shop page, served at `/` with its scripts and styles: plain HTML and JavaScript, no
build step."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, request, send_from_directory
from werkzeug.security import safe_join

from shared.byte_ranges import answer_range_as_rfc_9110
from shared.page_headers import with_page_headers

PAGE_DIR = Path(__file__).resolve().parent / "web"

blueprint = Blueprint("web", __name__, static_folder=str(PAGE_DIR), static_url_path="/static")


@blueprint.get("/")
def shop_page():
    return send_from_directory(PAGE_DIR, "index.html")


@blueprint.before_request
def answer_a_range_as_rfc_9110() -> None:
    """A Range of the page or of one of its files read as RFC 9110 has it (shared.byte_ranges),
    before send_file's Werkzeug answers it: `bytes=-99999` is the whole file, not a 416."""
    if "HTTP_RANGE" not in request.environ:
        return
    name = ("index.html" if request.endpoint == "web.shop_page"
            else (request.view_args or {}).get("filename", ""))
    path = safe_join(str(PAGE_DIR), name)
    if path is not None and Path(path).is_file():
        answer_range_as_rfc_9110(request.environ, Path(path).stat().st_size)


blueprint.after_request(with_page_headers)
