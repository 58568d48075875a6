"""Intake floors: the bare baseline's work (`bench.baseline.write_order`) served under each layer
of the stack the orders API is built on, by gunicorn as the API is, so that the intake report shows
what each layer costs before any of the shop's own work per request. Between the last floor and
the API lies only that work: the gateway's signature checked, the request id bound, echoed and
logged, the query looked at (none taken), the idempotency key looked at, the user's placing lock
taken (in the order INSERT's round trip), the event checked against its contract, the cached order
lists invalidated.

Each floor adds one layer to the one before it:
1. Flask: its routing, request and response; raw psycopg2 connections, one per thread, as the
   baseline's.
2. + Flask-SQLAlchemy as the shop uses it (`shared.db`): a pooled session, `transaction()`, the
   statements on its `driver_cursor`.
3. + flask-smorest and marshmallow as the shop uses them (`shared.http_api.Blueprint`): the body
   parsed and validated with the API's `PlaceOrderSchema`, the answer dumped with `OrderSchema`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from flask import Flask, jsonify, request
from flask_smorest import Api

from bench.baseline import WrittenOrder, thread_connection, write_order
from orders_app.schemas import OrderSchema, PlaceOrderSchema
from shared.config import get_settings
from shared.db import driver_cursor, init_database, transaction
from shared.http_api import Blueprint


@dataclass(frozen=True)
class Floor:
    process_name: str
    adds: str
    app: str  # what gunicorn serves


FLOORS = (
    Floor("floor-flask", "Flask", "bench.floors:flask_app()"),
    Floor("floor-flask-sqlalchemy", "+ Flask-SQLAlchemy (shared.db)",
          "bench.floors:flask_sqlalchemy_app()"),
    Floor("floor-flask-smorest", "+ flask-smorest, marshmallow (the API's schemas)",
          "bench.floors:flask_smorest_app()"),
)


def flask_app() -> Flask:
    settings = get_settings()
    topic = settings.topic_payment_requested
    connection = thread_connection(settings.orders_database_url)
    app = Flask("floor-flask")

    @app.post("/orders")
    def place_order():
        body = request.get_json()
        with connection() as conn, conn.cursor() as cursor:  # one transaction, committed on exit
            order = write_order(cursor, topic, request.headers.get("X-User-ID", ""),
                                Decimal(body["amount"]), body.get("description", ""))
        return jsonify(order.body()), 202

    return app


def flask_sqlalchemy_app() -> Flask:
    app = _app_with_database("floor-flask-sqlalchemy")

    @app.post("/orders")
    def place_order():
        body = request.get_json()
        order = _write_order_in_transaction(Decimal(body["amount"]), body.get("description", ""))
        return jsonify(order.body()), 202

    return app


def flask_smorest_app() -> Flask:
    app = _app_with_database("floor-flask-smorest")
    app.config.update(API_TITLE="floor", API_VERSION="1", OPENAPI_VERSION="3.0.3")
    blueprint = Blueprint("orders", __name__, url_prefix="/orders")
    order_schema = OrderSchema()

    @blueprint.post("")
    @blueprint.arguments(PlaceOrderSchema)
    @blueprint.response(202, OrderSchema)
    def place_order(args):
        order = _write_order_in_transaction(args["amount"], args["description"])
        return jsonify(order_schema.dump(vars(order) | {
            "status": "NEW", "reason": None, "updated_at": order.created_at})), 202

    Api(app).register_blueprint(blueprint)
    return app


def _app_with_database(name: str) -> Flask:
    """A Flask app with the shop's database extension set up as the API's (shared.app)."""
    app = Flask(name)
    app.config["SQLALCHEMY_DATABASE_URI"] = get_settings().database_url("orders")
    init_database(app)
    return app


def _write_order_in_transaction(amount: Decimal, description: str) -> WrittenOrder:
    """The baseline's work for the caller of this request, on the shop's session and cursor."""
    with transaction() as session, driver_cursor(session) as cursor:
        return write_order(cursor, get_settings().topic_payment_requested,
                           request.headers.get("X-User-ID", ""), amount, description)
