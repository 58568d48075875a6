"""shared.app.ShopApi and shared.http_api.Blueprint where an operation uses what no HseShop
operation does yet: flask-smorest's own pagination, whose header ShopApi registers in its own way
and whose page parameters the Blueprint must not refuse, and a query parameter that takes a list,
which alone may be given more than once."""

from __future__ import annotations

from flask import Flask
from marshmallow import Schema, fields
from openapi_spec_validator import OpenAPIV30SpecValidator, validate

from shared.app import ShopApi
from shared.http_api import Blueprint


class ThingSchema(Schema):
    name = fields.String()


class ThingsNamedSchema(Schema):
    name = fields.List(fields.String())
    limit = fields.Integer()


THINGS = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
NAMING_HEADER = {"in": "header", "name": "X-Naming", "required": False,
                 "schema": {"type": "string"}}


def _things_app() -> tuple[Flask, ShopApi]:
    """An app on ShopApi and the project's Blueprint with a route paged by flask-smorest
    (/things) and one that takes no query parameter (/plain)."""
    app = Flask(__name__)
    app.config.update(API_TITLE="Things", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    api = ShopApi(app)
    blueprint = Blueprint("things", __name__)

    @blueprint.get("/things")
    @blueprint.response(200, ThingSchema(many=True))
    @blueprint.paginate()
    def things(pagination_parameters):
        pagination_parameters.item_count = len(THINGS)
        return THINGS[pagination_parameters.first_item:pagination_parameters.last_item + 1]

    @blueprint.get("/named")
    @blueprint.arguments(ThingsNamedSchema, location="query")
    @blueprint.doc(parameters=[NAMING_HEADER])
    @blueprint.response(200, ThingSchema(many=True))
    def named(args):
        return [thing for thing in THINGS if thing["name"] in args["name"]][:args.get("limit")]

    @blueprint.get("/plain")
    @blueprint.response(200, ThingSchema(many=True))
    def plain():
        return []

    api.register_blueprint(blueprint)
    return app, api


def test_an_operation_paginated_by_flask_smorest_documents_its_pagination_header():
    """ShopApi writes the X-Pagination header's schema out in it, so that PaginationMetadata is
    in no document whose operations do not paginate: one that does still documents the header."""
    _, api = _things_app()
    document = api.spec.to_dict()
    header = document["paths"]["/things"]["get"]["responses"]["200"]["headers"]["X-Pagination"]
    assert header == {"$ref": "#/components/headers/PAGINATION"}
    schema = document["components"]["headers"]["PAGINATION"]["schema"]
    assert {"total", "page", "next_page"} <= set(schema["properties"])
    validate(document, cls=OpenAPIV30SpecValidator)


def test_an_operation_documents_its_query_parameters_beside_those_it_is_documented_with():
    """A parameter given with `doc(parameters=...)` (a header) is documented beside those of the
    operation's query schema, not in their place."""
    _, api = _things_app()
    document = api.spec.to_dict()
    parameters = document["paths"]["/named"]["get"]["parameters"]
    assert {(parameter["in"], parameter["name"]) for parameter in parameters} == {
        ("query", "name"), ("query", "limit"), ("header", "X-Naming")}
    validate(document, cls=OpenAPIV30SpecValidator)


def test_an_operation_paginated_by_flask_smorest_takes_its_page_parameters():
    """The project's Blueprint refuses query parameters on a route that declares none; a route
    paged by flask-smorest declares page and page_size through `paginate`, not `arguments`."""
    app, _ = _things_app()
    client = app.test_client()
    paged = client.get("/things?page=2&page_size=2")
    assert paged.status_code == 200, paged.get_json()
    assert paged.get_json() == [{"name": "c"}]
    assert client.get("/plain?page=2").status_code == 422  # (a route that takes none)


def test_only_a_query_parameter_that_takes_a_list_may_be_given_more_than_once():
    """Any other given twice is refused (a 422 naming it), whichever value comes first, flask-
    smorest's own page parameters too; not read first-value-wins."""
    app, _ = _things_app()
    client = app.test_client()
    assert client.get("/named?name=a&name=c").get_json() == [{"name": "a"}, {"name": "c"}]
    for query, messages in (
            ("name=a&limit=1&limit=x", ["Given more than once."]),
            # (read on its first value, with what is wrong with that)
            ("name=a&limit=x&limit=1", ["Not a valid integer.", "Given more than once."]),
            ("limit=2&name=a&limit=2", ["Given more than once."])):
        refused = client.get(f"/named?{query}")
        assert refused.status_code == 422, query
        assert refused.get_json()["errors"] == {"query": {"limit": messages}}, query
    paged_twice = client.get("/things?page=1&page=2")
    assert paged_twice.status_code == 422
    assert paged_twice.get_json()["errors"] == {"query": {"page": ["Given more than once."]}}
    # One the route does not know is refused as unknown, however often it is given.
    assert client.get("/named?x=1&x=2").get_json()["errors"] == {
        "query": {"x": ["Unknown field."]}}


def test_the_swagger_ui_page_is_served_where_its_path_says_and_only_when_it_names_one():
    """ShopApi's page loads the app's own files: it is served at OPENAPI_SWAGGER_UI_PATH with no
    OPENAPI_SWAGGER_UI_URL (flask-smorest's address of a CDN's copy, which the shop set only to
    have the page served at all), and not served when the path is None."""
    for path, status in (("/ui", 200), (None, 404)):
        app = Flask(__name__)
        app.config.update(API_TITLE="Things", API_VERSION="1", OPENAPI_VERSION="3.0.3",
                          OPENAPI_URL_PREFIX="/docs", OPENAPI_SWAGGER_UI_PATH=path)
        ShopApi(app)
        page = app.test_client().get("/docs/ui")
        assert page.status_code == status, path
        assert (b"/docs/swagger-ui-assets/swagger-ui-bundle.js" in page.data) is (status == 200)
