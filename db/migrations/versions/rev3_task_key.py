"""evaluations.task_key and baselines.task_key

The task's identity ``name@hash``, nullable: rows written before schema 3 keep NULL, and all of
them belong to the sine task of their run's config. Adding a nullable column needs no table
rebuild on SQLite, so no stored row is rewritten.

Revision ID: 3
Revises: 2
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "3"
down_revision: str | None = "2"
branch_labels: str | None = None
depends_on: str | None = None

TABLES = ("evaluations", "baselines")


def _stamp(version: str) -> None:
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=version))


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("task_key", sa.String(96), nullable=True))
    _stamp("3")


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite before 3.35 cannot DROP COLUMN
            batch.drop_column("task_key")
    _stamp("2")
