"""Swagger UI as each app serves it, from its own origin (so the docs work on a machine with no
way out to a CDN): its page, which runs no script of its own inline, and only the files that page
loads, not the whole of the swagger-ui-bundle package's folder (which holds a stock index.html
that renders the Petstore's document from petstore.swagger.io). The page, its files and the
document it reads are answered with the shop's page headers (shared/page_headers.py): no inline
script, nothing from elsewhere, never framed."""

from __future__ import annotations

from pathlib import Path

from flask import (Blueprint, Flask, make_response, render_template_string, send_from_directory,
                   url_for)
from swagger_ui_bundle import swagger_ui_path
from werkzeug.exceptions import NotFound

from shared.page_headers import with_page_headers

SWAGGER_UI_ASSETS = "/docs/swagger-ui-assets"
_OWN_FILES = Path(__file__).resolve().parent / "swagger_ui"
# Each file the page loads, by its name under SWAGGER_UI_ASSETS, and the folder it is in: the
# vendor's script and styles, and ours that starts it. Any other name is a 404.
PAGE_FILES = {"swagger-ui-bundle.js": Path(swagger_ui_path),
              "swagger-ui.css": Path(swagger_ui_path), "start-swagger-ui.js": _OWN_FILES}


class SwaggerUiPage:
    """For flask-smorest's Api: its Swagger UI page (OPENAPI_SWAGGER_UI_PATH) is ours, which
    starts Swagger UI from a file, not an inline script as flask-smorest's own page does (so
    OPENAPI_SWAGGER_UI_CONFIG is not read: start-swagger-ui.js configures it); the page and the
    document (OPENAPI_JSON_PATH) come with the page headers."""

    def _openapi_swagger_ui(self):
        spec_url = url_for(f"{self._make_doc_blueprint_name()}.openapi_json")
        page = render_template_string((_OWN_FILES / "page.html").read_text(),
                                      title=self.spec.title, assets=SWAGGER_UI_ASSETS,
                                      spec_url=spec_url)
        return with_page_headers(make_response(page))

    def _openapi_json(self):
        return with_page_headers(super()._openapi_json())


def serve_swagger_ui_files(app: Flask) -> None:
    """Serve the files the Swagger UI page loads, under SWAGGER_UI_ASSETS, with the page headers;
    a 404 for any other path there."""
    # Made per app (any number of apps can be built, each registering its own).
    blueprint = Blueprint("swagger_ui_files", __name__, url_prefix=SWAGGER_UI_ASSETS)

    @blueprint.get("/<path:name>")
    def page_file(name: str):
        if name not in PAGE_FILES:
            raise NotFound()
        return send_from_directory(PAGE_FILES[name], name)

    blueprint.after_request(with_page_headers)
    app.register_blueprint(blueprint)
