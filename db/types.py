"""Column types that carry the storage rules, so no caller can forget them: datetimes are UTC,
floats are finite or NULL, JSON is canonical text (``json.dumps(sort_keys=True)``) nested at most
``MAX_JSON_DEPTH`` deep. The rules hold on the way back too (`check_stored`): a value some other
program wrote into the file is checked like input, never trusted. The tables are `db.models`.
"""

from __future__ import annotations

import json
import math
import operator
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import DateTime, Dialect, Float, Integer, String, Text, TypeDecorator

MAX_JSON_DEPTH = 64  # genomes nest about 10 deep, configs 3


class StoredValueError(ValueError):
    """A value read back from the database breaks its column's rules (a tampered row)."""


def utcnow() -> datetime:
    """Current time, timezone-aware UTC (the only clock the database sees)."""
    return datetime.now(timezone.utc)


def plain_json(value: Any) -> Any:
    """Turn ``value`` into plain JSON data: non-finite floats become None, numpy-like
    scalars become Python numbers, tuples become lists.

    Raises TypeError for anything else, so an object never slips in as its repr.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return plain_json(value.item())
    raise TypeError(f"{type(value).__name__} is not JSON data")


def dump_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, no NaN/inf.

    A ``str`` is taken to be JSON text already; it is parsed (so garbage is refused)
    and re-dumped canonically.
    """
    if isinstance(value, str):
        value = json.loads(value)
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return json.dumps(plain_json(value), sort_keys=True, allow_nan=False)


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep lists and objects nest in ``value`` (without recursion); stops counting
    just past ``limit``."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            depth = max(depth, level)
            if depth > limit:
                return depth
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def _reject_constant(name: str) -> Any:
    raise StoredValueError(f"{name} is not valid JSON")


def load_json(text: Any, where: str = "JSON", *, object_only: bool = False) -> Any:
    """Parse JSON text read back from the database; StoredValueError (one line) if it is
    not text, not JSON, holds NaN/Infinity, nests deeper than ``MAX_JSON_DEPTH`` or (with
    ``object_only``) is not a JSON object."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StoredValueError(f"{where}: not UTF-8 text") from None
    if not isinstance(text, str):
        raise StoredValueError(f"{where}: expected JSON text, got {type(text).__name__}")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise StoredValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except StoredValueError as exc:
        raise StoredValueError(f"{where}: {exc}") from None
    except ValueError as exc:
        first = (str(exc).splitlines() or [""])[0][:80]
        raise StoredValueError(f"{where}: not valid JSON ({first})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise StoredValueError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    if object_only and not isinstance(value, dict):
        raise StoredValueError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (portable across SQLite and PostgreSQL), read back aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # naive means UTC already
            return value
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)

    def result_processor(self, dialect: Dialect, coltype: Any) -> Any:
        """The driver's parsing too, with a stored non-date (SQLite keeps any type) reported
        as a StoredValueError instead of the parser's TypeError / ValueError."""
        process = super().result_processor(dialect, coltype)
        if process is None:
            return None

        def checked(value: Any) -> datetime | None:
            try:
                return process(value)
            except (TypeError, ValueError, OverflowError):
                raise StoredValueError(
                    f"a date-time column holds {type(value).__name__} {_short(value)}"
                ) from None

        return checked


class FiniteFloat(TypeDecorator[float]):
    """A float column that stores NaN and +-inf as NULL (a non-finite loss is "no loss")."""

    impl = Float
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> float | None:
        if value is None:
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    def process_result_value(self, value: Any, dialect: Dialect) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise StoredValueError(f"a number column holds {type(value).__name__} {_short(value)}")
        try:
            value = float(value)
        except OverflowError:
            return None
        return value if math.isfinite(value) else None


class Int(TypeDecorator[int]):
    """An integer column that accepts numpy/torch integers (the GA hands those out)."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else operator.index(value)


class JSONText(TypeDecorator[Any]):
    """JSON stored as canonical text, so hashes and diffs of the raw column are stable."""

    impl = Text
    cache_ok = True

    def __init__(self, where: str = "a JSON column", *, object_only: bool = False) -> None:
        super().__init__()
        self.where = where  # names the column in a damaged-value message
        self.object_only = object_only  # read back: only a JSON object is a valid value

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else dump_json(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else load_json(value, self.where, object_only=self.object_only)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value[:limit + 1] if isinstance(value, (str, bytes)) else value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_stored(table: str, column: Any, value: Any) -> Any:
    """``value`` as read from ``table.column``, if it has the column's Python type;
    StoredValueError otherwise (SQLite stores any type in any column)."""
    if value is None:
        return None
    kind = column.type
    if isinstance(kind, JSONText):  # parsed and checked by JSONText itself
        return value
    if isinstance(kind, FiniteFloat):
        ok, want = isinstance(value, float) and math.isfinite(value), "a finite number"
    elif isinstance(kind, (Int, Integer)):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(kind, UTCDateTime):
        ok, want = isinstance(value, datetime), "a date-time"
    elif isinstance(kind, (String, Text)):
        ok, want = isinstance(value, str), "text"
    else:
        ok, want = True, ""
    if not ok:
        raise StoredValueError(
            f"{table}.{column.key} holds {type(value).__name__} {_short(value)}, not {want}"
        )
    return value
