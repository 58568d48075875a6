"""The web shop page, served at `/` with its scripts and styles: plain HTML and JavaScript, no
build step."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

from shared.page_headers import with_page_headers

PAGE_DIR = Path(__file__).resolve().parent / "web"

blueprint = Blueprint("web", __name__, static_folder=str(PAGE_DIR), static_url_path="/static")


@blueprint.get("/")
def shop_page():
    return send_from_directory(PAGE_DIR, "index.html")


blueprint.after_request(with_page_headers)
