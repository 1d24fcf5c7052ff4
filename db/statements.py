"""Statements built once, and writes that run only if an earlier part of the same statement did.

A ledger transition and what goes with it (its event, the enrollment's end, the breaker)
are one statement: `WITH moved AS (UPDATE ... RETURNING id) INSERT ... SELECT ... FROM moved`.
PostgreSQL applies a statement whole or not at all, and every write here is conditional on
`moved` having returned its row, so a compare-and-set that loses writes nothing; one
statement is also one round trip instead of a transaction's several.

The send path's statements are built once per shape with named parameters and executed with
their values (`params`): building a statement and its cache key each time cost more CPU
than sending it to PostgreSQL. Parameter names carry a prefix per part of the statement
(a name equal to a column's is reserved by SQLAlchemy in VALUES and SET).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import CTE, Table, bindparam, exists, select
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.sql.dml import Update

from db.tables import Base

__all__ = ["insert_if", "params", "table_of", "update_if"]


def table_of(model: type[Base]) -> Table:
    """The model's table, for Core statements (no ORM bookkeeping around them)."""
    return cast(Table, model.__table__)


def params(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` under the parameter names of a part built with `prefix`."""
    return {prefix + k: v for k, v in values.items()}


def insert_if(model: type[Base], columns: Sequence[str], after: CTE | None, prefix: str) -> Insert:
    """INSERT of one row (parameters `prefix` + column), or (with `after`) one per row `after` returned."""
    table = table_of(model)
    binds = {c: bindparam(prefix + c, type_=table.c[c].type) for c in columns}
    if after is None:
        return insert(table).values(binds)
    return insert(table).from_select(list(columns), select(*(b.label(c) for c, b in binds.items())).select_from(after))


def update_if(stmt: Update, after: CTE | None) -> Update:
    """`stmt`, applied only if `after` returned a row (always without `after`)."""
    return stmt if after is None else stmt.where(exists(select(1).select_from(after)))
