"""`GET /health` in every app's OpenAPI document, where no flask-smorest blueprint puts it (it is a
plain Flask blueprint, shared/health.py, public in every app): what its answers carry."""

from __future__ import annotations

from shared.documented_errors import BODY_TOO_LARGE, openapi_error_responses

# What each check is of (shared/health.py names them so in its answer).
CHECKS = {"database": "the app's PostgreSQL database",
          "redis": "Redis (REDIS_URL's, not the read cache's CACHE_REDIS_URL)",
          "broker": "the Kafka broker"}

_DESCRIPTION = """\
Public: no credentials. An app runs its checks at most once a second, one round at a time, and
answers the requests meanwhile with its last round's results."""


def _answer(description: str, service: str, status: str, check_values: list[str]) -> dict:
    """A /health answer of `service` whose status is `status`, each check one of `check_values`."""
    def one_of(values: list[str], description: str) -> dict:
        return {"type": "string", "enum": values, "description": description}

    checks = {"type": "object", "additionalProperties": False, "required": list(CHECKS),
              "properties": {name: one_of(check_values, f"Whether {what} answers")
                             for name, what in CHECKS.items()}}
    schema = {"type": "object", "additionalProperties": False,
              "required": ["status", "service", "checks"],
              "properties": {"status": one_of([status], "`ok` when every check is"
                                                        " `ok`, else `degraded`"),
                             "service": one_of([service], "The app that answered"),
                             "checks": checks}}
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document_health(api, rule, service: str) -> None:
    """Put `GET /health` of the app `service`, served at the URL rule `rule`, in `api`'s OpenAPI
    document."""
    api.spec.tag({"name": "health", "description": "Whether the app can do its work"})
    api.spec.path(rule=rule, parameters=[], operations={"get": {
        "tags": ["health"],
        "summary": "Whether the app's database, Redis and the Kafka broker are reachable",
        "description": _DESCRIPTION,
        "security": [],
        "responses": {
            "200": _answer("Every check is `ok`", service, "ok", ["ok"]),
            # (an app's every request is held to its body size limit: shared.app)
            **openapi_error_responses([BODY_TOO_LARGE]),
            "503": _answer("A check is `unreachable`: the status is `degraded`", service,
                           "degraded", ["ok", "unreachable"]),
            "default": api.DEFAULT_ERROR_RESPONSE_NAME,  # (a reference to every operation's own)
        },
    }})
