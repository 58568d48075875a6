"""The OpenAPI document each app serves, as a client reads it: valid OpenAPI 3.0, and what it says
of what every app serves alike (`GET /health`, the `X-Request-ID` of every request) as the app
answers; and the Swagger UI each app serves it with."""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import re
import uuid
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from openapi_schema_validator import OAS30Validator
from openapi_schema_validator import validate as validate_value
from openapi_spec_validator import OpenAPIV30SpecValidator, validate
from werkzeug.http import http_date, parse_date
from werkzeug.serving import make_server

import gateway_app
import orders_app
import payments_app
from devstack.infra import free_port
from shared.app_closing import close_app
from shared.documented_errors import INVALID_DEADLINE
from shared.errors import ApiError
from shared.idempotency import IDEMPOTENCY_HEADER, checked_idempotency_key
from shared.request_context import REQUEST_ID_HEADER
from shared.swagger_ui import PAGE_FILES
from tests.openapi_tools import (HEALTH, PATH_PARAMETER_TEXTS, assert_answered_as_documented,
                                 assert_documented, documented_answers, link_faults,
                                 link_followed, links, operations, path_parameters,
                                 unused_components, with_a_body_in_chunks,
                                 with_each_path_parameter)

# Where every app serves its document (and its Swagger UI reads it), and its Swagger UI.
DOCUMENT_URL = "/docs/openapi.json"
SWAGGER_UI_URL = {"orders": "/docs/swagger-ui", "payments": "/docs/swagger-ui", "gateway": "/docs"}
SWAGGER_UI_FILES = "/docs/swagger-ui-assets"
README = Path(__file__).resolve().parents[2] / "README.md"
# How README names an error a client gets: its status, then its code ("409 ACCOUNT_EXISTS", or
# with the code in backticks), a line break between them at most.
README_ERROR = re.compile(r"\b([45][0-9]{2})\s+`?([A-Z][A-Z_]+[A-Z])\b")
# How each document's `default` response names the errors any request can get: "`CODE` (status".
DEFAULT_ERROR = re.compile(r"`([A-Z][A-Z_]+[A-Z])` \(([0-9]{3})")


@pytest.fixture(scope="module")
def apps(orders_flask_app, payments_flask_app, settings):
    gateway = gateway_app.create_app(settings=settings)
    yield {"orders": orders_flask_app, "payments": payments_flask_app, "gateway": gateway}
    close_app(gateway)  # (a module's: see tests/conftest.py's apps_made_are_closed)


def _reaching_nothing(service: str, settings):
    """`service`'s app with its database, Redis and the broker all unreachable."""
    package = {"orders": orders_app, "payments": payments_app, "gateway": gateway_app}[service]
    return package.create_app(settings=dataclasses.replace(
        settings, redis_url=f"redis://127.0.0.1:{free_port()}/0",
        kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
        **{f"{service}_database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"}))


def _served_document(app) -> dict:
    answer = app.test_client().get(DOCUMENT_URL)
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    return answer.get_json()


def test_each_app_serves_a_valid_openapi_3_0_document(apps):
    for service, app in apps.items():
        document = _served_document(app)
        assert document["openapi"].startswith("3.0."), service
        validate(document, cls=OpenAPIV30SpecValidator)  # (raises, saying what is wrong)


def test_no_document_gives_a_component_no_operation_uses(apps):
    """(flask-smorest's PaginationMetadata was in all three: shared.app.ShopApi.)"""
    for service, app in apps.items():
        assert unused_components(_served_document(app)) == set(), service


# The links each document gives (shared/operation_links.py): from which operation's answer (its
# operationId and status) to which operation.
LINKED = {
    "orders": {("place_order", "202", "get_order"), ("list_orders", "200", "list_orders")},
    "payments": {("open_account", "201", "deposit"), ("open_account", "201", "balance")},
    "gateway": {("place_order", "202", "get_order"), ("list_orders", "200", "list_orders"),
                ("open_account", "201", "deposit"), ("open_account", "201", "balance"),
                ("newest_notification", "200", "notifications_socket"),
                ("newest_notification", "200", "list_notifications"),
                ("socket_ticket", "201", "notifications_socket")},
}


def test_each_document_links_answers_to_operations_by_a_parameter_and_field_that_exist(apps):
    """A response's field that another operation takes (a placed order's `id`, the `order_id` of
    GET /orders/{order_id}) is linked to it: each link names an operation of the document by its
    operationId, parameters that operation takes, each given a field of the answer."""
    for service, app in apps.items():
        document = _served_document(app)
        assert link_faults(document) == [], service
        assert {(document["paths"][path][method]["operationId"], status, link["operationId"])
                for method, path, status, _, link in links(document)} == LINKED[service], service


# Each document's operations and the operationId each is named by, its view's name: a contract
# (a generated client's method names, Swagger UI's deep links, /docs#/shop/place_order), changed
# only as README says.
OPERATION_IDS = {
    "orders": {("get", "/health", "health"), ("post", "/orders", "place_order"),
               ("get", "/orders", "list_orders"), ("get", "/orders/{order_id}", "get_order")},
    "payments": {("post", "/accounts", "open_account"), ("get", "/accounts/balance", "balance"),
                 ("post", "/accounts/deposit", "deposit"), ("get", "/health", "health")},
    "gateway": {("post", "/api/accounts", "open_account"),
                ("get", "/api/accounts/balance", "balance"),
                ("post", "/api/accounts/deposit", "deposit"),
                ("post", "/api/auth/login", "login"), ("post", "/api/auth/logout", "logout"),
                ("post", "/api/auth/logout/everywhere", "logout_everywhere"),
                ("post", "/api/auth/register", "register"),
                ("get", "/api/notifications", "list_notifications"),
                ("get", "/api/notifications/newest", "newest_notification"),
                ("post", "/api/notifications/tickets", "socket_ticket"),
                ("get", "/api/notifications/ws", "notifications_socket"),
                ("post", "/api/orders", "place_order"), ("get", "/api/orders", "list_orders"),
                ("get", "/api/orders/{order_id}", "get_order"), ("get", "/health", "health")},
}


def test_the_notifications_list_says_how_to_page_through_it(apps):
    """`GET /api/notifications` pages by `after` (the last id seen), `limit` at a time, and its
    answer holds no cursor: its operation said only "oldest first", no description at all."""
    from gateway_app.notifications import REPLAY_LIMIT

    operation = _served_document(apps["gateway"])["paths"]["/api/notifications"]["get"]
    description = operation["description"]
    assert f"1–{REPLAY_LIMIT}, 100 unless given" in description
    assert "with `after` the last one's `id`" in description
    limit = next(p for p in operation["parameters"] if p["name"] == "limit")["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, REPLAY_LIMIT, 100)


def test_every_notification_id_is_documented_as_the_64_bit_integer_the_table_keeps(apps):
    """A notification's id is a bigint (gateway_app/models.py): documented as a bare `integer`,
    which a client generated from the document may read as 32 bits, an id past 2**31 broke it.
    Each place an id is given or taken: `after` of the list and of the socket, the newest's `id`,
    each notification's `id`."""
    document = _served_document(apps["gateway"])
    schemas = document["components"]["schemas"]
    notifications = [reference["$ref"].rsplit("/", 1)[1]
                     for reference in schemas["Notification"]["oneOf"]]
    ids = {
        "list's after": _parameter(document, "/api/notifications", "after")["schema"],
        "socket's after": _parameter(document, "/api/notifications/ws", "after")["schema"],
        "NewestNotification's id": schemas["NewestNotification"]["properties"]["id"],
        **{f"{name}'s id": schemas[name]["properties"]["id"] for name in notifications},
    }
    assert notifications
    assert {where: (schema["type"], schema.get("format")) for where, schema in ids.items()} == {
        where: ("integer", "int64") for where in ids}


def _parameter(document: dict, path: str, name: str) -> dict:
    return next(parameter for parameter in document["paths"][path]["get"]["parameters"]
                if parameter["name"] == name)


def test_each_documents_operations_are_named_as_the_contract_has_them(apps):
    """Every operation of each document, by method and path, with the operationId it is named by
    (its view's name), no more and no other."""
    for service, app in apps.items():
        document = _served_document(app)
        assert {(method, path, document["paths"][path][method]["operationId"])
                for method, path in operations(document)} == OPERATION_IDS[service], service


def test_a_link_is_at_fault_once_its_operation_parameter_or_field_is_gone(apps):
    """(So that no link can outlive what it names.)"""
    document = _served_document(apps["orders"])
    placed = document["paths"]["/orders"]["post"]["responses"]["202"]["links"]
    sound = placed["GetOrder"]
    for rotten, fault in (
            ({**sound, "operationId": "read_order"}, "no operation 'read_order'"),
            ({**sound, "parameters": {"id": "$response.body#/id"}}, "takes no 'id'"),
            ({**sound, "parameters": {"query.order_id": "$response.body#/id"}},
             "takes no 'query.order_id'"),
            ({**sound, "parameters": {"order_id": "$response.body#/order_id"}},
             "'$response.body#/order_id' names no field"),
            ({**sound, "parameters": {"order_id": "$response.body#/id/0"}},
             "'$response.body#/id/0' names no field"),
            ({**sound, "parameters": {"order_id": "$request.body#/id"}},
             "'$request.body#/id' names no field")):
        placed["GetOrder"] = rotten
        assert [fault in found for found in link_faults(document)] == [True], rotten
    placed["GetOrder"] = {**sound, "parameters": {"path.order_id": "$response.body#/id"}}
    assert link_faults(document) == []


def test_a_services_links_lead_where_they_say(apps):
    """Each link of a service's document followed from an answer of its operation: the order
    placed is read by its id, the next page of orders is the one after, and the account opened is
    topped up and read."""
    user = {"signed_as": f"user-{uuid.uuid4().hex[:10]}"}
    orders, document = apps["orders"].test_client(), _served_document(apps["orders"])
    placed = [orders.post("/orders", json=BODIES["PlaceOrder"](), **user) for _ in range(2)]
    assert [answer.status_code for answer in placed] == [202, 202]
    link = document["paths"]["/orders"]["post"]["responses"]["202"]["links"]["GetOrder"]
    read = link_followed(orders, document, link, placed[1], **user)
    assert (read.status_code, read.get_json()) == (200, placed[1].get_json())
    first_page = orders.get("/orders?limit=1", **user)
    link = document["paths"]["/orders"]["get"]["responses"]["200"]["links"]["NextPage"]
    next_page = link_followed(orders, document, link, first_page, **user)
    assert next_page.status_code == 200
    assert [order["id"] for order in next_page.get_json()["items"]] == [placed[0].get_json()["id"]]
    payments, document = apps["payments"].test_client(), _served_document(apps["payments"])
    opened = payments.post("/accounts", **user)
    assert opened.status_code == 201
    opened_links = document["paths"]["/accounts"]["post"]["responses"]["201"]["links"]
    topped_up = link_followed(payments, document, opened_links["Deposit"], opened,
                              body=BODIES["Deposit"](), **user)
    balance = link_followed(payments, document, opened_links["GetBalance"], opened, **user)
    assert (topped_up.status_code, balance.status_code) == (200, 200)
    assert balance.get_json() == {"user_id": user["signed_as"], "balance": "1.00"}


def test_every_path_parameter_of_any_text_is_answered_as_its_operation_documents(apps):
    """A path parameter as a client may send it (shared/path_parameters.py): an id built from
    user text with a slash in it (`a%2Fb`, which the server decodes before routing), or none
    (`/api/orders/`), is its operation's, and answered with an error the operation documents (a
    404 ORDER_NOT_FOUND): it was Werkzeug's 404 NOT_FOUND, a code no such operation documents,
    and unknown to a client generated from the document. Each app's, signed in as a user."""
    session = apps["gateway"].test_client().post("/api/auth/register", json={
        "username": f"paths-{uuid.uuid4().hex[:8]}", "password": "long password"}).get_json()
    as_a_user = {"gateway": {"headers": {"Authorization": f"Bearer {session['access_token']}"}},
                 "orders": {"signed_as": session["user_id"]},
                 "payments": {"signed_as": session["user_id"]}}
    asked = set()
    for service, app in apps.items():
        document, client = _served_document(app), app.test_client()
        for method, path in operations(document):
            if not path_parameters(document, method, path):
                continue
            for text in PATH_PARAMETER_TEXTS:
                answer = client.open(with_each_path_parameter(path, text), method=method.upper(),
                                     **as_a_user[service])
                assert_documented(document, method, path, answer)
                asked.add((service, method, path, answer.status_code))
    assert asked == {("gateway", "get", "/api/orders/{order_id}", 404),
                     ("orders", "get", "/orders/{order_id}", 404)}


def test_every_app_answers_health_as_its_document_says(apps, settings):
    """GET /health asked of each app, without credentials: with all it checks reachable, with
    nothing reachable, and with a body over the size limit. Each answer is one the document
    gives, its body holding to the schema given for its status (every field and check named,
    with a value it names), and the document gives no status it was not seen to answer."""
    method, path = HEALTH
    for service, app in apps.items():
        document = _served_document(app)
        assert document["paths"][path][method]["security"] == [], service  # public
        healthy = app.test_client().get(path)
        degraded = _reaching_nothing(service, settings).test_client().get(path)
        too_large = with_a_body_in_chunks(app.test_client(), method, path)
        assert (healthy.status_code, degraded.status_code) == (200, 503), service
        assert set(degraded.get_json()["checks"].values()) == {"unreachable"}, service
        seen = {assert_answered_as_documented(document, method, path, answer)
                for answer in (healthy, degraded, too_large)}
        assert_documented(document, method, path, too_large)  # (its code named)
        assert seen == {int(status) for status in document["paths"][path][method]["responses"]
                        if status != "default"}, service


def _answered_as_a_page_of_the_shop(answer) -> bool:
    """Whether `answer` comes with the headers of the shop's web page (gateway_app/web.py): only
    the origin's own files run and are reached, no site may frame it, no type is sniffed."""
    policy = answer.headers.get("Content-Security-Policy", "")
    return ("default-src 'self'" in policy and "frame-ancestors 'none'" in policy
            and "'unsafe-inline'" not in policy and answer.headers.get("X-Frame-Options") == "DENY"
            and answer.headers.get("X-Content-Type-Options") == "nosniff")


def test_each_app_serves_swagger_ui_with_the_files_it_loads_alone_none_to_be_framed(apps):
    """The page (no inline script), each file it loads and the document it reads come with the
    shop's page headers; the rest of the vendor's folder is a 404: its stock index.html loaded
    and rendered https://petstore.swagger.io/v2/swagger.json on the app's origin. (The page works
    under its policy: tests/e2e/test_web_page.py, in Chromium.)"""
    for service, app in apps.items():
        client = app.test_client()
        page = client.get(SWAGGER_UI_URL[service])
        assert page.status_code == 200 and _answered_as_a_page_of_the_shop(page), service
        html = page.get_data(as_text=True)
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], service  # none inline
        loaded = re.findall(r'(?:src|href)="(/[^"]*)"', html)
        assert f"{SWAGGER_UI_FILES}/swagger-ui-bundle.js" in loaded, service
        for url in (*loaded, DOCUMENT_URL):
            answer = client.get(url)
            assert answer.status_code == 200, (service, url)
            assert _answered_as_a_page_of_the_shop(answer), (service, url)
        for unused in ("index.html", "swagger-initializer.js", "oauth2-redirect.html",
                       "swagger-ui.js", "swagger-ui-bundle.js.map", "favicon-32x32.png",
                       "nested/index.html"):
            answer = client.get(f"{SWAGGER_UI_FILES}/{unused}")
            assert answer.status_code == 404, (service, unused)
            assert answer.get_json()["error"]["code"] == "NOT_FOUND", (service, unused)


def _response(document: dict, response: dict) -> dict:
    """A response of the document, a reference to one of its components read there."""
    reference = response.get("$ref")
    return document["components"]["responses"][reference.rpartition("/")[2]] if reference \
        else response


def test_every_path_and_response_of_each_document_gives_the_request_id(apps):
    """X-Request-ID, which every app reads (kept when sane, else replaced) and every answer of
    its carries, is given once among each document's components, as a parameter and as a header,
    and referred to by every path and by every response but a WebSocket's 101 (answered by the
    socket's own code, without it). The header's schema holds for an id kept and for one made."""
    parameter_ref = {"$ref": "#/components/parameters/REQUEST_ID"}
    header_ref = {"$ref": "#/components/headers/REQUEST_ID"}
    for service, app in apps.items():
        document = _served_document(app)
        parameter = document["components"]["parameters"]["REQUEST_ID"]
        assert (parameter["name"], parameter["in"], parameter["required"]) == (
            REQUEST_ID_HEADER, "header", False), service
        for path, item in document["paths"].items():
            assert parameter_ref in item["parameters"], (service, path)
            for method, operation in item.items():
                for status, response in (operation["responses"].items()
                                         if method != "parameters" else ()):
                    headers = _response(document, response).get("headers", {})
                    assert headers.get(REQUEST_ID_HEADER) == (
                        None if status.startswith("1") else header_ref), (service, path, status)
        header = document["components"]["headers"]["REQUEST_ID"]
        for sent in ("kept-1234.5:6", "not kept: a space"):
            answer = app.test_client().get("/health", headers={REQUEST_ID_HEADER: sent})
            given = answer.headers[REQUEST_ID_HEADER]
            assert (given == sent) is (" " not in sent), (service, sent, given)
            validate_value(given, header["schema"], cls=OAS30Validator)


def _component_schemas_answered(document: dict) -> set[str]:
    """The component schemas a success response of the document gives, however deeply."""
    named, to_read = set(), [media["schema"] for item in document["paths"].values()
                             for method, operation in item.items() if method != "parameters"
                             for status, response in operation["responses"].items()
                             if status.startswith("2")
                             for media in response.get("content", {}).values()]
    while to_read:
        schema = to_read.pop()
        reference = schema.get("$ref")
        if reference:
            name = reference.rpartition("/")[2]
            if name not in named:
                named.add(name)
                to_read.append(document["components"]["schemas"][name])
            continue
        to_read += [*schema.get("properties", {}).values(), *schema.get("oneOf", []),
                    *([schema["items"]] if "items" in schema else [])]
    return named


def test_every_schema_of_a_success_answer_requires_every_field_it_gives(apps):
    """Every field of an answer is always sent (null where it may be): a client generated from
    the document need not take each as optional (an Order, an Account, a Session, a
    Notification and the pages of them gave no `required`)."""
    for service, app in apps.items():
        document = _served_document(app)
        answered = _component_schemas_answered(document)
        assert answered, service
        for name in answered:
            schema = document["components"]["schemas"][name]
            if "properties" not in schema:  # (one of others: a Notification, of its type's)
                assert schema["oneOf"], (service, name)
                continue
            assert sorted(schema.get("required", [])) == sorted(schema["properties"]), (
                service, name)


@pytest.fixture(scope="module")
def served(apps):
    """Each app over real HTTP, on a free loopback port."""
    from tests.integration.test_gateway import _Served

    servers = {service: _Served(make_server("127.0.0.1", 0, app, threaded=True))
               for service, app in apps.items()}
    yield servers
    for server in servers.values():
        server.close()


def _over_http(url: str, path: str, method: str = "GET", **headers: str):
    """`method path` asked of the server at `url` with exactly `headers` (http.client adds
    Host, and Accept-Encoding: identity unless told one), the answer's body as it came."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name.replace("_", "-"), value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.headers, answer.read()
    finally:
        connection.close()


def test_swagger_ui_files_go_gzipped_to_a_client_that_takes_gzip_as_they_are_to_one_that_not(
        served, monkeypatch):
    """Each file the page loads, asked over HTTP: gzipped (`Content-Encoding: gzip`, its
    Content-Length the gzipped size) to a client whose Accept-Encoding takes gzip, as it is on
    disk to one that asks for none, refuses gzip or takes only another; `Vary: Accept-Encoding`
    and an ETag of its own form either way, each form's revalidated to a 304 and not the other's,
    a HEAD answered with its GET's length. Compressed once, not for each request (the bundle,
    about a megabyte, went out whole to every browser)."""
    takes_gzip = ("gzip", "gzip, deflate, br", "br;q=1.0, gzip;q=0.5", "*")
    takes_no_gzip = (None, "identity", "gzip;q=0", "br", "deflate, br")
    monkeypatch.setattr(gzip, "compress", None)  # (compressed as the apps were built)
    for service, server in served.items():
        for name in PAGE_FILES:
            path = f"{SWAGGER_UI_FILES}/{name}"
            on_disk = (PAGE_FILES[name] / name).read_bytes()
            forms = {}
            for accepted in (*takes_gzip, *takes_no_gzip):
                headers = {} if accepted is None else {"Accept-Encoding": accepted}
                status, given, body = _over_http(server.url, path, **headers)
                gzipped = accepted in takes_gzip
                assert status == 200, (service, name, accepted)
                assert given.get("Content-Encoding") == ("gzip" if gzipped else None), (
                    service, name, accepted)
                assert (gzip.decompress(body) if gzipped else body) == on_disk, (name, accepted)
                assert int(given["Content-Length"]) == len(body), (service, name, accepted)
                assert "Accept-Encoding" in given["Vary"], (service, name, accepted)
                assert given["Content-Type"].startswith(("text/javascript", "text/css")), name
                assert _answered_as_a_page_of_the_shop(SimpleNamespace(headers=given)), name
                forms.setdefault(gzipped, set()).add((given["ETag"], len(body)))
            (gzipped_form,), (plain_form,) = forms[True], forms[False]  # (one of each)
            assert gzipped_form[0] != plain_form[0], (service, name)
            if name == "swagger-ui-bundle.js":
                assert gzipped_form[1] < len(on_disk) / 2, (service, gzipped_form)
            for accepted, form, status in (("gzip", gzipped_form, 304), ("gzip", plain_form, 200),
                                           ("identity", plain_form, 304),
                                           ("identity", gzipped_form, 200)):
                got, given, body = _over_http(server.url, path, Accept_Encoding=accepted,
                                              If_None_Match=form[0])
                assert (got, len(body)) == (status, 0 if status == 304 else len(body)), (
                    service, name, accepted, form)
                assert given.get("Content-Encoding") == ("gzip" if accepted == "gzip"
                                                         and status == 200 else None)
            got, given, body = _over_http(server.url, path, "HEAD", Accept_Encoding="gzip")
            assert (got, body, int(given["Content-Length"])) == (200, b"", gzipped_form[1])


def test_a_range_of_a_swagger_ui_file_is_sent_only_if_range_names_its_forms_strong_etag(served):
    """A client holding bytes 0-99 of one form resumes with `Range: bytes=100-` and If-Range:
    it is sent the rest (206) only when If-Range is that form's ETag, strong, and the form it
    asks for now is the same; with the other form's ETag, a weak ETag or a date (which both forms
    share: the file's) it is sent the whole form it asks for (200), never the bytes from 100 of a
    form it does not hold (plain bytes 0-99 then gzip from 100: garbage). Without If-Range, the
    range is sent."""
    name = "swagger-ui-bundle.js"
    path = f"{SWAGGER_UI_FILES}/{name}"
    for service, server in served.items():
        _, plain, plain_body = _over_http(server.url, path)
        _, gzipped, gzipped_body = _over_http(server.url, path, Accept_Encoding="gzip")
        forms = {"identity": (plain["ETag"], plain_body), "gzip": (gzipped["ETag"], gzipped_body)}
        for accepted, (etag, body) in forms.items():
            other_etag = forms["gzip" if accepted == "identity" else "identity"][0]
            for if_range, sent in ((None, 206), (etag, 206), (other_etag, 200),
                                   (f"W/{etag}", 200), (f"W/{other_etag}", 200),
                                   (plain["Last-Modified"], 200)):
                headers = {"Accept_Encoding": accepted, "Range": "bytes=100-"}
                if if_range is not None:
                    headers["If_Range"] = if_range
                status, given, got = _over_http(server.url, path, **headers)
                assert (status, got) == (sent, body[100:] if sent == 206 else body), (
                    service, accepted, if_range)
                assert given.get("Content-Encoding") == (
                    "gzip" if accepted == "gzip" else None), (service, accepted, if_range)
                assert given.get("Content-Range") == (
                    f"bytes 100-{len(body) - 1}/{len(body)}" if sent == 206 else None)


def test_a_range_of_the_gateways_page_is_sent_only_if_range_names_its_strong_etag(served):
    """As a Swagger UI file's: with If-Range, a range of `/` or of a file under `/static/` is
    sent (206) only if it is the file's ETag, strong; with a weak one, another ETag or a date the
    whole file (200), where Werkzeug sent the range for a weak ETag and for the file's date. Its
    other conditions are still answered (If-None-Match: 304)."""
    url = served["gateway"].url
    for path in ("/", "/static/app.js"):
        _, given, body = _over_http(url, path)
        etag = given["ETag"]
        for if_range, sent in ((None, 206), (etag, 206), (f"W/{etag}", 200), ('"other"', 200),
                               (given["Last-Modified"], 200)):
            headers = {"Range": "bytes=10-"} | ({} if if_range is None else {"If_Range": if_range})
            status, answered, got = _over_http(url, path, **headers)
            assert (status, got) == (sent, body[10:] if sent == 206 else body), (path, if_range)
            assert answered.get("Content-Range") == (
                f"bytes 10-{len(body) - 1}/{len(body)}" if sent == 206 else None), (path, if_range)
        assert _over_http(url, path, If_None_Match=etag)[0] == 304, path


def test_a_files_if_none_match_and_if_match_are_answered_before_its_range(served):
    """Of each Swagger UI file and of the gateway's page and its files: a Range asked with an
    If-None-Match the file matches is a 304, with an If-Match it does not a 412 (RFC 9110 13.2.2,
    where Werkzeug sent the range, 206), the 412 in the usual error body, not the file; with
    conditions that hold, the range is sent."""
    files = [(service, f"{SWAGGER_UI_FILES}/start-swagger-ui.js") for service in served]
    files += [("gateway", path) for path in ("/", "/static/app.js")]
    for service, path in files:
        url = served[service].url
        _, given, body = _over_http(url, path)
        etag, ranged = given["ETag"], {"Range": "bytes=0-3"}
        assert _over_http(url, path, If_None_Match=etag, **ranged)[0] == 304, (service, path)
        for headers in ({"If_Match": '"other"'}, {"If_Match": '"other"', **ranged}):
            status, _, received = _over_http(url, path, **headers)
            assert status == 412, (service, path, headers)
            assert json.loads(received)["error"]["code"] == "PRECONDITION_FAILED"
        for holding in ({"If_None_Match": '"other"'}, {"If_Match": etag}, {"If_Match": "*"}):
            status, _, received = _over_http(url, path, **holding, **ranged)
            assert (status, received) == (206, body[:4]), (service, path, holding)
            assert _over_http(url, path, **holding)[0] == 200, (service, path, holding)


def test_a_files_conditions_are_answered_in_the_order_rfc_9110_gives_them(served):
    """Of each Swagger UI file and of the gateway's page and its files, a GET's and a HEAD's
    conditions as RFC 9110 13.2.2 orders them: If-Match (strong) or else If-Unmodified-Since, a 412
    in the usual error body if it fails; then If-None-Match (weak) or else If-Modified-Since, a
    304 if it fails. Werkzeug let a matching If-Match overrule If-None-Match and If-Modified-Since
    (a 200), never read If-Unmodified-Since, and read a list of dates or a date in lower case."""
    files = [(service, f"{SWAGGER_UI_FILES}/start-swagger-ui.js") for service in served]
    files += [("gateway", path) for path in ("/", "/static/app.js")]
    for service, path in files:
        url = served[service].url
        _, given, body = _over_http(url, path)
        etag, modified = given["ETag"], given["Last-Modified"]
        earlier = http_date(parse_date(modified) - timedelta(days=1))
        later = http_date(parse_date(modified) + timedelta(days=1))
        for method in ("GET", "HEAD"):
            for headers, status in (
                    ({"If_Match": etag, "If_None_Match": etag}, 304),
                    ({"If_Match": "*", "If_None_Match": f'"other", W/{etag}'}, 304),
                    ({"If_Match": etag, "If_Modified_Since": modified}, 304),
                    ({"If_Match": f'"other", {etag}', "If_Modified_Since": later}, 304),
                    ({"If_Match": '"other"', "If_None_Match": '"other"'}, 412),
                    ({"If_Match": f"W/{etag}"}, 412),
                    ({"If_Match": etag.strip('"')}, 412),  # (an unquoted tag is none)
                    ({"If_Match": ""}, 412),  # (a list of no tag; Werkzeug ignored it)
                    ({"If_Match": '"other"', "If_None_Match": etag}, 412),
                    ({"If_Unmodified_Since": earlier}, 412),
                    ({"If_Unmodified_Since": earlier, "If_None_Match": etag}, 412),
                    ({"If_Unmodified_Since": earlier, "Range": "bytes=0-3"}, 412),
                    ({"If_Unmodified_Since": modified}, 200),
                    ({"If_Unmodified_Since": later, "If_None_Match": etag}, 304),
                    # (ignored with an If-Match, and where it is no HTTP-date)
                    ({"If_Unmodified_Since": earlier, "If_Match": etag}, 200),
                    ({"If_Unmodified_Since": "yesterday"}, 200),
                    ({"If_Unmodified_Since": f"{later}, {earlier}"}, 200),
                    ({"If_Unmodified_Since": earlier.lower()}, 200),
                    ({"If_Modified_Since": modified}, 304),
                    ({"If_Modified_Since": earlier}, 200),
                    ({"If_Modified_Since": f"{modified}, {earlier}"}, 200),
                    ({"If_Modified_Since": modified.lower()}, 200),
                    ({"If_Modified_Since": modified.replace("GMT", "+0000")}, 200),
                    ({"If_None_Match": '"other"', "If_Modified_Since": modified}, 200),
                    ({"If_None_Match": f"W/{etag}"}, 304), ({"If_None_Match": "*"}, 304)):
                got, answered, received = _over_http(url, path, method, **headers)
                assert got == status, (service, path, method, headers)
                if status == 412:
                    assert method == "HEAD" or json.loads(received)["error"]["code"] == (
                        "PRECONDITION_FAILED"), (service, path, headers)
                elif status == 304:
                    assert received == b"", (service, path, method, headers)
                    assert answered["ETag"] == etag and answered["Cache-Control"] == (
                        given["Cache-Control"]) and answered["Date"], (service, path, headers)
                    assert answered.get("Vary") == given.get("Vary"), (service, path, headers)
                    assert not {"Content-Type", "Content-Encoding", "Content-Range",
                                "Last-Modified"} & set(answered), (service, path, headers)
                    assert answered.get("Content-Length") in (None, "0"), (service, path)
                else:
                    assert received == (body if method == "GET" else b""), (service, path)
                    assert int(answered["Content-Length"]) == len(body), (service, path)


def test_a_files_range_is_sent_to_a_get_alone_after_its_conditions(served):
    """Of each Swagger UI file and of the gateway's page: a GET's range is sent when its
    conditions hold (If-Unmodified-Since its date, If-Modified-Since before it), a HEAD's is
    ignored (RFC 9110 14.2: GET is the one method it is defined for), where Werkzeug answered it
    206."""
    files = [(service, f"{SWAGGER_UI_FILES}/start-swagger-ui.js") for service in served]
    files += [("gateway", "/")]
    for service, path in files:
        url = served[service].url
        _, given, body = _over_http(url, path)
        modified = given["Last-Modified"]
        earlier = http_date(parse_date(modified) - timedelta(days=1))
        for headers in ({}, {"If_Unmodified_Since": modified}, {"If_Modified_Since": earlier},
                        {"If_Match": given["ETag"], "If_Unmodified_Since": earlier}):
            got, answered, received = _over_http(url, path, Range="bytes=0-3", **headers)
            assert (got, received, answered["Content-Range"]) == (
                206, body[:4], f"bytes 0-3/{len(body)}"), (service, path, headers)
            got, answered, received = _over_http(url, path, "HEAD", Range="bytes=0-3", **headers)
            assert (got, received, int(answered["Content-Length"])) == (
                200, b"", len(body)), (service, path, headers)
            assert "Content-Range" not in answered, (service, path, headers)


def test_a_range_of_a_page_file_is_answered_as_rfc_9110_asks(served):
    """Of each Swagger UI file and of the gateway's page and its files: a suffix longer than the
    file is the whole file (206, bytes 0-(n-1)/n: RFC 9110 14.1.3), a range unit other than bytes
    is ignored (MUST, 14.2) and so are two ranges or more (MAY; the file has them both), in any
    order: a 200 with the whole file, where Werkzeug answered each 416. A range that starts past
    the end, or that cannot be read, is still a 416, in the usual error body."""
    files = [(service, f"{SWAGGER_UI_FILES}/start-swagger-ui.js") for service in served]
    files += [("gateway", path) for path in ("/", "/static/app.js", "/static/style.css")]
    for service, path in files:
        url = served[service].url
        _, _, body = _over_http(url, path)
        length = len(body)
        for asked, status, sent, content_range in (
                (f"bytes=-{length + 1}", 206, body, f"bytes 0-{length - 1}/{length}"),
                ("bytes=-999999999999", 206, body, f"bytes 0-{length - 1}/{length}"),
                (f"bytes=-{length}", 206, body, f"bytes 0-{length - 1}/{length}"),
                ("bytes=-10", 206, body[-10:], f"bytes {length - 10}-{length - 1}/{length}"),
                ("items=0-9", 200, body, None),
                ("bytes=0-0,2-3", 200, body, None),
                # (those Werkzeug cannot read, out of order or overlapping, alike)
                ("bytes=-5,0-9", 200, body, None), ("bytes=20-,0-9", 200, body, None),
                ("bytes=0-9, 5-7", 200, body, None),
                # (an empty element is none: one range)
                ("bytes=0-0,", 206, body[:1], f"bytes 0-0/{length}"),
                ("bytes=0-9", 206, body[:10], f"bytes 0-9/{length}")):
            got, given, received = _over_http(url, path, Range=asked)
            assert (got, received, given.get("Content-Range")) == (
                status, sent, content_range), (service, path, asked)
        for asked in (f"bytes={length}-", "bytes=5-1"):
            got, given, received = _over_http(url, path, Range=asked)
            assert got == 416, (service, path, asked)
            assert json.loads(received)["error"]["code"] == "REQUESTED_RANGE_NOT_SATISFIABLE"


def test_a_page_file_is_served_at_its_own_name_alone_other_forms_of_it_are_404(served):
    """Over real HTTP: the gateway's page files at `/static/` and every app's Swagger UI files
    at their names alone; a trailing "/" (or a "./", a "x/..") is a 404 in the usual error body,
    as for a file that is not there. `/static/app.js/` sent app.js (Werkzeug's safe_join
    normalises the name it is given), a page whose relative links resolved below it."""
    asked = [("gateway", "/static", name) for name in ("app.js", "style.css", "index.html")]
    asked += [(service, SWAGGER_UI_FILES, name) for service in served for name in PAGE_FILES]
    for service, folder, name in asked:
        url = served[service].url
        assert _over_http(url, f"{folder}/{name}")[0] == 200, (service, name)
        for other in (f"{folder}/{name}/", f"{folder}/./{name}", f"{folder}/x/../{name}",
                      f"{folder}/{name}/."):
            status, headers, body = _over_http(url, other)
            assert (status, headers["Content-Type"]) == (404, "application/json"), (service,
                                                                                   other)
            assert json.loads(body)["error"]["code"] == "NOT_FOUND", (service, other)
    for service, page in SWAGGER_UI_URL.items():
        for other in (f"{page}/", f"{DOCUMENT_URL}/"):
            status, headers, body = _over_http(served[service].url, other)
            assert (status, json.loads(body)["error"]["code"]) == (404, "NOT_FOUND"), (service,
                                                                                     other)


def test_a_services_swagger_ui_tries_nothing_out_and_its_document_sends_people_to_the_gateway(
        apps):
    """A service's operations (but /health) take only calls the gateway signs: asked as its
    Swagger UI asks them, with the X-User-ID its Authorize button takes, each is refused 401.
    So its page offers no "Try it out" (supportedSubmitMethods: [], start-swagger-ui.js), and
    its document says so and where the public API is; the gateway's page tries its own out.
    (Swagger UI showing no button: tests/e2e/test_web_page.py.)"""
    for service, app in apps.items():
        client = app.test_client()
        document = _served_document(app)
        page = client.get(SWAGGER_UI_URL[service]).get_data(as_text=True)
        tries_out = service == "gateway"
        assert f'data-try-it-out="{"true" if tries_out else "false"}"' in page, service
        if tries_out:
            continue
        description = document["info"]["description"]
        assert "gateway's `/docs`" in description and "401" in description, service
        for method, path in operations(document) - {HEALTH}:
            answer = client.open(path.format(order_id=uuid.uuid4()), method=method.upper(),
                                 headers={"X-User-ID": "user-1"}, json={})
            assert (answer.status_code, answer.get_json()["error"]["code"]) == (
                401, "UNTRUSTED_IDENTITY"), (service, method, path)
    starts = apps["orders"].test_client().get(f"{SWAGGER_UI_FILES}/start-swagger-ui.js")
    assert "supportedSubmitMethods = []" in starts.get_data(as_text=True)


# A body each operation that takes one takes, by its schema's name in the documents.
BODIES = {"PlaceOrder": lambda: {"amount": "1.00"}, "Deposit": lambda: {"amount": "1.00"},
          "Empty": dict, "Credentials": lambda: {"username": f"user-{uuid.uuid4().hex[:10]}",
                                                 "password": "long password"}}
BODIES["SignInCredentials"] = BODIES["Credentials"]
UNPAIRED, PAIRED = "\ud800", "\ud83d\ude00"  # (a high surrogate alone; U+1F600 as JSON pairs it)


def _signed_in_as_each_app_takes_it(service: str, app) -> dict:
    """The test client's arguments for a signed-in user's request to `service`'s app: the
    gateway's bearer token, or the identity the gateway signs for a service's (signed for each
    request: tests/signed_requests.py)."""
    if service != "gateway":
        return {"signed_as": f"user-{uuid.uuid4().hex[:10]}"}
    signed_up = app.test_client().post("/api/auth/register", json=BODIES["Credentials"]())
    return {"headers": {"Authorization": f"Bearer {signed_up.get_json()['access_token']}"}}


def test_text_whose_schema_lets_an_unpaired_surrogate_through_says_it_is_refused_and_is(
        apps, settings):
    """Each string field of a request body whose schema lets a lone UTF-16 surrogate through (no
    pattern can refuse it without refusing the pairs, as ECMA-262 and Python read one) says in
    its description that it is refused, and it is, asked with the JSON escape `\\ud800` alone:
    422 VALIDATION_ERROR naming the field; the same text with a pair (an emoji) is not refused
    for it."""
    described = set()
    for service, app in apps.items():
        document = _served_document(app)
        components = document["components"]
        signed_in = _signed_in_as_each_app_takes_it(service, app)
        for method, path in sorted(operations(document)):
            operation = document["paths"][path][method]
            if "requestBody" not in operation:
                continue
            name = operation["requestBody"]["content"]["application/json"]["schema"][
                "$ref"].rpartition("/")[2]
            for field, schema in components["schemas"][name].get("properties", {}).items():
                text = BODIES[name]().get(field) or "x" * schema.get("minLength", 0)
                if not OAS30Validator({**schema, "components": components}).is_valid(
                        text + UNPAIRED):
                    continue
                described.add((service, name, field))
                assert "unpaired UTF-16 surrogate" in schema.get("description", ""), (
                    service, name, field)
                for written, refused in ((text + UNPAIRED, True), (text + PAIRED, False)):
                    body = json.dumps({**BODIES[name](), field: written})  # (\\u escapes)
                    answer = app.test_client().open(path, method=method.upper(), data=body,
                                                    content_type="application/json",
                                                    **signed_in)
                    error = (answer.get_json() or {}).get("error", {})
                    assert (answer.status_code == 422 and error["code"] == "VALIDATION_ERROR"
                            and field in error["details"]["json"]) is refused, (
                        service, path, field, written, answer.get_json())
    assert described >= {("gateway", "PlaceOrder", "description"),
                         ("gateway", "Credentials", "password"),
                         ("gateway", "SignInCredentials", "password"),
                         ("orders", "PlaceOrder", "description")}


def _request_body_schema(document: dict, path: str) -> dict:
    """The schema of the JSON body POST `path` takes, as a validator reads it, $refs and all."""
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"][
        "schema"]
    return {**schema, "components": document["components"]}


def test_passwords_the_gateway_takes_are_valid_by_its_document(apps):
    """A password is 8 to 128 characters of its NFKC form: the document states no minLength or
    maxLength, which count it as sent, so that what the gateway takes is valid by it (U+FDFA, one
    character, 18 in NFKC; "e\\u0301" * 100, 200 as sent, 100 in NFKC)."""
    gateway = apps["gateway"]
    document, client = _served_document(gateway), gateway.test_client()
    for schema in ("Credentials", "SignInCredentials"):
        password = document["components"]["schemas"][schema]["properties"]["password"]
        assert not {"minLength", "maxLength"} & set(password), schema
        assert "NFKC" in password["description"], schema
    for password in ("\ufdfa", "e\u0301" * 100):
        body = {"username": f"user-{uuid.uuid4().hex[:10]}", "password": password}
        for path, taken in (("/api/auth/register", 201), ("/api/auth/login", 200)):
            answer = client.post(path, json=body)
            assert answer.status_code == taken, (path, password, answer.get_json())
            assert OAS30Validator(_request_body_schema(document, path)).is_valid(body), (
                path, len(password))


# Keys to ask a document's Idempotency-Key of: an empty one, all spaces, padded with spaces or tabs
# (stripped), a comma (a repeat joined), a tab or a character other than printable ASCII inside,
# and 255 and 256 characters, padded and not. (No "k\n": Python's `$` matches before a final
# newline, where ECMA-262's, which the document's pattern is written in, does not.)
KEYS_TO_ASK = ("", " ", "  ", "\t", " \t ", "k", " k ", "\tk", "k\t", "a b", "a,b", "a\tb",
               "caf\u00e9", "x" * 255, " " + "x" * 255 + "\t", "x" * 256, " " + "x" * 256)


def _taken_as_a_key(key: str) -> bool:
    try:
        checked_idempotency_key(key)
    except ApiError:
        return False
    return True


def test_the_idempotency_key_each_document_gives_is_the_one_the_shop_takes(apps):
    """The Idempotency-Key's schema on each operation that honours it is valid for the keys the
    shop takes (over either transport: shared.idempotency.checked_idempotency_key) and for no
    other: `" "` was valid by it and refused 400 INVALID_IDEMPOTENCY_KEY, `"\\tk"` (the key
    `k`, its tab stripped) and 255 characters padded with a space refused by it and taken."""
    documented = set()
    for service, app in apps.items():
        document = _served_document(app)
        for method, path in operations(document):
            for parameter in document["paths"][path][method].get("parameters", []):
                if (parameter.get("in"), parameter.get("name")) != ("header", IDEMPOTENCY_HEADER):
                    continue
                documented.add((service, method, path))
                validator = OAS30Validator(parameter["schema"])
                for key in KEYS_TO_ASK:
                    assert validator.is_valid(key) is _taken_as_a_key(key), (service, path, key)
    assert documented == {("gateway", "post", "/api/orders"),
                          ("gateway", "post", "/api/accounts/deposit"),
                          ("orders", "post", "/orders"), ("payments", "post", "/accounts/deposit")}


def test_every_error_readme_names_is_given_with_its_status_by_an_apps_document(apps):
    """What README tells a client it may be answered (a status and its error code) is what an
    operation of the gateway's or a service's document says it answers, or what every operation
    may (its `default`): a code renamed, or moved to another status, in the code alone fails here,
    not in a client's hands."""
    documented = set()
    for app in apps.values():
        document = _served_document(app)
        for method, path in operations(document):
            documented |= documented_answers(document, method, path)
        default = document["components"]["responses"]["DEFAULT_ERROR"]["description"]
        documented |= {(int(status), code) for code, status in DEFAULT_ERROR.findall(default)}
    named = {(int(status), code)
             for status, code in README_ERROR.findall(README.read_text())}
    assert len(named) > 20  # (README's own form of them, still read)
    assert named - documented == set()


def test_every_4xx_a_services_operation_documents_the_gateways_operation_documents_too(apps):
    """The gateway relays a service's 4xx only if its own operation documents the error's code
    under its status (gateway_app/upstream_answers.py: any other is a 502), so each 4xx a
    service's operation documents is documented by the gateway's operation that calls it (the
    same path under /api), but for those the gateway answers for itself: a 401 (the identity it
    signed refused) and a 400 INVALID_DEADLINE (the deadline it signed). One left out, a refusal
    of the client's (ACCOUNT_NOT_FOUND, say) would reach it as a 502."""
    gateway = _served_document(apps["gateway"])
    called = set()
    for service in ("orders", "payments"):
        document = _served_document(apps[service])
        for method, path in operations(document) - {HEALTH}:
            relayed = {(status, code) for status, code in documented_answers(document, method, path)
                       if 400 <= status < 500 and status != 401 and code != INVALID_DEADLINE.code}
            assert relayed, (service, method, path)
            assert relayed - documented_answers(gateway, method, f"/api{path}") == set(), (
                service, method, path)
            called.add((method, f"/api{path}"))
    assert called == {("post", "/api/orders"), ("get", "/api/orders"),
                      ("get", "/api/orders/{order_id}"), ("post", "/api/accounts"),
                      ("post", "/api/accounts/deposit"), ("get", "/api/accounts/balance")}
