"""The OpenAPI document each app serves, as a client reads it: valid OpenAPI 3.0."""

from __future__ import annotations

import pytest
from openapi_spec_validator import OpenAPIV30SpecValidator, validate

import gateway_app

# Where every app serves its document (and its Swagger UI reads it).
DOCUMENT_URL = "/docs/openapi.json"


@pytest.fixture(scope="module")
def apps(orders_flask_app, payments_flask_app, settings):
    return {"orders": orders_flask_app, "payments": payments_flask_app,
            "gateway": gateway_app.create_app(settings=settings)}


def _served_document(app) -> dict:
    answer = app.test_client().get(DOCUMENT_URL)
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    return answer.get_json()


def test_each_app_serves_a_valid_openapi_3_0_document(apps):
    for service, app in apps.items():
        document = _served_document(app)
        assert document["openapi"].startswith("3.0."), service
        validate(document, cls=OpenAPIV30SpecValidator)  # (raises, saying what is wrong)
