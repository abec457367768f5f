"""Checks of incoming rows that every storage backend shares, so all of them refuse the same
bad input with the same one-line StoreError (and accept the same good input).

Nothing here talks to a database: these functions look at the models' column lists and at
the values a caller hands in, before any backend stores them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import TypeDecorator, inspect

from db.errors import MAX_ID, StoreError
from db.models import (
    BASELINE_KEY,
    INDIVIDUAL_STATUSES,
    NULL_HPARAM,
    SPLITS,
    Base,
    Baseline,
    Evaluation,
    Individual,
    TimestepStat,
)


def check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def columns(model: type[Base]) -> set[str]:
    return {attr.key for attr in inspect(model).column_attrs}


def fields(model: type[Base], row: dict, what: str) -> dict[str, Any]:
    """The row as column values; an unknown key is an error, never silently dropped."""
    unknown = set(row) - columns(model)
    if unknown:
        raise StoreError(f"{what}: unknown field(s) {', '.join(sorted(unknown))}")
    if "split" in row:
        check_choice(f"split in {what}", row["split"], SPLITS)
    return dict(row)


def complete(model: type[Base], values: dict[str, Any]) -> dict[str, Any]:
    """Fill absent columns (NULL or their scalar default) so every row of a batch has the
    same keys and the batch stays one INSERT statement. Callable defaults (timestamps)
    are left to SQLAlchemy, which fills them per row."""
    values = dict(values)
    for column in model.__table__.columns:
        if column.key in values or column.primary_key:
            continue
        if column.default is None:
            values[column.key] = None
        elif column.default.is_scalar:
            values[column.key] = column.default.arg
    return values


def individual_values(row: dict, what: str) -> tuple[dict[str, Any], str | None, list[dict]]:
    """Split an add_individuals row into (column values, parent_slot, evaluations)."""
    row = dict(row)
    evaluations = row.pop("evaluations", None) or []
    parent_slot = row.pop("parent_slot", None)
    values = fields(Individual, row, what)
    missing = [k for k in ("run_id", "slot", "genome", "status") if values.get(k) is None]
    if missing:
        raise StoreError(f"{what}: missing {', '.join(missing)}")
    check_choice(f"status in {what}", values["status"], INDIVIDUAL_STATUSES)
    if parent_slot is not None and values.get("parent_id") is not None:
        raise StoreError(f"{what}: give parent_id or parent_slot, not both")
    evaluations = [
        complete(Evaluation, fields(Evaluation, e, f"{what}, evaluation {j}"))
        for j, e in enumerate(evaluations)
    ]
    return complete(Individual, values), parent_slot, evaluations


def evaluation_values(by_individual: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """The rows of an add_evaluations call, checked and completed, in order."""
    return [
        {**complete(Evaluation, fields(Evaluation, e, f"evaluation of {ind_id}")), "individual_id": ind_id}
        for ind_id, evals in by_individual.items()
        for e in evals
    ]


def baseline_values(rows: list[dict]) -> list[dict[str, Any]]:
    """The rows of an add_baselines call, checked and completed, in order."""
    return [complete(Baseline, fields(Baseline, row, f"baseline row {i}")) for i, row in enumerate(rows)]


def timestep_values(run_id: int, row: dict) -> dict[str, Any]:
    """The values of a put_timestep_stats call (its own ``id`` dropped, ``run_id`` set)."""
    values = {**fields(TimestepStat, row, "timestep stats"), "run_id": run_id}
    values.pop("id", None)
    if "timestep" not in values:
        raise StoreError("timestep stats need a 'timestep'")
    return values


def baseline_key(values: dict[str, Any], dialect: Any) -> tuple:
    """A baseline row's `BASELINE_KEY` as stored and read back (a non-finite float is NULL)."""
    types = {c: Baseline.__table__.c[c].type for c in BASELINE_KEY}
    return tuple(kind.process_bind_param(values[c], dialect) if isinstance(kind, TypeDecorator) else values[c]
                 for c, kind in types.items())


def baseline_index_key(stored: dict[str, Any]) -> tuple | None:
    """What the unique index uq_baselines_key indexes of a stored row: the `BASELINE_KEY` with a
    NULL hparam as -1.0 (`NULL_HPARAM`); None for a row without a protocol (not indexed)."""
    if stored["protocol"] is None:
        return None
    return tuple(float(NULL_HPARAM) if c == "hparam" and stored[c] is None else stored[c]
                 for c in BASELINE_KEY)


def fits_id(value: Any) -> bool:
    """Could ``value`` be a stored id (an int in 1 .. 2**63 - 1)?"""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_ID


def run_lookup(name_or_id: str | int) -> tuple[str | None, int | None]:
    """How get_run finds ``name_or_id``: ``(None, id)`` for an int (None when out of range),
    ``(name, None)`` for anything else (then `digits_id` of the name, when no run has that
    name), ``(None, None)`` when nothing can match (undecodable text)."""
    if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
        return None, (name_or_id if fits_id(name_or_id) else None)
    name = str(name_or_id)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes from a command line: no stored name
        return None, None
    return name, None


def digits_id(name: str) -> int | None:
    """The id a run name of plain digits stands for, when no run has that name."""
    return int(name) if name.isascii() and name.isdigit() and fits_id(int(name)) else None


def top_limit(n: int) -> int:
    """``top``'s ``n`` as a row limit: 0 .. MAX_ID."""
    return max(0, min(int(n), MAX_ID))


def one_line(exc: BaseException) -> str:
    """The first line of the driver's message (SQLAlchemy appends SQL and links), cut short."""
    orig = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return cut(lines[0]) if lines else type(orig).__name__


def cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
