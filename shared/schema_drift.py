"""What a service's migrated database has that its models do not declare, or lacks that they do:
Alembic's autogenerate comparison of the database with the service's models (shared/'s included),
each difference said in words. It compares tables, columns (types, nullability), indexes (columns,
expressions, uniqueness), unique constraints and foreign keys; not server defaults, CHECK
constraints, nor an index's WHERE or INCLUDE (a revision, or a step of shared/migration_steps.py it
runs, edited to change only those is caught by the revision pins, shared/revision_pins.py, not
here). An index's expressions are compared as written, their letters' case and quoted text
included (`index_expression_drift`): Alembic's own comparison lowers both sides, and takes
`translate(username, 'abc', 'ABC')` for the gateway's username key (`translate(username, 'ABC',
'abc')`). Nothing, when the database is as this release's revisions left it
(tests/integration/test_migrations.py checks that they and the models agree); `upgrade` checks it
at the head (shared.migrations), where a database migrated by a revision edited since records the
same revision and has another schema."""

from __future__ import annotations

import importlib
import re

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.config import SERVICES_KEEPING_IDEMPOTENCY_KEYS
from shared.db import db

# The modules of shared/ that declare tables every service's database has (the idempotency keys'
# only for a service that keeps them).
SHARED_MODELS = ("shared.outbox.writing", "shared.inbox.model", "shared.idempotency")


def schema_drift(service: str, connection: sa.Connection) -> list:
    """What Alembic finds to change in the service's database (on `connection`) to make it as the
    service's models declare it (its own models' tables and shared/'s, but the idempotency keys'
    for a service that keeps none; column types compared too), as compare_metadata gives it. A
    table of the database that the service declares none of is found too, whoever else declares
    it."""
    declared = sa.MetaData(naming_convention=db.metadata.naming_convention)
    for table in declared_tables(service):
        table.to_metadata(declared)

    def compared(item, name, type_, reflected, compare_to) -> bool:
        return type_ != "table" or name != "alembic_version"

    context = MigrationContext.configure(connection, opts={
        "compare_type": True, "include_object": compared})
    differences = compare_metadata(context, declared)
    told = {difference[1].name for difference in differences
            if isinstance(difference, tuple) and difference[0] in ("add_index", "remove_index")}
    return differences + [difference for difference in index_expression_drift(
        connection, declared.tables.values()) if difference[1].name not in told]


def index_expression_drift(connection: sa.Connection, tables) -> list[tuple]:
    """An index of an expression whose expression in the database is not the declared one, but
    for what PostgreSQL adds writing it out (casts, parentheses, spaces): `("modify_index_
    expression", index, in_database, declared)`. Letters' case and quoted text count."""
    differences = []
    for table in tables:
        declared = {index.name: index for index in table.indexes
                    if any(not isinstance(expression, sa.Column)
                           for expression in index.expressions)}
        if not declared:
            continue
        in_database = dict(connection.execute(sa.text(
            "SELECT index.relname, pg_get_expr(pg_index.indexprs, pg_index.indrelid)"
            " FROM pg_index JOIN pg_class AS index ON index.oid = pg_index.indexrelid"
            " WHERE pg_index.indrelid = to_regclass(:table) AND pg_index.indexprs IS NOT NULL"),
            {"table": table.name}).all())
        for name, index in declared.items():
            expressions = ", ".join(
                str(expression.compile(dialect=connection.dialect, compile_kwargs={
                    "literal_binds": True, "include_table": False}))
                for expression in index.expressions if not isinstance(expression, sa.Column))
            written = in_database.get(name)
            if written is not None and _as_compared(written) != _as_compared(expressions):
                differences.append(("modify_index_expression", index, written, expressions))
    return differences


# A quoted text ('it''s' included), and a cast PostgreSQL writes out (`::text`, `::character
# varying`, `::character varying(64)`, `::text[]`).
_QUOTED = re.compile(r"('(?:[^']|'')*')")
_CAST = re.compile(r"::(?:character varying|double precision|time(?:stamp)? with(?:out)? time zone"
                   r"|[a-z_][a-z0-9_]*)(?:\(\d+(?:, ?\d+)?\))?(?:\[\])?")
# An identifier in parentheses of its own, as in `(username)::text` (not a call's: `lower(name)`).
_PARENTHESISED_NAME = re.compile(r"(?<![\w$])\(([a-z_][a-z0-9_$]*)\)")


def _as_compared(expression: str) -> str:
    """`expression` without what PostgreSQL adds writing out one it was given (casts, an
    identifier's parentheses, spaces), outside quoted text; its letters' case kept."""
    parts = _QUOTED.split(expression)
    for position in range(0, len(parts), 2):  # (the odd ones: quoted)
        unquoted = _CAST.sub("", parts[position])
        unquoted = _PARENTHESISED_NAME.sub(r"\1", unquoted)
        parts[position] = "".join(unquoted.split())
    return "".join(parts)


def declared_tables(service: str) -> list[sa.Table]:
    """The tables the service's database has, as its models and shared/'s declare them."""
    from shared.idempotency import IdempotencyKey  # (loaded with the models, when compared)

    for module in (*SHARED_MODELS, f"{service}_app.models"):
        importlib.import_module(module)
    keeps_keys = service in SERVICES_KEEPING_IDEMPOTENCY_KEYS
    return [mapper.local_table for mapper in db.Model.registry.mappers
            if mapper.class_.__module__.startswith(("shared.", f"{service}_app."))
            and (keeps_keys or mapper.class_ is not IdempotencyKey)]


def harmless_extra(difference) -> bool:
    """Whether a difference of schema_drift's is something the database has that the models do
    not declare and that the services' writes cannot trip over: a table, an index that is not
    unique, a column that takes nulls or has a default (an index a DBA added, say). Not an extra
    unique index or constraint, foreign key, or column that needs a value none of the services
    gives (every insert would fail on it), nor anything the models declare that the database
    lacks or has otherwise."""
    if isinstance(difference, list):  # a column's modifications
        return False
    kind = difference[0]
    if kind == "remove_table":
        return True
    if kind == "remove_index":
        return not difference[1].unique
    if kind == "remove_column":
        column = difference[3]
        return column.nullable or column.server_default is not None
    return False


def said(difference) -> str:
    """One difference of schema_drift's in words, from the database's side: `column
    users.token_generation missing`, `index ix_x on t not declared`, `column t.c's type is TEXT,
    declared VARCHAR(40)`."""
    if isinstance(difference, list):  # a column's modifications
        return "; ".join(said(modification) for modification in difference)
    kind, *details = difference
    action, _, what = kind.partition("_")
    if action == "modify" and len(details) == 6:  # a column's
        _, table, column, _, in_database, declared = details
        return f"column {table}.{column}'s {what} is {in_database}, declared {declared}"
    if kind == "modify_index_expression":
        index, in_database, declared = details
        return (f"index {index.name} on {index.table.name} is of {in_database}, declared of"
                f" {declared}")
    how = {"add": "missing", "remove": "not declared"}.get(action)
    if how is None:
        return " ".join(str(part) for part in difference)
    if what == "column":
        return f"column {details[1]}.{details[2].name} {how}"
    item = details[0]  # a table, an index or a constraint
    table = getattr(item, "table", None)
    return (f"{_WHAT.get(what, what)} {item.name}" + (f" on {table.name}" if table is not None
                                                       else "") + f" {how}")


_WHAT = {"fk": "foreign key", "table_comment": "comment of table"}
