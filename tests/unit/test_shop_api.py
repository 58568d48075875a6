"""shared.app.ShopApi's document where an operation uses what no HseShop operation does:
flask-smorest's own pagination, whose header ShopApi registers in its own way."""

from __future__ import annotations

from flask import Flask
from flask_smorest import Blueprint
from marshmallow import Schema, fields
from openapi_spec_validator import OpenAPIV30SpecValidator, validate

from shared.app import ShopApi


class ThingSchema(Schema):
    name = fields.String()


def test_an_operation_paginated_by_flask_smorest_documents_its_pagination_header():
    """ShopApi writes the X-Pagination header's schema out in it, so that PaginationMetadata is
    in no document whose operations do not paginate: one that does still documents the header."""
    app = Flask(__name__)
    app.config.update(API_TITLE="Things", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    api = ShopApi(app)
    blueprint = Blueprint("things", __name__)

    @blueprint.get("/things")
    @blueprint.response(200, ThingSchema(many=True))
    @blueprint.paginate()
    def things(pagination_parameters):
        return []

    api.register_blueprint(blueprint)
    document = api.spec.to_dict()
    header = document["paths"]["/things"]["get"]["responses"]["200"]["headers"]["X-Pagination"]
    assert header == {"$ref": "#/components/headers/PAGINATION"}
    schema = document["components"]["headers"]["PAGINATION"]["schema"]
    assert {"total", "page", "next_page"} <= set(schema["properties"])
    validate(document, cls=OpenAPIV30SpecValidator)
