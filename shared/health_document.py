"""`GET /health` in every app's OpenAPI document, where no flask-smorest blueprint puts it (it is a
plain Flask blueprint, shared/health.py, public in every app): what its answers carry."""

from __future__ import annotations

from marshmallow import Schema, fields

from shared.config import SERVICES
from shared.documented_errors import BODY_TOO_LARGE, openapi_error_responses


def _check(what: str) -> fields.String:
    return fields.String(required=True, metadata={"enum": ["ok", "unreachable"],
                                                  "description": f"Whether {what} answers"})


class HealthChecksSchema(Schema):
    database = _check("the app's PostgreSQL database")
    redis = _check("Redis")
    broker = _check("the Kafka broker")


class HealthSchema(Schema):
    status = fields.String(required=True, metadata={
        "enum": ["ok", "degraded"], "description": "`ok` when every check is, else `degraded`"})
    service = fields.String(required=True, metadata={"enum": list(SERVICES),
                                                     "description": "The app that answered"})
    checks = fields.Nested(HealthChecksSchema, required=True)


_DESCRIPTION = """\
Public: no credentials. An app runs its checks at most once a second, one round at a time, and
answers the requests meanwhile with its last round's results."""


def _health(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": HealthSchema}}}


def document_health(api, rule) -> None:
    """Put `GET /health`, served at the URL rule `rule`, in `api`'s OpenAPI document."""
    api.spec.tag({"name": "health", "description": "Whether the app can do its work"})
    api.spec.path(rule=rule, parameters=[], operations={"get": {
        "tags": ["health"],
        "summary": "Whether the app's database, Redis and the Kafka broker are reachable",
        "description": _DESCRIPTION,
        "security": [],
        "responses": {
            "200": _health("Every check is `ok`"),
            # (an app's every request is held to its body size limit: shared.app)
            **openapi_error_responses([BODY_TOO_LARGE]),
            "503": _health("A check is `unreachable`: the status is `degraded`"),
            "default": api.DEFAULT_ERROR_RESPONSE_NAME,  # (a reference to every operation's own)
        },
    }})
