"""Tables held in memory for `db.memory.MemoryStorage`, with SQLite's rules for what is stored.

A row is kept as the SQL store's SQLite file would keep it: each value goes through its column
type (`db.models`: canonical JSON text, naive UTC datetimes, NaN as NULL, numpy integers as
ints) and then SQLite's column affinity (a number in a text column becomes text, a digit
string in an id column a number, anything else that supports the buffer protocol a blob).
Inserts and updates check what SQLite checks, with its wording: NOT NULL, UNIQUE (a primary
key, a unique constraint, or one extra unique key such as uq_baselines_key) and, at the end of
each statement, FOREIGN KEY. Rows are read back the way `db.sql_engine.row` reads them:
column type, then `db.models.check_stored`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import sqlalchemy
from sqlalchemy import Integer, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.dialects import sqlite

from db.models import Base, FiniteFloat, Int, JSONText, UTCDateTime, check_stored
from db.rows import one_line

DIALECT = sqlite.dialect()
TOO_LARGE = "Python int too large to convert to SQLite INTEGER"

Undo = list[Callable[[], None]]


class Failed(Exception):
    """A statement SQLAlchemy would fail with (a value it cannot bind): "<what> failed: ..."."""


class Integrity(Failed):
    """A constraint a statement breaks, in SQLite's words (SQLAlchemy's IntegrityError)."""


def _sqlite_int(value: int) -> int:
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise OverflowError(TOO_LARGE)  # what sqlite3 raises binding it
    return value


def _real_text(value: float) -> str:
    """A REAL as SQLite turns it into TEXT (``%!.15g``: 1.0, 0.1, 1.0e+20)."""
    if not math.isfinite(value):
        return "Inf" if value > 0 else "-Inf" if value < 0 else "NaN"
    mantissa, e, exponent = f"{value:.15g}".partition("e")
    if "." not in mantissa:
        mantissa += ".0"
    return mantissa + e + exponent


def _driver_value(value: Any) -> Any:
    """What sqlite3 binds ``value`` as: int, float, str, bytes (anything with a buffer); a
    datetime is left as it is (SQLAlchemy stores it as ISO text and parses it back)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return _sqlite_int(value)
    if isinstance(value, (float, str, bytes, datetime)):  # a datetime: DateTime's own text
        return value
    try:
        return bytes(memoryview(value))
    except TypeError:
        raise Failed(f"Error binding parameter: type '{type(value).__name__}' is not supported") from None


def bind(column: Any, value: Any) -> Any:
    """``value`` as SQLite stores it in (or compares it with) ``column``."""
    if value is None:
        return None
    kind = column.type
    if isinstance(kind, TypeDecorator):
        try:
            value = kind.process_bind_param(value, DIALECT)
        except Exception as exc:  # SQLAlchemy: a StatementError around it
            raise Failed(one_line(exc)) from exc
        if value is None:
            return None
    value = _driver_value(value)
    if isinstance(kind, (Int, Integer)):  # INTEGER affinity
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            try:
                return _sqlite_int(int(value))
            except OverflowError:
                return value
    elif isinstance(kind, (String, Text, JSONText)):  # TEXT affinity
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return _real_text(value)
    return value


def read(table: str, column: Any, stored: Any) -> Any:
    """A stored value as the SQL store reads it back (StoredValueError when damaged)."""
    kind = column.type
    if stored is not None and isinstance(kind, (JSONText, UTCDateTime, FiniteFloat)):
        stored = kind.process_result_value(stored, DIALECT)
    return check_stored(table, column, stored)


class Table:
    """One table's rows by id, as stored, with its constraints."""

    def __init__(self, model: type[Base], tables: dict[str, Table],
                 unique_key: tuple[str, Callable[[dict], tuple | None]] | None = None) -> None:
        table = cast(sqlalchemy.Table, model.__table__)
        self.name = table.name
        self.columns = list(table.columns)
        self.column = {c.key: c for c in self.columns}
        self.uniques = [tuple(c.key for c in k.columns) for k in table.constraints
                        if isinstance(k, UniqueConstraint)]
        self.foreign = [(c.key, fk.column.table.name) for c in self.columns for fk in c.foreign_keys]
        self.unique_key = unique_key  # (index name, key of a stored row or None)
        self.tables = tables  # all tables by name, for foreign keys
        self.rows: dict[int, dict[str, Any]] = {}
        self._index: dict[tuple, dict[tuple, int]] = {cols: {} for cols in self.uniques}
        self._keyed: dict[tuple, int] = {}  # unique_key of the stored rows
        self._key_name = "" if unique_key is None else unique_key[0]
        self._max = 0

    # ------------------------------------------------------------------ reading

    def out(self, stored: dict[str, Any]) -> dict[str, Any]:
        """A stored row as the SQL store returns it (a fresh dict, JSON parsed anew)."""
        return {c.key: read(self.name, c, stored[c.key]) for c in self.columns}

    def find(self, **where: Any) -> list[dict[str, Any]]:
        """Stored rows whose columns equal ``where`` (values bound like SQL's), by id."""
        bound = {k: bind(self.column[k], v) for k, v in where.items()}
        hits = [r for r in self.rows.values() if all(r[k] == v for k, v in bound.items())]
        return sorted(hits, key=lambda r: r["id"])

    def get(self, row_id: Any) -> dict[str, Any] | None:
        return self.rows.get(bind(self.column["id"], row_id))

    # ------------------------------------------------------------------ writing

    def insert(self, rows: list[dict[str, Any]], undo: Undo, *, nulls: bool = True,
               skip_conflicts: bool = False) -> list[int | None]:
        """Insert ``rows`` as one statement, all or none; their ids (None: a row whose
        `unique_key` was taken, with ``skip_conflicts``, as ON CONFLICT DO NOTHING). With
        ``nulls`` False a None counts as absent where the column has a default (what an ORM
        insert does without render_nulls)."""
        prepared = [self._complete(r, nulls) for r in rows]  # every value bound before any row
        ids: list[int | None] = []
        done: list[int] = []
        try:
            for values in prepared:
                self._not_null(values, values)
                if self._key_taken(values):
                    if skip_conflicts:
                        ids.append(None)
                        continue
                    raise Integrity(f"UNIQUE constraint failed: index '{self._key_name}'")
                row_id = values.pop("id", None)
                if row_id is None:
                    row_id = self._max + 1
                elif not isinstance(row_id, int):
                    raise Integrity("datatype mismatch")
                elif row_id in self.rows:
                    raise Integrity(f"UNIQUE constraint failed: {self.name}.id")
                values = {"id": row_id, **values}
                self._unique(values)
                self._put(row_id, values)
                done.append(row_id)
                ids.append(row_id)
            self._foreign([self.rows[i] for i in done])
        except BaseException:
            for row_id in reversed(done):
                self._drop(row_id)
            raise
        undo.extend(self._dropper(row_id) for row_id in done)
        return ids

    def update(self, rows: list[dict[str, Any]], values: dict[str, Any], undo: Undo) -> int:
        """Set ``values`` in the stored ``rows`` as one statement; how many rows."""
        bound = {k: bind(self.column[k], v) for k, v in values.items()}
        changed = [{**old, **bound} for old in rows]
        for new in changed:
            self._not_null(new, bound)
        olds = [self.rows[new["id"]] for new in changed]
        for old in olds:
            self._drop(old["id"])
        try:
            for new in changed:
                self._unique(new)
                self._put(new["id"], new)
            if any(k in bound for k, _ in self.foreign):
                self._foreign(changed)
        except BaseException:
            for new in changed:
                if self.rows.get(new["id"]) is new:
                    self._drop(new["id"])
            for old in olds:
                self._put(old["id"], old)
            raise

        def restore(olds: list[dict[str, Any]] = olds) -> None:
            for old in olds:
                self._drop(old["id"])
                self._put(old["id"], old)

        undo.append(restore)
        return len(changed)

    def _dropper(self, row_id: int) -> Callable[[], None]:
        return lambda: self._drop(row_id)

    def _complete(self, values: dict[str, Any], nulls: bool) -> dict[str, Any]:
        """All columns of a new row, defaults filled in, every value bound."""
        row: dict[str, Any] = {}
        for c in self.columns:
            value = values.get(c.key)
            default: Any = c.default  # a ColumnDefault: a scalar, or a callable taking a context
            if value is None and default is not None and (c.key not in values or not nulls):
                value = default.arg if default.is_scalar else default.arg(None)
            row[c.key] = bind(c, value)
        return row

    def _not_null(self, row: dict[str, Any], given: dict[str, Any]) -> None:
        for c in self.columns:
            if not c.nullable and not c.primary_key and c.key in given and row[c.key] is None:
                raise Integrity(f"NOT NULL constraint failed: {self.name}.{c.key}")

    def _key_taken(self, row: dict[str, Any]) -> bool:
        key = None if self.unique_key is None else self.unique_key[1](row)
        return key is not None and key in self._keyed

    def _unique(self, row: dict[str, Any]) -> None:
        for cols in self.uniques:
            key = tuple(row[c] for c in cols)
            if None not in key and key in self._index[cols]:
                raise Integrity(f"UNIQUE constraint failed: {', '.join(f'{self.name}.{c}' for c in cols)}")

    def _foreign(self, rows: list[dict[str, Any]]) -> None:
        """SQLite checks foreign keys when a statement ends."""
        for row in rows:
            for key, target in self.foreign:
                if row[key] is not None and row[key] not in self.tables[target].rows:
                    raise Integrity("FOREIGN KEY constraint failed")

    def _put(self, row_id: int, row: dict[str, Any]) -> None:
        self.rows[row_id] = row
        self._max = max(self._max, row_id)
        for cols in self.uniques:
            key = tuple(row[c] for c in cols)
            if None not in key:
                self._index[cols][key] = row_id
        if self.unique_key is not None and (keyed := self.unique_key[1](row)) is not None:
            self._keyed[keyed] = row_id

    def _drop(self, row_id: int) -> None:
        row = self.rows.pop(row_id)
        for cols in self.uniques:
            self._index[cols].pop(tuple(row[c] for c in cols), None)
        if self.unique_key is not None and (keyed := self.unique_key[1](row)) is not None:
            self._keyed.pop(keyed, None)
        if row_id == self._max:
            self._max = max(self.rows, default=0)

    def by_unique(self, cols: tuple[str, ...], **values: Any) -> dict[str, Any] | None:
        """The stored row whose unique ``cols`` hold ``values`` (bound like SQL's)."""
        key = tuple(bind(self.column[c], values[c]) for c in cols)
        row_id = self._index[cols].get(key)
        return None if row_id is None else self.rows[row_id]
