"""one baselines row per key: duplicates removed, unique index uq_baselines_key

Two processes that computed one evaluation protocol at the same moment both stored its baseline
rows. The key of a stored baseline result is (protocol, method, horizon, seed, split, hparam):
the protocol key names the task, seeds, grids and budget, the method carries RandOpt's layer
variant. Of each set of rows with one key the lowest id -- the copy stored first -- is kept and
the others are deleted (the copies are the same computation: the same numbers); then a unique
index keeps the key unique. Two exemptions, as in `db.models.baseline_key_index`:

- rows with protocol NULL (a run's own Adam reference, and rows written before schema 2) are
  per run, not a protocol's, and are left alone (a partial index: WHERE protocol IS NOT NULL);
- NULLs are distinct in a unique index on SQLite and PostgreSQL alike, so the "before" rows'
  NULL hparam is indexed as -1.0 (an expression index; no lr or sigma is negative).

Only those duplicate rows change: no table is rebuilt (DELETE and CREATE INDEX need no batch
mode on SQLite), every other row keeps its bytes. The SQL is spelled out here, not taken from
`db.models`, so this revision does the same thing whatever later schemas change.

Revision ID: 4
Revises: 3
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "4"
down_revision: str | None = "3"
branch_labels: str | None = None
depends_on: str | None = None

INDEX = "uq_baselines_key"
KEY = ("protocol", "method", "horizon", "seed", "split", "coalesce(hparam, -1.0)")
KEYED = "protocol IS NOT NULL"


def _stamp(version: str) -> None:
    meta = sa.table("meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=version))


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # readers go on; a writer of schema 3 waits, so no new duplicate lands between the
        # DELETE and the index (SQLite: the upgrade's BEGIN IMMEDIATE holds the write lock)
        op.execute("LOCK TABLE baselines IN EXCLUSIVE MODE")
    op.execute(f"DELETE FROM baselines WHERE {KEYED} AND id NOT IN "
               f"(SELECT min(id) FROM baselines WHERE {KEYED} GROUP BY {', '.join(KEY)})")
    op.create_index(INDEX, "baselines", [sa.text(c) if "(" in c else c for c in KEY], unique=True,
                    sqlite_where=sa.text(KEYED), postgresql_where=sa.text(KEYED))
    _stamp("4")


def downgrade() -> None:
    op.drop_index(INDEX, table_name="baselines")  # the deleted copies are not brought back
    _stamp("3")
