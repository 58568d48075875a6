"""`X-Request-ID` in every app's OpenAPI document, as shared.request_context takes it and echoes
it: described once, as a parameter and as a response header among the components, and referred
to by every path and by every response (an apispec plugin, so the paths no blueprint documents
have it too: /health, the notification socket)."""

from __future__ import annotations

from apispec import BasePlugin

from shared.request_context import REQUEST_ID_HEADER, SANE_REQUEST_ID

# The name of both components (a parameter and a header).
REQUEST_ID = "REQUEST_ID"

_PARAMETER = {
    "name": REQUEST_ID_HEADER, "required": False, "schema": {"type": "string"},
    "description": "An id of yours for the request, kept when it is 8 to 128 characters of "
                   "`A-Za-z0-9._:-`: logged, passed on to the services and into the events the "
                   "request causes. Any other is replaced by one the shop makes (never refused)."}
_HEADER = {
    "description": "The request's id: the one it was sent with when that was kept, else the one "
                   "the shop made.",
    "schema": {"type": "string", "pattern": f"^{SANE_REQUEST_ID.pattern}$"}}


class RequestIdDocumented(BasePlugin):
    """Puts X-Request-ID's parameter on every path, and its header on every response but a
    101's (a WebSocket's handshake is answered by the socket's own code)."""

    def init_spec(self, spec) -> None:
        spec.components.parameter(REQUEST_ID, "header", _PARAMETER)
        spec.components.header(REQUEST_ID, _HEADER)

    def path_helper(self, path=None, operations=None, parameters=None, **kwargs) -> None:
        parameters.append(REQUEST_ID)  # (the path stays as the other plugins make it)

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if isinstance(response, dict) and not str(status).startswith("1"):
                    _with_the_header(response)

    def response_helper(self, response, **kwargs) -> dict:
        return _with_the_header(response)  # (a response among the components: DEFAULT_ERROR's)


def _with_the_header(response: dict) -> dict:
    response.setdefault("headers", {})[REQUEST_ID_HEADER] = REQUEST_ID
    return response
