"""shared.operation_links.OperationIdsOfViews as an apispec plugin: each operation is named by its
view, and a path documented by hand, with no URL rule, is left as it was written."""

from __future__ import annotations

from apispec import APISpec
from werkzeug.routing import Rule

from shared.operation_links import OperationIdsOfViews


def _spec() -> APISpec:
    return APISpec("Things", "1", "3.0.3", plugins=[OperationIdsOfViews()])


def _answered(**operation) -> dict:
    return {"responses": {"200": {"description": "OK"}}, **operation}


def test_an_operation_is_named_by_its_views_endpoint_unless_it_is_named_already():
    spec = _spec()
    spec.path("/orders", rule=Rule("/orders", endpoint="shop.place_order"),
              operations={"post": _answered(), "get": _answered(operationId="list_them")})
    operations = spec.to_dict()["paths"]["/orders"]
    assert operations["post"]["operationId"] == "place_order"
    assert operations["get"]["operationId"] == "list_them"


def test_a_path_documented_by_hand_with_no_url_rule_is_left_as_written():
    """spec.path(path, operations) with no rule (a path no view of the app serves, documented by
    hand): there is no view to name its operations by, so they are left as written, named or
    not, where the plugin raised AttributeError on the missing rule and failed the whole
    document. (On a ShopApi, flask-smorest's own plugin asks for a rule before this one runs.)"""
    spec = _spec()
    spec.path("/by-hand", operations={"get": _answered(),
                                      "post": _answered(operationId="named_by_hand")})
    operations = spec.to_dict()["paths"]["/by-hand"]
    assert "operationId" not in operations["get"]
    assert operations["post"]["operationId"] == "named_by_hand"
