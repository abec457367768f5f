"""The revisions, one module per nos schema version (see `db.migrations`)."""
