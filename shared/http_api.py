"""The flask-smorest Blueprint both APIs use: request bodies are parsed by our strict JSON reader,
so amounts arrive as Decimal and NaN/Infinity are refused as malformed JSON."""

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
