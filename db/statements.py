"""Writes that run only if an earlier part of the same statement did: data-modifying CTEs.

A ledger transition and what goes with it (its event, the enrollment's end, the breaker)
are one statement: `WITH moved AS (UPDATE ... RETURNING id) INSERT ... SELECT ... FROM moved`.
PostgreSQL applies a statement whole or not at all, and every write here is conditional on
`moved` having returned its row, so a compare-and-set that loses writes nothing; one
statement is also one round trip instead of a transaction's several.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CTE, Table, exists, literal, select
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.sql.dml import Update

from db.tables import Base

__all__ = ["insert_if", "table_of", "update_if"]


def table_of(model: type[Base]) -> Table:
    """The model's table, for Core statements (no ORM bookkeeping around them)."""
    return cast(Table, model.__table__)


def insert_if(model: type[Base], values: dict[str, Any], after: CTE | None) -> Insert:
    """INSERT of one row of `values`, or (with `after`) one per row that `after` returned."""
    table = table_of(model)
    if after is None:
        return insert(table).values(**values)
    row = select(*(literal(v, table.c[k].type).label(k) for k, v in values.items())).select_from(after)
    return insert(table).from_select(list(values), row)


def update_if(stmt: Update, after: CTE | None) -> Update:
    """`stmt`, applied only if `after` returned a row (always without `after`)."""
    return stmt if after is None else stmt.where(exists(select(1).select_from(after)))
