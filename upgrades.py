"""Upgrades: a database written by an earlier fleetmon, brought up to SCHEMA_VERSION at
start, in one transaction, from the steps in migrations/ and then schema.sql.

The first layout's database is rewritten whole, so the upgrade says first how much free
disk it needs and refuses in one line if it is not there, tells its progress while it
works, and gives the space back after. Stopped at any point, kill -9 included, it leaves
the old database or the new one.
"""

import shutil
import sqlite3
import time
from pathlib import Path

from fleetmon import HERE, SCHEMA_VERSION, StartupError, schema_version, transaction

MIGRATIONS = HERE / "migrations"
# A long upgrade says it is still at work this often.
UPGRADE_PROGRESS_SECONDS = 10


def upgrade(db: sqlite3.Connection, database: Path, schema: str, announce=print) -> str | None:
    """Bring a database written by an earlier fleetmon to SCHEMA_VERSION: each step the
    SQL of migrations/N.sql, then schema (schema.sql) for what the steps leave to it, all
    in one transaction, so that no one sees a step without the rest; then give back the
    space it freed. Returns a line to tell, if it did."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise StartupError(f"database {database} was written by a newer fleetmon (schema version {version}, "
                           f"this one knows up to {SCHEMA_VERSION}); it is left as it was")
    # Version 0 is the first layout, or a database that schema.sql is about to make.
    is_new = version == 0 and not db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'heartbeat_minutes'").fetchone()
    if version == SCHEMA_VERSION or is_new:
        return None
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what an earlier fleetmon left in its log, in the file
    size = database.stat().st_size
    # From the first layout every row is rewritten: with secure_delete off (below), what
    # that takes of the disk is in OPERATING.md, "Upgrades", as benchmark.py measures it.
    needed = size * 3 // 4 if version == 0 else size // 10
    free = shutil.disk_usage(database.parent).free
    if free < needed:
        raise StartupError(f"upgrading database {database} from schema version {version} needs about "
                           f"{needed / 2**20:,.0f} MiB free on its disk, and {free / 2**20:,.0f} MiB are; "
                           "it is left as it was")
    started, changes_before = time.monotonic(), db.total_changes
    announce(f"fleetmon: upgrading database {database} ({size / 2**20:,.1f} MiB) from schema version {version}; "
             "stopped before it is done, it is left as it was")
    next_word = [started + UPGRADE_PROGRESS_SECONDS]

    def tell_progress() -> int:
        if time.monotonic() >= next_word[0]:
            next_word[0] += UPGRADE_PROGRESS_SECONDS
            announce(f"fleetmon: still upgrading, {time.monotonic() - started:.0f} s so far")
        return 0  # go on

    db.set_progress_handler(tell_progress, 1_000_000)
    # Some builds of SQLite zero every page a DROP TABLE frees, through the write-ahead log:
    # a copy of the old tables' size more. The VACUUM that follows leaves none of them.
    db.execute("PRAGMA secure_delete = OFF")
    try:
        with transaction(db):
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in split_statements((MIGRATIONS / f"{step}.sql").read_text(encoding="utf-8")):
                    db.execute(statement)
            # Its PRAGMAs change nothing here: an earlier fleetmon's database is in WAL mode.
            for statement in split_statements(schema):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except sqlite3.Error as error:
        raise StartupError(f"cannot upgrade database {database} from schema version {version}: {error}; "
                           "it is left as it was") from None
    finally:
        db.set_progress_handler(None, 0)
    written = db.total_changes - changes_before
    try:  # the space it freed: the log emptied into the file, and the file rewritten without the free pages
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        free, pages = db.execute("SELECT * FROM pragma_freelist_count, pragma_page_count").fetchone()
        if free * 2 > pages:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:  # upgraded all the same
        announce(f"fleetmon: upgraded, but could not give back the space the upgrade freed ({error}); "
                 "sqlite3's VACUUM does it")
    return (f"upgraded database {database} from schema version {version} to {SCHEMA_VERSION}: "
            f"{written:,} rows written in {time.monotonic() - started:.1f} s, "
            f"{size / 2**20:,.1f} MiB before, {database.stat().st_size / 2**20:,.1f} MiB after")


def split_statements(script: str) -> list[str]:
    """An SQL script's statements, one by one: executescript() would commit first."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending)
            pending = ""
    return statements
