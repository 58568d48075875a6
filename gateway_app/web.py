"""The web shop page, served at `/` with its scripts and styles: plain HTML and JavaScript, no
build step."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

PAGE_DIR = Path(__file__).resolve().parent / "web"

blueprint = Blueprint("web", __name__, static_folder=str(PAGE_DIR), static_url_path="/static")


# The page runs only its own files and talks only to its own origin (the API and the socket):
# markup that ever slipped into it could run no script, load nothing from elsewhere, send nothing
# elsewhere. No site may frame it, and it names no address to the sites it links to.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@blueprint.get("/")
def shop_page():
    return send_from_directory(PAGE_DIR, "index.html")


@blueprint.after_request
def _page_headers(response):
    response.headers.update(PAGE_HEADERS)
    return response
