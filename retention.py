"""Retention: with --keep-days N, raw telemetry more than N days older than the device's
own newest minute goes, and the alerts and outages that ended more than N days ago by
fleetmon's clock.

Telemetry is pruned by each device's clock, so that a replayed day from long ago is not
pruned the moment it lands, and one device with a wrong clock cannot prune another's
history. The aggregates stay as they are, so lifetime stats never change. The kept history
starts on a whole hour (an online_hours row is kept or pruned whole), and telemetry from
before it is refused, so that nothing pruned can be counted twice.

Pruning goes a few hundred rows a transaction, so that a large backlog never holds the
write lock for long: the requests in between get it. It looks only at the devices heard
since it last looked, so an idle fleetmon costs nothing whatever the fleet's size.
"""

import argparse
import sqlite3
import threading

from fleetmon import FIRST_MINUTE, whole_number

ROWS_PER_STEP = 500


class Pruning:
    def __init__(self, db: sqlite3.Connection, keep_days: int, device_keys: dict[str, int]):
        self.keep_minutes = keep_days * 24 * 60
        self.device_keys = device_keys
        self._lock = threading.Lock()
        # Every device that has sent anything, once, then those heard since.
        self._to_look_at = {row[0] for row in db.execute("SELECT device_key FROM devices"
                                                         " WHERE listed AND newest_minute IS NOT NULL")}

    def heard(self, device_id: str, heard_at_ms: int) -> None:
        """A listener of fleetmon.tell_heard(): its device may have moved on by an hour."""
        with self._lock:
            self._to_look_at.add(self.device_keys[device_id])

    def step(self, db: sqlite3.Connection, now_ms: int) -> bool:
        """Prune up to ROWS_PER_STEP rows; False when there was nothing to do."""
        under_way = db.execute("SELECT device_key, kept_from FROM pruning").fetchone()
        if under_way is None:
            under_way = self.begin_next(db)
        if under_way is not None:
            self.prune_device(db, *under_way)
            return True
        return self.prune_history(db, now_ms - self.keep_minutes * 60_000)

    def begin_next(self, db: sqlite3.Connection) -> tuple[int, int] | None:
        """Move the boundary of the next device whose window has moved on by an hour or
        more, and note that its rows before it are to go, in one transaction: from its
        commit on, telemetry before it is refused, so the rows deleted next cannot come
        back, and a restart finishes what a kill interrupted."""
        while True:
            with self._lock:
                if not self._to_look_at:
                    return None
                device_key = self._to_look_at.pop()
            device = db.execute(
                "SELECT newest_minute FROM devices WHERE device_key = ? AND newest_minute IS NOT NULL"
                " AND (kept_from IS NULL OR kept_from <= newest_minute - ? - 60)",
                (device_key, self.keep_minutes),
            ).fetchone()
            if device is None:
                continue
            kept_from = max((device["newest_minute"] - self.keep_minutes) // 60 * 60, FIRST_MINUTE)
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("UPDATE devices SET kept_from = ? WHERE device_key = ?", (kept_from, device_key))
                db.execute("INSERT INTO pruning (device_key, kept_from) VALUES (?, ?)", (device_key, kept_from))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return device_key, kept_from

    def prune_device(self, db: sqlite3.Connection, device_key: int, kept_from: int) -> None:
        deleted = db.execute(
            "DELETE FROM online_hours WHERE device_key = :key AND hour IN"
            " (SELECT hour FROM online_hours WHERE device_key = :key AND hour < :hour LIMIT :rows)",
            {"key": device_key, "hour": kept_from // 60, "rows": ROWS_PER_STEP},
        ).rowcount
        deleted += db.execute(
            "DELETE FROM uploads WHERE device_key = :key AND number IN"
            " (SELECT number FROM uploads WHERE device_key = :key AND sent_at < :second LIMIT :rows)",
            {"key": device_key, "second": kept_from * 60, "rows": ROWS_PER_STEP - deleted},
        ).rowcount
        if deleted < ROWS_PER_STEP:
            db.execute("DELETE FROM pruning WHERE device_key = ?", (device_key,))

    def prune_history(self, db: sqlite3.Connection, before_ms: int) -> bool:
        """Alerts dealt with, and outages ended, before before_ms; True if any went.
        Both are read along an index from their oldest, so a step costs its rows."""
        deleted = db.execute(
            "DELETE FROM alerts WHERE id IN (SELECT id FROM alerts WHERE at_ms < ? AND delivered <> 0 LIMIT ?)",
            (before_ms, ROWS_PER_STEP)).rowcount
        deleted += db.execute(
            "DELETE FROM outages WHERE (device_key, started_ms) IN (SELECT device_key, started_ms FROM outages"
            " WHERE ended_ms < ? ORDER BY ended_ms LIMIT ?)", (before_ms, ROWS_PER_STEP)).rowcount
        return deleted > 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--keep-days", type=whole_number(1, 100_000, "a whole number of days, 1 or more"), metavar="N",
                        help="prune raw telemetry more than N days older than each device's newest (default: keep "
                        "everything); stats are kept whole")
