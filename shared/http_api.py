"""The flask-smorest Blueprint every HseShop API uses: request bodies are parsed by our strict JSON
reader (amounts arrive as Decimal, NaN/Infinity are refused as malformed JSON; a body of another
Content-Type is refused with 415, not passed over as if none were sent), query parameters
are held to their schema as bodies are (a route that takes none refuses any, and one given more
than once is refused, not read first-value-wins), each route parses with one schema instance made
when the route is declared, and each route's OpenAPI document gives the errors it can answer
(shared.documented_errors) and its answers' links to the operations they feed."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from copy import deepcopy
from functools import wraps

import flask
import flask_smorest
import marshmallow
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.datastructures import MultiDict

from shared.documented_errors import (ACCEPT_ENCODING, BODY_TOO_LARGE, MALFORMED_REQUEST,
                                     UNSUPPORTED_MEDIA_TYPE, VALIDATION_ERROR, DocumentedError,
                                     error_responses)
from shared.errors import ApiError
from shared.jsonio import loads_strict_naming_repeats


class EmptySchema(marshmallow.Schema):
    """The body of an operation that takes none: nothing, or an empty JSON object."""

    class Meta:
        unknown = marshmallow.RAISE


# What a query parameter given more than once is refused with: `?limit=1&limit=x` is ambiguous,
# and webargs would read its first value.
GIVEN_MORE_THAN_ONCE = "Given more than once."


def given_more_than_once(args: MultiDict, names: Collection[str]) -> list[str]:
    """Those of `names` that the query `args` gives more than once, in the query's order."""
    return [name for name in args if name in names and len(args.getlist(name)) > 1]


def _refused_as_given_more_than_once(schema: marshmallow.Schema, value,
                                     repeated: Iterable[str]) -> marshmallow.ValidationError:
    """The error for `value` (a query, read on each name's first value, or a body, on its last)
    that gives each of `repeated` more than once: whatever the schema finds wrong with it, as it
    reports every field at once, with each repeated name's message beside its field's own ("Not a
    valid integer.", "Unknown field.")."""
    errors = schema.validate(value)
    for name in repeated:
        messages = errors.setdefault(name, [])
        if isinstance(messages, dict):  # (a nested field's, by its own fields)
            messages = messages.setdefault("_schema", [])
        if GIVEN_MORE_THAN_ONCE not in messages:  # (`a.b` repeated, and `b` in `a`: one name)
            messages.append(GIVEN_MORE_THAN_ONCE)
    return marshmallow.ValidationError(errors)


class OnceEachParser(FlaskParser):
    """webargs' parser for Flask, refusing a query parameter given more than once where its field
    takes one value (a List's may repeat): a ValidationError, which webargs answers with a 422
    under "query", as any query that does not hold to its schema."""

    def load_querystring(self, req: flask.Request, schema: marshmallow.Schema):
        # A parameter the schema does not know is left to the schema (refused as unknown, or
        # dropped), however often it is given.
        query = super().load_querystring(req, schema)
        single_valued = {field.data_key or name for name, field in schema.load_fields.items()
                         } - query.multiple_keys
        repeated = given_more_than_once(req.args, single_valued)
        if repeated:
            # (read on each one's first value)
            raise _refused_as_given_more_than_once(schema, query, repeated)
        return query


class StrictJSONParser(OnceEachParser):
    # A query parameter the route does not know is refused as an unknown body field is (the
    # schemas say `unknown = RAISE`; webargs would otherwise drop unknown query parameters).
    DEFAULT_UNKNOWN_BY_LOCATION = {**FlaskParser.DEFAULT_UNKNOWN_BY_LOCATION,
                                   "query": None, "querystring": None}

    def _raw_load_json(self, req: flask.Request):
        # (On every request with a body, placing an order: the body is taken once, and the
        # Content-Encoding read only when there is one.)
        data = req.get_data(cache=True)
        if data and _content_coded(req.environ.get("HTTP_CONTENT_ENCODING")):
            # Read as it was sent, a body gzipped was "not valid JSON" (a 400), and one that said
            # it was gzipped but was not was carried out: an order placed from bytes the client
            # had said were something else. RFC 9110 (15.5.16): a 415 naming the coding taken.
            raise ApiError("The request body must be sent as it is, with no Content-Encoding.",
                           status=UNSUPPORTED_MEDIA_TYPE.status, code=UNSUPPORTED_MEDIA_TYPE.code,
                           headers={ACCEPT_ENCODING: "identity"})
        if not is_json_request(req):
            # A body of another type (a form, text/plain, none named: curl's -d sends a form) was
            # passed over as if none were sent, and a client that sent the fields was told they
            # were missing (a 422 "Missing data for required field"), or had them ignored.
            if data:
                raise ApiError("The request body must be JSON, sent with Content-Type:"
                               " application/json.", status=UNSUPPORTED_MEDIA_TYPE.status,
                               code=UNSUPPORTED_MEDIA_TYPE.code)
            return core.missing
        value, repeated = loads_strict_naming_repeats(data.decode("utf-8"))
        if repeated:
            raise _NamesRepeated(value, repeated)
        return value

    def load_json(self, req: flask.Request, schema: marshmallow.Schema):
        try:
            return super().load_json(req, schema)
        except _NamesRepeated as exc:
            # Ambiguous as a query parameter given twice is: `{"amount": "1", "amount": "900"}`
            # was read last-name-wins, where another JSON reader on its way (a proxy's, a log's)
            # may read the first. Refused alike, naming each, with whatever else is wrong (a body
            # that is no object too: `[{"a": 1, "a": 2}]`, "Invalid input type.").
            raise _refused_as_given_more_than_once(schema, exc.value, exc.repeated) from None


def _content_coded(content_encoding: str | None) -> bool:
    """Whether a request's Content-Encoding says its body is in a content coding (gzip, say), as
    none is read."""
    if not content_encoding:
        return False
    return any(coding.strip().lower() not in ("", "identity")
               for coding in content_encoding.split(","))


class _NamesRepeated(Exception):
    """A JSON body with an object that gives a name more than once."""

    def __init__(self, value, repeated: list[str]):
        super().__init__(repeated)
        self.value, self.repeated = value, repeated


class Blueprint(flask_smorest.Blueprint):
    """`errors`: what every route of the blueprint can answer (its `before_request` checks, say),
    documented with what the route declares (`errors`) and what every route can answer: a body
    over the size limit (any app's, shared.app), and a query, or a JSON body, that does not hold
    to the route's schema or cannot be read."""

    # One parser for every query a route reads, so that each parameter is taken once wherever it
    # is read: flask-smorest looks it up under two names, one for the route's declared arguments
    # and one for `paginate`'s page and page_size (whose schema passes over the route's other
    # parameters). No shop route pages with `paginate` (the lists page with cursors of their own);
    # one that came to would still be held to the rule.
    ARGUMENTS_PARSER = PAGINATION_ARGUMENTS_PARSER = StrictJSONParser()

    def __init__(self, *args, errors: Iterable[DocumentedError] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.errors_of_every_route = tuple(errors)

    @staticmethod
    def errors(*errors: DocumentedError):
        """Declare the errors a route can answer besides those of every route of its blueprint
        (below its `route`, which documents them as it registers the view)."""

        def decorator(view):
            if getattr(view, "_errors_documented", False):
                raise TypeError(f"{view.__name__}: `errors` must come below the route's"
                                " decorator, which has documented its errors already")
            view._documented_errors = (*getattr(view, "_documented_errors", ()), *errors)
            return view

        return decorator

    def arguments(self, schema, *args, **kwargs):
        # Given a schema class, webargs builds a new instance of it for every request (about a
        # tenth of what parsing a small body costs); a marshmallow schema keeps no state between
        # loads, so one instance serves every request of the route.
        if isinstance(schema, type):
            schema = schema()
        return super().arguments(schema, *args, **kwargs)

    def response(self, status_code, schema=None, *, links: dict[str, dict] | None = None,
                 **kwargs):
        """flask-smorest's, the response documented with `links` too: for each of its names, the
        operation a field of this answer feeds (shared.operation_links.link)."""
        document = super().response(status_code, schema, **kwargs)
        if not links:
            return document

        def decorator(view):
            view = document(view)  # (its document a copy of its own: flask-smorest's wrapper's)
            responses = view._apidoc["response"]["responses"][status_code]
            responses[-1] = {**responses[-1], "links": deepcopy(links)}
            return view

        return decorator

    def route(self, rule, *, parameters=None, tags=None, **options):
        register = super().route(rule, parameters=parameters, tags=tags, **options)

        def decorator(view):
            if not isinstance(view, type):
                _document_parameters_beside_arguments(view)
                if not _takes_query_parameters(view):
                    view = _refusing_query_parameters(view)
                _document_errors(view, self.errors_of_every_route)
            return register(view)

        return decorator


def _document_parameters_beside_arguments(view) -> None:
    """Move the parameters `doc(parameters=...)` gives `view` (a header: X-Gateway-Deadline,
    Idempotency-Key) among those its `arguments` document, where flask-smorest put them in their
    place: the orders service's GET /orders documented its X-Gateway-Deadline and not its query
    (`limit`, `cursor`)."""
    documented = getattr(view, "_apidoc", {})
    if "parameters" in documented.get("manual_doc", {}) and "arguments" in documented:
        view._apidoc = documented = deepcopy(documented)
        documented["arguments"]["parameters"] += documented["manual_doc"].pop("parameters")


def _takes_query_parameters(view) -> bool:
    """Whether the view declares query arguments (`arguments(..., location="query")`, or
    "querystring", webargs' other name for it), or pages with flask-smorest's `paginate` (whose
    page and page_size are query parameters)."""
    documented = getattr(view, "_apidoc", {})
    declared = documented.get("arguments", {}).get("parameters", [])
    return "pagination" in documented or any(
        parameter.get("in") in ("query", "querystring") for parameter in declared)


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
    return refusing


def _document_errors(view, errors_of_every_route: tuple[DocumentedError, ...]) -> None:
    """Put in `view`'s OpenAPI document a response for each status it can answer with an error,
    in place of flask-smorest's bare 422 for its arguments."""
    documented = getattr(view, "_apidoc", {})
    takes_a_body = any(parameter.get("in") == "json" for parameter in
                       documented.get("arguments", {}).get("parameters", []))
    errors = [BODY_TOO_LARGE, VALIDATION_ERROR,
              *([MALFORMED_REQUEST, UNSUPPORTED_MEDIA_TYPE] if takes_a_body else []),
              *errors_of_every_route, *getattr(view, "_documented_errors", ())]
    view._apidoc = documented = deepcopy(documented)
    view._errors_documented = True
    documented.get("arguments", {}).pop("responses", None)
    responses = documented.setdefault("response", {}).setdefault("responses", {})
    by_status = error_responses(errors)
    for status, response in by_status.items():
        # (as flask-smorest's alt_response keeps one: its content type the API's default)
        responses.setdefault(status, []).append({**response, "content_type": None})
    view._documented_error_codes = {status: frozenset(response["x-error-codes"])
                                    for status, response in by_status.items()}


def documented_error_codes(view) -> dict[int, frozenset[str]]:
    """The error codes `view` (a route's view, as its Blueprint registered it) documents in its
    OpenAPI document, by status (each response's `x-error-codes`): the one list of them, which a
    gateway relaying a service's error holds it to (gateway_app/upstream_answers.py)."""
    return view._documented_error_codes
