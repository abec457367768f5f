"""`python -m nos.db upgrade`: bring a database written by an older nos to this nos's schema.

An SQLite file is first copied, byte for byte, beside itself (FILE.schemaN.bak; an existing
backup of that name must be identical, or nothing is done), then migrated in place in one
transaction. A database already at this schema is left alone. A damaged file, a file that
is not a nos database, one written by a newer nos or one another process has open is
refused with one line (exit status 2), unchanged. A PostgreSQL database is migrated in one
transaction with no backup: take a pg_dump first. From schema 3 or older, the upgrade also removes
the duplicate baseline rows two processes left when they stored one protocol at the same moment
(the first copy of each is kept: the same numbers); its line says how many went.

    python -m nos.db upgrade --db runs/nos.sqlite
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from db.migrate import upgrade  # the top-level `db` package (this module is `nos.db`)

from .ui.cli import DEFAULT_DB, ArgumentParser, db_arg, run_command


def _parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m nos.db", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    up = sub.add_parser(
        "upgrade", help="upgrade an older database in place (backup first)",
        description="Upgrade the database to this nos's schema in place. SQLite: a byte-identical "
                    "backup FILE.schemaN.bak is written first. PostgreSQL: no backup is "
                    "written, take a pg_dump first.")
    up.add_argument("--db", type=db_arg, default=DEFAULT_DB,
                    help=f"database path or SQLAlchemy URL ({DEFAULT_DB}); for PostgreSQL take a "
                         "pg_dump first")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "upgrade":
        print(upgrade(args.db))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
