"""Swagger UI as each app serves it, from its own origin (so the docs work on a machine with no
way out to a CDN): its page, which runs no script of its own inline, and only the files that page
loads, not the whole of the swagger-ui-bundle package's folder (which holds a stock index.html
that renders the Petstore's document from petstore.swagger.io). The page, its files and the
document it reads are answered with the shop's page headers (shared/page_headers.py): no inline
script, nothing from elsewhere, never framed."""

from __future__ import annotations

import functools
import gzip
import hashlib
import mimetypes
from dataclasses import dataclass
from pathlib import Path

from flask import (Blueprint, Flask, Response, make_response, render_template_string, request,
                   url_for)
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import NotFound

from shared.byte_ranges import answer_range_as_rfc_9110
from shared.page_headers import with_page_headers

SWAGGER_UI_ASSETS = "/docs/swagger-ui-assets"
_OWN_FILES = Path(__file__).resolve().parent / "swagger_ui"
# Each file the page loads, by its name under SWAGGER_UI_ASSETS, and the folder it is in: the
# vendor's script and styles, and ours that starts it. Any other name is a 404.
PAGE_FILES = {"swagger-ui-bundle.js": Path(swagger_ui_path),
              "swagger-ui.css": Path(swagger_ui_path), "start-swagger-ui.js": _OWN_FILES}


class SwaggerUiPage:
    """For flask-smorest's Api: its Swagger UI page is ours, served at OPENAPI_SWAGGER_UI_PATH
    (none when that is None), which starts Swagger UI from a file, not an inline script as
    flask-smorest's own page does (so neither OPENAPI_SWAGGER_UI_URL, the address of
    flask-smorest's scripts, nor OPENAPI_SWAGGER_UI_CONFIG is read: start-swagger-ui.js
    configures it); the page and the document (OPENAPI_JSON_PATH) come with the page headers.

    SWAGGER_UI_TRY_IT_OUT says whether its "Try it out" sends requests (else Swagger UI's
    supportedSubmitMethods is empty): a page whose operations refuse every call a person can
    make (a service's, which take only the gateway's signature) offers none, rather than a
    button always answered 401."""

    def _register_swagger_ui_rule(self, blueprint):
        # flask-smorest's serves its page only if OPENAPI_SWAGGER_UI_URL is set too, the address
        # of a CDN's copy of Swagger UI that its page loads; ours loads the app's own files.
        path = self.config.get("OPENAPI_SWAGGER_UI_PATH")
        if path is not None:
            blueprint.add_url_rule(path if path.startswith("/") else f"/{path}",
                                   endpoint="openapi_swagger_ui",
                                   view_func=self._openapi_swagger_ui)

    def _openapi_swagger_ui(self):
        spec_url = url_for(f"{self._make_doc_blueprint_name()}.openapi_json")
        page = render_template_string((_OWN_FILES / "page.html").read_text(),
                                      title=self.spec.title, assets=SWAGGER_UI_ASSETS,
                                      spec_url=spec_url,
                                      try_it_out=bool(self.config.get("SWAGGER_UI_TRY_IT_OUT")))
        return with_page_headers(make_response(page))

    def _openapi_json(self):
        return with_page_headers(super()._openapi_json())


@dataclass(frozen=True)
class FileForm:
    """A file's body as it is sent in one form (as it is, or gzipped), and its ETag: one per
    form, so that a cache holding one never answers a request for the other with it."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes) -> FileForm:
        return cls(body, hashlib.sha256(body).hexdigest()[:32])


@dataclass(frozen=True)
class PageFile:
    """A file the page loads, read once, with its gzip form made once (the bundle is about a
    megabyte, a third of that gzipped, and every browser that opens the docs loads it)."""

    mimetype: str
    last_modified: float
    plain: FileForm
    gzipped: FileForm


@functools.cache
def page_file(name: str) -> PageFile:
    """The page's file `name` (one of PAGE_FILES), read and compressed once per process."""
    path = PAGE_FILES[name] / name
    plain = path.read_bytes()
    # (mtime=0: the same bytes, so the same ETag, in every process)
    return PageFile(mimetype=mimetypes.guess_type(name)[0] or "application/octet-stream",
                    last_modified=path.stat().st_mtime, plain=FileForm.of(plain),
                    gzipped=FileForm.of(gzip.compress(plain, compresslevel=9, mtime=0)))


def answer_with_page_file(name: str) -> Response:
    """The file `name`, gzipped to a client that accepts it (`Content-Encoding: gzip`), as it is
    to one that does not; either way with `Vary: Accept-Encoding` and its form's ETag, its
    conditions and range answered as RFC 9110 orders and reads them (shared.byte_ranges)."""
    file = page_file(name)
    gzipped = (request.accept_encodings["gzip"] > 0
               and len(file.gzipped.body) < len(file.plain.body))
    form = file.gzipped if gzipped else file.plain
    response = Response(form.body, mimetype=file.mimetype)
    if gzipped:
        response.content_encoding = "gzip"
    response.vary.add("Accept-Encoding")
    response.set_etag(form.etag)
    response.last_modified = file.last_modified
    response.cache_control.no_cache = True  # (revalidated each time, as send_file's were)
    return answer_range_as_rfc_9110(response, request.environ)


def serve_swagger_ui_files(app: Flask) -> None:
    """Serve the files the Swagger UI page loads, under SWAGGER_UI_ASSETS, with the page headers;
    a 404 for any other path there. They are read and compressed as the app is built (once a
    process), not at the first request for them: some 50 ms of a core, once, that no browser
    waits on."""
    for name in PAGE_FILES:
        page_file(name)
    # Made per app (any number of apps can be built, each registering its own).
    blueprint = Blueprint("swagger_ui_files", __name__, url_prefix=SWAGGER_UI_ASSETS)

    @blueprint.get("/<path:name>")
    def page_file_answer(name: str):
        if name not in PAGE_FILES:
            raise NotFound()
        return answer_with_page_file(name)

    blueprint.after_request(with_page_headers)
    app.register_blueprint(blueprint)
