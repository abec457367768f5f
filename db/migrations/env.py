"""Alembic's environment for the nos schema.

`db.migrate` hands over an open connection (``config.attributes["connection"]``) already inside
its transaction, so the stamp, every revision and the ``meta.schema_version`` stamps commit or
roll back together. Without one (Alembic's own command line) the URL comes from the
``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine
from sqlalchemy.pool import NullPool


def _run(connection: Connection) -> None:
    # SQLite's DDL is transactional too when BEGIN is issued explicitly (db.migrate does)
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url for the nos migrations")
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("the nos migrations run online only (db.migrate.upgrade)")
run()
