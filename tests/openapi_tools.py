"""Reading an OpenAPI document as a client does (the errors each operation says it can answer, the
headers it says its answers carry, whether an answer it gave is one of them, and the links from
its answers to other operations), and asking its operations by their documented paths."""

from __future__ import annotations

import io
import re
import uuid
from urllib.parse import quote

from openapi_schema_validator import OAS30ReadValidator, validate

from shared.app import MAX_REQUEST_BYTES

ERROR_SCHEMA = {"$ref": "#/components/schemas/Error"}
# Every app's, in its document; its answers are checked against it in test_openapi_documents.py.
HEALTH = ("get", "/health")


def operations(spec: dict) -> set[tuple[str, str]]:
    """Every operation the document gives, by method and path."""
    return {(method, path) for path, item in spec["paths"].items() for method in item
            if method in {"get", "put", "post", "delete", "patch", "head", "options"}}


def unused_components(spec: dict) -> set[tuple[str, str]]:
    """The components (kind, name) the document gives that no operation uses, however indirectly:
    referred to from nowhere but themselves, or a security scheme no requirement names."""
    referred, to_read = set(), list(_references({**spec, "components": {}}))
    while to_read:
        reference = to_read.pop()  # "#/components/<kind>/<name>"
        if reference not in referred:
            referred.add(reference)
            kind, name = reference.split("/")[2:]
            to_read += _references(spec["components"][kind][name])
    requirements = [*spec.get("security", []), *(
        requirement for item in spec["paths"].values() for operation in item.values()
        if isinstance(operation, dict) for requirement in operation.get("security", []))]
    used = {tuple(reference.split("/")[2:]) for reference in referred} | {
        ("securitySchemes", name) for requirement in requirements for name in requirement}
    return {(kind, name) for kind, named in spec["components"].items() for name in named} - used


def _references(node) -> list[str]:
    """Every `$ref` in `node`, at any depth."""
    if isinstance(node, dict):
        return [reference for key, value in node.items()
                for reference in ([value] if key == "$ref" else _references(value))]
    if isinstance(node, list):
        return [reference for value in node for reference in _references(value)]
    return []


def assert_default_error_described(spec: dict) -> None:
    """That every operation's `default` response (shared.app.ShopApi) names what it can carry."""
    assert "`INTERNAL_ERROR`" in spec["components"]["responses"]["DEFAULT_ERROR"]["description"]


def documented_errors(spec: dict, method: str, path: str) -> dict[int, dict]:
    """The error responses the operation `method path` documents, by status (not its default)."""
    responses = spec["paths"][path][method]["responses"]
    return {int(status): response for status, response in responses.items()
            if status != "default" and int(status) >= 400}


def codes_named(response: dict) -> set[str]:
    """The `error.code` values a documented response carries: its `x-error-codes`, for a client
    to read, each named in its description too (as `CODE`), for a reader."""
    codes = set(response.get("x-error-codes", []))
    assert codes == set(re.findall(r"`([A-Z][A-Z_]+)`", response.get("description", ""))), response
    return codes


def documented_answers(spec: dict, method: str, path: str) -> set[tuple[int, str]]:
    """Each (status, code) the operation documents."""
    return {(status, code) for status, response in documented_errors(spec, method, path).items()
            for code in codes_named(response)}


def assert_documented(spec: dict, method: str, path: str, answer) -> tuple[int, str]:
    """That `answer`, an error the operation `method path` gave, is one it documents: its status,
    in the error shape, with its code named and its Retry-After (if it has one). Returns the
    (status, code) it was."""
    status, code = answer.status_code, answer.get_json()["error"]["code"]
    documented = documented_errors(spec, method, path)
    assert status in documented, (method, path, status, code)
    assert documented[status]["content"]["application/json"]["schema"] == ERROR_SCHEMA
    assert code in codes_named(documented[status]), (method, path, status, code)
    assert_headers_documented(spec, method, path, answer)
    return status, code


def assert_answered_as_documented(spec: dict, method: str, path: str, answer) -> int:
    """That `answer`, which the operation `method path` gave, is one it documents: its status one
    the operation gives, its body holding to the schema given for that status (no field or value
    the schema does not name, none it requires missing). Returns its status."""
    responses = spec["paths"][path][method]["responses"]
    assert str(answer.status_code) in responses, (method, path, answer.status_code)
    schema = responses[str(answer.status_code)]["content"][answer.mimetype]["schema"]
    # (the schema's references read in the document's components)
    validate(answer.get_json(), {**schema, "components": spec["components"]},
             cls=OAS30ReadValidator)
    return answer.status_code


# The headers an answer carries only where its operation's document gives them for its status (the
# socket's 426s their Upgrade and Sec-WebSocket-Version, what a POST made its Location), and
# X-Request-ID, which every answer carries and every response documents.
DOCUMENTED_HEADERS = ("Retry-After", "Accept-Encoding", "Idempotent-Replayed", "Upgrade",
                      "Sec-WebSocket-Version", "Location", "X-Request-ID")


def assert_headers_documented(spec: dict, method: str, path: str, answer) -> None:
    """That each of DOCUMENTED_HEADERS that `answer`, an answer of the operation `method path`,
    carries is documented for its status."""
    response = spec["paths"][path][method]["responses"].get(str(answer.status_code), {})
    for name in DOCUMENTED_HEADERS:
        if name in answer.headers:
            assert name in response.get("headers", {}), (method, path, answer.status_code, name)


def responses_documenting(spec: dict, header: str) -> set[tuple[str, str, int]]:
    """Each response (method, path, status) whose document gives `header`."""
    return {(method, path, int(status)) for method, path in operations(spec)
            for status, response in spec["paths"][path][method]["responses"].items()
            if header in response.get("headers", {})}


# The runtime expressions a link's parameter is given by that link_faults reads: a field of the
# answer's JSON body, by its JSON pointer.
RESPONSE_BODY_FIELD = "$response.body#"


def links(spec: dict) -> list[tuple[str, str, str, str, dict]]:
    """Each link of the document: (method, path, status) of the response that gives it, its name,
    and the link."""
    return [(method, path, status, name, link) for method, path in sorted(operations(spec))
            for status, response in spec["paths"][path][method]["responses"].items()
            for name, link in response.get("links", {}).items()]


def operation_of(spec: dict, operation_id: str) -> tuple[str, str] | None:
    """The operation (method, path) of the document whose operationId is `operation_id`."""
    return next(((method, path) for method, path in operations(spec)
                 if spec["paths"][path][method].get("operationId") == operation_id), None)


def link_faults(spec: dict) -> list[str]:
    """What is wrong with each link of the document, so that none can outlive what it names: an
    operationId no operation has, a parameter its operation does not take, an expression that
    names no field of the answer it is given in (or one of another kind: RESPONSE_BODY_FIELD
    alone is read)."""
    faults = []
    for method, path, status, name, link in links(spec):
        where = f"{method.upper()} {path} {status} {name}"
        target = operation_of(spec, link.get("operationId"))
        if target is None:
            faults.append(f"{where}: no operation {link.get('operationId')!r}")
            continue
        taken = _parameters_taken(spec, *target)
        answer = _resolved(spec, spec["paths"][path][method]["responses"][status]).get(
            "content", {}).get("application/json", {}).get("schema", {})
        for parameter, expression in link.get("parameters", {}).items():
            located, _, named = parameter.rpartition(".")
            if not any(named == given and located in ("", place) for place, given in taken):
                faults.append(f"{where}: {link['operationId']} takes no {parameter!r}")
            if not (expression.startswith(RESPONSE_BODY_FIELD) and _field_of(
                    spec, answer, expression[len(RESPONSE_BODY_FIELD):])):
                faults.append(f"{where}: {expression!r} names no field of the answer")
    return faults


def _parameters_taken(spec: dict, method: str, path: str) -> set[tuple[str, str]]:
    """The parameters (in, name) the operation takes: its own and its path's."""
    item = spec["paths"][path]
    return {(parameter["in"], parameter["name"]) for parameter in (
        _resolved(spec, given) for given in [*item.get("parameters", []),
                                             *item[method].get("parameters", [])])}


def _resolved(spec: dict, node: dict) -> dict:
    """`node`, or what its `$ref` refers to in the document."""
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[2:]
        node = spec["components"][kind][name]
    return node


def _field_of(spec: dict, schema: dict, pointer: str) -> bool:
    """Whether the JSON pointer `pointer` ("/id", "/items/0/id") names a field a value of
    `schema` gives."""
    for token in pointer.split("/")[1:]:
        schema = _resolved(spec, schema)
        if token in schema.get("properties", {}):
            schema = schema["properties"][token]
        elif token.isdigit() and schema.get("type") == "array":
            schema = schema["items"]
        else:
            return False
    return pointer.startswith("/")


def link_followed(client, spec: dict, link: dict, answer, body=None, **kwargs):
    """The operation `link` leads to asked of `client`, each parameter the link gives read from
    `answer` (an answer of the response that gives it), with `body`; `kwargs` go to the client (a
    service's: signed_as=)."""
    method, path = operation_of(spec, link["operationId"])
    given = {parameter.rpartition(".")[2]: _pointed_at(
        answer.get_json(), expression.removeprefix(RESPONSE_BODY_FIELD))
        for parameter, expression in link.get("parameters", {}).items()}
    in_path = {name: value for name, value in given.items() if f"{{{name}}}" in path}
    return client.open(path.format(**in_path), method=method.upper(), json=body,
                       query_string={name: value for name, value in given.items()
                                     if name not in in_path}, **kwargs)


def _pointed_at(value, pointer: str):
    """What the JSON pointer `pointer` names in `value`."""
    for token in pointer.split("/")[1:]:
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value


# Values a client may be given for a path parameter (user text, or nothing), that name nothing: a
# slash in them, once encoded (%2F), is decoded by the server before any route sees the path
# (shared/path_parameters.py), and an empty one leaves the path ending in its slash.
PATH_PARAMETER_TEXTS = ("", "a/b", "/", "a/", "../x", "a?b#c", "a b", "\n")
_PATH_PARAMETER = re.compile(r"\{[^{}]+\}")


def path_parameters(spec: dict, method: str, path: str) -> set[str]:
    """The names of the path parameters the operation `method path` takes."""
    return {name for place, name in _parameters_taken(spec, method, path) if place == "path"}


def with_each_path_parameter(path: str, value: str) -> str:
    """`path`, a document's, with `value` for each of its parameters, as a client generated from
    the document sends it: percent-encoded whole (OpenAPI's `simple` style), a slash too."""
    return _PATH_PARAMETER.sub(lambda _match: quote(value, safe=""), path)


def asked(client, method: str, path: str, body=None, headers=None, **kwargs):
    """The operation `method path` (as documented) asked of `client`, its order id a new one."""
    return client.open(path.format(order_id=uuid.uuid4()), method=method.upper(), json=body,
                       headers=headers or {}, **kwargs)


def with_a_body_in_chunks(client, method: str, path: str, headers: dict | None = None,
                          **kwargs):
    """The operation `method path` asked with a JSON body over the size limit sent in chunks: no
    Content-Length, its stream ending where the body does (as gunicorn hands such a body over).
    `kwargs` go to the client (a service's: signed_as=)."""
    body = b'{"description": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
    return client.open(path.format(order_id=uuid.uuid4()), method=method.upper(),
                       input_stream=io.BytesIO(body),
                       environ_overrides={"wsgi.input_terminated": True},
                       headers={**(headers or {}), "Content-Type": "application/json",
                                "Transfer-Encoding": "chunked"}, **kwargs)
