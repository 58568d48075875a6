"""The flask-smorest Blueprint every HseShop API uses: request bodies are parsed by our strict JSON
reader (amounts arrive as Decimal, NaN/Infinity are refused as malformed JSON), and each route
parses with one schema instance made when the route is declared."""

from __future__ import annotations

import flask
import flask_smorest
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request

from shared.jsonio import loads_strict


class StrictJSONParser(FlaskParser):
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
