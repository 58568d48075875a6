"""The gateway: HseShop's single public front door. Sign-in, the public /api (forwarded to the
services with a gateway-signed identity), rate limits, live notifications, docs and the web page."""

from __future__ import annotations

from flask import Flask

from shared.config import Settings

SERVICE = "gateway"

DOCS_CONFIG = {
    "OPENAPI_URL_PREFIX": "/",
    "OPENAPI_JSON_PATH": "docs/openapi.json",
    "OPENAPI_SWAGGER_UI_PATH": "/docs",
    "SWAGGER_UI_TRY_IT_OUT": True,  # (the public API: a person signs in with Authorize)
    "API_SPEC_OPTIONS": {
        "info": {"description": "Sign up or sign in under /api/auth, then send the token as "
                                "`Authorization: Bearer <token>`."},
        "components": {"securitySchemes": {
            "Bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
        "security": [{"Bearer": []}],
    },
}


def create_app(settings: Settings | None = None, *,
               warns_of_published_secrets: bool = True) -> Flask:
    """The gateway's app; a worker's or a tool's, which serves no request, is built without
    `warns_of_published_secrets` (shared.app)."""
    import redis
    from werkzeug.middleware.proxy_fix import ProxyFix

    from gateway_app import (auth, models, notifications, routes, sign_out,  # noqa: F401
                             user_channels, web)
    from gateway_app.no_store import keep_api_answers_out_of_caches
    from gateway_app.channel_listener import ChannelListener, subscriber_client
    from gateway_app.notification_document import document_notifications
    from gateway_app.ratelimit import RateLimiter
    from shared.app import create_service_app
    from shared.app_closing import close_with
    from shared.config import SECRETS

    app = create_service_app(SERVICE, title="HseShop", settings=settings,
                             config=DOCS_CONFIG,
                             blueprints=[routes.blueprint, notifications.blueprint],
                             authenticate=auth.authenticate_bearer,
                             takes_caller_deadlines=False,
                             secrets=SECRETS,  # (it signs identities and users' tokens)
                             warns_of_published_secrets=warns_of_published_secrets)
    settings = app.extensions["hseshop.settings"]
    limiter = app.extensions[auth.RATE_LIMITER] = RateLimiter(
        settings.redis_url, settings.rate_limit_per_minute, settings.redis_key_prefix)
    close_with(app, limiter.close)
    # This process's own: each gunicorn worker is a process that builds its own app (create_app
    # runs in the worker after the fork, without --preload), and no memory is shared between them.
    app.extensions[sign_out.REMEMBERED] = sign_out.RememberedSignOuts()
    # A read gives up after 2 s (a Redis host gone silent would otherwise hold the thread that
    # publishes a notification for as long as TCP waits).
    publisher = app.extensions[user_channels.REDIS_EXTENSION] = redis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=1, socket_timeout=2, socket_keepalive=True,
        health_check_interval=30)
    close_with(app, publisher.close)
    # The sockets' subscriber: no connection, no thread until the first socket opens (none in a
    # process that keeps no socket, and none that a fork would drop were the app built before it).
    subscriber = subscriber_client(settings.redis_url)
    listener = app.extensions[user_channels.LISTENER_EXTENSION] = ChannelListener(subscriber)
    close_with(app, subscriber.close)
    close_with(app, listener.close)  # (before the client's: see ChannelListener.close)
    app.extensions["hseshop.api"].register_blueprint(auth.blueprint)
    app.before_request_funcs.setdefault(auth.blueprint.name, []).append(auth.limit_by_address)
    notifications.register_socket(app, auth.socket_token, auth.socket_ticket_token)
    document_notifications(app.extensions["hseshop.api"], notifications.MESSAGE_HANDLERS)
    app.register_blueprint(web.blueprint)
    keep_api_answers_out_of_caches(app)
    if settings.gateway_trusted_proxy_hops:
        # The address the limits count is the client's, not the proxy's, which every client
        # would share: the one our outermost proxy wrote into X-Forwarded-For, however many
        # entries a client put before it. Only that header is trusted (x_proto's default is 1).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.gateway_trusted_proxy_hops,
                                x_proto=0)
    return app


def subscribed_topics(settings: Settings) -> list[str]:
    return [settings.topic_order_status_changed]


def published_events(settings: Settings) -> dict[str, frozenset[str]]:
    """The topics this service writes outbox rows to: none (it reads notifications only)."""
    return {}


def message_handlers():
    from gateway_app.notifications import MESSAGE_HANDLERS

    return MESSAGE_HANDLERS
