"""Alembic migrations of the nos schema (run by `db.migrate`, i.e. `nos db upgrade`).

One revision per schema change, its revision id the ``meta.schema_version`` it produces;
revision "2" is the base: a schema-2 database is stamped "2", then upgraded.
"""
