"""The application factory every HseShop web app builds on: configuration, database, JSON, errors,
request ids, OpenAPI with Swagger UI, health, the cache, caller identity, the header of a
replayed answer and the answer to an OPTIONS. What an app opens it names for
shared.app_closing.close_app to release."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flask import Blueprint, Flask, Response, request
from flask_smorest import Api
from flask_smorest.pagination import PAGINATION_HEADER, PaginationMetadataSchema
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.app_closing import close_with
from shared.cache import CACHE_EXTENSION, VersionedCache
from shared.caller_deadline import take_caller_deadlines
from shared.config import (MAX_REQUEST_BYTES, REDIS_KEY_SEPARATOR, Settings, get_settings,
                           published_secrets)
from shared.db import init_database
from shared.errors import ErrorSchema, UnreadableBody, register_error_handlers, sorted_methods
from shared.health import health_blueprint
from shared.health_document import document_health
from shared.idempotency import forget_replayed_mark, say_if_replayed
from shared.identity import identify_caller
from shared.jsonio import StrictDecimalJSONProvider
from shared.operation_links import OperationIdsOfViews
from shared.path_parameters import take_any_text_in_paths
from shared.request_context import configure_logging, install_request_ids
from shared.request_id_document import RequestIdDocumented
from shared.single_use_signatures import SINGLE_USE_SIGNATURES_EXTENSION, SingleUseSignatures
from shared.swagger_ui import SwaggerUiPage, serve_swagger_ui_files

log = logging.getLogger(__name__)

# A service's document's description (the gateway's has its own: gateway_app.DOCS_CONFIG).
BEHIND_THE_GATEWAY = (
    "This service's own API, behind the gateway. Its operations, but `GET /health`, take only "
    "calls the gateway signs (`X-User-ID` with `X-Gateway-Timestamp`, `X-Gateway-Nonce` and "
    "`X-Gateway-Signature`, made with a secret only the gateway holds) and refuse any other "
    "with 401, so this page cannot try them out. The public API is the gateway's: its "
    "document, and a Swagger UI that tries it out, are at the gateway's `/docs`.")


class ShopApi(SwaggerUiPage, Api):
    """flask-smorest's Api, its OpenAPI document describing errors as they are answered (each
    operation's own: shared.documented_errors), giving no component no operation uses, and
    naming each operation by its view (shared.operation_links)."""

    ERROR_SCHEMA = ErrorSchema
    # Every operation's "default" response: what any request can be answered besides what its
    # operation documents.
    DEFAULT_ERROR_DESCRIPTION = (
        "Any other error: `INTERNAL_ERROR` (500), a failure nobody foresaw; and, before the "
        "request reaches an operation, the answer to one that cannot be read: `BAD_REQUEST` "
        "(400: a malformed request line, header or chunked body), `REQUEST_URI_TOO_LONG` (414), "
        "`EXPECTATION_FAILED` (417: an `Expect` other than `100-continue`), "
        "`REQUEST_HEADER_FIELDS_TOO_LARGE` (431), `NOT_IMPLEMENTED` (501: a `Transfer-Encoding` "
        "the server does not know); the web server answers these last four, and 400s for a "
        "request line or header, itself, without `X-Request-ID`. And `REQUEST_TIMEOUT` (408, the "
        "connection closed after it): a request whose head or body stopped arriving (the web "
        "server answers it for a head, itself).")

    def _register_responses(self):
        super()._register_responses()
        # (registered, as flask-smorest registers its own, for when an operation refers to it)
        self.spec.components.response(self.DEFAULT_ERROR_RESPONSE_NAME, {
            "description": self.DEFAULT_ERROR_DESCRIPTION,
            "content": {"application/json": {"schema": self.ERROR_SCHEMA}}}, lazy=True)

    def _register_pagination_header(self):
        # flask-smorest registers its X-Pagination header lazily, to be in a document only if an
        # operation paginates with it (none does: the lists page with cursors of their own); but
        # apispec turns the header's schema into a reference as it registers it, which put that
        # schema, PaginationMetadata, in every document, used by none. Written out in the header
        # instead, it comes with the header or not at all.
        self.spec.components.header("PAGINATION", {
            **PAGINATION_HEADER,
            "schema": self.ma_plugin.converter.schema2jsonschema(PaginationMetadataSchema)},
            lazy=True)

    def _init_spec(self, *, extra_plugins=(), **options):
        # X-Request-ID, which every app takes and every answer carries, in every document; and
        # each operation's id, which the links between operations name it by.
        super()._init_spec(extra_plugins=[*extra_plugins, RequestIdDocumented(),
                                          OperationIdsOfViews()], **options)


class ShopFlask(Flask):
    """Flask, answering the OPTIONS it answers by itself (for every route) as a JSON API does:
    204 No Content with the path's methods in `Allow`, where Flask's is a 200 with an empty
    text/html body."""

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()  # (its Allow: the URL map's methods)
        response.status_code = 204
        del response.headers["Content-Type"]  # (no body, so no type of one)
        response.headers["Allow"] = sorted_methods(response.headers["Allow"])
        return response


def create_service_app(service: str, *, title: str, blueprints: Iterable[Blueprint],
                       settings: Settings | None = None, config: dict | None = None,
                       authenticate: Callable[[], None] = identify_caller,
                       takes_caller_deadlines: bool = True,
                       secrets: Iterable[str] = ("INTERNAL_AUTH_SECRET",),
                       warns_of_published_secrets: bool = True) -> Flask:
    """A web app for `service`; `authenticate` runs before every route of `blueprints`. A service
    behind the gateway `takes_caller_deadlines` (shared/caller_deadline.py); the gateway, the
    public door, takes none from its clients. `secrets` are those the service signs or trusts
    with (shared.config.SECRETS): the services behind the gateway, the gateway's identities.
    An app that serves requests `warns_of_published_secrets` (warn_of_published_secrets); one
    built only for its app context (workers' tasks, the operator's commands) signs and verifies
    nothing, so is built with it false and says nothing of the secrets."""
    settings = settings or get_settings()
    # No static folder of Flask's own: the gateway serves its page's files at /static itself.
    app = ShopFlask(service, static_folder=None)
    # A path with "//" in it is matched as it is written (a 404 where nothing is there), not
    # redirected by Werkzeug with an HTML page that no error handler sees.
    app.url_map.merge_slashes = False
    # A path parameter of any text, an id sent with an encoded slash or none at all, is its
    # operation's to answer (shared.path_parameters).
    take_any_text_in_paths(app)
    app.json = StrictDecimalJSONProvider(app)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=settings.database_url(service),
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        API_TITLE=title,
        API_VERSION="1.0.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/docs",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/swagger-ui",
        # A service's routes take only calls the gateway signs, which nobody using its page can
        # make: its page tries none out, and its document says where the public API is.
        SWAGGER_UI_TRY_IT_OUT=False,
        API_SPEC_OPTIONS={
            "info": {"description": BEHIND_THE_GATEWAY},
            "components": {"securitySchemes": {"UserId": {
                "type": "apiKey", "in": "header", "name": "X-User-ID",
                "description": "Set by the gateway, with X-Gateway-Timestamp, "
                               "X-Gateway-Nonce and X-Gateway-Signature, signed for the request "
                               "it comes with (its method, path and query, body, Idempotency-Key "
                               "and X-Gateway-Deadline); the service refuses it otherwise."}}},
            "security": [{"UserId": []}]},
    )
    app.config.update(config or {})
    app.extensions["hseshop.settings"] = settings
    app.extensions["hseshop.service"] = service
    services_keys = f"{settings.redis_key_prefix}{REDIS_KEY_SEPARATOR}{service}"
    cache = app.extensions[CACHE_EXTENSION] = VersionedCache(
        settings.cache_url(), settings.cache_ttl_seconds, prefix=services_keys)
    close_with(app, cache.close)
    if authenticate is identify_caller:  # (a service behind the gateway, which signs its calls)
        signatures = app.extensions[SINGLE_USE_SIGNATURES_EXTENSION] = SingleUseSignatures(
            settings.redis_url, prefix=services_keys)
        close_with(app, signatures.close)
    init_database(app)
    api = ShopApi(app)
    app.extensions["hseshop.api"] = api
    blueprints = list(blueprints)
    for blueprint in blueprints:
        api.register_blueprint(blueprint)
        # Bound per app (not on the shared Blueprint object), so any number of apps can be built.
        app.before_request_funcs.setdefault(blueprint.name, []).append(authenticate)
    if takes_caller_deadlines:  # (read once the identity is checked)
        take_caller_deadlines(app, [blueprint.name for blueprint in blueprints])
    app.register_blueprint(health_blueprint)
    document_health(api, next(app.url_map.iter_rules(endpoint="health.health")), service)
    serve_swagger_ui_files(app)
    register_error_handlers(app)
    configure_logging()
    if warns_of_published_secrets:
        warn_of_published_secrets(service, settings, secrets)
    install_request_ids(app)
    # (after the request's id is set: its 413 and 400 are logged with it)
    app.before_request(refuse_a_chunked_body_unreadable_or_over_the_limit)
    app.before_request(forget_replayed_mark)
    app.after_request(say_if_replayed)  # Idempotent-Replayed: true on a replayed answer
    return app


def warn_of_published_secrets(service: str, settings: Settings, secrets: Iterable[str]) -> None:
    """One WARNING if the service signs or trusts with a secret whose value is published with the
    code (a default, or a placeholder in deploy/): anyone could sign in as any user, or as the
    gateway. It starts all the same (a fresh clone's `docker compose up` must work)."""
    published = published_secrets(settings, secrets)
    if published:
        one = len(published) == 1
        log.warning("%s: %s %s published with the code, so anyone can sign what this service"
                    " trusts; set %s (README: Deploying)", service, " and ".join(published),
                    "is the placeholder" if one else "are the placeholders",
                    "it to a random value of your own" if one else "them to random values of your"
                    " own")


def _the_readers_refusal(exc: Exception) -> bool:
    """Whether `exc` is the web server's reader refusing a body: gunicorn's parse errors, or the
    socket's."""
    return isinstance(exc, OSError) or type(exc).__module__.startswith("gunicorn.http")


def refuse_a_chunked_body_unreadable_or_over_the_limit() -> None:
    """A body sent in chunks, with no Content-Length, read before any view or sign-in: a 413 if it
    goes on past MAX_REQUEST_BYTES, a 400 if it cannot be read as chunks.

    Over the limit: Werkzeug reads such a body up to the limit and stops there without a word,
    so the app would have parsed its first 64 KiB (a 400 for JSON cut off, or a request made of a
    body's beginning); one with a Content-Length over the limit is refused as it arrives.

    A body that cannot be read as chunks (a chunk size that is no number, a chunk longer than it
    says) is a 400 BAD_REQUEST, the connection's last answer. gunicorn's reader raises an error of
    its own for it, which Werkzeug passes on (it makes a 400 only of the socket's errors); it is
    told here by its module (the apps run without gunicorn too), and named by its class alone: its
    text can hold the body itself (a password sent unframed), which neither the log nor the answer
    repeats. Any other error stays an unexpected one (a 500, with its traceback)."""
    if request.content_length is None and "chunked" in request.headers.get(
            "Transfer-Encoding", "").lower():
        try:
            read = request.get_data(cache=True)  # (up to the limit)
            goes_on = len(read) >= MAX_REQUEST_BYTES and request.environ["wsgi.input"].read(1)
        except HTTPException:  # (Werkzeug's own answers: a 413, the client gone)
            raise
        except Exception as exc:
            if not _the_readers_refusal(exc):
                raise
            log.warning("a request body that could not be read: %s", type(exc).__name__)
            raise UnreadableBody(type(exc).__name__) from None
        if goes_on:
            raise RequestEntityTooLarge()
