"""The flask-smorest Blueprint every HseShop API uses: request bodies are parsed by our strict JSON
reader (amounts arrive as Decimal, NaN/Infinity are refused as malformed JSON), query parameters
are held to their schema as bodies are (a route that takes none refuses any), and each route
parses with one schema instance made when the route is declared."""

from __future__ import annotations

from copy import deepcopy
from functools import wraps

import flask
import flask_smorest
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from shared.jsonio import loads_strict


class StrictJSONParser(FlaskParser):
    # A query parameter the route does not know is refused as an unknown body field is (the
    # schemas say `unknown = RAISE`; webargs would otherwise drop unknown query parameters).
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
                                   "query": None, "querystring": None}

    def _raw_load_json(self, req: flask.Request):
        if not is_json_request(req):
            return core.missing
        return loads_strict(req.get_data(cache=True).decode("utf-8"))


class Blueprint(flask_smorest.Blueprint):
    ARGUMENTS_PARSER = StrictJSONParser()

    def arguments(self, schema, *args, **kwargs):
        # Given a schema class, webargs builds a new instance of it for every request (about a
        # tenth of what parsing a small body costs); a marshmallow schema keeps no state between
        # loads, so one instance serves every request of the route.
        if isinstance(schema, type):
            schema = schema()
        return super().arguments(schema, *args, **kwargs)

    def route(self, rule, *, parameters=None, tags=None, **options):
        register = super().route(rule, parameters=parameters, tags=tags, **options)

        def decorator(view):
            if not isinstance(view, type) and not _takes_query_parameters(view):
                view = _refusing_query_parameters(view)
            return register(view)

        return decorator


def _takes_query_parameters(view) -> bool:
    """Whether the view declares query arguments (`arguments(..., location="query")`, or
    "querystring", webargs' other name for it)."""
    declared = getattr(view, "_apidoc", {}).get("arguments", {}).get("parameters", [])
    return any(parameter.get("in") in ("query", "querystring") for parameter in declared)


def _refusing_query_parameters(view):
    """`view`, refusing a request with query parameters (it takes none) with a 422 as webargs
    words it for a route that has a query schema: each name, "Unknown field.". A look at
    `request.args`, not a parse: the hot routes (placing an order) take none."""

    @wraps(view)
    def refusing(*args, **kwargs):
        if flask.request.args:
            flask_smorest.abort(422, messages={"query": {
                name: ["Unknown field."] for name in flask.request.args}})
        return view(*args, **kwargs)

    refusing._apidoc = deepcopy(getattr(view, "_apidoc", {}))
    documented = refusing._apidoc.setdefault("arguments", {})
    documented.setdefault("parameters", [])
    documented.setdefault("responses", {})[422] = "UNPROCESSABLE_ENTITY"
    return refusing
