"""Who is down: each device's status, its outages, and the watch that declares it down.

A device is heard when fleetmon accepts its telemetry, by fleetmon's own clock: its
sent_at may be late, replayed or wrong. Deadlines are elapsed time (time.monotonic(),
which no clock change moves); what a person reads is the wall clock (fleetmon.now_ms()).
A device heard again after an outage is up again in the same statement that stores its
telemetry (schema.sql, note_up_again); going down is the watch's to notice.
"""

import argparse
import math
import sqlite3
import threading
import time
from collections import OrderedDict

import alerts
from fleetmon import DEFAULT_DOWN_AFTER_SECONDS, transaction

# A device's status, as a condition on its row in `devices`: the one definition that the
# lists, the pages, the counts and the metrics use.
STATUSES = {
    "up": "last_heard_ms IS NOT NULL AND down_since_ms IS NULL",
    "down": "down_since_ms IS NOT NULL",
    "never": "last_heard_ms IS NULL",
}
OUTAGES_SHOWN = 20


def status_of(device: sqlite3.Row) -> str:
    """STATUSES, for a row already read."""
    if device["last_heard_ms"] is None:
        return "never"
    return "down" if device["down_since_ms"] is not None else "up"


def read_outages(db: sqlite3.Connection, device_key: int) -> list[tuple[int, int | None]]:
    """A device's latest outages, newest first: (started_ms, ended_ms, None while it lasts)."""
    return db.execute("SELECT started_ms, ended_ms FROM outages WHERE device_key = ? ORDER BY started_ms DESC LIMIT ?",
                      (device_key, OUTAGES_SHOWN)).fetchall()


def mark_down(db: sqlite3.Connection, device_id: str, last_heard_ms: int, at_ms: int) -> bool:
    """Declare a device down, unless it was heard again since last_heard_ms: its outage
    starts when it was last heard, and the change is queued as an alert in the same
    transaction. False if it was heard meanwhile."""
    with transaction(db):
        changed = db.execute(
            "UPDATE devices SET down_since_ms = last_heard_ms"
            " WHERE device_id = ? AND last_heard_ms = ? AND down_since_ms IS NULL RETURNING device_key",
            (device_id, last_heard_ms),
        ).fetchall()
        if not changed:
            return False
        device_key = changed[0]["device_key"]
        db.execute("INSERT INTO outages (device_key, started_ms) VALUES (?, ?)", (device_key, last_heard_ms))
        alerts.queue(db, device_key, "down", at_ms, last_heard_ms)
    return True


class Watch:
    """Who is due to be declared down, soonest first, and the server window's line for
    each change of status.

    Devices in the order they were last heard: the first is the one whose deadline comes
    first, so a check reads only the devices that are overdue, whatever the fleet's size,
    and hearing a device costs a move to the end. After a start, every device that was
    up is given the down-after time from then: fleetmon's own downtime is not theirs.
    """

    def __init__(self, db: sqlite3.Connection, down_after_seconds: float, started: float, announce=print):
        self.down_after = down_after_seconds
        self.announce = announce
        self.wake_delivery = threading.Event()
        self._due: OrderedDict[str, tuple[float, int]] = OrderedDict()  # device_id: (heard, heard_at_ms)
        self._lock = threading.Lock()
        for row in db.execute("SELECT device_id, last_heard_ms FROM devices WHERE listed"
                              f" AND {STATUSES['up']} ORDER BY last_heard_ms"):
            self._due[row["device_id"]] = (started, row["last_heard_ms"])
        self.announced = alerts.newest_id(db)

    def heard(self, device_id: str, heard_at_ms: int, monotonic_now: float | None = None) -> None:
        """A listener of fleetmon.tell_heard(): runs in the request, after its commit."""
        with self._lock:
            self._due[device_id] = (time.monotonic() if monotonic_now is None else monotonic_now, heard_at_ms)
            self._due.move_to_end(device_id)

    def check(self, db: sqlite3.Connection, monotonic_now: float, now: int) -> int:
        """Declare down every device not heard for down_after; returns how many."""
        with self._lock:
            overdue = []
            while self._due:
                device_id, (heard_at, heard_at_ms) = next(iter(self._due.items()))
                if heard_at + self.down_after > monotonic_now:
                    break
                del self._due[device_id]
                overdue.append((device_id, heard_at_ms))
        declared = 0
        for number, (device_id, heard_at_ms) in enumerate(overdue):
            try:
                declared += mark_down(db, device_id, heard_at_ms, now)
            except sqlite3.Error:
                with self._lock:  # due again at the next check, first in line, unless heard meanwhile
                    for overdue_id, at_ms in reversed(overdue[number:]):
                        if overdue_id not in self._due:
                            self._due[overdue_id] = (monotonic_now - self.down_after, at_ms)
                            self._due.move_to_end(overdue_id, last=False)
                raise
        return declared

    def tell_changes(self, db: sqlite3.Connection) -> list[sqlite3.Row]:
        """Tell every change since the last call, those of requests too (a device up
        again), a line each; returns their alerts."""
        changes = alerts.read_since(db, self.announced)
        for alert in changes:
            self.announce(alerts.text_of(alert))
            self.announced = alert["id"]
        if changes:
            self.wake_delivery.set()
        return changes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--down-after", type=seconds_argument, default=DEFAULT_DOWN_AFTER_SECONDS, metavar="TIME",
                        help="a device not heard for this long is down: seconds, or with s, m or h (default 5m)")


def seconds_argument(text: str) -> float:
    """--down-after: seconds, or a number with s, m or h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"{text!r} is not a time: give seconds, or a number with s, m or h, like 5m")
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not more than no time at all: give a time like 5m")
    return seconds
