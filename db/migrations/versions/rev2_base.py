"""nos schema 2 (the base: evaluations.split, baselines.split and .protocol, individuals.fidelity)

A database at schema 2 is stamped with this revision, never built by it: the schema-2 tables
are whatever the nos of that schema created (`Store` on an empty database).

Revision ID: 2
Revises: (none)
"""

from __future__ import annotations

revision = "2"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    raise RuntimeError("revision 2 is the base: a schema-2 database is stamped, not created by it")


def downgrade() -> None:
    raise RuntimeError("nos schema 2 is the oldest a migration knows")
