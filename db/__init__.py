"""Persistence for nos: SQLAlchemy models and the Store (nothing else in nos talks SQL), both
behind the `Storage` interface with `MemoryStorage`, an in-memory one for unit tests.

A leaf package: it never imports ``nos`` or ``search_space``.
"""

from __future__ import annotations

from db.memory import MemoryStorage
from db.models import INDIVIDUAL_STATUSES, RUN_STATUSES, SCHEMA_VERSION
from db.storage import Storage
from db.store import SlotTakenError, Store, StoreError, resolve_url

__all__ = [
    "INDIVIDUAL_STATUSES",
    "MemoryStorage",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "SlotTakenError",
    "Storage",
    "Store",
    "StoreError",
    "resolve_url",
]
