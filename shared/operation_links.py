"""Operation ids and links in every app's OpenAPI document: each operation is named by its view
(`place_order`, `health`), so that a response can say which operation a field of it feeds (an
OpenAPI 3 Link Object: the `id` of a placed order is the `order_id` of `get_order`), for a client
generated from the document and for Swagger UI, which shows them under each response."""

from __future__ import annotations

from apispec import BasePlugin


def link(operation_id: str, description: str, **parameters: str) -> dict:
    """A link to the operation `operation_id` of the same document, each of its `parameters`
    given by a runtime expression (`$response.body#/id`)."""
    return {"operationId": operation_id, "description": description,
            **({"parameters": parameters} if parameters else {})}


class OperationIdsOfViews(BasePlugin):
    """Gives each operation that has none the name of the view that serves it (its endpoint's
    last part: `shop.place_order`'s `place_order`), which links name it by; the paths no blueprint
    documents too (/health, the notification socket). The service behind the gateway and the
    gateway name an operation they both serve by one view name, so that one link serves both
    documents."""

    def operation_helper(self, path=None, operations=None, rule=None, **kwargs) -> None:
        if rule is None:  # (a path documented by hand, spec.path(...) with no rule: named there)
            return
        for operation in operations.values():
            operation.setdefault("operationId", rule.endpoint.rpartition(".")[2])
