"""The exceptions and status constants every storage backend shares (`db.storage.Storage`)."""

from __future__ import annotations

# Statuses whose hash means "this genome was already judged": find_hash may point at them.
JUDGED_STATUSES = ("evaluated", "rejected_integrity", "invalid", "error")
FINAL_RUN_STATUSES = ("finished", "interrupted", "failed")
MAX_ID = 2**63 - 1  # SQLite INTEGER (and PostgreSQL BIGINT) ids are signed 64-bit


class StoreError(Exception):
    """A database problem, described in one line a user can act on."""


class SlotTakenError(StoreError):
    """``add_individuals`` found a slot of the batch already stored (nothing was written).

    With several processes on one run this is not a fault: slots are deterministic, so the
    other process stored the same candidate first and the caller can read it back.
    """
