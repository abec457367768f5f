"""Persistence for nos: SQLAlchemy models and the Store (nothing else in nos talks SQL).

A leaf package: it never imports ``nos`` or ``search_space``.
"""

from __future__ import annotations

from db.models import INDIVIDUAL_STATUSES, RUN_STATUSES, SCHEMA_VERSION
from db.store import SlotTakenError, Store, StoreError, resolve_url

__all__ = [
    "INDIVIDUAL_STATUSES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "SlotTakenError",
    "Store",
    "StoreError",
    "resolve_url",
]
